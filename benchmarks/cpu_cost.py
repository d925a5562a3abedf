"""CPU cost of the search service per request, by process, against the same search in process and
against the bare gRPC floor of the same topology, all in one run.

On a machine whose few cores the client, the router and the shards share, wall-clock ratios measure
how they share the cores more than what the service costs. This benchmark counts CPU seconds instead:

- **service**: the CPU seconds per request of every process involved, read from /proc: the client
  (this process), the router and each shard, for two paths: through the router (`RetrieverClient`
  on the router's address) and the client's own fan-out to the shards (`RetrieverClient` on the
  shard addresses);
- **in process**: the same search on one thread, the datastore's own shard index files memory-mapped
  and searched one after another, their top-k merged ("sharded", the reference for efficiency),
  one index holding every row with the same codec ("unsharded"), and the shard files searched at
  once, one thread each, as the shard processes search ("parallel": two searches at once on two
  cores cost more CPU each than one alone, as they share caches and memory bandwidth);
- **floor**: the bare Python gRPC topology with the same bytes on the wire and no work in it
  (`grpc_floor.py`): a relay in front of two shard processes, or the client calling both; its shard
  processes run on the cores the service's shards run on (each its own core, on 2 cores).

From them: efficiency = in-process (sharded) CPU / service CPU, and overhead over floor =
(service - in-process) / floor: 1.0 means the service adds exactly what bare gRPC costs.

The datastore: 20000 real MiniLM vectors of CPython stdlib chunks, `IVF256,PQ32`, 2 shards, served
by `LocalDeployment` (what `retriever-server serve` runs: supervised shard processes with one FAISS
thread each, on a core each, and a router, hedging and limits at their defaults), plaintext on
loopback, nprobe 32.
It also reports the cost of TLS with a bearer token on the router path.

    python benchmarks/cpu_cost.py [--out bench_out] [--quick] [--pin]

With `--pin` (8 cores or more: the GPU machine, `benchmarks/device_speed.sh`), the client, the router and
each shard run on 2 cores of their own, and a second table gives wall-clock ratios (`pinning.py`).

Prints the table and the bars, and writes OUT/cpu_cost.json and its figure, OUT/cpu_cost.png
(`cpu_cost_plot.py`: per (nq, k), each path's CPU by process beside the in-process search and its floor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_cost_plot import plot_costs  # noqa: E402
from decoding import process_cpu_s  # noqa: E402
from grpc_floor import FloorDeployment, request_bytes  # noqa: E402
from pinning import core_plan, pin_process, wall_table  # noqa: E402
from search_service import load_vectors, query_batches, save_keys  # noqa: E402

from retriever_server.cluster.launcher import LocalDeployment  # noqa: E402
from retriever_server.datastore.index import read_index  # noqa: E402
from retriever_server.datastore.manifest import read_manifest  # noqa: E402
from retriever_server.security.config import ClientSecurity, ServerSecurity  # noqa: E402
from retriever_server.serving.client import RetrieverClient, RetrieverError, make_request  # noqa: E402
from retriever_server.serving.merge import merge_results, rank_neighbours  # noqa: E402
from retriever_server.wire.response import encode_search_response  # noqa: E402
from retriever_server.wire.result import SearchResult  # noqa: E402

ONE_THREAD = ("--threads", "1")  # one FAISS thread a shard, as the reference searches (machines of many cores)

FACTORY = "IVF256,PQ32"
NLIST = int(FACTORY.split(",")[0].removeprefix("IVF"))  # the lists of every datastore this benchmark builds or reuses
SHARDS = 2
SEED = 0
SETTLE_S = 0.05  # after a side's last call, before its servers' CPU is read

# The bars: efficiency through the router by (nq, k); fan-out at nq=1 against floor + in-process;
# the router's own CPU at nq=64, k=1024.
MIN_ROUTER_EFFICIENCY = {(256, 10): 0.8, (64, 10): 0.8, (64, 1024): 0.7, (1024, 10): 0.9, (1024, 1024): 0.9}
MAX_FANOUT_OVER_FLOOR = 1.3
MAX_ROUTER_MS = {(64, 1024): 3.0}


@dataclass(frozen=True)
class CostConfig:
    """What to measure and for how long."""

    out: Path = Path("bench_out")
    nprobe: int = 32
    nqs: tuple[int, ...] = (1, 64, 256, 1024)
    ks: tuple[int, ...] = (10, 1024)
    seconds_per_cell: float = 3.0  # per side and cell; /proc counts in 10 ms ticks
    min_calls: int = 10
    warmup_calls: int = 3
    rounds: int = 3  # the sides take turns this many times in each cell
    secure_nqs: tuple[int, ...] = (1, 64)
    pin: bool = False  # each process on cores of its own (`pinning.core_plan`); wall-clock ratios too

    @property
    def datastore(self) -> Path:
        return self.out / "ds-cpu-cost"


# ---------------------------------------------------------------------------------------------
# Datastore and references
# ---------------------------------------------------------------------------------------------

def ensure_datastore(config: CostConfig, keys: np.ndarray) -> None:
    """Builds the 2-shard `IVF256,PQ32` datastore with Ray, or reuses the one already there."""
    path = config.out / "keys.npy"
    save_keys(keys, path)
    manifest = config.datastore / "manifest.json"
    if manifest.is_file():
        found = read_manifest(config.datastore)
        if found.ntotal == len(keys) and found.factory == FACTORY and len(found.shards) == SHARDS:
            print(f"reusing the datastore at {config.datastore}")
            return
    import ray

    from retriever_server.datastore.build import BuildConfig, build_datastore

    print(f"building a {SHARDS}-shard {FACTORY} datastore at {config.datastore} ...", flush=True)
    build = BuildConfig(keys=path, out=config.datastore, shards=SHARDS, factory=FACTORY, seed=SEED,
                        overwrite=config.datastore.exists())
    try:
        build_datastore(build, num_cpus=2, progress=True)
    finally:
        ray.shutdown()  # Ray's workers must not use the cores while we count


@dataclass
class InProcess:
    """The references: the shard files searched one after another on one thread, and one index."""

    parts: list[faiss.Index]
    whole: faiss.Index
    metric: str
    nprobe: int
    threads: ThreadPoolExecutor

    def sharded(self, queries: np.ndarray, k: int) -> SearchResult:
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        results = []
        for part in self.parts:
            distances, ids = part.search(queries, k, params=params)
            results.append(rank_neighbours(SearchResult(ids, distances), k, self.metric))  # as a shard answers
        return merge_results(results, k, self.metric, ranked=True)  # as the router merges

    def parallel(self, queries: np.ndarray, k: int) -> SearchResult:
        """The shards searched at once, one thread each (as the shard processes search), then merged."""
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)

        def search(part: faiss.Index):
            faiss.omp_set_num_threads(1)
            return part.search(queries, k, params=params)

        found = list(self.threads.map(search, self.parts))
        ranked = [rank_neighbours(SearchResult(ids, distances), k, self.metric) for distances, ids in found]
        return merge_results(ranked, k, self.metric, ranked=True)

    def unsharded(self, queries: np.ndarray, k: int) -> SearchResult:
        distances, ids = self.whole.search(queries, k, params=faiss.SearchParametersIVF(nprobe=self.nprobe))
        return SearchResult(ids, distances)


def in_process(config: CostConfig, keys: np.ndarray) -> InProcess:
    manifest = read_manifest(config.datastore)
    parts = [read_index(config.datastore / s.name / "index.faiss") for s in manifest.shards]
    whole = read_index(config.datastore / manifest.shards[0].name / "index.faiss", mmap=False)
    whole.reset()  # keeps the trained coarse quantizer and codebooks
    whole.add_with_ids(keys, np.arange(len(keys), dtype=np.int64))
    return InProcess(parts, whole, manifest.metric, config.nprobe, ThreadPoolExecutor(len(parts)))


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------

def page_faults(pid: int) -> int:
    """Minor page faults of process `pid` so far, from /proc (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except OSError:
        return 0


@dataclass
class Tally:
    """CPU seconds of this process ("client") and of the processes `pids`, over the calls of one side."""

    pids: dict[str, int]
    calls: int = 0
    wall_s: float = 0.0
    faults: int = 0
    used: dict[str, float] = field(default_factory=dict)

    def run(self, call: Callable[[np.ndarray], object], batches: list[np.ndarray], seconds: float,
            min_calls: int) -> None:
        """Calls for about `seconds` (at least `min_calls` times) and adds what they used."""
        before = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        faults = sum(page_faults(pid) for pid in self.pids.values())
        mine, started, calls = time.process_time(), time.perf_counter(), 0
        while calls < min_calls or time.perf_counter() - started < seconds:
            call(batches[(self.calls + calls) % len(batches)])
            calls += 1
        wall = time.perf_counter() - started
        time.sleep(SETTLE_S)  # what the servers do after the last answer (freeing it, a hedge's cancel) is this side's
        used = {"client": time.process_time() - mine,
                **{name: process_cpu_s(pid) - before[name] for name, pid in self.pids.items()}}
        self.wall_s += wall
        self.faults += sum(page_faults(pid) for pid in self.pids.values()) - faults
        self.calls += calls
        for name, seconds_used in used.items():
            self.used[name] = self.used.get(name, 0.0) + seconds_used

    def per_call(self) -> dict[str, float]:
        """CPU ms per call by process, their total, the calls, wall ms per call and the servers' minor
        page faults per call."""
        per = {name: 1e3 * seconds / self.calls for name, seconds in self.used.items()}
        return {**per, "total": sum(per.values()), "calls": self.calls, "wall_ms": 1e3 * self.wall_s / self.calls,
                "server_page_faults": self.faults / self.calls}


def measure_sides(sides: dict[str, tuple[Callable[[np.ndarray], object], dict[str, int]]],
                  batches: list[np.ndarray], config: CostConfig) -> dict[str, dict[str, float]]:
    """Each side's CPU per call, the sides taking turns in `rounds` rounds, so that a machine whose
    speed drifts (a shared host) moves them all alike."""
    tallies = {name: Tally(pids) for name, (_, pids) in sides.items()}
    for call, _ in sides.values():
        for i in range(config.warmup_calls):
            call(batches[i % len(batches)])
    share, least = config.seconds_per_cell / config.rounds, -(-config.min_calls // config.rounds)
    for turn in range(config.rounds):  # every other round in reverse: no side always follows the same one
        order = list(sides.items()) if turn % 2 == 0 else list(sides.items())[::-1]
        for name, (call, _) in order:
            tallies[name].run(call, batches, share, least)
    return {name: tally.per_call() for name, tally in tallies.items()}


def cpu_per_call(call: Callable[[np.ndarray], object], batches: list[np.ndarray], pids: dict[str, int],
                 config: CostConfig) -> dict[str, float]:
    """One side's CPU ms per call (see `Tally.per_call`)."""
    return measure_sides({"side": (call, pids)}, batches, config)["side"]


def deployment_pids(deployment: LocalDeployment) -> dict[str, int]:
    return {"router": deployment.router.popen.pid,
            **{f"shard {s}": replicas[0].popen.pid for s, replicas in enumerate(deployment.shards)}}


def answer_bytes(nq: int, k: int, version: str) -> int:
    """The size of a Search answer of nq x k neighbours."""
    result = SearchResult(np.zeros((nq, k), np.int64), np.zeros((nq, k), np.float32), datastore_version=version)
    return len(encode_search_response(result))


def cell(config: CostConfig, refs: InProcess, router: RetrieverClient, fan_out: RetrieverClient,
         deployment: LocalDeployment, floor: FloorDeployment, queries: np.ndarray, nq: int, k: int,
         version: str) -> dict:
    """Every side of one (nq, k)."""
    batches = query_batches(queries, nq, count=8)
    pids = deployment_pids(deployment)
    shard_pids = {name: pid for name, pid in pids.items() if name != "router"}
    size, answer = make_request(batches[0], k, config.nprobe).ByteSize(), answer_bytes(nq, k, version)
    relay_request, fan_request = request_bytes(size, answer, answer), request_bytes(size + len(version) + 2, answer, 0)
    direct = {name: pid for name, pid in floor.pids.items() if name != "relay"}

    def one_thread(search):  # the in-process references search on one thread (OpenMP's count is per thread)
        def call(q):
            faiss.omp_set_num_threads(1)
            return search(q)
        return call

    sides = {
        "in_process_sharded": (one_thread(lambda q: refs.sharded(q, k)), {}),
        "in_process_unsharded": (one_thread(lambda q: refs.unsharded(q, k)), {}),
        "in_process_parallel": (lambda q: refs.parallel(q, k), {}),
        "router": (lambda q: router.search(q, k=k, nprobe=config.nprobe), pids),
        "fan_out": (lambda q: fan_out.search(q, k=k, nprobe=config.nprobe), shard_pids),
        "floor_router": (lambda q: floor.call(relay_request), floor.pids),
        "floor_fan_out": (lambda q: floor.fan_out(fan_request), direct),
    }
    measured = measure_sides(sides, batches, config)
    sharded, unsharded, parallel = (measured[f"in_process_{name}"] for name in ("sharded", "unsharded", "parallel"))
    via_router, via_fan_out = measured["router"], measured["fan_out"]
    floor_router, floor_fan_out = measured["floor_router"], measured["floor_fan_out"]
    row = {"nq": nq, "k": k, "request_bytes": size, "answer_bytes": answer, "in_process_sharded": sharded,
           "in_process_unsharded": unsharded, "in_process_parallel": parallel, "router": via_router,
           "fan_out": via_fan_out, "floor_router": floor_router, "floor_fan_out": floor_fan_out}
    for path in ("router", "fan_out"):
        service, floor_cost = row[path]["total"], row[f"floor_{path}"]["total"]
        row[f"{path}_efficiency"] = sharded["total"] / service
        row[f"{path}_efficiency_unsharded"] = unsharded["total"] / service
        row[f"{path}_efficiency_parallel"] = parallel["total"] / service
        row[f"{path}_overhead_over_floor"] = (service - sharded["total"]) / floor_cost
    print(f"  nq={nq:5d} k={k:5d}: in-process {sharded['total']:8.2f} ms, router {via_router['total']:8.2f} ms "
          f"(router {via_router['router']:.2f}), fan-out {via_fan_out['total']:8.2f} ms, floors "
          f"{floor_router['total']:.2f} / {floor_fan_out['total']:.2f} ms", flush=True)
    return row


def serve_args() -> tuple[str, ...]:
    """The shards' flags: none where `serve` itself gives each shard one core (2 shards on 2 cores: one
    FAISS thread each, pinned to its core); else one thread asked for, as the in-process reference
    searches (`--pin` then places them: read before `pin_client`). An explicit --threads turns the
    launcher's pinning off."""
    return () if len(os.sched_getaffinity(0)) // SHARDS == 1 else ONE_THREAD


def check_placement(placement: dict[str, list[int]], pinned: bool) -> None:
    """RuntimeError where each shard should have had a core of its own and has not (the figures would be
    those of shards sharing cores, not of `serve`'s)."""
    shards = [set(cores) for role, cores in placement.items() if role.startswith("shard")]
    shared = any(not cores for cores in shards) or sum(map(len, shards)) != len(set().union(*shards))
    if (pinned or not serve_args()) and shared:
        raise RuntimeError(f"the shards were not each placed on cores of their own: {placement}")


def secure_costs(config: CostConfig, queries: np.ndarray, version: str,
                 plan: dict[str, tuple[int, ...]] | None = None, shard_args: tuple[str, ...] = ()) -> list[dict]:
    """Router-path CPU per request, plaintext and TLS + bearer token, at k=10 (with `plan`, each
    process on its cores; `shard_args`, the shards' flags: `serve_args`)."""
    from chaos import private_pki

    server, client_side = private_pki(config.out / "cpu-cost-pki")
    rows = []
    for name, (server_side, client) in {"plaintext": (ServerSecurity(), ClientSecurity()),
                                        "TLS + token": (server, client_side)}.items():
        with LocalDeployment(config.datastore, security=server_side, extra_args=shard_args) as deployment, \
                RetrieverClient(deployment.router_address, security=client) as router:
            if plan:
                for role, pid in deployment_pids(deployment).items():
                    pin_process(pid, plan[role])
            for nq in config.secure_nqs:
                batches = query_batches(queries, nq, count=8)
                cost = cpu_per_call(lambda q: router.search(q, k=10, nprobe=config.nprobe), batches,
                                    deployment_pids(deployment), config)
                rows.append({"hops": name, "nq": nq, "k": 10, **cost})
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def cost_table(rows: list[dict]) -> str:
    lines = ["CPU ms per request (client + router + shards, from /proc); in-process: one thread, the shard "
             "files one after another, merged; floor: bare gRPC, same topology and bytes.", "",
             "| nq | k | path | client | router | shard 0 | shard 1 | service total | in-process sharded "
             "| in-process unsharded | in-process parallel | floor | efficiency | efficiency vs parallel "
             "| overhead / floor |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for path in ("router", "fan_out"):
            s, floor = r[path], r[f"floor_{path}"]
            lines.append(f"| {r['nq']} | {r['k']} | {path.replace('_', '-')} | {s['client']:.2f} | "
                         f"{s.get('router', 0.0):.2f} | {s['shard 0']:.2f} | {s['shard 1']:.2f} | {s['total']:.2f} | "
                         f"{r['in_process_sharded']['total']:.2f} | {r['in_process_unsharded']['total']:.2f} | "
                         f"{r['in_process_parallel']['total']:.2f} | {floor['total']:.2f} | "
                         f"{r[f'{path}_efficiency']:.2f} | {r[f'{path}_efficiency_parallel']:.2f} | "
                         f"{r[f'{path}_overhead_over_floor']:.2f} |")
    return "\n".join(lines)


def secure_table(rows: list[dict]) -> str:
    lines = ["| hops | nq | k | client | router | shard 0 | shard 1 | total |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['hops']} | {r['nq']} | {r['k']} | {r['client']:.2f} | {r['router']:.2f} | {r['shard 0']:.2f} | "
              f"{r['shard 1']:.2f} | {r['total']:.2f} |" for r in rows]
    return "\n".join(lines)


def bars(rows: list[dict]) -> list[dict]:
    """Each bar with its measured value and PASS/MISS."""
    by_cell = {(r["nq"], r["k"]): r for r in rows}
    out = []
    for (nq, k), least in MIN_ROUTER_EFFICIENCY.items():
        if (nq, k) in by_cell:
            value = by_cell[nq, k]["router_efficiency"]
            out.append({"bar": f"router efficiency at nq={nq}, k={k} >= {least}", "value": f"{value:.2f}",
                        "pass": value >= least})
    for (nq, k), r in by_cell.items():
        if nq == 1:
            limit = MAX_FANOUT_OVER_FLOOR * (r["floor_fan_out"]["total"] + r["in_process_sharded"]["total"])
            value = r["fan_out"]["total"]
            out.append({"bar": f"fan-out at nq=1, k={k}: service CPU <= {MAX_FANOUT_OVER_FLOOR} x (floor + in-process)"
                               f" = {limit:.2f} ms", "value": f"{value:.2f} ms", "pass": value <= limit})
    for (nq, k), most in MAX_ROUTER_MS.items():
        if (nq, k) in by_cell:
            value = by_cell[nq, k]["router"]["router"]
            out.append({"bar": f"router CPU at nq={nq}, k={k} <= {most} ms", "value": f"{value:.2f} ms",
                        "pass": value <= most})
    return out


def bars_table(results: list[dict]) -> str:
    lines = ["| bar | measured | |", "|---|---:|---|"]
    lines += [f"| {b['bar']} | {b['value']} | {'PASS' if b['pass'] else 'MISS'} |" for b in results]
    return "\n".join(lines)


def pin_all(plan: dict[str, tuple[int, ...]], deployment: LocalDeployment, floor: FloorDeployment) -> None:
    """The service's router and shards, and the floor's relay and shards, on the plan's cores (the
    client, this process, was pinned before it started them)."""
    for name, pid in deployment_pids(deployment).items():
        pin_process(pid, plan[name])
    for name, pid in floor.pids.items():
        pin_process(pid, plan["router" if name == "relay" else name])


def process_cores(pids: dict[str, int]) -> dict[str, list[int]]:
    """The cores each named process may run on."""
    return {name: sorted(os.sched_getaffinity(pid)) for name, pid in pids.items()}


def place_floor_as_service(placement: dict[str, list[int]], floor: FloorDeployment) -> dict[str, list[int]]:
    """The floor's shard processes on the cores of the service's shards (`placement`: `LocalDeployment`
    gives each shard process cores of its own when there are enough), the relay, like the router, on
    any: the same topology on the same cores. Returns each floor process's cores."""
    for name, pid in floor.pids.items():
        if name != "relay":
            pin_process(pid, tuple(placement[name]))
    return process_cores(floor.pids)


def pin_client(config: CostConfig) -> tuple[dict[str, tuple[int, ...]] | None, tuple[str, ...]]:
    """With --pin, each process's cores (`core_plan`) and this process on the client's; and the shards'
    flags (`serve_args`), read first: on the client's cores alone it would leave the shards to the
    launcher, which would place (and restart) them on the client's cores."""
    shard_args = serve_args()
    plan = core_plan(sorted(os.sched_getaffinity(0)), SHARDS) if config.pin else None
    if plan:
        pin_process(os.getpid(), plan["client"])
    return plan, shard_args


def run(config: CostConfig) -> dict:
    plan, shard_args = pin_client(config)
    keys, queries = load_vectors()
    ensure_datastore(config, keys)
    refs = in_process(config, keys)
    version = read_manifest(config.datastore).version
    rows = []
    with LocalDeployment(config.datastore, extra_args=shard_args) as deployment, FloorDeployment() as floor, \
            RetrieverClient(deployment.router_address) as router, \
            RetrieverClient(deployment.shard_addresses) as fan_out:
        if plan:
            pin_all(plan, deployment, floor)
        placement = process_cores(deployment_pids(deployment))
        check_placement(placement, bool(plan))
        floor_placement = place_floor_as_service(placement, floor)
        for nq in config.nqs:
            for k in config.ks:
                if plan:  # again: a process restarted since (under a new pid) starts on this process's cores
                    pin_all(plan, deployment, floor)
                rows.append(cell(config, refs, router, fan_out, deployment, floor, queries, nq, k, version))
    secure = secure_costs(config, queries, version, plan, shard_args)
    return {"config": {**asdict(config), "out": str(config.out), "factory": FACTORY, "shards": SHARDS,
                       "keys": len(keys)},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__,
                        "pinned": plan, "placement": placement, "floor_placement": floor_placement},
            "rows": rows, "secure": secure, "bars": bars(rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CostConfig.out)
    parser.add_argument("--quick", action="store_true", help="about 0.5 s per side and cell instead of 3 s")
    parser.add_argument("--nprobe", type=int, default=CostConfig.nprobe)
    parser.add_argument("--pin", action="store_true",
                        help="client, router and each shard on 2 cores of their own (8 cores), and wall-clock ratios")
    args = parser.parse_args(argv)
    if not 1 <= args.nprobe <= NLIST:  # in-process FAISS fails or caps it where the service refuses it
        sys.exit(f"cpu_cost.py: --nprobe must be between 1 and {NLIST} (the lists of {FACTORY}), got {args.nprobe}")
    config = CostConfig(out=args.out, nprobe=args.nprobe, pin=args.pin)
    if args.quick:
        config = replace(config, seconds_per_cell=0.5, min_calls=5)
    try:
        results = run(config)
    except (ValueError, RuntimeError, RetrieverError) as err:  # too few cores for --pin; RuntimeError: a server
        sys.exit(f"cpu_cost.py: {err}")  # gone mid-measurement or not started, shards sharing cores, FAISS
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_cost.json").write_text(json.dumps(results, indent=2))
    print()
    print(cost_table(results["rows"]))
    print()
    if config.pin:
        print(wall_table(results["rows"]))
        print()
    print("TLS and bearer-token cost, through the router (CPU ms per request):")
    print()
    print(secure_table(results["secure"]))
    print()
    print(bars_table(results["bars"]))
    plot_costs(results["rows"], args.out / "cpu_cost.png")
    print(f"\nwrote {args.out / 'cpu_cost.json'} and {args.out / 'cpu_cost.png'}")


if __name__ == "__main__":
    main()
