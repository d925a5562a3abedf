"""Search-service benchmark: the gRPC service (router + 2 shards) against in-process FAISS.

All sides search the same 20000 real MiniLM vectors of CPython stdlib chunks with the same trained
codec (the one `auto` picks for 20000 rows: `IVF512,SQ8`), in the same run, against two in-process references:

- "unsharded": one FAISS index holding every row (what an LM process would hold itself);
- "sharded": the same two shard index files, searched in process by `faiss.IndexShards` (threads,
  merged top-k): the same work as the service minus gRPC, the router and serialization.

Beside them it times the transport floor (`grpc_floor.py`): the service's processes and bytes on the
wire with no work in them, what Python gRPC alone costs this machine per call through a router.

The recall of the references and the service (without re-ranking) must be equal: a bar per nprobe, within
`RECALL_SLACK` (ties at the k-th place may fall either way).

    python benchmarks/search_service.py [--out bench_out] [--quick] [--nprobe 16]

Writes bench_out/keys.npy, bench_out/ds-2shard/ (reused when already built with the same
parameters) and bench_out/search_service.json; prints a speed table, a recall table and the bars.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from grpc_floor import FloorDeployment, request_bytes

from retriever_server.cluster.launcher import LocalDeployment
from retriever_server.datastore.manifest import read_manifest
from retriever_server.serving.client import RetrieverClient, make_request
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.result import SearchResult

N_KEYS = 20000
N_QUERIES = 1000
SHARDS = 2
SEED = 0
CACHE_WAIT_S = 480.0
RECALL_K = 10
RECALL_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RECALL_SLACK = 0.002  # recall a few tied neighbours at the k-th place may move (2 in 10 000 at k=10)

# The bars: service qps / reference qps at nq >= 64 by k, and the p50 latency added at nq = 1.
MIN_RATIO = {10: 0.8, 1024: 0.6}
MAX_ADDED_P50_MS = 2.0


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and for how long."""

    out: Path = Path("bench_out")
    nprobe: int = 16
    nqs: tuple[int, ...] = (1, 64, 1024)
    ks: tuple[int, ...] = (10, 1024)
    seconds_per_cell: float = 2.5
    min_calls: int = 5
    warmup_calls: int = 3
    rerank_candidates: int = 100

    @property
    def datastore(self) -> Path:
        return self.out / "ds-2shard"

    @property
    def keys_path(self) -> Path:
        return self.out / "keys.npy"


@dataclass(frozen=True)
class Timing:
    """Repeated calls of one side in one cell."""

    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    qps: float


# ---------------------------------------------------------------------------------------------
# Data and datastore
# ---------------------------------------------------------------------------------------------

def load_vectors() -> tuple[np.ndarray, np.ndarray]:
    """The cached real keys (N_KEYS, 384) and held-out queries (N_QUERIES, 384), float32.

    Waits for the cache directory while another process is still encoding it (its `.tmpPID` folder is
    there), so that this run does not start a second (slow) encode. $BENCH_VECTORS names a cache
    folder to read instead (one carried to a machine that cannot encode, as `device_speed.sh` does).
    """
    from lm_worker.encoders.stdlib_vectors import cache_root, cache_stem, load_cached, stdlib_vectors

    if os.environ.get("BENCH_VECTORS"):
        vectors = load_cached(Path(os.environ["BENCH_VECTORS"]), N_KEYS, N_QUERIES)
        return (np.ascontiguousarray(vectors.keys, dtype=np.float32),
                np.ascontiguousarray(vectors.queries, dtype=np.float32))
    directory = cache_root() / f"{cache_stem(64, 16)}-n{N_KEYS}-q{N_QUERIES}"
    deadline = time.monotonic() + CACHE_WAIT_S

    def encoding_elsewhere() -> bool:  # another process's unfinished encode sits beside the cache
        return not directory.is_dir() and any(directory.parent.glob(directory.name + ".tmp*"))

    while encoding_elsewhere() and time.monotonic() < deadline:
        print(f"waiting for the vector cache {directory} ...", flush=True)
        time.sleep(15)
    vectors = stdlib_vectors(N_KEYS, N_QUERIES)
    keys = np.ascontiguousarray(vectors.keys, dtype=np.float32)
    queries = np.ascontiguousarray(vectors.queries, dtype=np.float32)
    return keys, queries


