"""One shard server's CPU per Search, for two versions of the code taking turns on the same requests.

A change to the shard's request path saves tens of microseconds per request, under the few percent a
whole `cpu_cost.py` run drifts by. This starts the same shard of the same datastore twice, once from
each source tree (`retriever-server serve --shard`, with that tree first on `PYTHONPATH`), sends
both the same one-at-a-time requests from a blocking gRPC channel, in rounds that alternate between
them, and reads each server's CPU seconds from /proc:

    git worktree add /tmp/before HEAD~1
    python benchmarks/shard_ab.py --datastore bench_out/ds-cpu-cost --queries bench_out/keys.npy \
        --before /tmp/before
    # before 0.909 ms server CPU per call over 17,344 calls
    # after  0.829 ms server CPU per call over 18,866 calls (0.91x)

`--after` defaults to this checkout. Both trees must use the same proto package (`retrieval.v1`).
`--before-cpus` and `--after-cpus` run a side on those cores alone (`serve --cpus`): with the same
tree on both sides, what a core of its own does to a shard's CPU per request:

    python benchmarks/shard_ab.py --datastore bench_out/ds-cpu-cost --queries bench_out/keys.npy \
        --before . --after-cpus 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "proto"))

from retrieval.v1 import retriever_pb2 as pb  # noqa: E402
from retriever_server.wire.tensors import to_tensor  # noqa: E402

START_TIMEOUT_S = 60.0  # to bind its port, and again to turn SERVING (its files' checksums verified)
SERVICE = pb.DESCRIPTOR.services_by_name["Retriever"].full_name  # the name the server's health answers for
SEARCH = f"/{SERVICE}/Search"
# A shard's answers to nq x k neighbours pass gRPC's default 4 MiB receive limit (nq 512, k 1024: about 6 MiB).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]


@dataclass(frozen=True)
class AbConfig:
    """What to compare and for how long."""

    datastore: Path
    before: Path
    after: Path = ROOT
    queries: Path | None = None  # an (n, d) .npy whose rows are the queries; None: the shard's stored keys
    shard: int = 0
    nq: int = 1
    k: int = 10
    nprobe: int = 32
    rounds: int = 6
    seconds_per_round: float = 3.0  # per side; /proc counts in 10 ms ticks
    threads: int = 1  # FAISS threads of each server (as `serve --datastore` gives 2 shards on 2 cores)
    before_cpus: str = ""  # `serve --cpus` of each side ("": any core)
    after_cpus: str = ""


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) of process `pid`, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_shard(tree: Path, config: AbConfig, address_file: Path, cpus: str = "") -> tuple[subprocess.Popen, str]:
    """`retriever-server serve --shard` run from `tree` (on `cpus`, when given); returns the process and
    its address."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "proto")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "retriever_server.cli", "serve", "--datastore", str(config.datastore.resolve()),
         "--shard", str(config.shard), "--port", "0", "--metrics-port", "-1", "--address-file", str(address_file),
         "--threads", str(config.threads), *(["--cpus", cpus] if cpus else [])],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (address_file.is_file() and address_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the shard server from {tree} did not start")
        time.sleep(0.1)
    return process, json.loads(address_file.read_text())["address"]


def wait_serving(channel: grpc.Channel, process: subprocess.Popen, what: str,
                 timeout_s: float = START_TIMEOUT_S) -> None:
    """Waits for the server's grpc.health.v1 to say SERVING for the Retriever service: `serve --shard` binds
    its port first and answers searches UNAVAILABLE ("shard is loading") until its files are checked.
    RuntimeError naming `what` and the last answer if the process exits or `timeout_s` passes first."""
    check = health_pb2_grpc.HealthStub(channel).Check
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while True:
        try:
            status = check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}) before its health said SERVING ({last})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not turn SERVING within {timeout_s:g} s (health: {last})")
        time.sleep(0.1)


