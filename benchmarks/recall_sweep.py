"""Recall against query CPU for candidate default settings at one datastore size: the table that
chooses what `auto` writes into a manifest (codec, nprobe, re-rank candidates).

The keys are `scale.py`'s: the cached real MiniLM keys and, past those, real keys plus seeded noise
(every table says how many are real), with its 256 held-out real queries. One coarse quantizer is
trained the way the build trains it (`resolve_factory`'s nlist, the build's training sample), and
every codec shares it, so the codecs differ only in how they encode the residuals:

- `PQm`: m sub-quantizers of 8 bits, scanned with look-up tables (`auto`'s former codec, PQ48 at 384-d);
- `PQmx4fs`: m sub-quantizers of 4 bits in FAISS's FastScan layout, scanned with SIMD registers;
- `SQ4`, `SQ6`, `SQ8`: a scalar quantizer of that many bits per dimension (`auto`'s codec is SQ8).

The rows are split into `--shards` id ranges as the build splits them, one index per range sharing
the trained codec (large indexes assign their rows through `coarse.graph_assignment`, as the build
does). For each codec and nprobe it searches every shard single-threaded in batches of 64 and reports
the search CPU ms per query summed over the shards, the codes scanned per query, recall@10 of the codec
alone, and recall@10 after exact re-rank, by the float16 keys a shard stores, of the best `--rerank`
candidates of each shard (what a request with `rerank_candidates` asks of every shard). Recall is
against exact search over the same rows.

    python benchmarks/recall_sweep.py --rows 1000000 [--codecs PQ48,PQ96x4fs] [--nprobes 32,64,128,256]

Writes OUT/recall_sweep_N.json and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import NOISE, PART_ROWS, QUERIES, REAL_KEYS, key_rows, real_vectors, recall_at_k  # noqa: E402

from retriever_server.datastore.coarse import graph_assignment, graph_params  # noqa: E402
from retriever_server.datastore.index import (  # noqa: E402
    ivf_params,
    new_trained_index,
    resolve_factory,
    train_size_for,
)

BATCH = 64  # queries per search call, as the benchmarks' nq=64 requests
SCALAR = {"SQ4": faiss.ScalarQuantizer.QT_4bit, "SQ6": faiss.ScalarQuantizer.QT_6bit,
          "SQ8": faiss.ScalarQuantizer.QT_8bit}  # per-dimension scalar codecs, residuals of the lists


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep."""

    rows: int = 1_000_000
    codecs: tuple[str, ...] = ("PQ48", "PQ96", "PQ48x4fs", "PQ96x4fs")
    nprobes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rerank: int = 100  # candidates re-ranked, from each shard
    shards: int = 2
    nlist: int = 0  # 0: resolve_factory's
    train_rows: int = 0  # 0: as many as the build trains on
    seed: int = 0
    out: Path = Path("bench_out/scale")


def codec_index(codec: str, quantizer: faiss.Index, d: int, nlist: int, seed: int) -> faiss.Index:
    """An IVF index over the trained `quantizer` with the residual codec `codec` (PQm, PQmx4fs, SQ4/6/8)."""
    if codec in SCALAR:
        return faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, SCALAR[codec], faiss.METRIC_INNER_PRODUCT)
    match = re.fullmatch(r"PQ(\d+)(x4fs)?", codec)
    if match is None:
        raise ValueError(f"codec must look like PQ48, PQ96x4fs or SQ8, got {codec!r}")
    m = int(match.group(1))
    if match.group(2):
        index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        index.do_polysemous_training = False
    index.pq.cp.seed = seed + 1
    return index


