"""Encode's inputs and outputs, checked: a replaced source's leftovers are found by their exact names, a
malformed source.json is one line, a split of another tokenizer and chunks longer than the encoding LM
takes are refused before Ray starts, a worker no node can take is refused on the job's own cluster, and a
vector cache smaller than asked for is refused."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stdlib_data

from lm_worker.cli import main
from lm_worker.cli.common import folder_kind
from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.encoders.stdlib_vectors import load_cached
from lm_worker.jobs.encode_job import run_encode_job
from lm_worker.jobs.encode_plan import EncodeJobConfig, no_room_for_a_worker, plan_parts
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.sources.output import check_out, new_source
from lm_worker.sources.source import read_source

QUIET = ["--no-progress", "--log-level", "WARNING"]


def one_line_error(capsys, *args) -> str:
    code = main([*QUIET, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return stdlib_data(tmp_path_factory.mktemp("data"), 300, chars=3000)


@pytest.fixture(scope="module")
def short_lm(data, tmp_path_factory) -> Path:
    """A tiny LM of max_len 16, of `data`'s tokenizer."""
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(vocab_size=300, max_len=16)).eval()
    path = tmp_path_factory.mktemp("lm") / "checkpoint.pt"
    save_checkpoint(path, kind="lm", model=lm, config=lm.config, step=0,
                    tokenizer_fingerprint=TokenStore.open(data / "train").tokenizer_fingerprint, extra={})
    return path


# 1. a replacement's leftovers are found by their exact names


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_name_with_glob_characters_finds_its_own_leftovers_and_no_others(tmp_path):
    other = tmp_path / ".src1.replaced-deadbeef"  # src1's only copy: its replacement killed between the renames
    other.mkdir()
    (other / "source.json").write_text('{"who": "src1"}')
    own = tmp_path / ".src[1].replaced-0123abcd"  # src[1]'s own, killed the same way
    own.mkdir()
    (own / "source.json").write_text('{"who": "src[1]"}')
    with new_source(tmp_path / "src[1]") as work:
        assert (tmp_path / "src[1]" / "source.json").read_text() == '{"who": "src[1]"}'  # put back first
        (work / "source.json").write_text('{"who": "new"}')
    assert sorted(p.name for p in tmp_path.iterdir()) == [".src1.replaced-deadbeef", "src[1]"]
    assert (other / "source.json").read_text() == '{"who": "src1"}'
    assert (tmp_path / "src[1]" / "source.json").read_text() == '{"who": "new"}'


