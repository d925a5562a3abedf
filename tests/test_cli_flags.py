"""`retriever-server serve` and `router` refuse impossible flags up front, in one line naming the flag and
the value: numbers no server can work with, a health host the whole-datastore launcher cannot probe, an
address file that is a directory, TLS files that do not match, a metrics port already taken."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from retriever_server import cli
from retriever_server.datastore.manifest import FileEntry, Manifest, ShardEntry, write_manifest
from retriever_server.security.certs import make_ca, make_leaf, write_private

# a log record ("2026-01-01 10:00:00,123 INFO ..."), not the command's message
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


@pytest.fixture
def datastore(tmp_path: Path) -> Path:
    """A datastore of two shards whose manifest is valid but whose shard files are missing: anything that
    gets as far as loading a shard fails there, so an error about a flag proves it was refused first."""
    out = tmp_path / "ds"
    out.mkdir()
    files = {"index.faiss": FileEntry(bytes=1, sha256="0" * 64)}  # listed, not there
    shards = (ShardEntry("shard-00000", 0, 10, files), ShardEntry("shard-00001", 10, 20, files))
    write_manifest(out, Manifest(dimension=8, metric="l2", factory="Flat", ntotal=20, nlist=1, default_nprobe=1,
                                 has_keys=False, payloads=(), shards=shards))
    return out


@pytest.fixture(autouse=True)
def keep_logging(monkeypatch) -> None:
    """The commands run in this process leave the test session's logging as it is."""
    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)