def train(config: SweepConfig, real: np.ndarray) -> tuple[faiss.Index, dict[str, list[faiss.Index]], str, float]:
    """The trained coarse index, each codec's shard indexes (empty, trained), the lists' factory part
    (`IVFn` or `IVFn_HNSW32`, as `auto` makes it) and the training seconds."""
    d = real.shape[1]
    lists = resolve_factory("auto", config.rows, d).split(",")[0]  # IVFn, or IVFn_HNSW32 from coarse.LARGE_NLIST on
    nlist = config.nlist or int(re.match(r"IVF(\d+)", lists).group(1))
    factory = f"{re.sub(r'IVF[0-9]+', f'IVF{nlist}', lists)},Flat"
    rows = min(config.rows, config.train_rows or train_size_for(factory, d, "inner_product"))
    sample = key_rows(real, 0, rows, config.seed)
    started = time.perf_counter()
    coarse = new_trained_index(factory, "inner_product", sample, config.seed)
    seconds = time.perf_counter() - started
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(coarse).quantizer)
    indexes = {}
    for codec in config.codecs:
        index = codec_index(codec, quantizer, d, nlist, config.seed)
        index.train(sample[: min(len(sample), 65_536)])  # the coarse quantizer is trained: codec only
        indexes[codec] = [faiss.clone_index(index) for _ in range(config.shards)]
    print(f"  trained {factory} on {rows} rows in {seconds:.1f} s", flush=True)
    return coarse, indexes, factory.split(",")[0], seconds


def add_and_find_truth(config: SweepConfig, real: np.ndarray, queries: np.ndarray,
                       indexes: dict[str, list[faiss.Index]]) -> np.ndarray:
    """Adds every row to its shard's index of every codec, a part at a time; returns the exact top-10
    ids (nq, 10)."""
    bounds = np.linspace(0, config.rows, config.shards + 1).astype(np.int64)
    best_d = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), 10), -1, dtype=np.int64)
    with contextlib.ExitStack() as stack:
        for shards in indexes.values():
            for index in shards:
                stack.enter_context(graph_assignment(index))
        for start in range(0, config.rows, PART_ROWS):
            rows = key_rows(real, start, min(config.rows, start + PART_ROWS), config.seed)
            ids = np.arange(start, start + len(rows))
            shard = np.searchsorted(bounds, ids, side="right") - 1
            for shards in indexes.values():
                for s, index in enumerate(shards):
                    if (shard == s).any():
                        index.add_with_ids(rows[shard == s], ids[shard == s])
            d, i = faiss.knn(queries, rows, 10, metric=faiss.METRIC_INNER_PRODUCT)
            d, i = np.concatenate([best_d, d], axis=1), np.concatenate([best_i, i + start], axis=1)
            order = np.argsort(-d, axis=1, kind="stable")[:, :10]
            best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
            print(f"  added {start + len(rows)} / {config.rows} rows", flush=True)
    return best_i


def codes_scanned(shards: list[faiss.Index], queries: np.ndarray, nprobe: int) -> float:
    """Mean codes scanned per query over the shards: the sizes of the lists each query probes."""
    total = 0.0
    for index in shards:
        sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
        _, lists = index.quantizer.search(queries, nprobe, params=graph_params(index, nprobe))
        total += float(sizes[lists].sum(axis=1).mean())
    return total


def search(shards: list[faiss.Index], queries: np.ndarray, nprobe: int, k: int) -> tuple[np.ndarray, float]:
    """Each shard's best k candidate ids side by side (nq, shards * k), and the search CPU ms per query
    summed over the shards, one thread, batches of BATCH."""
    params = ivf_params(shards[0], nprobe)
    for index in shards:
        index.search(queries[:BATCH], k, params=params)  # warm
    started = time.process_time()
    ids = np.concatenate([np.concatenate([index.search(queries[s:s + BATCH], k, params=params)[1]
                                          for s in range(0, len(queries), BATCH)]) for index in shards], axis=1)
    return ids, 1e3 * (time.process_time() - started) / len(queries)


def best_plain(shards: list[faiss.Index], queries: np.ndarray, nprobe: int) -> np.ndarray:
    """The codec's own top-10 over all shards (nq, 10), as a request without re-rank is answered."""
    found = [index.search(queries, 10, params=ivf_params(index, nprobe)) for index in shards]
    d, i = np.concatenate([d for d, _ in found], axis=1), np.concatenate([i for _, i in found], axis=1)
    return np.take_along_axis(i, np.argsort(-d, axis=1, kind="stable")[:, :10], 1)