def test_a_plain_name_leaves_the_leftovers_of_a_longer_one(tmp_path):
    """`b` and `b.replaced-1` are two outputs: the leftovers of the second are not the first's."""
    theirs = tmp_path / ".b.replaced-1.replaced-0123abcd"
    theirs.mkdir()
    (theirs / "source.json").write_text("{}")
    work = tmp_path / ".b.encoding-x.encoding-0123456789ab"  # a killed encode of output `b.encoding-x`
    work.mkdir()
    (work / ".encoding-owner").write_text(f"{_dead_pid()} {__import__('socket').gethostname()}")
    check_out(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [work.name, theirs.name]
    check_out(tmp_path / "b.encoding-x")  # its own encode reaps it
    assert sorted(p.name for p in tmp_path.iterdir()) == [theirs.name]


# 2. a malformed source.json is one line


def _source(folder: Path, **fields) -> Path:
    body = {"kind": "retro", "rows": 4, "dimension": 8, "tokenizer_fingerprint": "t", "encoder_fingerprint": "e",
            "chunk_len": 2, "details": {}, **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "source.json").write_text(json.dumps(body))
    return folder


@pytest.mark.parametrize("field, value, says", [
    ("kind", ["x"], "records kind ['x'], not one of 'knnlm', 'retro'"),
    ("kind", 3, "records kind 3, not one of 'knnlm', 'retro'"),
    ("details", [], "records details [], not an object"),
    ("rows", -1, "records rows -1, not an integer >= 0"),
    ("rows", True, "records rows True, not an integer >= 0"),
    ("dimension", 8.5, "records dimension 8.5, not an integer >= 0"),
    ("chunk_len", "2", "records chunk_len '2', not an integer >= 0"),
    ("tokenizer_fingerprint", 7, "records tokenizer_fingerprint 7, not a string"),
    ("encoder_fingerprint", None, "records encoder_fingerprint None, not a string"),
])
def test_a_source_json_of_wrong_types_is_named(tmp_path, field, value, says):
    folder = _source(tmp_path / "src", **{field: value})
    with pytest.raises(ValueError) as err:
        read_source(folder)
    assert str(err.value) == f"{folder / 'source.json'} {says}"


def test_a_long_bad_field_is_cut(tmp_path):
    folder = _source(tmp_path / "src", kind=["x" * 500])
    with pytest.raises(ValueError) as err:
        read_source(folder)
    assert len(str(err.value)) < len(str(folder)) + 150


def test_build_of_a_malformed_source_is_one_line(tmp_path, capsys):
    folder = _source(tmp_path / "src", details=[])
    err = one_line_error(capsys, "build", folder, "--out", tmp_path / "ds")
    assert err == f"lm-worker build: error: {folder / 'source.json'} records details [], not an object"


def test_folder_kind_takes_a_kind_that_is_no_string_as_unknown(tmp_path):
    assert folder_kind(_source(tmp_path / "a", kind=["x"])) == "a datastore source"
    assert folder_kind(_source(tmp_path / "b", kind={"k": 1})) == "a datastore source"
    assert folder_kind(_source(tmp_path / "c", kind="knnlm")) == "a kNN-LM source"


# 3. the kNN-LM job refuses a split of another tokenizer


def test_the_knnlm_job_refuses_a_split_of_another_tokenizer(data, short_lm, tmp_path):
    other = tmp_path / "data"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    store = write_token_store(other / "train", [("d", list(range(1, 40)))], 0, "another-tokenizer")
    config = EncodeJobConfig(kind="knnlm", data=other, checkpoint=short_lm, context_len=16, stride=8, progress=False)
    ours = TokenStore.open(data / "train").tokenizer_fingerprint
    with pytest.raises(ValueError) as err:
        run_encode_job(config, tmp_path / "src")
    assert str(err.value) == f"{store.directory} was tokenized with another-tokenizer, not {ours}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_knnlm_job_needs_the_tokenizer(short_lm, tmp_path):
    config = EncodeJobConfig(kind="knnlm", data=tmp_path, checkpoint=short_lm, progress=False)
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer.json \(run lm-worker prepare\)$"):
        run_encode_job(config, tmp_path / "src")


# 4. kNN-LM parts hold whole batches of windows, as --help says


def test_rows_per_part_help_says_the_rounding(capsys):
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "kNN-LM parts hold whole batches of 16 windows: at least 16 x --stride rows" in text


def test_rows_per_part_is_rounded_up_to_whole_batches_of_windows(tmp_path):
    """1650 rows at a stride of 100 take 17 windows, so 2 batches of 16: parts of 3200 rows (the first keys
    256 more), never fewer rows than asked for; a count that is whole batches already stays as it is."""
    config = EncodeJobConfig(kind="knnlm", data=tmp_path, checkpoint=tmp_path, context_len=256, stride=100,
                             rows_per_part=1650)
    plan = plan_parts(config, 1 + 256 + 47 * 100)  # 48 windows
    assert [(p.first, p.last) for p in plan] == [(0, 32), (32, 48)]
    assert [p.row_end - p.row_start for p in plan] == [256 + 31 * 100, 1600]
    assert all(p.row_end - p.row_start >= 1650 for p in plan[:-1])
    exact = plan_parts(dataclasses.replace(config, rows_per_part=3200), 1 + 256 + 47 * 100)
    assert exact == plan  # 32 windows exactly: the plan (and so the job) of an earlier run is unchanged
    defaults = plan_parts(EncodeJobConfig(kind="knnlm", data=tmp_path, stride=128), 1 + 256 + 1199 * 128)
    assert [p.last - p.first for p in defaults] == [512, 512, 176]  # 65536 rows: 512 windows, as before


# 5. a vector cache smaller than asked for is refused


def test_load_cached_refuses_a_cache_smaller_than_asked(tmp_path):
    for name, rows in (("keys", 5), ("tokens", 5), ("doc_ids", 5), ("queries", 2), ("query_tokens", 2)):
        np.save(tmp_path / f"{name}.npy", np.zeros((rows, 3), np.float32))
    (tmp_path / "docs.json").write_text("[]")
    assert len(load_cached(tmp_path, 5, 2).keys) == 5
    with pytest.raises(ValueError) as err:
        load_cached(tmp_path, 6, 2)
    assert str(err.value) == f"{tmp_path} holds 5 keys and 2 queries, fewer than the 6 keys and 2 queries asked for"
    with pytest.raises(ValueError, match="holds 5 keys and 2 queries, fewer than the 5 keys and 3 queries"):
        load_cached(tmp_path, 5, 3)


# 6. RETRO chunks longer than the encoding LM takes


def test_encode_retro_refuses_chunks_longer_than_the_lm_takes(data, short_lm, tmp_path, capsys):
    for workers in ("0", "2"):
        err = one_line_error(capsys, "encode", "retro", "--encoder", "lm", "--checkpoint", short_lm, "--data", data,
                             "--out", tmp_path / "src", "--chunk-len", "17", "--workers", workers)
        assert err == (f"lm-worker encode: error: --chunk-len 17 exceeds the max_len 16 of the LM at {short_lm}, "
                       "which embeds each chunk whole")
    config = EncodeJobConfig(kind="retro", data=data, encoder="lm", checkpoint=short_lm, chunk_len=17, progress=False)
    with pytest.raises(ValueError) as err:
        run_encode_job(config, tmp_path / "src")
    assert str(err.value) == (f"chunk_len 17 exceeds the max_len 16 of the LM at {short_lm}, which embeds each "
                              "chunk whole")
    assert not list(tmp_path.iterdir())


# 7. a worker no node can take


def test_a_worker_no_node_can_take_is_named(tmp_path):
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}]
    config = EncodeJobConfig(kind="retro", data=tmp_path, num_cpus=4)
    assert no_room_for_a_worker(config, nodes) == ("no node of the Ray cluster can take an encode worker of 4 CPUs "
                                                   "(--worker-cpus): its live nodes have at most 2 CPUs")
    gpu = EncodeJobConfig(kind="retro", data=tmp_path, num_cpus=2, device="cuda")
    assert no_room_for_a_worker(gpu, nodes) == ("no node of the Ray cluster can take an encode worker of 2 CPUs "
                                                "(--worker-cpus) and 1 GPU (--device cuda): its live nodes have at "
                                                "most 2 CPUs, 1 GPU")
    assert no_room_for_a_worker(EncodeJobConfig(kind="retro", data=tmp_path, num_cpus=2), nodes) == ""
    assert no_room_for_a_worker(EncodeJobConfig(kind="retro", data=tmp_path, num_cpus=1, device="cuda"), nodes) == ""


def test_the_job_refuses_a_worker_its_own_cluster_cannot_take(data, short_lm, tmp_path, monkeypatch):
    """On a cluster the job started itself no node will join: Ray Data would wait for the workers forever."""
    import ray

    import lm_worker.jobs.encode_job

    monkeypatch.setattr(lm_worker.jobs.encode_job, "connect", lambda *args, **kwargs: True)  # started its own
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    config = EncodeJobConfig(kind="knnlm", data=data, checkpoint=short_lm, context_len=16, stride=8, num_cpus=4,
                             progress=False)
    with pytest.raises(ValueError) as err:
        run_encode_job(config, tmp_path / "src")
    assert str(err.value) == ("no node of the Ray cluster can take an encode worker of 4 CPUs (--worker-cpus): its "
                              "live nodes have at most 2 CPUs; this job's own cluster takes no other node: ask for "
                              "less, or give --address of a cluster that has one")
    assert not list(tmp_path.iterdir())  # refused before its work folder (or anything else) was written
