"""How fast, and how exactly, a row finds its inverted list while a build adds it: flat search over
every centroid (FAISS's own `add`) against an HNSW graph over the centroids (`coarse.graph_assignment`).

Centroids are two-level k-means centroids (`coarse.two_level_centroids`) of `scale.py`'s keys (real
MiniLM keys and real keys plus seeded noise); the rows assigned are 20,000 further rows of the same
kind. One thread; rows/s per core, and the share of rows given the same list as the flat search.

    python benchmarks/assignment.py [--nlists 4096,16384]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import REAL_KEYS, key_rows, real_vectors  # noqa: E402

from retriever_server.datastore.coarse import two_level_centroids  # noqa: E402

GRAPHS = ((32, 64), (32, 32), (32, 16), (16, 32))  # (M, efSearch)


def rows_per_s(index: faiss.Index, rows: np.ndarray) -> tuple[float, np.ndarray]:
    started = time.process_time()
    _, lists = index.search(rows, 1)
    return len(rows) / (time.process_time() - started), lists.ravel()


def measure(real: np.ndarray, nlist: int) -> list[dict]:
    centroids = two_level_centroids(key_rows(real, 1_000_000, 1_000_000 + 40 * nlist, 0), nlist, True, 0)
    rows = key_rows(real, 3_000_000, 3_020_000, 0)
    flat = faiss.IndexFlatIP(real.shape[1])
    flat.add(centroids)
    speed, truth = rows_per_s(flat, rows)
    found = [{"nlist": nlist, "how": "flat", "rows_per_s": speed, "same_list": 1.0}]
    for m, ef in GRAPHS:
        graph = faiss.IndexHNSWFlat(real.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        graph.add(centroids)
        graph.hnsw.efSearch = ef
        speed, lists = rows_per_s(graph, rows)
        found.append({"nlist": nlist, "how": f"HNSW M {m}, efSearch {ef}", "rows_per_s": speed,
                      "same_list": float((lists == truth).mean())})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nlists", default="4096,16384")
    args = parser.parse_args(argv)
    real, _ = real_vectors(REAL_KEYS, 1)
    faiss.omp_set_num_threads(1)
    print("| lists | assignment | rows/s per core | same list as flat |\n|---:|---|---:|---:|")
    for nlist in (int(n) for n in args.nlists.split(",")):
        for cell in measure(real, nlist):
            print(f"| {cell['nlist']} | {cell['how']} | {cell['rows_per_s']:.0f} | {cell['same_list']:.4f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