def rerank(config: SweepConfig, real: np.ndarray, queries: np.ndarray,
           candidates: dict[tuple[str, int], np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    """Each candidate set re-ranked by exact inner product with the float16 keys; top-10 ids."""
    wanted = np.unique(np.concatenate([c.ravel() for c in candidates.values()]))
    wanted = wanted[wanted >= 0]
    scores = np.zeros((len(queries), len(wanted)), dtype=np.float32)
    for start in range(0, config.rows, PART_ROWS):
        stop = min(config.rows, start + PART_ROWS)
        here = (wanted >= start) & (wanted < stop)
        if here.any():
            rows = key_rows(real, start, stop, config.seed)[wanted[here] - start].astype(np.float16)
            scores[:, here] = queries @ rows.astype(np.float32).T
    found = {}
    for key, ids in candidates.items():
        columns = np.searchsorted(wanted, np.maximum(ids, 0))
        s = np.take_along_axis(scores, columns, 1)
        s[ids < 0] = -np.inf
        found[key] = np.take_along_axis(ids, np.argsort(-s, axis=1, kind="stable")[:, :10], 1)
    return found


def run(config: SweepConfig) -> dict:
    real, queries = real_vectors(REAL_KEYS, QUERIES)
    print(f"{config.rows} rows ({min(config.rows, len(real))} real, the rest real + noise {NOISE}):", flush=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    coarse, indexes, lists, train_s = train(config, real)
    truth = add_and_find_truth(config, real, queries, indexes)
    faiss.omp_set_num_threads(1)
    candidates, cells = {}, []
    for codec, shards in indexes.items():
        for nprobe in config.nprobes:
            ids, cpu_ms = search(shards, queries, nprobe, config.rerank)
            candidates[(codec, nprobe)] = ids
            cells.append({"codec": codec, "bytes": shards[0].code_size, "nprobe": nprobe, "cpu_ms": cpu_ms,
                          "codes": codes_scanned(shards, queries, nprobe),
                          "recall_plain": recall_at_k(best_plain(shards, queries, nprobe), truth, 10)})
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    reranked = rerank(config, real, queries, candidates)
    for cell in cells:
        cell["recall_rerank"] = recall_at_k(reranked[(cell["codec"], cell["nprobe"])], truth, 10)
    return {"config": {**asdict(config), "out": str(config.out)}, "lists": lists, "train_s": train_s,
            "real_rows": min(config.rows, len(real)), "noise": NOISE, "cells": cells}


def table(report: dict) -> str:
    rerank = report["config"]["rerank"]
    lines = [f"| codec | bytes/row | nprobe | codes scanned/query | search CPU ms/query | recall@10 | "
             f"recall@10 re-rank {rerank} per shard |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {report['lists']},{c['codec']} | {c['bytes']} | {c['nprobe']} | {c['codes']:.0f} | "
              f"{c['cpu_ms']:.3f} | {c['recall_plain']:.3f} | {c['recall_rerank']:.3f} |" for c in report["cells"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=SweepConfig.rows)
    parser.add_argument("--codecs", default=",".join(SweepConfig.codecs))
    parser.add_argument("--nprobes", default=",".join(map(str, SweepConfig.nprobes)))
    parser.add_argument("--rerank", type=int, default=SweepConfig.rerank, help="candidates re-ranked, per shard")
    parser.add_argument("--shards", type=int, default=SweepConfig.shards)
    parser.add_argument("--nlist", type=int, default=0, help="inverted lists (default: auto's for the rows)")
    parser.add_argument("--train-rows", type=int, default=0, help="training sample (default: the build's)")
    parser.add_argument("--out", type=Path, default=SweepConfig.out)
    args = parser.parse_args(argv)
    config = SweepConfig(rows=args.rows, codecs=tuple(args.codecs.split(",")),
                         nprobes=tuple(int(p) for p in args.nprobes.split(",")), rerank=args.rerank, shards=args.shards,
                         nlist=args.nlist, train_rows=args.train_rows, out=args.out)
    report = run(config)
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / f"recall_sweep_{config.rows}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{config.rows} rows ({report['real_rows']} real MiniLM keys, the rest real + Gaussian noise {NOISE} "
          f"per dimension); {QUERIES} held-out real queries; "
          f"{config.shards} shards; one thread")
    print(table(report))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
