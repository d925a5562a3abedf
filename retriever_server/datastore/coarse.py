"""The coarse quantizer of a large IVF index: trained by two-level k-means, and assigning rows through
a graph over its centroids while they are added.

Flat k-means and flat assignment both cost one distance per row and centroid. With about 4·√N
lists, that is N^1.5: from 10^6 to 10^7 rows the build would grow 40x, not 10x. From `LARGE_NLIST`
lists on, the build instead

- trains the centroids in two levels: √nlist clusters first, then each split into as many
  centroids as its share of the sample (about 2·√nlist distances per sample row instead of nlist);
- assigns the rows it adds through an HNSW graph over the centroids (`graph_assignment`), and keeps
  the flat quantizer in the saved index, so searches rank their lists exactly as before.

Both give a slightly different index than FAISS's flat training would; `benchmarks/recall_sweep.py`
measures recall with them.
"""

from __future__ import annotations

import contextlib
import logging
import math

import faiss
import numpy as np

log = logging.getLogger(__name__)

LARGE_NLIST = 8192  # from this many lists on: two-level training and graph assignment
NITER = 10  # k-means iterations, as FAISS trains an IVF quantizer
REFINE_PASSES = 3  # k-means iterations over every centroid at once, after the two levels
REFINE_PROBE = 8  # first-level clusters a row looks in during those iterations
GRAPH_M = 32  # HNSW links per centroid
C_INT_SEEDS = 2**31 - 1  # the sub-clusters' seeds (seed + 1 + c) wrap below this: FAISS takes a C int
GRAPH_SEARCH_EF = 64  # the least HNSW search breadth when a query looks for its nprobe lists
GRAPH_EF = 16  # HNSW breadth when assigning rows: 99.75% the flat list at 16,384 lists (benchmarks/assignment.py)


def is_large(index: faiss.Index) -> bool:
    """Whether `index` is a plain IVF index (no pre-transform) with at least LARGE_NLIST lists."""
    return isinstance(index, faiss.IndexIVF) and index.nlist >= LARGE_NLIST


def proportional_shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """`total` split over clusters in proportion to `sizes` (largest remainders), each share at least 1
    and at most its cluster's size."""
    exact = sizes * total / sizes.sum()
    shares = np.clip(np.floor(exact).astype(np.int64), 1, sizes)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while shares.sum() < total:  # hand out the rest, one at a time, where rows remain
        c = order[i % len(order)]
        if shares[c] < sizes[c]:
            shares[c] += 1
        i += 1
    while shares.sum() > total:  # the floor of 1 can overshoot: take from the largest shares
        shares[np.argmax(shares)] -= 1
    return shares


def _kmeans(x: np.ndarray, k: int, spherical: bool, seed: int, gpu: bool = False) -> np.ndarray:
    """k centroids (k, d) of x (n, d) by FAISS k-means (its assignment step on the GPUs with `gpu`)."""
    if k == 1:
        c = x.mean(axis=0, keepdims=True)
        return c / np.linalg.norm(c) if spherical else c
    km = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=seed, spherical=spherical, min_points_per_centroid=1,
                      max_points_per_centroid=256, gpu=gpu)
    km.train(x)
    return km.centroids


def two_level_centroids(sample: np.ndarray, nlist: int, spherical: bool, seed: int, gpu: bool = False) -> np.ndarray:
    """`nlist` centroids (nlist, d) of `sample` (n, d) float32: √nlist clusters, each split again in
    proportion to its rows. `spherical` keeps centroids at unit norm (inner-product data); `gpu` runs
    the k-means assignment steps on the GPUs."""
    top = max(2, round(math.sqrt(nlist)))
    first = _kmeans(sample, top, spherical, seed, gpu)
    metric = faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2
    _, assign = faiss.knn(sample, first, 1, metric=metric)
    assign = assign.ravel()
    shares = proportional_shares(np.bincount(assign, minlength=top), nlist)
    parts = [_kmeans(sample[assign == c], int(shares[c]), spherical, (seed + 1 + c) % C_INT_SEEDS, gpu)
             for c in range(top) if shares[c]]
    centroids = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    for _ in range(REFINE_PASSES):
        centroids = _lloyd_pass(sample, centroids, first, spherical)
    return centroids