def requests(config: AbConfig, count: int = 8) -> list[bytes]:
    """`count` Search requests of nq consecutive rows of `config.queries` (else of the shard's stored
    keys, else random ones)."""
    stored = config.datastore / f"shard-{config.shard:05d}" / "keys.npy"
    source = config.queries or (stored if stored.is_file() else None)
    rng = np.random.default_rng(0)
    if source is None:
        d = json.loads((config.datastore / "manifest.json").read_text())["dimension"]
        rows = [rng.standard_normal((config.nq, d), dtype=np.float32) for _ in range(count)]
    else:
        keys = np.load(source, mmap_mode="r")
        starts = rng.integers(0, max(1, len(keys) - config.nq), count)
        rows = [np.asarray(keys[s:s + config.nq], np.float32) for s in starts]
    return [pb.SearchRequest(queries=to_tensor(q), k=config.k, nprobe=config.nprobe).SerializeToString() for q in rows]


def compare(config: AbConfig) -> dict[str, dict[str, float]]:
    """CPU ms per call, calls and the server's cores, for "before" and "after"."""
    batch = requests(config)
    sides, processes, channels, cores = {}, [], [], {}
    with tempfile.TemporaryDirectory(prefix="shard-ab-") as scratch:
        try:
            for name, tree, cpus in (("before", config.before, config.before_cpus),
                                     ("after", config.after, config.after_cpus)):
                process, address = start_shard(Path(tree).resolve(), config, Path(scratch) / f"{name}.json", cpus)
                processes.append(process)
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                channels.append(channel)
                wait_serving(channel, process, f"the shard server from {tree}")
                call = channel.unary_unary(SEARCH)
                for request in batch:  # warm up
                    call(request, timeout=30)
                sides[name] = (process.pid, call)
                cores[name] = sorted(os.sched_getaffinity(process.pid))
            result = take_turns(sides, batch, config.rounds, config.seconds_per_round)
        finally:
            for channel in channels:
                channel.close()
            for process in processes:
                process.terminate()
                process.wait(10)
    return {name: {**row, "cores": cores[name]} for name, row in result.items()}


def take_turns(sides: dict[str, tuple[int, Callable[..., bytes]]], batch: list[bytes], rounds: int,
               seconds_per_round: float) -> dict[str, dict[str, float]]:
    """Each side (name -> (the server's pid, a blocking call)) sends `batch`'s requests one at a time for
    `seconds_per_round`, the sides taking turns for `rounds` rounds, each round in the order opposite the
    last one's (so a machine whose speed drifts does not favour the side that goes first); the server's
    CPU ms per call and the calls, by side."""
    used, calls = {name: 0.0 for name in sides}, {name: 0 for name in sides}
    for turn in range(rounds):
        for name, (pid, call) in (list(sides.items()) if turn % 2 == 0 else list(sides.items())[::-1]):
            before, started, n = process_cpu_s(pid), time.perf_counter(), 0
            while time.perf_counter() - started < seconds_per_round:
                call(batch[n % len(batch)], timeout=30)
                n += 1
            used[name] += process_cpu_s(pid) - before
            calls[name] += n
    return {name: {"ms": 1e3 * used[name] / calls[name], "calls": calls[name]} for name in sides}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datastore", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True, help="source tree of the code to compare against")
    parser.add_argument("--after", type=Path, default=ROOT, help="source tree of the new code (this checkout)")
    parser.add_argument("--queries", type=Path, help="an (n, d) .npy of query rows (default: the shard's keys)")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--nq", type=int, default=1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0, help="per side and round")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads of each server")
    parser.add_argument("--before-cpus", default="", help="cores of the before side's server, e.g. 1 (default: any)")
    parser.add_argument("--after-cpus", default="", help="cores of the after side's server (default: any)")
    args = parser.parse_args(argv)
    config = AbConfig(args.datastore, args.before, args.after, args.queries, args.shard, args.nq, args.k,
                      args.nprobe, args.rounds, args.seconds, args.threads, args.before_cpus, args.after_cpus)
    result = compare(config)
    base = result["before"]["ms"]
    for name, row in result.items():
        ratio = "" if name == "before" else f" ({row['ms'] / base:.2f}x)"
        print(f"{name:6s} {row['ms']:.3f} ms server CPU per call over {row['calls']:,} calls{ratio}, "
              f"on cores {row['cores']}")


if __name__ == "__main__":
    main()
