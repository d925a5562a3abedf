"""The `retriever-server` command: bad arguments and missing files in one line, no traceback."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import synthetic

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")  # a server's log record, not the CLI's message


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "retriever_server.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(result, words):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert words in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["build", "missing.npy", "--out", "x"], "keys file missing.npy not found"),
        (["build", "k.npy"], "the following arguments are required: --out"),
        (["build", "k.npy", "--out", "x", "--payload", "oops"], "expected NAME=VALUE"),
        (["build", "k.npy", "--out", "x", "--shards", "lots"], "invalid int value"),
        (["serve", "--datastore", "nowhere", "--shard", "0"], "nowhere/manifest.json not found"),
        (["serve", "--datastore", "nowhere"], "nowhere/manifest.json not found"),
        (["router", "--shards", ","], "no shard addresses"),
        (["serve", "--datastore", ".", "--shard", "0"], "manifest.json not found: not a datastore"),
        (["info", "nowhere"], "UNAVAILABLE"),
        (["search", "127.0.0.1:1", "--queries", "missing.npy"], "queries file missing.npy not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "k.npy", synthetic(50, 8))
    one_line_error(run(*args), words)


@pytest.mark.slow
def test_build_info_and_refused_tampered_shard(tmp_path):
    np.save(tmp_path / "k.npy", synthetic(3000, 8))
    np.save(tmp_path / "v.npy", np.arange(3000, dtype=np.int64))
    built = run("build", str(tmp_path / "k.npy"), "--out", str(tmp_path / "ds"), "--shards", "2", "--factory",
                "IVF8,PQ4", "--payload", f"values={tmp_path / 'v.npy'}", "--meta", "encoder=test", "--num-cpus", "1",
                "--no-progress", timeout=300)
    assert built.returncode == 0, built.stderr
    assert "built" in built.stdout and "3000 rows, 2 shards" in built.stdout
    info = run("info", str(tmp_path / "ds"), "--json")
    body = json.loads(info.stdout)
    assert body["metadata"] == {"encoder": "test"} and body["ntotal"] == 3000
    index = tmp_path / "ds" / "shard-00001" / "index.faiss"
    index.write_bytes(index.read_bytes()[:-10] + b"0123456789")
    one_line_error(run("serve", "--datastore", str(tmp_path / "ds"), "--shard", "1", "--metrics-port", "-1"),
                   "shard-00001/index.faiss checksum does not match")
    one_line_error(run("serve", "--datastore", str(tmp_path / "ds")), "shard-00001/index.faiss checksum")
