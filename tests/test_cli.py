"""The `retriever-server` command: bad arguments and missing files in one line, no traceback."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import build, synthetic

from retriever_server import cli
from retriever_server.cli import serve
from retriever_server.serving.grpc_setup import health_status

# a log record (the project's, or one from Ray's core: "[2026-... W pid tid] ..."), not the CLI's message
LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+ |[A-Z] \d+ \d+\] )")


def run(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "retriever_server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


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
        (["build", "k.npy", "--out", "x", "--shards", "lots"], "argument --shards: expected an integer, got 'lots'"),
        (["serve", "--datastore", "nowhere", "--shard", "0"], "nowhere/manifest.json not found"),
        (["serve", "--datastore", "nowhere"], "nowhere/manifest.json not found"),
        (["router", "--shards", ","], "no shard addresses"),
        (["router", "--shards", "a:1", "--cpus", "1-x"], "argument --cpus: '1-x' is not a list of cores"),
        (["serve", "--datastore", ".", "--cpus", "4096"], "argument --cpus: cores '4096': this machine has cores"),
        (["serve", "--datastore", ".", "--cpus", "0-99999999999"],  # made a set of 10^11 cores first
         "argument --cpus: cores '0-99999999999': this machine has cores"),
        (["info", "127.0.0.1:1", "--timeout", "1e10"],  # gRPC's deadline overflowed: DEADLINE_EXCEEDED at once
         "argument --timeout: must be a finite number of seconds in (0, 1e+06], got 1e10"),
        (["serve", "--datastore", ".", "--shard", "0"], "manifest.json not found: not a datastore"),
        (["info", "nowhere"], "'nowhere' is neither a datastore directory nor a server's HOST:PORT"),
        (["info", "127.0.0.1:1"], "UNAVAILABLE"),
        (["search", "127.0.0.1:1", "--queries", "missing.npy"], "queries file missing.npy not found"),
        (["frobnicate"], "invalid choice"),
        (["deploy", "--datastore", "d", "--detached", "--num-cpus", "2"],
         "--num-cpus sizes the local cluster deploy starts; with --detached it joins a running one"),
        (["deploy", "--datastore", "d", "--address", "127.0.0.1:1", "--num-cpus", "2"],
         "--num-cpus sizes the local cluster deploy starts; with --address it joins a running one"),
        (["--log-level", "bogus", "info", "."], "argument --log-level: invalid choice: 'BOGUS'"),
        (["serve", "--datastore", ".", "--port", "99999"], "argument --port: a port must be in [0, 65535], got 99999"),
        (["router", "--shards", "a:1", "--metrics-port", "-2"], "argument --metrics-port: a port (-1: off) must be"),
        (["serve", "--datastore", ".", "--replicas", "0"], "argument --replicas: the count must be in [1, "),
        (["build", "k.npy", "--out", "x", "--seed", "-1"], "argument --seed: a seed must be in [0, 2147483646]"),
        (["build", "k.npy", "--out", "x", "--seed", "2147483648"], "a seed must be in [0, 2147483646], got 21"),
        (["search", "127.0.0.1:1", "--queries", "empty.npy"], "queries file empty.npy is not a loadable .npy array"),
        (["search", "127.0.0.1:1", "--queries", "k.npy", "--out", "."], "--out . is a directory: give the name of a"),
        (["search", "127.0.0.1:1", "--queries", "k.npy", "--out", "nowhere/found"],
         "--out nowhere/found: folder nowhere does not exist"),
        (["search", "127.0.0.1:72636", "--queries", "k.npy"], "'127.0.0.1:72636': the port must be a number in [1,"),
        (["info", "127.0.0.1:99999"], "address '127.0.0.1:99999': the port must be a number in [1, 65535]"),
        (["info", "127.0.0.1:1", "--tls-server-name", "router.internal"],
         "--tls-server-name needs TLS: give --tls-ca, the CA that signed the server's certificate"),
        (["router", "--shards", "127.0.0.1:7000,garbage"], "address 'garbage' names no port: give HOST:PORT"),
        (["router", "--shards", "a:1", "--address-file", "nowhere/a.json"],
         "--address-file nowhere/a.json: cannot write there (No such file or directory)"),
        (["router", "--shards", "a:1|b:2,a:1"], "address a:1 is given twice in 'a:1|b:2,a:1': each replica of each"),
        (["router", "--shards", "a:1,,b:2"], "an empty entry in 'a:1,,b:2': give each shard's addresses between"),
        (["search", "a:1,,b:2", "--queries", "k.npy"], "an empty entry in 'a:1,,b:2'"),
        (["search", "127.0.0.1:1", "--queries", "words.npy"], "queries file words.npy holds <U5 values: give float32"),
        (["build", "k.npy", "--out", "x", "--payload", "v=k.npy", "--payload", "v=k.npy"],
         "--payload v given twice: give each name once"),
        (["build", "k.npy", "--out", "x", "--meta", "a=1", "--meta", "a=2"],
         "--meta a given twice: give each name once"),
        (["build", "k.npy", "--out", "x", "--meta", "=v"],
         "argument --meta: expected NAME=VALUE with a name before '='"),
        (["build", "dir.npy", "--out", "x"], "keys file dir.npy is a directory, not a .npy array or a parts index"),
        (["search", "127.0.0.1:1", "--queries", "dir.npy"], "queries file dir.npy is a directory, not a .npy array"),
        (["build", "k.npy", "--out", "x", "--shards", "0"], "argument --shards: the count must be in [1, "),
        (["build", "k.npy", "--out", "x", "--metric", "cos"],
         "argument --metric: a metric must be l2, ip or inner_product, got 'cos'"),
        (["build", "k.npy", "--out", "x", "--train-size", "-1"], "argument --train-size: the number must be in [0, "),
        (["search", "127.0.0.1:1", "--queries", "k.npy", "-k", "0"], "argument -k: the count must be in [1, "),
        (["search", "127.0.0.1:1", "--queries", "k.npy", "--nprobe", "-1"], "argument --nprobe: the number must be in"),
        (["search", "127.0.0.1:1", "--queries", "k.npy", "--rerank", "-1"], "argument --rerank: the number must be in"),
        (["search", "127.0.0.1:1", "--queries", "z.npz"], "queries file z.npz is a .npz archive of arrays, not one"),
        (["search", "127.0.0.1:1", "--queries", "badzip.npy"], "queries file badzip.npy is not a loadable .npy array"),
        (["search", "127.0.0.1:1", "--queries", "huge.npy"],  # a header of 29 TiB over 8 bytes: nothing allocated
         "queries file huge.npy is not a loadable .npy array"),
        (["build", "z.npz", "--out", "x"], "keys file z.npz is not a loadable .npy array: z.npz is a .npz archive"),
        (["build", "keys.txt", "--out", "x"], "keys file keys.txt is not a loadable .npy array: keys.txt is not a "
                                              ".npy file (it does not start as np.save writes one)"),
        (["search", "127.0.0.1:1", "--queries", "keys.txt"], "queries file keys.txt is not a loadable .npy array: "
                                                             "keys.txt is not a .npy file"),
        (["router", "--shards", "a:1", "--address-file", "live.json"],  # it removed a running server's file
         f"--address-file live.json is the address of a server still running (pid {os.getpid()}): give another "
         "file, or stop that server first"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "k.npy", synthetic(50, 8))
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "words.npy", np.array(["hello", "world"]))
    (tmp_path / "dir.npy").mkdir()
    np.savez(tmp_path / "z.npz", synthetic(50, 8))  # as `search --out` writes its answers
    (tmp_path / "badzip.npy").write_bytes(b"PK\x03\x04 not a zip archive")
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 8)})
        f.write(bytes(8))
    np.savetxt(tmp_path / "keys.txt", synthetic(50, 8))  # numpy itself calls this "pickled data"
    (tmp_path / "live.json").write_text(json.dumps({"address": "127.0.0.1:1", "pid": os.getpid()}))  # this test's
    one_line_error(run(*args), words)
    assert (tmp_path / "live.json").is_file()


def test_serve_refuses_an_address_it_cannot_bind_and_flags_it_would_ignore(ray_cluster, tmp_path):
    """A --host that is no address of this machine is named before gRPC tries it (it used to read "in
    use?" after a C-level log line); a hedge delay with hedging off, or a --replica number without
    --shard, is refused instead of ignored."""
    datastore = build(tmp_path, synthetic(600, 8), "ds", shards=2, factory="IVF4,Flat")
    for args, words in (
            (["--shard", "0", "--host", "no such host!", "--insecure"],
             "could not bind no such host!:0: not an address of this machine"),
            (["--shard", "0", "--host", "192.0.2.1", "--insecure"], "could not bind 192.0.2.1:0: not an address of"),
            (["--hedge-delay-ms", "50", "--no-hedge"],
             "--hedge-delay-ms and --no-hedge: a hedge delay is for hedges, which --no-hedge turns off"),
            (["--replica", "2"], "--replica 2 numbers one shard's server (with --shard)")):
        one_line_error(run("serve", "--datastore", str(datastore), "--metrics-port", "-1", *args), words)


def test_search_rerank_takes_an_optional_candidate_count():
    parse = cli.build_parser().parse_args
    base = ["search", "127.0.0.1:1", "--queries", "q.npy"]
    assert parse(base).rerank is None  # no re-rank
    assert parse([*base, "--rerank"]).rerank == 0  # k candidates
    assert parse([*base, "--rerank", "100", "-k", "5"]).rerank == 100


def test_log_level_is_any_case():
    assert cli.build_parser().parse_args(["--log-level", "debug", "info", "x"]).log_level == "DEBUG"


@pytest.mark.parametrize(
    "error, shown",
    [
        (ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"),
         "Failed to connect to Ray cluster at 10.0.0.1:6379"),
        (RuntimeError("Ray says:\n  some context\n\n  the line that matters\n\n"), "the line that matters"),
        (PermissionError(13, "Permission denied", "/data/ds"), "[Errno 13] Permission denied: '/data/ds'"),
        (RuntimeError("FAILED_PRECONDITION: \x1b[2J\x1b]0;title\x07all good"),  # a server's words: no escape
         "FAILED_PRECONDITION: \\x1b[2J\\x1b]0;title\\x07all good"),         # reaches the terminal
    ],
)
def test_runtime_and_os_errors_are_one_line(monkeypatch, capsys, error, shown):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)
    monkeypatch.setitem(cli.COMMANDS, "build", fail)
    assert cli.main(["build", "k.npy", "--out", "x"]) == 1
    assert capsys.readouterr().err == f"retriever-server build: error: {shown}\n"


def test_interrupt_exits_130_and_says_so(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)
    monkeypatch.setitem(cli.COMMANDS, "info", interrupted)
    assert cli.main(["info", "x"]) == 130
    assert capsys.readouterr().err == "retriever-server info: interrupted\n"


def test_help_lists_every_command_on_one_line():
    listing = run("--help", env={**os.environ, "COLUMNS": "80"}).stdout
    for name, summary in [("build", "build a sharded datastore from an (N, d) .npy matrix"),
                          ("serve", "serve one shard, or every shard and a router"),
                          ("router", "serve the Retriever API in front of shards"),
                          ("info", "describe a datastore directory or a running server"),
                          ("search", "search a running server with queries from a .npy file")]:
        assert re.search(rf"^ +{name} +{re.escape(summary)}$", listing, re.M), listing
    serve = run("serve", "--help").stdout
    assert "Serve one shard, or every shard and a router." in serve and "SIGTERM drains" in serve


def reparse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_serve_datastore_passes_its_flags_to_the_children():
    args = reparse("serve", "--datastore", "ds", "--grace", "2.5", "--drain-delay", "0.25", "--max-k", "64",
                   "--threads", "3", "--no-verify", "--metrics-port", "9100", "--hedge-delay-ms", "30")
    shard_args, router_args = serve.child_args(args)
    shard = reparse("serve", "--datastore", "ds", "--shard", "0", *shard_args)
    router = reparse("router", "--shards", "127.0.0.1:1", *router_args)
    for child in (shard, router):
        assert (child.grace, child.drain_delay, child.max_k) == (2.5, 0.25, 64)
    assert (shard.threads, shard.no_verify, shard.metrics_port, router.metrics_port) == (3, True, 0, 9100)
    assert (router.hedge_delay_ms, router.no_hedge) == (30.0, False)
    assert shard.max_request_mb == router.max_request_mb + 1  # nothing the router accepts is too big for a shard
    off = reparse("serve", "--datastore", "ds", "--metrics-port", "-1")
    assert all(child[child.index("--metrics-port") + 1] == "-1" for child in serve.child_args(off))
    assert "--health-port" not in router_args  # the router picks one on 127.0.0.1, as the shards do...
    fixed = serve.child_args(reparse("serve", "--datastore", "ds", "--health-port", "7904", "--health-host", "0.0.0.0"))
    router = reparse("router", "--shards", "127.0.0.1:1", *fixed[1])
    assert (router.health_port, router.health_host) == (7904, "0.0.0.0") and "--health-port" not in fixed[0]  # ...or


def served_info_search_and_a_closed_pipe(datastore, directory_info: dict) -> None:
    """`serve` the datastore, then: `info` of the server has the fields of `info` of the directory;
    `search --payload` prints the payload; float64 queries are sent as float32 with a note; `info`
    into a pipe whose reader has gone ends quietly."""
    address_file = datastore.parent / "serve.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "retriever_server.cli", "serve", "--datastore", str(datastore),
                               "--address-file", str(address_file), "--metrics-port", "-1", "--health-port",
                               str(health_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not address_file.is_file():
            assert server.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)  # polling, with a deadline
        address = json.loads(address_file.read_text())["address"]
        assert json.loads(address_file.read_text())["health_port"] == health_port
        server.send_signal(signal.SIGHUP)  # every process reads its TLS and token files again; none stops
        assert health_status(f"127.0.0.1:{health_port}", timeout=5) == "SERVING"  # the router's, as given
        served = json.loads(run("info", address, "--json").stdout)
        assert served.keys() == directory_info.keys()
        same = ("dimension", "metric", "factory", "ntotal", "nlist", "default_nprobe", "has_keys",
                "datastore_version", "datastore_checksum", "shards", "payloads", "metadata")
        assert {k: served[k] for k in same} == {k: directory_info[k] for k in same}
        assert (served["role"], directory_info["role"]) == ("router", "datastore")
        np.save(datastore.parent / "q64.npy", synthetic(2, 8).astype(np.float64))
        found = run("search", address, "--queries", str(datastore.parent / "q64.npy"), "-k", "3", "--payload",
                    "values", "--out", str(datastore.parent / "found"))
        assert found.returncode == 0, found.stderr
        with np.load(datastore.parent / "found.npz") as saved:  # NumPy's suffix added, as the help says
            assert saved["ids"].shape == saved["values"].shape == (2, 3)
        assert "float64 queries; they are sent as float32" in found.stderr
        ids = [line.split()[3:] for line in found.stdout.splitlines() if line.startswith("query ")]
        values = [line.split()[1:] for line in found.stdout.splitlines() if line.strip().startswith("values ")]
        assert len(ids) == 2 and values == ids  # payload "values" holds each row's own id
        shards = ",".join("|".join(replicas) for replicas in json.loads(address_file.read_text())["shards"])
        fanned = run("search", shards, "--queries", str(datastore.parent / "q64.npy"), "-k", "3", "--payload", "values")
        assert fanned.returncode == 0 and fanned.stdout == found.stdout, fanned.stderr  # as through the router
        closed = subprocess.Popen([sys.executable, "-m", "retriever_server.cli", "info", str(datastore)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        closed.stdout.close()
        assert closed.wait(60) == 0 and closed.stderr.read() == b""
        assert server.poll() is None  # still serving, seconds after the SIGHUP (it used to end `serve`)
    finally:
        server.terminate()
        server.wait(60)
    assert not address_file.exists()  # a stopped server's address is nobody's


@pytest.mark.slow
def test_build_info_and_refused_tampered_shard(tmp_path):
    np.save(tmp_path / "k.npy", synthetic(3000, 8))
    np.save(tmp_path / "v.npy", np.arange(3000, dtype=np.int64))
    built = run("build", str(tmp_path / "k.npy"), "--out", str(tmp_path / "ds"), "--shards", "2", "--factory",
                "IVF8,PQ4", "--payload", f"values={tmp_path / 'v.npy'}", "--meta", "encoder=test", "--meta",
                "note=hi\nforged: line\x1b[31mRED", "--num-cpus", "1", "--no-progress", timeout=300)
    assert built.returncode == 0, built.stderr
    assert "built" in built.stdout and "3000 rows, 2 shards" in built.stdout
    assert "Token authentication" not in built.stderr  # the local cluster it started did not announce it
    info = run("info", str(tmp_path / "ds"), "--json")
    body = json.loads(info.stdout)
    assert body["metadata"] == {"encoder": "test", "note": "hi\nforged: line\x1b[31mRED"} and body["ntotal"] == 3000
    shown = run("info", str(tmp_path / "ds")).stdout  # the text form: one line per value, no terminal escape
    assert "note=hi\\nforged: line\\x1b[31mRED" in shown and "\x1b" not in shown
    assert not any(line.startswith("forged") for line in shown.splitlines())
    served_info_search_and_a_closed_pipe(tmp_path / "ds", body)
    index = tmp_path / "ds" / "shard-00001" / "index.faiss"
    index.write_bytes(index.read_bytes()[:-10] + b"0123456789")
    one_line_error(run("serve", "--datastore", str(tmp_path / "ds"), "--shard", "1", "--metrics-port", "-1"),
                   "shard-00001/index.faiss checksum does not match")
    one_line_error(run("serve", "--datastore", str(tmp_path / "ds")), "shard-00001/index.faiss checksum")


@pytest.mark.parametrize("module", ["retriever_server.cli", "lm_worker.cli"])
def test_output_cut_short_by_its_reader_ends_quietly(module):
    """`... --help | head -1`: the reader goes away before the command writes; no BrokenPipeError."""
    process = subprocess.Popen([sys.executable, "-m", module, "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before the child has imported anything, let alone written
    err = process.stderr.read().decode()
    assert process.wait(30) == 0 and err == "", err


def test_a_command_needing_a_running_cluster_says_so_when_none_runs(tmp_path):
    """`lookup` with no --address and no RAY_ADDRESS, on a machine where `ray start` recorded no cluster:
    one line that says what to give, not advice about an --address auto the user never gave."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path)}
    looked = run("lookup", "wiki", env=env, timeout=120)
    one_line_error(looked, "no Ray cluster runs on this machine")
    assert "--address auto" not in looked.stderr
    assert "give its address (--address, where the command takes one, or RAY_ADDRESS)" in looked.stderr


def test_addresses_take_gRPC_targets_and_refuse_ports_that_would_wrap():
    from retriever_server.serving.fanout import check_address

    for address in ("127.0.0.1:7100", "localhost:1", "[::1]:50051", "svc.ns.svc.cluster.local:7100", "unix:/tmp/s",
                    "unix-abstract:shard0", "dns:///h:7100", "ipv4:127.0.0.1:7100", "ipv6:[::1]:7100", "vsock:3:50"):
        assert check_address(address) == address
    for address, words in (("garbage", "names no port"), ("[::1]", "names no port"), ("h:", "names no port"),
                           ("h:0", "must be a number in [1, 65535]"), ("h:65536", "must be a number in [1, 65535]"),
                           ("h:7x", "must be a number"), ("h1:1,h2:2", "holds a comma: give one HOST:PORT")):
        with pytest.raises(ValueError, match=re.escape(words)):
            check_address(address)
    assert check_address("ipv4:127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"  # gRPC's own list


def test_search_out_keeps_payloads_named_as_its_own_arrays_or_numpys_arguments(aio, ray_cluster, tmp_path):
    """`search --out` holds ids, distances and every payload asked for, whatever its name: one named ids
    is saved as payload.ids; file and allow_pickle, names np.savez takes as its own arguments, as named."""
    from conftest import build, serve

    keys = synthetic(300, 8, seed=5)
    rows = np.arange(300, dtype=np.int32)
    datastore = build(tmp_path, keys, "named", shards=1, factory="IDMap,Flat",
                      payload_arrays={"ids": rows + 1000, "file": rows + 2000, "allow_pickle": rows + 3000})
    np.save(tmp_path / "q.npy", keys[:2])
    with serve(aio, datastore, 1) as served:
        found = run("search", served.address, "--queries", str(tmp_path / "q.npy"), "-k", "3", "--payload", "ids",
                    "--payload", "file", "--payload", "allow_pickle", "--out", str(tmp_path / "found.npz"))
    assert found.returncode == 0, found.stderr
    with np.load(tmp_path / "found.npz") as saved:
        assert sorted(saved.files) == ["allow_pickle", "distances", "file", "ids", "payload.ids"]
        assert saved["ids"][:, 0].tolist() == [0, 1]  # each query is its own nearest row
        for name, offset in (("payload.ids", 1000), ("file", 2000), ("allow_pickle", 3000)):
            np.testing.assert_array_equal(saved[name], saved["ids"] + offset)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("flags, threads", [([], 0), (["--cpus", "0-1"], 2), (["--cpus", "1"], 1),
                                            (["--cpus", "0-1", "--threads", "3"], 3)])
def test_a_pinned_shard_computes_on_as_many_threads_as_its_cores(flags, threads):
    """FAISS, loaded before `serve --shard --cpus` pins the process, counted every core of the machine: its
    threads shared the cores given."""
    from retriever_server.cli import build_parser
    from retriever_server.cli.serve import shard_threads

    args = build_parser().parse_args(["serve", "--datastore", "ds", "--shard", "0", *flags])
    assert shard_threads(args) == threads


def test_an_address_file_of_another_host_or_of_no_process_is_stale(tmp_path):
    """A pid is this machine's to check: another host's file (shared storage), or a detached deployment's
    (no pid), is replaced; this host's running writer's is refused."""
    from retriever_server.cli.address_file import prepare_address_file, write_address
    from retriever_server.cli.common import CliError

    for body in ({"address": "10.0.0.9:1", "pid": os.getpid(), "host": "another-host"},
                 {"address": "10.0.0.9:1", "pid": None, "name": "detached"}):
        path = tmp_path / "a.json"
        path.write_text(json.dumps(body))
        prepare_address_file(path)
        assert not path.exists()
    write_address(path, "127.0.0.1:1", None)  # this process's own: replaced when it starts again
    prepare_address_file(path)
    assert not path.exists()
    path.write_text(json.dumps({"address": "127.0.0.1:1", "pid": os.getppid()}))  # the test runner's parent runs
    with pytest.raises(CliError, match="is the address of a server still running"):
        prepare_address_file(path)