def save_keys(keys: np.ndarray, path: Path) -> None:
    """Writes keys.npy unless the same array is already there (keeps its mtime for the build)."""
    if path.is_file():
        old = np.load(path, mmap_mode="r")
        if old.shape == keys.shape and old.dtype == keys.dtype and np.array_equal(old, keys):
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, keys)


def datastore_matches(directory: Path, n: int) -> bool:
    """True when `directory` holds a datastore built with this benchmark's parameters."""
    if not (directory / "manifest.json").is_file():
        return False
    manifest = read_manifest(directory)
    from retriever_server.datastore.index import resolve_factory, train_size_for

    factory = resolve_factory("auto", n, manifest.dimension)
    trained_on = min(train_size_for(factory, manifest.dimension, "l2"), n)  # what the build records: its sample
    return (manifest.ntotal == n and len(manifest.shards) == SHARDS and manifest.has_keys
            and manifest.metric == "l2" and manifest.build.get("seed") == SEED
            and manifest.build.get("train_size") == trained_on and manifest.factory == factory)


def ensure_datastore(config: BenchConfig, keys: np.ndarray) -> None:
    """Builds the 2-shard datastore with Ray, or reuses the one already at config.datastore."""
    save_keys(keys, config.keys_path)
    if datastore_matches(config.datastore, len(keys)):
        print(f"reusing the datastore at {config.datastore}")
        return
    import ray

    from retriever_server.datastore.build import BuildConfig, build_datastore

    print(f"building a {SHARDS}-shard datastore at {config.datastore} ...", flush=True)
    build = BuildConfig(keys=config.keys_path, out=config.datastore, shards=SHARDS, keep_keys=True,
                        factory="auto", seed=SEED, overwrite=config.datastore.exists())
    try:
        build_datastore(build, num_cpus=2, progress=True)
    finally:
        ray.shutdown()  # Ray's workers must not compete for the cores while we time


def reference_index(config: BenchConfig, keys: np.ndarray) -> faiss.Index:
    """All keys in one index with the datastore's trained codec (shard 0's, emptied and refilled)."""
    index = faiss.read_index(str(config.datastore / "shard-00000" / "index.faiss"))
    index.reset()  # drops the rows, keeps the trained coarse quantizer and PQ codebooks
    index.add_with_ids(keys, np.arange(len(keys), dtype=np.int64))
    return index


def sharded_reference(config: BenchConfig) -> tuple[faiss.Index, list[faiss.Index]]:
    """The datastore's own shard files, memory-mapped as the servers map them, behind one
    `faiss.IndexShards` that searches them in parallel threads and merges their top-k.
    Returns the IndexShards and its parts (the caller keeps the parts alive)."""
    from retriever_server.datastore.index import read_index

    parts = [read_index(config.datastore / f"shard-{i:05d}" / "index.faiss") for i in range(SHARDS)]
    shards = faiss.IndexShards(parts[0].d, True, False)
    for part in parts:
        shards.add_shard(part)
    return shards, parts


def reference_search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int):
    """In-process FAISS search; returns (distances, ids)."""
    return index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))


