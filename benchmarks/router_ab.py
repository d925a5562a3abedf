"""The router's CPU per Search, for two versions of the code taking turns on the same requests.

`shard_ab.py` compares one shard server; this compares whole deployments, for a change to the
router's path (its failover and hedging, its merge). It starts a `LocalDeployment` (S shards x R
replicas and a router, what `retriever-server serve --datastore` runs) from each source tree, with
that tree first on `PYTHONPATH`, sends both routers the same one-at-a-time requests from a blocking
gRPC channel, in rounds that alternate between them, and reads each router's CPU seconds from /proc:

    git worktree add /tmp/before HEAD~1
    python benchmarks/router_ab.py --datastore bench_out/ds-cpu-cost --queries bench_out/keys.npy \
        --before /tmp/before --replicas 2
    # before 1.101 ms router CPU per call over 9,040 calls
    # after  1.081 ms router CPU per call over 9,259 calls (0.98x)

With `--replicas 2` (the default) every call runs the failover policy's hedging; with 1 a call has one
replica to try and takes the path without it. `--after` defaults to this checkout. Both trees must
use the same proto package (`retrieval.v1`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from shard_ab import SEARCH, AbConfig, requests, take_turns  # noqa: E402

from retriever_server.cluster.launcher import LocalDeployment  # noqa: E402


@dataclass(frozen=True)
class RouterAbConfig:
    """What to compare and for how long."""

    datastore: Path
    before: Path
    after: Path = ROOT
    queries: Path | None = None  # an (n, d) .npy whose rows are the queries; None: shard 0's stored keys
    replicas: int = 2
    nq: int = 1
    k: int = 10
    nprobe: int = 32
    rounds: int = 6
    seconds_per_round: float = 2.0  # per side; /proc counts in 10 ms ticks


def deployment_from(tree: Path, config: RouterAbConfig) -> LocalDeployment:
    """A started `LocalDeployment` whose processes run the code of `tree`: started from `tree` (`python -m`
    puts the working directory ahead of PYTHONPATH), with `tree` and its proto/ package on PYTHONPATH."""
    previous, cwd = os.environ.get("PYTHONPATH"), Path.cwd()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "proto")])  # the children inherit it
    datastore = Path(config.datastore).resolve()
    os.chdir(tree)
    try:
        return LocalDeployment(datastore, replicas=config.replicas).__enter__()
    finally:
        os.chdir(cwd)
        if previous is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = previous


def compare(config: RouterAbConfig) -> dict[str, dict[str, float]]:
    """Router CPU ms per call and calls, for "before" and "after"."""
    batch = requests(AbConfig(config.datastore, config.before, queries=config.queries, nq=config.nq, k=config.k,
                              nprobe=config.nprobe))
    deployments, channels, sides = [], [], {}
    try:
        for name, tree in (("before", config.before), ("after", config.after)):
            deployment = deployment_from(Path(tree).resolve(), config)
            deployments.append(deployment)
            channel = grpc.insecure_channel(deployment.router_address,
                                            options=[("grpc.max_receive_message_length", -1)])  # k=1024 answers
            channels.append(channel)
            call = channel.unary_unary(SEARCH)
            for i in range(4 * len(batch)):  # warm up (and give hedging its 20 answers)
                call(batch[i % len(batch)], timeout=30)
            sides[name] = (deployment.router.popen.pid, call)
        return take_turns(sides, batch, config.rounds, config.seconds_per_round)
    finally:
        for channel in channels:
            channel.close()
        for deployment in deployments:
            deployment.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datastore", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True, help="source tree of the code to compare against")
    parser.add_argument("--after", type=Path, default=ROOT, help="source tree of the new code (this checkout)")
    parser.add_argument("--queries", type=Path, help="an (n, d) .npy of query rows (default: shard 0's keys)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of each shard (1: no hedging)")
    parser.add_argument("--nq", type=int, default=1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and round")
    args = parser.parse_args(argv)
    for tree in (args.before, args.after):  # else PYTHONPATH would miss it, and the installed code run silently
        if not (tree / "retriever_server").is_dir():
            sys.exit(f"router_ab.py: {tree} is not a source tree of this project (no retriever_server/ in it)")
    config = RouterAbConfig(args.datastore, args.before, args.after, args.queries, args.replicas, args.nq, args.k,
                            args.nprobe, args.rounds, args.seconds)
    result = compare(config)
    base = result["before"]["ms"]
    for name, row in result.items():
        ratio = "" if name == "before" else f" ({row['ms'] / base:.2f}x)"
        print(f"{name:6s} {row['ms']:.3f} ms router CPU per call over {row['calls']:,} calls{ratio}")


if __name__ == "__main__":
    main()