def _lloyd_pass(sample: np.ndarray, centroids: np.ndarray, first: np.ndarray, spherical: bool) -> np.ndarray:
    """One k-means iteration over all the centroids at once: each row moves to its nearest centroid
    among those of its REFINE_PROBE nearest first-level clusters (an IVF over the centroids), so rows
    near a first-level border can change sides; each centroid becomes the mean of its rows."""
    d, nlist = sample.shape[1], len(centroids)
    metric = faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2
    top = faiss.IndexFlat(d, metric)
    top.add(first)
    index = faiss.IndexIVFFlat(top, d, len(first), metric)
    index.add(centroids)
    index.nprobe = min(REFINE_PROBE, len(first))
    _, nearest = index.search(sample, 1)
    nearest = nearest.ravel()
    sums = np.zeros_like(centroids)
    for start in range(0, len(sample), 1 << 16):  # sums per centroid, a sorted block of rows at a time
        near = nearest[start:start + (1 << 16)]
        order = np.argsort(near, kind="stable")
        order = order[near[order] >= 0]
        ids, first_row = np.unique(near[order], return_index=True)
        if len(ids):
            sums[ids] += np.add.reduceat(sample[start:start + (1 << 16)][order], first_row)
    counts = np.bincount(nearest[nearest >= 0], minlength=nlist)
    moved = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
    if spherical:
        moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    return np.ascontiguousarray(moved, dtype=np.float32)


def train_two_level(index: faiss.IndexIVF, sample: np.ndarray, seed: int, gpu: bool = False) -> None:
    """Fills the (untrained) flat quantizer of `index` with two-level centroids of `sample`; the
    index's own `train` then trains only its codec."""
    spherical = index.metric_type == faiss.METRIC_INNER_PRODUCT
    log.info("two-level k-means: %d lists from %d rows%s", index.nlist, len(sample), " on the GPU" if gpu else "")
    index.quantizer.add(two_level_centroids(sample, index.nlist, spherical, seed, gpu))


def graph_params(index: faiss.IndexIVF, nprobe: int) -> faiss.SearchParametersHNSW | None:
    """Search parameters for an IVF index's graph quantizer (None for a flat one): a breadth of
    2·nprobe, at least GRAPH_SEARCH_EF, so the graph finds the nprobe nearest lists. The breadth saved
    with the graph (GRAPH_EF) is the one rows are added with."""
    if not isinstance(faiss.downcast_index(index.quantizer), faiss.IndexHNSW):
        return None
    return faiss.SearchParametersHNSW(efSearch=max(GRAPH_SEARCH_EF, 2 * nprobe))


@contextlib.contextmanager
def quantizer_stand_in(index: faiss.IndexIVF, stand_in: faiss.Index):
    """Within the block, rows added to `index` find their list through `stand_in` (another index over
    the same centroids, in the same order); the index's own quantizer is back in place afterwards."""
    own = index.quantizer
    owned = index.own_fields
    index.own_fields = False  # while the stand-in is in place, nothing may free the own quantizer
    index.quantizer = stand_in
    try:
        yield
    finally:
        index.quantizer = own
        index.own_fields = owned
        stand_in.this.acquire()  # setting it as the quantizer disowned it: freed with its Python object again


@contextlib.contextmanager
def graph_assignment(index: faiss.Index):
    """Within the block, rows added to a large IVF index find their list through an HNSW graph over
    its centroids; the flat quantizer is back in place afterwards. A no-op for other indexes."""
    if not is_large(index) or not isinstance(faiss.downcast_index(index.quantizer), faiss.IndexFlat):
        yield  # small, or its quantizer is a graph already
        return
    graph = faiss.IndexHNSWFlat(index.d, GRAPH_M, index.metric_type)
    graph.hnsw.efSearch = GRAPH_EF
    graph.add(index.quantizer.reconstruct_n(0, index.nlist))
    with quantizer_stand_in(index, graph):
        yield