def query_batches(queries: np.ndarray, nq: int, count: int = 16) -> list[np.ndarray]:
    """`count` contiguous (nq, d) batches walking through the queries (tiled past the end)."""
    rows = np.arange(count * nq) % len(queries)
    return [np.ascontiguousarray(queries[rows[i * nq:(i + 1) * nq]]) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------

def time_calls(call: Callable[[np.ndarray], object], batches: list[np.ndarray],
               config: BenchConfig) -> Timing:
    """Warms up, then calls repeatedly for about `seconds_per_cell` (at least `min_calls` calls)."""
    for i in range(config.warmup_calls):
        call(batches[i % len(batches)])
    latencies = []
    started = time.perf_counter()
    while len(latencies) < config.min_calls or time.perf_counter() - started < config.seconds_per_cell:
        batch = batches[len(latencies) % len(batches)]
        t0 = time.perf_counter()
        call(batch)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3
    nq = len(batches[0])
    return Timing(len(latencies), elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                  nq * len(latencies) / elapsed)


def floor_request(queries: np.ndarray, k: int, nprobe: int, version: str) -> bytes:
    """The floor's request for this batch: the real Search request's size, asking for answers the
    size of the real ones (each shard and the router answer nq x k neighbours)."""
    nq = len(queries)
    answer = encode_search_response(SearchResult(np.zeros((nq, k), np.int64), np.zeros((nq, k), np.float32),
                                                 datastore_version=version))
    return request_bytes(make_request(queries, k, nprobe).ByteSize(), len(answer), len(answer))


def _seconds_per_call(timing: Timing, nq: int) -> float:
    return nq / timing.qps


def ceilings(nq: int, ref: Timing, sref: Timing, floor: Timing) -> dict:
    """An estimate of the best any service could do here: the sharded search's time per call plus
    the floor's, as a throughput ratio to each reference."""
    best = _seconds_per_call(sref, nq) + _seconds_per_call(floor, nq)
    return {"ceiling_ratio": _seconds_per_call(ref, nq) / best,
            "ceiling_ratio_sharded": _seconds_per_call(sref, nq) / best}


def speed_cells(config: BenchConfig, index: faiss.Index, sharded: faiss.Index, client: RetrieverClient,
                floor: FloorDeployment, queries: np.ndarray, version: str) -> list[dict]:
    """Reference, sharded-reference, service and floor timings for every (nq, k), back to back."""
    cells = []
    for nq in config.nqs:
        batches = query_batches(queries, nq)
        for k in config.ks:
            ref = time_calls(lambda q, k=k: reference_search(index, q, k, config.nprobe), batches, config)
            sref = time_calls(lambda q, k=k: reference_search(sharded, q, k, config.nprobe), batches, config)
            svc = time_calls(lambda q, k=k: client.search(q, k=k, nprobe=config.nprobe), batches, config)
            request = floor_request(batches[0], k, config.nprobe, version)
            flo = time_calls(lambda q, r=request: floor.call(r), batches, config)
            cell = {"nq": nq, "k": k, "reference": asdict(ref), "sharded_reference": asdict(sref),
                    "service": asdict(svc), "floor": asdict(flo), "ratio": svc.qps / ref.qps,
                    "ratio_sharded": svc.qps / sref.qps, "added_p50_ms": svc.p50_ms - ref.p50_ms,
                    "added_p50_ms_sharded": svc.p50_ms - sref.p50_ms,
                    # the floor searches nothing: all of its p50 is what bare gRPC adds to a search
                    "floor_added_p50_ms": flo.p50_ms, "floor_added_p50_ms_sharded": flo.p50_ms,
                    **ceilings(nq, ref, sref, flo)}
            print(f"  nq={nq:5d} k={k:5d}: unsharded {ref.qps:9.0f} q/s, sharded {sref.qps:9.0f} q/s, "
                  f"service {svc.qps:9.0f} q/s, ratios {cell['ratio']:.2f} / {cell['ratio_sharded']:.2f}; "
                  f"floor p50 {flo.p50_ms:.2f} ms", flush=True)
            cells.append(cell)
    return cells


# ---------------------------------------------------------------------------------------------
# Recall
# ---------------------------------------------------------------------------------------------

def exact_neighbours(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground truth: brute-force L2 top-k ids."""
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    return flat.search(queries, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found among its returned top-k."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f[:k], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def recall_rows(config: BenchConfig, index: faiss.Index, sharded: faiss.Index, client: RetrieverClient,
                keys: np.ndarray, queries: np.ndarray, nlist: int) -> list[dict]:
    """recall@10 of the unsharded and the sharded reference, the service, and the service with exact
    re-ranking, per nprobe."""
    truth = exact_neighbours(keys, queries, RECALL_K)
    rows = []
    for nprobe in [p for p in RECALL_NPROBES if p <= nlist]:
        ref_ids = reference_search(index, queries, RECALL_K, nprobe)[1]
        sharded_ids = reference_search(sharded, queries, RECALL_K, nprobe)[1]
        svc_ids = client.search(queries, k=RECALL_K, nprobe=nprobe).ids
        rerank_ids = client.search(queries, k=RECALL_K, nprobe=nprobe, exact_rerank=True,
                                   rerank_candidates=config.rerank_candidates).ids
        rows.append({"nprobe": nprobe, "reference": recall_at(ref_ids, truth),
                     "sharded_reference": recall_at(sharded_ids, truth),
                     "service": recall_at(svc_ids, truth), "service_rerank": recall_at(rerank_ids, truth),
                     "ids_equal": float(np.mean(ref_ids == svc_ids))})
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def bars(cells: list[dict], recall: list[dict]) -> list[dict]:
    """Each bar, against each reference, with its measured value, PASS/MISS, and what the floor
    leaves possible (the floor's own added p50; the estimated ceiling of the ratio); and per nprobe,
    the service's recall against both references'."""
    out = []
    for row in recall:
        gap = max(abs(row["service"] - row["reference"]), abs(row["service"] - row["sharded_reference"]))
        out.append({"bar": f"nprobe={row['nprobe']}: service recall@{RECALL_K} equal to both references' "
                           f"(within {RECALL_SLACK:g})",
                    "value": f"{row['service']:.4f} vs {row['reference']:.4f} / {row['sharded_reference']:.4f}",
                    "pass": gap <= RECALL_SLACK, "floor": "-"})
    for cell in cells:
        nq, k = cell["nq"], cell["k"]
        for name, suffix in (("unsharded", ""), ("sharded", "_sharded")):
            if nq >= 64 and k in MIN_RATIO:
                ratio = cell["ratio" + suffix]
                out.append({"bar": f"nq={nq} k={k}: service >= {MIN_RATIO[k]}x {name} in-process throughput",
                            "value": f"{ratio:.2f}x", "pass": ratio >= MIN_RATIO[k],
                            "floor": f"ceiling {cell['ceiling_ratio' + suffix]:.2f}x"})
            if nq == 1:
                added = cell["added_p50_ms" + suffix]
                floor_added = cell["floor_added_p50_ms" + suffix]
                out.append({"bar": f"nq=1 k={k}: service adds < {MAX_ADDED_P50_MS:g} ms at p50 over {name}",
                            "value": f"{added:+.2f} ms", "pass": added < MAX_ADDED_P50_MS,
                            "floor": f"floor adds {floor_added:+.2f} ms"})
    return out


def speed_table(cells: list[dict], nprobe: int) -> str:
    lines = [f"Speed (nprobe={nprobe}; p50/p99 latency per call in ms; throughput in queries/s). "
             "Ratio = service q/s over the in-process reference's.", "",
             "| nq | k | unsharded p50/p99 | unsharded q/s | sharded p50/p99 | sharded q/s "
             "| service p50/p99 | service q/s | ratio vs unsharded | ratio vs sharded | floor p50/p99 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        r, h, s, f = c["reference"], c["sharded_reference"], c["service"], c["floor"]
        lines.append(f"| {c['nq']} | {c['k']} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['qps']:.0f} | "
                     f"{h['p50_ms']:.2f} / {h['p99_ms']:.2f} | {h['qps']:.0f} | "
                     f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} | {s['qps']:.0f} | {c['ratio']:.2f} | "
                     f"{c['ratio_sharded']:.2f} | {f['p50_ms']:.2f} / {f['p99_ms']:.2f} |")
    return "\n".join(lines)


def recall_table(rows: list[dict], rerank_candidates: int) -> str:
    lines = [f"Recall@{RECALL_K} vs exact search ({N_QUERIES} held-out queries)", "",
             f"| nprobe | reference | sharded reference | service | service + exact rerank ({rerank_candidates}) "
             "| ids equal ref |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['nprobe']} | {r['reference']:.4f} | {r['sharded_reference']:.4f} | {r['service']:.4f} | "
                     f"{r['service_rerank']:.4f} | {r['ids_equal']:.4f} |")
    return "\n".join(lines)


def bars_table(results: list[dict]) -> str:
    lines = ["Bars (informational). Floor: the transport floor's own added p50, or the estimated ceiling "
             "of the ratio (sharded search time + floor time per call).", "",
             "| bar | measured | result | floor |", "|---|---:|---|---:|"]
    lines += [f"| {b['bar']} | {b['value']} | {'PASS' if b['pass'] else 'MISS'} | {b['floor']} |" for b in results]
    return "\n".join(lines)


def write_plot(results: dict, path: Path) -> None:
    """Recall@10 against nprobe, and throughput of the three sides per (nq, k), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = results["recall"]
    nprobes = [r["nprobe"] for r in rows]
    left.plot(nprobes, [r["service"] for r in rows], "o-", label="service (= in-process index)")
    left.plot(nprobes, [r["service_rerank"] for r in rows], "s-", label="service, exact re-rank of 100")
    left.set(xscale="log", xlabel="nprobe", ylabel=f"recall@{RECALL_K}", ylim=(0, 1.02),
             title=f"{results['datastore']['factory']}, {results['datastore']['ntotal']} real stdlib vectors")
    left.set_xticks(nprobes, [str(n) for n in nprobes])
    left.grid(alpha=0.3)
    left.legend(loc="lower right")
    cells = results["speed"]
    x = np.arange(len(cells))
    for offset, (key, label) in zip((-0.27, 0.0, 0.27), (("reference", "in-process, unsharded"),
                                                          ("sharded_reference", "in-process, 2 shards"),
                                                          ("service", "service: router + 2 shards"))):
        right.bar(x + offset, [c[key]["qps"] for c in cells], width=0.27, label=label)
    right.set_xticks(x, [f"nq={c['nq']}\nk={c['k']}" for c in cells])
    right.set(yscale="log", ylabel="queries/s", title=f"throughput, nprobe={results['config']['nprobe']}")
    right.grid(alpha=0.3, axis="y")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    return {"python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
            "cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
            "machine": platform.machine(), "load_average_1m": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def run(config: BenchConfig) -> dict:
    """Builds or reuses the datastore, starts the service, measures, returns every number."""
    keys, queries = load_vectors()
    ensure_datastore(config, keys)
    manifest = read_manifest(config.datastore)
    print(f"datastore: {manifest.ntotal} rows, {manifest.factory}, nlist {manifest.nlist}, "
          f"{len(manifest.shards)} shards", flush=True)
    index = reference_index(config, keys)
    sharded, _parts = sharded_reference(config)
    deployment = LocalDeployment(config.datastore, replicas=1)
    deployment.start()
    try:
        with RetrieverClient(deployment.router_address, timeout=300) as client, FloorDeployment() as floor:
            print("timing (references, service, then the transport floor, per cell) ...", flush=True)
            cells = speed_cells(config, index, sharded, client, floor, queries, manifest.version)
            print("recall ...", flush=True)
            recall = recall_rows(config, index, sharded, client, keys, queries, manifest.nlist)
    finally:
        deployment.stop()
    return {"config": {**asdict(config), "out": str(config.out)}, "environment": environment(),
            "datastore": {"path": str(config.datastore), "ntotal": manifest.ntotal,
                          "factory": manifest.factory, "nlist": manifest.nlist,
                          "shards": len(manifest.shards), "version": manifest.version},
            "speed": cells, "recall": recall, "bars": bars(cells, recall)}


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory")
    parser.add_argument("--nprobe", type=int, default=16, help="nprobe for the speed table")
    parser.add_argument("--quick", action="store_true", help="about 0.5 s per cell instead of 2.5 s")
    args = parser.parse_args(argv)
    if args.quick:
        return BenchConfig(out=args.out, nprobe=args.nprobe, seconds_per_cell=0.5, warmup_calls=1)
    return BenchConfig(out=args.out, nprobe=args.nprobe)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    results = run(config)
    env = results["environment"]
    print(f"\nfaiss {env['faiss']}, {env['cpus']} CPUs, 1-min load average after timing {env['load_average_1m']:.2f}")
    print()
    print(speed_table(results["speed"], config.nprobe))
    print()
    print(recall_table(results["recall"], config.rerank_candidates))
    print()
    print(bars_table(results["bars"]))
    path = config.out / "search_service.json"
    path.write_text(json.dumps(results, indent=2))
    write_plot(results, config.out / "search_service.png")
    print(f"\nwrote {path} and {config.out / 'search_service.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