def error_of(capsys, *argv: str) -> str:
    """Runs the command in this process; returns its one error line (failing if it printed more)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as stop:  # argparse's exit, for a refused flag
        code = stop.code
    assert code != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retriever_server.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("flag, value, words", [
    ("--max-k", "-3", "the count must be in [1, 2147483647], got -3"),
    ("--max-inflight", "0", "the count must be in [1, 2147483647], got 0"),
    ("--max-batch", "0", "the count must be in [1, 2147483647], got 0"),
    ("--max-request-mb", "0", "MiB must be in [1, 2047], got 0"),
    ("--max-request-mb", "4096", "MiB must be in [1, 2047], got 4096"),  # past gRPC's int32 of bytes
    ("--grace", "-1", "must be a finite number of 0 or more, got -1"),
    ("--grace", "nan", "must be a finite number of 0 or more, got nan"),
    ("--grace", "soon", "expected a number, got 'soon'"),
    ("--drain-delay", "-5", "must be a finite number of 0 or more, got -5"),
    ("--hedge-delay-ms", "-1", "must be a finite number of 0 or more, got -1"),
    ("--hedge-delay-ms", "inf", "must be a finite number of 0 or more, got inf"),
])
@pytest.mark.parametrize("command", [["serve", "--datastore", "ds", "--shard", "0"], ["router", "--shards", "a:1"]])
def test_impossible_numbers_are_refused_naming_the_flag_and_value(capsys, command, flag, value, words):
    line = error_of(capsys, *command, flag, value)
    assert line == f"retriever-server {command[0]}: error: argument {flag}: {words} (see --help)"


@pytest.mark.parametrize("flag, value, words", [
    ("--threads", "-2", "a thread count (0: FAISS's default) must be in [0, 4096], got -2"),
    ("--replica", "-1", "a replica number must be in [0, 2147483647], got -1"),
])
def test_impossible_shard_numbers_are_refused(capsys, flag, value, words):
    line = error_of(capsys, "serve", "--datastore", "ds", "--shard", "0", flag, value)
    assert line == f"retriever-server serve: error: argument {flag}: {words} (see --help)"


@pytest.mark.parametrize("command, flag, value, words", [
    (["deploy", "--datastore", "ds"], "--cpus-per-shard", "0", "must be a finite number above 0, got 0"),
    (["deploy", "--datastore", "ds"], "--cpus-per-shard", "nan", "must be a finite number above 0, got nan"),
    (["deploy", "--datastore", "ds"], "--timeout", "inf", "must be a finite number above 0, got inf"),
    (["deploy", "--datastore", "ds"], "--timeout", "-1", "must be a finite number above 0, got -1"),
    (["deploy", "--datastore", "ds"], "--num-cpus", "-1", "the count must be in [1, 2147483648], got -1"),
    (["deploy", "--datastore", "ds"], "--namespace", "", "a Ray namespace cannot be empty"),
    (["undeploy", "--name", "x"], "--grace", "nan", "must be a finite number of 0 or more, got nan"),
    (["undeploy", "--name", "x"], "--grace", "-1", "must be a finite number of 0 or more, got -1"),
    (["build", "k.npy", "--out", "x"], "--cpus-per-shard", "0", "the count must be in [1, 2147483648], got 0"),
    (["build", "k.npy", "--out", "x"], "--num-cpus", "0", "the count must be in [1, 2147483648], got 0"),
])
def test_impossible_ray_numbers_are_refused_naming_the_flag_and_value(capsys, command, flag, value, words):
    """Before any cluster is joined: a value Ray would refuse in its own words, wait on for ever, or
    half-apply (an undeploy that drained the router, then failed on nan)."""
    line = error_of(capsys, *command, f"{flag}={value}")
    assert line == f"retriever-server {command[0]}: error: argument {flag}: {words} (see --help)"


def test_the_special_values_keep_their_meaning():
    parse = cli.build_parser().parse_args
    args = parse(["serve", "--datastore", "ds", "--threads", "0", "--grace", "0", "--drain-delay", "0",
                  "--hedge-delay-ms", "0", "--metrics-port", "-1", "--health-port", "0", "--max-request-mb", "2047"])
    assert (args.threads, args.grace, args.drain_delay, args.hedge_delay_ms) == (0, 0.0, 0.0, 0.0)
    assert (args.metrics_port, args.health_port, args.max_request_mb) == (-1, 0, 2047)
    assert parse(["router", "--shards", "a:1", "--hedge-delay-ms", "12.5"]).hedge_delay_ms == 12.5


@pytest.mark.parametrize("command", [["serve"], ["deploy", "--address", "127.0.0.1:1"]])
def test_a_whole_datastore_leaves_its_shards_room_under_grpcs_request_limit(capsys, datastore, command):
    line = error_of(capsys, *command, "--datastore", str(datastore), "--max-request-mb", "2047")
    assert line.endswith("error: --max-request-mb 2047: with shards behind a router at most 2046 (each shard takes "
                         "1 MiB more than the router)")


@pytest.mark.parametrize("host", ["192.0.2.7", "[::1]", "::1", "127.0.0.2", "::"])
def test_a_whole_datastore_refuses_a_health_host_it_cannot_probe_before_starting(capsys, datastore, host):
    """serve asks its children's health ports on 127.0.0.1: a loopback address other than that one (taken
    before, and then waited on for the whole start-up timeout) is refused as any other."""
    line = error_of(capsys, "serve", "--datastore", str(datastore), "--health-port", "7904", "--health-host", host)
    assert line.startswith(f"retriever-server serve: error: --health-host {host}: without --shard the router's "
                           "health port must answer on 127.0.0.1, where serve checks it"), line


def test_an_address_file_that_is_a_directory_is_refused_before_starting(capsys, datastore, tmp_path):
    folder = tmp_path / "somedir"
    folder.mkdir()
    line = error_of(capsys, "serve", "--datastore", str(datastore), "--address-file", str(folder))
    assert line == f"retriever-server serve: error: --address-file {folder} is a directory: give the name of a file " \
                   "to write"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "somedir"]  # no somedir.tmp left behind


def test_deploys_address_file_that_is_a_directory_is_refused_before_joining_a_cluster(capsys, datastore, tmp_path):
    folder = tmp_path / "somedir"
    folder.mkdir()
    line = error_of(capsys, "deploy", "--datastore", str(datastore), "--host", "127.0.0.1", "--address", "127.0.0.1:1",
                    "--address-file", str(folder))  # a cluster that does not answer: refused before trying it
    assert line == f"retriever-server deploy: error: --address-file {folder} is a directory: give the name of a " \
                   "file to write"


def test_deploy_on_node_ips_without_tls_is_refused_before_joining_a_cluster(capsys, datastore):
    line = error_of(capsys, "deploy", "--datastore", str(datastore), "--address", "127.0.0.1:1")
    assert line.startswith("retriever-server deploy: error: refusing to serve a node's IP without TLS"), line


def test_a_tls_certificate_and_key_that_do_not_match_are_refused_before_starting(capsys, datastore, tmp_path):
    ca = make_ca("test CA")
    cert = write_private(tmp_path / "a.pem", make_leaf(ca, "a", ["127.0.0.1"]).cert_pem)
    key = write_private(tmp_path / "b.key", make_leaf(ca, "b", ["127.0.0.1"]).key_pem)
    line = error_of(capsys, "serve", "--datastore", str(datastore), "--tls-cert", str(cert), "--tls-key", str(key))
    assert line.startswith(f"retriever-server serve: error: --tls-cert {cert} and --tls-key {key} are not a PEM "
                           "certificate and its unencrypted private key"), line


@pytest.mark.parametrize("command", [["serve", "--shard", "0"], ["router", "--shards", "127.0.0.1:1"]])
def test_a_metrics_port_in_use_is_named(datastore, command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [*command, "--datastore", str(datastore)] if command[0] == "serve" else command
        result = run(*argv, "--metrics-port", str(port))
    lines = [line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines == [f"retriever-server {command[0]}: error: --metrics-port {port}: could not bind the metrics port "
                     f"127.0.0.1:{port} (Address already in use)"]


@pytest.mark.parametrize("flag, what", [("--port", ""), ("--health-port", "the health port ")])
def test_a_port_in_use_is_one_line_without_grpcs_own(flag, what):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("router", "--shards", "127.0.0.1:1", "--metrics-port", "-1", flag, str(port))
    lines = [line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert result.returncode == 1 and lines == [f"retriever-server router: error: could not bind {what}127.0.0.1:"
                                                f"{port} (Address already in use)"], result.stderr


def test_an_address_file_holding_something_else_is_left_as_it_is(capsys, datastore, tmp_path):
    """--address-file naming a file that is not a server's address: refused, the file kept (it used to be
    removed as a stale address before the server even bound its port)."""
    kept = tmp_path / "important.txt"
    kept.write_text("keep\n")
    line = error_of(capsys, "serve", "--datastore", str(datastore), "--shard", "1", "--address-file", str(kept))
    assert line == f"retriever-server serve: error: --address-file {kept} holds something other than a server's " \
                   "address: refusing to replace it; give the name of a new file"
    assert kept.read_text() == "keep\n"


def test_a_shard_that_fails_to_load_leaves_no_address_file(capsys, datastore, tmp_path):
    """The address is written once the port is bound, before the shard loads; a load that fails takes it
    away again, and a stale address file of an earlier server is replaced, not refused."""
    address_file = tmp_path / "shard.json"
    crashed = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed.wait()
    address_file.write_text(json.dumps({"address": "127.0.0.1:1", "pid": crashed.pid}))  # left by a crash
    line = error_of(capsys, "serve", "--datastore", str(datastore), "--shard", "0", "--metrics-port", "-1",
                    "--address-file", str(address_file))
    assert line.startswith("retriever-server serve: error: ") and "shard-00000" in line, line
    assert not address_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no probe or .tmp left behind


@pytest.mark.parametrize("name", ["a/b", ""])
def test_a_deployment_name_no_actor_can_take_is_refused_naming_the_flag(capsys, datastore, name):
    line = error_of(capsys, "deploy", "--datastore", str(datastore), "--host", "127.0.0.1", "--address", "127.0.0.1:1",
                    "--name", name)  # a cluster that does not answer: refused before trying it
    assert line == f"retriever-server deploy: error: --name {name!r}: a deployment's name is non-empty and holds no " \
                   "'/' (its actors are named NAME/...)"


def test_a_request_as_large_as_a_server_takes_can_be_sent_to_it():
    """--max-request-mb goes up to 2047 MiB, but the router's channels to its shards (and the client's)
    sent at most 1 GiB: a request the router took failed on the way to the shards. Their send limit is
    now gRPC's largest, the receiving server's own limit the bound."""
    from retriever_server.cli.common import MAX_REQUEST_MB
    from retriever_server.serving.grpc_setup import CHANNEL_OPTIONS

    assert dict(CHANNEL_OPTIONS)["grpc.max_send_message_length"] >= (MAX_REQUEST_MB << 20) == 2047 << 20


def test_cores_the_system_refuses_are_one_line_naming_cpus(capsys, datastore, monkeypatch):
    """--cpus with a core outside the container's cpuset (the system's EINVAL, injected here): one line
    naming --cpus and the cores, where it was a traceback's bare "[Errno 22] Invalid argument"."""
    import errno
    import os

    def refused(pid, cpus):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "sched_setaffinity", refused)
    line = error_of(capsys, "serve", "--datastore", str(datastore), "--shard", "0", "--cpus", "0")
    assert line == "retriever-server serve: error: --cpus: cannot run on cores 0 (Invalid argument): give cores " \
                   "this container or cgroup allows (see /sys/fs/cgroup/cpuset.cpus.effective)"
