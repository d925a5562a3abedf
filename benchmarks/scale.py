"""Scale benchmark: how build time, memory, disk, query cost and recall grow with the datastore, at the
datastore's default settings (`auto`), from 10^5 to 10^7 keys.

Keys: the cached real MiniLM vectors of CPython stdlib chunks (`lm_worker.encoders.stdlib_vectors`, R real
keys) and, past R rows, keys drawn around them: row i is real key i mod R plus seeded Gaussian noise of
`NOISE` per dimension, renormalised (unit norm, inner product, as MiniLM's). Every table says so. The
queries are held-out real MiniLM queries. Recall is always against exact search over the same rows.

Per size N, in one run:

- **build**: `retriever-server build` in a child process (2 shards, `--keep-keys`, metric ip, `auto`,
  its own local Ray cluster of 2 CPUs, or `--build-cpus`): its wall seconds, split into training and adding (the
  manifest's `build` record), and the add phase's rows/s per core beside plain single-process FAISS
  `add` into the same trained codec (shard 0's index, emptied): with as many threads as the build has
  cores over every row (per core: the same rows, cores and sustained load), and with one thread on a
  slice of at most 10^6 rows; the peak anonymous memory of
  the build's process and every Ray process below it together, sampled every 0.2 s from /proc, and
  their file-backed pages apart; and each shard task's seconds by phase (the manifest's
  `shard_phases`: FAISS's add, the keys' float16 copy, spills, the index file, waiting for keys);
- **disk**: bytes per row of the published datastore;
- **serve**: `LocalDeployment` start-up seconds, each shard's RssAnon and RssFile, an idle shard's
  measured the same way; each shard searches with one FAISS thread, as the in-process reference does
  (`serve --threads 1` where the launcher would give it more: `cpu_cost.serve_args`);
- **queries**: q/s, p50 latency and CPU ms per request over every process (client, router, shards,
  from /proc) at nq=1 and nq=64, k=10 and k=1024, through the router at the default nprobe; and the
  latency of the first request after the index and key files' pages are dropped
  (`posix_fadvise(DONTNEED)`), beside the warm one;
- **in-process FAISS** on the same shards, in the same run: their index files opened as the shards open
  them and searched one after another in this process, one thread, at the same nprobe: q/s and CPU ms
  per request (the sharded reference);
- **recall@10** at the default settings with exact re-rank of 100 candidates, and without re-rank.

    python benchmarks/scale.py [--sizes 100000,1000000,3000000,10000000] [--quick] [--out bench_out/scale]
                               [--real-keys N|all] [--build-cpus C] [--gpu] [--keep-others]

`--gpu` (faiss GPU build) builds with `retriever-server build --gpu` and serves with `serve --gpu`;
`benchmarks/gpu_scale.sh` runs it with the kNN-LM evaluation on CUDA.

Default sizes 10^5, 10^6, 3·10^6 and 10^7; `--quick` runs 10^5 and 10^6. Writes OUT/scale.json and
OUT/scale.png (log-log: build seconds, peak memory, disk, query CPU and recall against rows) and prints
the table. Datastores are kept in OUT and reused when their rows and real keys match (OUT/nN-realR) and
OUT/nN-realR/build.json says they were built with the same `--build-cpus` and `--gpu` (else rebuilt).
`--keep-others` re-measures only `--sizes` and keeps the other sizes an earlier run wrote to
OUT/scale.json in the JSON, table and plot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_cost import serve_args  # noqa: E402
from decoding import ProcessGone, process_cpu_s  # noqa: E402

from retriever_server.cluster.launcher import LocalDeployment  # noqa: E402
from retriever_server.datastore import index as ix  # noqa: E402
from retriever_server.datastore.manifest import read_manifest  # noqa: E402
from retriever_server.datastore.row_parts import open_rows, write_parts_index  # noqa: E402
from retriever_server.serving.client import RetrieverClient  # noqa: E402

NOISE = 0.02  # per-dimension Gaussian noise added to a real key for the rows past the real ones
REAL_KEYS = 20_000  # the real MiniLM keys drawn from (the benchmarks' shared cache)
ALL_REAL_KEYS = 140_370  # every 64-token chunk of the stdlib's non-held-out files (--real-keys all)
ALL_CHUNKS = 1 << 20  # chunks a file may give: all of them
QUERIES = 256
PART_ROWS = 1 << 20  # rows per .npy part of generated keys
SHARDS = 2
BUILD_CPUS = 2  # the build's local Ray cluster: one core per shard task
REFERENCE_BLOCK = 1_000_000  # rows read (untimed) per FAISS add of the reference over every row
RERANK = 100


def build_cores(build_cpus: int) -> int:
    """The cores a build on `build_cpus` CPUs keeps busy: its SHARDS tasks take max(1, build_cpus // SHARDS)
    CPUs (and FAISS threads) each, so as many run at once as fit (one core: one after the other)."""
    return min(build_cpus, SHARDS * max(1, build_cpus // SHARDS))


@dataclass(frozen=True)
class ScaleConfig:
    """What to measure."""

    sizes: tuple[int, ...] = (100_000, 1_000_000, 3_000_000, 10_000_000)
    out: Path = Path("bench_out/scale")
    seconds_per_cell: float = 2.0
    reference_rows: int = 1_000_000  # plain FAISS add on one thread is timed on at most this many rows
    real_keys: int = REAL_KEYS
    seed: int = 0
    build_cpus: int = BUILD_CPUS  # the build's local Ray cluster; each of the SHARDS tasks gets an equal share
    gpu: bool = False  # build with `--gpu` (k-means and list assignment) and serve with `--gpu`


@dataclass
class SizeResult:
    """Every figure of one size (see the module doc)."""

    rows: int
    real_rows: int
    factory: str = ""
    default_nprobe: int = 0
    build_s: float = 0.0
    train_s: float = 0.0
    add_s: float = 0.0
    add_rows_per_s_per_core: float = 0.0
    faiss_add_rows_per_s: float = 0.0  # one thread, on at most reference_rows rows
    faiss_add_rows_per_s_per_core: float = 0.0  # as many threads as the build's busy cores, every row, per core
    peak_build_anon_gib: float = 0.0
    peak_build_file_gib: float = 0.0
    disk_bytes_per_row: float = 0.0
    serve_ready_s: float = 0.0
    shard_anon_mib: list[float] = field(default_factory=list)
    shard_file_mib: list[float] = field(default_factory=list)
    idle_shard_anon_mib: float = 0.0
    index_file_mib: list[float] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    in_process: list[dict] = field(default_factory=list)
    cold_ms: float = 0.0
    warm_ms: float = 0.0
    recall_rerank: float = 0.0
    recall_plain: float = 0.0
    shard_phases: list[dict | None] = field(default_factory=list)  # each shard task's seconds by phase


# ---------------------------------------------------------------------------------------------
# Keys and exact neighbours
# ---------------------------------------------------------------------------------------------

def real_vectors(n_keys: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm real MiniLM keys (n_keys, 384) and held-out queries (n_queries, 384). Past the
    benchmarks' cached 20,000 keys (at most 16 chunks a file), the keys are every chunk of the stdlib's
    files in turn (`ALL_CHUNKS`), encoded once and cached; the queries stay the cached held-out ones."""
    from search_service import load_vectors

    keys, queries = load_vectors()
    if n_keys > len(keys):
        from lm_worker.encoders.stdlib_vectors import stdlib_vectors

        keys = stdlib_vectors(n_keys, 1, max_per_doc=ALL_CHUNKS, progress=True).keys
    return normalise(keys[:n_keys]), normalise(queries[:n_queries])


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def key_rows(real: np.ndarray, start: int, stop: int, seed: int) -> np.ndarray:
    """Rows start..stop-1 of the datastore: real keys first, then real keys plus seeded noise."""
    idx = np.arange(start, stop)
    rows = real[idx % len(real)].copy()
    drawn = idx >= len(real)
    if drawn.any():
        rng = np.random.default_rng([seed, start])
        rows[drawn] += rng.normal(0.0, NOISE, size=(int(drawn.sum()), real.shape[1])).astype(np.float32)
        rows[drawn] = normalise(rows[drawn])
    return rows


def write_keys(real: np.ndarray, n: int, folder: Path, seed: int) -> Path:
    """The N keys as a parts index of .npy parts (reused when already written)."""
    index = folder / "keys.parts.json"
    if index.is_file() and json.loads(index.read_text())["shape"][0] == n:
        return index
    parts = []
    for p, start in enumerate(range(0, n, PART_ROWS)):
        path = folder / "parts" / f"{p:05d}" / "keys.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, key_rows(real, start, min(n, start + PART_ROWS), seed))
        parts.append(path)
    return write_parts_index(index, parts)


def exact_top_k(real: np.ndarray, n: int, queries: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Exact inner-product top-k ids (nq, k) over the N rows, a part at a time."""
    best_d = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, n, PART_ROWS):
        rows = key_rows(real, start, min(n, start + PART_ROWS), seed)
        d, i = faiss.knn(queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)
        d, i = np.concatenate([best_d, d], axis=1), np.concatenate([best_i, i + start], axis=1)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def cached_truth(path: Path, real: np.ndarray, n: int, queries: np.ndarray, seed: int) -> np.ndarray:
    """`exact_top_k` at k=10, kept in `path` and reused while the keys and queries are the same."""
    stamp = np.array([n, len(real), seed, NOISE * 1e6, float(np.sum(real, dtype=np.float64)),
                      float(np.sum(queries, dtype=np.float64))])
    if path.is_file():
        saved = np.load(path)
        if np.array_equal(saved["stamp"], stamp):
            return saved["ids"]
    ids = exact_top_k(real, n, queries, 10, seed)
    np.savez(path, ids=ids, stamp=stamp)
    return ids


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


# ---------------------------------------------------------------------------------------------
# Processes: memory and CPU from /proc
# ---------------------------------------------------------------------------------------------

def status_kib(pid: int, field_name: str) -> int:
    """A `/proc/PID/status` field in KiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


class PeakMemory:
    """Samples the summed RssAnon (and RssFile) of process `pid` and its descendants until stopped."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.pid, self.every_s, self.anon_kib, self.file_kib = pid, every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = descendants(self.pid)
            self.anon_kib = max(self.anon_kib, sum(status_kib(p, "RssAnon") for p in pids))
            self.file_kib = max(self.file_kib, sum(status_kib(p, "RssFile") for p in pids))
            self._stop.wait(self.every_s)


def drop_pages(paths: list[Path]) -> None:
    """Asks the kernel to drop these files' cached pages (`posix_fadvise(DONTNEED)`)."""
    for path in paths:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------------------------------------
# One size
# ---------------------------------------------------------------------------------------------

BUILD_FIGURES = ("build_s", "train_s", "add_s", "add_rows_per_s_per_core", "peak_build_anon_gib",
                 "peak_build_file_gib")


def reusable_figures(config: ScaleConfig, out: Path, rows: int) -> dict | None:
    """The build figures OUT/../build.json kept for the datastore at `out`, when that datastore holds `rows`
    rows and was built as this run would build it (the same --build-cpus and --gpu); else None."""
    figures = out.parent / "build.json"
    if not ((out / "manifest.json").is_file() and figures.is_file() and read_manifest(out).ntotal == rows):
        return None
    kept = json.loads(figures.read_text())
    if kept.get("build_cpus") != config.build_cpus or kept.get("gpu") != config.gpu:
        print(f"  rebuilding {out}: built with --build-cpus {kept.get('build_cpus')}, gpu {kept.get('gpu')}; "
              f"this run: --build-cpus {config.build_cpus}, gpu {config.gpu}", flush=True)
        return None
    return {name: kept[name] for name in BUILD_FIGURES}


def build(config: ScaleConfig, keys: Path, out: Path, result: SizeResult) -> None:
    """Builds (or reuses, `reusable_figures`) the datastore of `result.rows` rows with `retriever-server
    build` in a child process (its own local Ray cluster, 2 CPUs), and records its build figures: peak memory
    is summed over that process and every process below it (the Ray cluster it starts), as a user's build runs."""
    figures = out.parent / "build.json"  # the build's figures and settings, kept beside the datastore for reuse
    kept = reusable_figures(config, out, result.rows)
    if kept is not None:
        print(f"  reusing {out} (build figures from the run that built it)", flush=True)
        for name, value in kept.items():
            setattr(result, name, value)
        return
    command = [sys.executable, "-m", "retriever_server.cli", "build", str(keys), "--out", str(out),
               "--shards", str(SHARDS), "--metric", "ip", "--keep-keys", "--seed", str(config.seed),
               "--num-cpus", str(config.build_cpus), "--cpus-per-shard", str(max(1, config.build_cpus // SHARDS)),
               "--no-progress", *(["--overwrite"] if out.exists() else []), *(["--gpu"] if config.gpu else [])]
    started = time.perf_counter()
    alone = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own, below it
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=alone)
    with PeakMemory(child.pid) as memory:
        output, _ = child.communicate()
    if child.returncode:
        raise RuntimeError(f"the build failed ({child.returncode}):\n{output}")
    result.build_s = time.perf_counter() - started
    manifest = read_manifest(out)
    result.train_s, result.add_s = manifest.build["train_seconds"], manifest.build["add_seconds"]
    result.add_rows_per_s_per_core = result.rows / result.add_s / build_cores(config.build_cpus)
    result.peak_build_anon_gib = memory.anon_kib / 2 ** 20
    result.peak_build_file_gib = memory.file_kib / 2 ** 20
    figures.write_text(json.dumps({**{name: getattr(result, name) for name in BUILD_FIGURES},
                                   "build_cpus": config.build_cpus, "gpu": config.gpu}))


def faiss_reference(config: ScaleConfig, real: np.ndarray, keys_path: Path, out: Path, result: SizeResult) -> None:
    """Plain FAISS in this process: `add` into the build's trained codec (shard 0's index, emptied),
    with as many threads as the build keeps cores busy (`build_cores`), over every row the build added
    (read from its keys a block at a time, untimed; rows/s per core: the same rows, cores and sustained
    load as the build's add phase; every row's codes are held in memory meanwhile: 3.9 GB at 10^7), and
    with one thread on a slice of at most `reference_rows` rows."""
    manifest = read_manifest(out)
    index = faiss.read_index(str(out / manifest.shards[0].name / "index.faiss"))
    index.reset()
    body = faiss.serialize_index(index)
    keys = open_rows(keys_path)
    faiss.omp_set_num_threads(build_cores(config.build_cpus))
    index, seconds = faiss.deserialize_index(body), 0.0
    for start in range(0, result.rows, REFERENCE_BLOCK):
        rows = np.ascontiguousarray(keys[start:start + REFERENCE_BLOCK], dtype=np.float32)
        began = time.perf_counter()
        index.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
        seconds += time.perf_counter() - began
    del index
    result.faiss_add_rows_per_s_per_core = result.rows / seconds / build_cores(config.build_cpus)
    n = min(result.rows, config.reference_rows)
    rows = key_rows(real, 0, n, config.seed)
    index = faiss.deserialize_index(body)
    faiss.omp_set_num_threads(1)
    began = time.perf_counter()
    index.add(rows)
    result.faiss_add_rows_per_s = n / (time.perf_counter() - began)
    faiss.omp_set_num_threads(os.cpu_count() or 1)


def cells() -> list[tuple[int, int]]:
    return [(nq, k) for nq in (1, 64) for k in (10, 1024)]


def batches_of(queries: np.ndarray, nq: int) -> list[np.ndarray]:
    """Eight batches of nq queries, taken in turn from the query set."""
    batches = [queries[(i * nq) % len(queries):][:nq] for i in range(8)]
    return [b if len(b) == nq else queries[:nq] for b in batches]


def query_cells(client: RetrieverClient, deployment: LocalDeployment, queries: np.ndarray,
                seconds: float) -> list[dict]:
    """q/s, p50 ms and CPU ms per request over every process at nq in {1, 64}, k in {10, 1024}."""
    pids = {"router": deployment.router.popen.pid,
            **{f"shard {s}": r[0].popen.pid for s, r in enumerate(deployment.shards)}}
    found = []
    for nq, k in cells():
        batches = batches_of(queries, nq)
        for batch in batches:  # warm: every page these queries touch (a new build's files are not cached)
            client.search(batch, k=k)
        before = {name: process_cpu_s(pid) for name, pid in pids.items()}
        mine, started, latencies = time.process_time(), time.perf_counter(), []
        while time.perf_counter() - started < seconds or len(latencies) < 5:
            t = time.perf_counter()
            client.search(batches[len(latencies) % len(batches)], k=k)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - started
        cpu = time.process_time() - mine + sum(process_cpu_s(pid) - before[name] for name, pid in pids.items())
        found.append({"nq": nq, "k": k, "qps": nq * len(latencies) / wall,
                      "p50_ms": 1e3 * float(np.median(latencies)), "cpu_ms": 1e3 * cpu / len(latencies)})
    return found


def in_process_cells(out: Path, queries: np.ndarray, seconds: float) -> list[dict]:
    """The sharded reference: the shards' index files opened as a shard opens them (mapped) and searched
    one after another in this process, one thread, at the datastore's default nprobe; q/s and CPU ms
    per request (both shards) at each cell of `query_cells`."""
    manifest = read_manifest(out)
    indexes = [ix.read_index(out / shard.name / "index.faiss") for shard in manifest.shards]
    faiss.omp_set_num_threads(1)
    found = []
    for nq, k in cells():
        batches = batches_of(queries, nq)
        for index in indexes:  # warm, as the service is
            for batch in batches:
                ix.search(index, batch, k, manifest.default_nprobe)
        cpu, started, count = time.process_time(), time.perf_counter(), 0
        while time.perf_counter() - started < seconds or count < 5:
            for index in indexes:
                ix.search(index, batches[count % len(batches)], k, manifest.default_nprobe)
            count += 1
        wall = time.perf_counter() - started
        found.append({"nq": nq, "k": k, "qps": nq * count / wall,
                      "cpu_ms": 1e3 * (time.process_time() - cpu) / count})
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return found


def serve_and_query(config: ScaleConfig, out: Path, queries: np.ndarray, truth: np.ndarray,
                    result: SizeResult) -> None:
    """Serves the datastore, reads its processes' memory, times queries cold and warm, measures recall."""
    manifest = read_manifest(out)
    files = [out / shard.name / name for shard in manifest.shards for name in shard.files]
    drop_pages(files)
    started = time.perf_counter()
    args = [*(["--gpu"] if config.gpu else []), *serve_args()]  # one FAISS thread a shard, as in process
    with LocalDeployment(out, extra_args=args) as deployment, \
            RetrieverClient(deployment.router_address, timeout=300) as client:  # a cold search on a loaded host
        result.serve_ready_s = time.perf_counter() - started
        shard_pids = [r[0].popen.pid for r in deployment.shards]
        result.idle_shard_anon_mib = status_kib(shard_pids[0], "RssAnon") / 1024  # before any search
        drop_pages(files)
        t = time.perf_counter()
        client.search(queries[:1], k=10)
        result.cold_ms = 1e3 * (time.perf_counter() - t)
        t = time.perf_counter()
        client.search(queries[1:2], k=10)
        result.warm_ms = 1e3 * (time.perf_counter() - t)
        found = client.search(queries, k=10, exact_rerank=True, rerank_candidates=RERANK).ids
        result.recall_rerank = recall_at_k(found, truth, 10)
        result.recall_plain = recall_at_k(client.search(queries, k=10).ids, truth, 10)
        result.queries = query_cells(client, deployment, queries, config.seconds_per_cell)
        result.shard_anon_mib = [status_kib(p, "RssAnon") / 1024 for p in shard_pids]
        result.shard_file_mib = [status_kib(p, "RssFile") / 1024 for p in shard_pids]
    result.in_process = in_process_cells(out, queries, config.seconds_per_cell)
    result.index_file_mib = [(out / s.name / "index.faiss").stat().st_size / 2 ** 20 for s in manifest.shards]
    result.disk_bytes_per_row = sum(f.stat().st_size for f in files) / result.rows


def size_folder(out: Path, n: int, real_keys: int) -> Path:
    """Where the keys, exact neighbours and datastore of N rows drawn around `real_keys` real keys live."""
    return out / f"n{n}-real{real_keys}"


def measure_size(config: ScaleConfig, real: np.ndarray, queries: np.ndarray, n: int) -> SizeResult:
    result = SizeResult(rows=n, real_rows=min(n, len(real)))
    folder = size_folder(config.out, n, len(real))
    print(f"{n} rows ({result.real_rows} real, the rest real + noise {NOISE}):", flush=True)
    keys = write_keys(real, n, folder / "keys", config.seed)
    truth = cached_truth(folder / "truth.npz", real, n, queries, config.seed)
    build(config, keys, folder / "ds", result)
    manifest = read_manifest(folder / "ds")
    result.factory, result.default_nprobe = manifest.factory, manifest.default_nprobe
    result.shard_phases = manifest.build.get("shard_phases") or []  # None for a shard an older version built
    faiss_reference(config, real, keys, folder / "ds", result)
    serve_and_query(config, folder / "ds", queries, truth, result)
    print(f"  {manifest.factory} nprobe {manifest.default_nprobe}: build {result.build_s:.1f} s, recall@10 "
          f"{result.recall_rerank:.3f} (re-rank {RERANK}) / {result.recall_plain:.3f}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _joined(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def table(results: list[SizeResult], build_cpus: int = BUILD_CPUS) -> str:
    lines = ["| rows (real) | factory, nprobe | build s (train + add) | add rows/s/core (FAISS add per core: "
             f"{build_cores(build_cpus)} threads, every row / 1 thread, first 10^6) "
             "| peak build anon GiB | disk B/row | serve ready s | shard anon / file MiB (idle anon) | index MiB "
             "| cold / warm ms | recall@10 re-rank 100 / plain |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.rows} ({r.real_rows}) | {r.factory}, {r.default_nprobe} | "
                     f"{r.build_s:.1f} ({r.train_s:.1f} + {r.add_s:.1f}) | "
                     f"{r.add_rows_per_s_per_core:.0f} ({r.faiss_add_rows_per_s_per_core:.0f} / "
                     f"{r.faiss_add_rows_per_s:.0f}) | "
                     f"{r.peak_build_anon_gib:.2f} | {r.disk_bytes_per_row:.0f} | {r.serve_ready_s:.2f} | "
                     f"{_joined(r.shard_anon_mib)} / {_joined(r.shard_file_mib)} ({r.idle_shard_anon_mib:.0f}) | "
                     f"{_joined(r.index_file_mib)} | {r.cold_ms:.1f} / {r.warm_ms:.1f} | "
                     f"{r.recall_rerank:.3f} / {r.recall_plain:.3f} |")
    lines += ["", "| rows | nq | k | service q/s | p50 ms | service CPU ms per request (all processes; 1 FAISS "
              "thread a shard) | in-process q/s | in-process CPU ms (1 thread) | efficiency |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for c, f in zip(r.queries, r.in_process):
            lines.append(f"| {r.rows} | {c['nq']} | {c['k']} | {c['qps']:.0f} | {c['p50_ms']:.2f} | {c['cpu_ms']:.2f} "
                         f"| {f['qps']:.0f} | {f['cpu_ms']:.2f} | {f['cpu_ms'] / c['cpu_ms']:.2f} |")
    return "\n".join(lines)


def cpu_at(result: SizeResult, nq: int, k: int) -> float:
    return next(c["cpu_ms"] for c in result.queries if c["nq"] == nq and c["k"] == k)


def plot(results: list[SizeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r.rows for r in results]
    series = {"build s": [r.build_s for r in results],
              "peak build anon GiB": [r.peak_build_anon_gib for r in results],
              "disk bytes/row": [r.disk_bytes_per_row for r in results],
              "CPU ms per request (nq=64, k=10)": [cpu_at(r, 64, 10) for r in results]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, values in series.items():
        axes[0].loglog(n, values, marker="o", label=label)
    axes[0].set_xlabel("rows")
    axes[0].set_ylabel("value, in the unit its label names")
    axes[0].set_title("cost against size (log-log)")
    axes[0].legend(fontsize=8)
    axes[1].semilogx(n, [r.recall_rerank for r in results], marker="o", label=f"re-rank {RERANK}")
    axes[1].semilogx(n, [r.recall_plain for r in results], marker="o", label="no re-rank")
    axes[1].axhline(0.9, color="grey", linestyle=":")
    axes[1].set_xlabel("rows")
    axes[1].set_ylabel("recall@10 against exact search")
    axes[1].set_title("recall@10 at the default settings")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def earlier_results(out: Path, sizes: tuple[int, ...]) -> list[SizeResult]:
    """The results in `out/scale.json` (an earlier run's) of sizes other than `sizes`."""
    path = out / "scale.json"
    if not path.is_file():
        return []
    kept = [r for r in json.loads(path.read_text())["results"] if r["rows"] not in sizes]
    return [SizeResult(**r) for r in kept]


def run(config: ScaleConfig, vectors: tuple[np.ndarray, np.ndarray] | None = None,
        keep_others: bool = False) -> list[SizeResult]:
    """Measures every size; `vectors` (real keys, queries) replaces the benchmarks' cached MiniLM vectors.
    With `keep_others`, the sizes an earlier run measured in the same folder and this one does not are
    kept in its JSON and plot."""
    real, queries = vectors if vectors is not None else real_vectors(config.real_keys, QUERIES)
    real, queries = normalise(real), normalise(queries)
    config.out.mkdir(parents=True, exist_ok=True)
    others = earlier_results(config.out, config.sizes) if keep_others else []
    results = sorted(others + [measure_size(config, real, queries, n) for n in config.sizes], key=lambda r: r.rows)
    (config.out / "scale.json").write_text(json.dumps(
        {"config": {**asdict(config), "out": str(config.out)}, "noise": NOISE, "results": [asdict(r) for r in results]},
        indent=2))
    plot(results, config.out / "scale.png")
    return results


def phase_table(results: list[SizeResult]) -> str:
    """Each shard task's add phase by phase (from the manifest): where the build's seconds went."""
    names = ("add", "keys", "spill", "index", "read")
    lines = ["| rows | shard | task s | " + " | ".join(f"{n} s" for n in names) + " | FAISS share |",
             "|---:|---:|---:|" + "---:|" * len(names) + "---:|"]
    for r in results:
        for i, phases in enumerate(r.shard_phases):
            if not phases:
                continue
            total = max(sum(phases.values()), 1e-9)
            lines.append(f"| {r.rows} | {i} | {total:.1f} | " + " | ".join(f"{phases.get(n, 0.0):.1f}" for n in names)
                         + f" | {phases.get('add', 0.0) / total:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="", help="comma-separated row counts (default 10^5, 10^6, 3·10^6, 10^7)")
    parser.add_argument("--quick", action="store_true", help="10^5 and 10^6 rows")
    parser.add_argument("--out", type=Path, default=ScaleConfig.out)
    parser.add_argument("--build-cpus", type=int, default=BUILD_CPUS,
                        help=f"CPUs of the build's Ray cluster, shared by its {SHARDS} shard tasks "
                             f"(default {BUILD_CPUS})")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the results of sizes an earlier run measured in --out and this one does not "
                             "(each row stays its own run's)")
    parser.add_argument("--gpu", action="store_true",
                        help="build with --gpu (k-means, list assignment) and serve the shards' indexes on the GPU")
    parser.add_argument("--real-keys", default=str(REAL_KEYS),
                        help=f"real MiniLM keys the rows are drawn around: a count, or 'all' ({ALL_REAL_KEYS}, every "
                             f"chunk of the stdlib, encoded once: about 16 minutes on 2 cores); default {REAL_KEYS}")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s) or ((100_000, 1_000_000) if args.quick else
                                                               ScaleConfig.sizes)
    real_keys = ALL_REAL_KEYS if args.real_keys == "all" else int(args.real_keys)
    config = ScaleConfig(sizes=sizes, out=args.out, real_keys=real_keys, build_cpus=args.build_cpus, gpu=args.gpu)
    try:
        results = run(config, keep_others=args.keep_others)
    except ProcessGone as err:
        sys.exit(f"scale.py: {err}")
    print()
    print(f"keys: {min(config.real_keys, max(config.sizes))} real MiniLM keys, the rest real + Gaussian noise "
          f"{NOISE} per dimension; {QUERIES} held-out real queries; 2 shards, metric ip, defaults of `auto`")
    print(table(results, config.build_cpus))
    print("\nadd phase by shard task (FAISS share: the task's seconds in FAISS's add)")
    print(phase_table(results))
    if config.gpu:
        print("on the GPU: the build's k-means and each row's list assignment, and the shards' searches; on CPU: "
              "the build's codes, the router, exact re-rank, the in-process reference and exact neighbours")
    print(f"\nwrote {config.out / 'scale.json'} and {config.out / 'scale.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
