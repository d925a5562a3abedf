"""FAISS indexes: factory strings, seeded training, adding with global ids, saving, loading, search.

Everything FAISS-specific lives here, so the build, the shard and the benchmarks share one way of
training, loading and searching an index.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

METRICS = {"l2": faiss.METRIC_L2, "inner_product": faiss.METRIC_INNER_PRODUCT}
METRIC_ALIASES = {"l2": "l2", "ip": "inner_product", "inner_product": "inner_product"}


def canonical_metric(metric: str) -> str:
    """'l2', 'ip' or 'inner_product' -> 'l2' or 'inner_product'; raises ValueError otherwise."""
    if metric.lower() not in METRIC_ALIASES:
        raise ValueError(f"metric must be one of l2, ip, inner_product; got {metric!r}")
    return METRIC_ALIASES[metric.lower()]


PQ_MIN_ROWS = 39 * 256  # FAISS trains 256-centroid sub-quantizers on at least this many rows


def _pq_subquantizers(d: int) -> int | None:
    """Sub-quantizers of 8 (else 4) dimensions: FAISS's fast paths; other widths run several
    times slower (6-d sub-vectors made a 384-d PQ64 search 5x slower than PQ48)."""
    for width in (8, 4):
        if d % width == 0:
            return d // width
    return None


def resolve_factory(factory: str, n: int, d: int) -> str:
    """Turns "auto" into a concrete factory string sized for n rows of dimension d: IVF with
    about 4*sqrt(n) lists and 8-dimensional PQ sub-quantizers, or IVF-Flat when n is too small
    to train a PQ codec (or d has no 8- or 4-wide split)."""
    if factory != "auto":
        return factory
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = int(max(1, min(nlist, 65536, n // 39 or 1)))
    m = _pq_subquantizers(d)
    if m is None or n < PQ_MIN_ROWS:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{m}"


def check_factory(factory: str, d: int, metric: str) -> None:
    """Raises ValueError when FAISS cannot build `factory` for dimension d."""
    try:
        faiss.index_factory(d, factory, METRICS[metric])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "invalid"
        raise ValueError(f"FAISS cannot build factory string {factory!r} for dimension {d}: {first}") from None


def train_size_for(factory: str, d: int, metric: str) -> int:
    """A training-sample size that FAISS does not warn about for this factory string."""
    index = faiss.index_factory(d, factory, METRICS[metric])
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 1
    return max(39 * nlist, 39 * 256, 1000)


def new_trained_index(factory: str, metric: str, sample: np.ndarray, seed: int) -> faiss.Index:
    """Builds the index from `factory` and trains it on `sample` (float32 (n, d)) with a fixed seed."""
    d = sample.shape[1]
    index = faiss.index_factory(d, factory, METRICS[metric])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf = faiss.downcast_index(ivf)
        pq = getattr(ivf, "pq", None)
        if pq is not None:
            pq.cp.seed = seed + 1
        if hasattr(ivf, "do_polysemous_training"):
            # Polysemous codes only help Hamming-filtered search, which we never run; their
            # training (simulated annealing) would dominate the build.
            ivf.do_polysemous_training = False
    log.info("training %s (%s) on %d vectors of dimension %d", factory, metric, len(sample), d)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def nlist_of(index: faiss.Index) -> int:
    """Number of inverted lists, or 0 for an index that is not IVF."""
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def default_nprobe(nlist: int) -> int:
    """A default nprobe: about 1/16 of the lists, at least 1 and at most 128."""
    return int(min(128, max(1, nlist // 16))) if nlist else 1


def write_index(index: faiss.Index, path: Path) -> None:
    """Writes the index to `path` through a temporary name, so `path` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Reads an index; with mmap the inverted lists stay in the file, mapped read-only, where the
    index type allows (plain array lists over the mapping: no prefetch threads per search)."""
    if not mmap:
        return faiss.read_index(str(path))
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        log.info("index type at %s does not memory-map; reading it into memory", path)
        return faiss.read_index(str(path))


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """Moves the index onto a GPU; raises RuntimeError when this FAISS build sees no GPU."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise RuntimeError("--gpu needs the faiss GPU build and a visible GPU; none was found")
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    gpu_index = faiss.index_cpu_to_gpu(resources, device, index, options)
    gpu_index.referenced_resources = resources  # keep the resources alive with the index
    return gpu_index


MANY_RANGES = 32  # more ranges than this are laid into the bitmap by one pass over their span


def _mark_ranges(bitmap: np.ndarray, ranges: tuple[tuple[int, int], ...]) -> None:
    """Sets the bits of non-overlapping [start, end) id ranges."""
    if len(ranges) > MANY_RANGES:
        starts, ends = np.array(ranges, dtype=np.int64).T
        base = int(starts.min()) & ~7
        edges = np.zeros(int(ends.max()) - base + 1, dtype=np.int32)
        np.add.at(edges, starts - base, 1)
        np.add.at(edges, ends - base, -1)
        covered = np.packbits(np.cumsum(edges[:-1]) > 0, bitorder="little")
        bitmap[base // 8:base // 8 + len(covered)] |= covered
        return
    for start, end in ranges:
        full_from, full_to = -(-start // 8), end // 8
        if full_from < full_to:
            bitmap[full_from:full_to] = 0xFF
            loose = np.r_[start:min(end, full_from * 8), max(start, full_to * 8):end]
        else:
            loose = np.arange(start, end)
        np.bitwise_or.at(bitmap, loose >> 3, (1 << (loose & 7)).astype(np.uint8))


def id_selector(excluded_ids: tuple[int, ...], ranges: tuple[tuple[int, int], ...]):
    """A FAISS selector accepting every id except the given ids and non-overlapping [start, end) ranges;
    None if there are none.

    The excluded ids are bits of one bitmap (`IDSelectorBitmap`), so whatever their number a candidate
    is checked in constant time; the bitmap spans ids up to the largest excluded one (ids past it are
    accepted without a look), and its untouched pages cost no memory.
    """
    ids = np.asarray(excluded_ids, dtype=np.int64)
    end = max([int(ids.max()) + 1 if len(ids) else 0] + [e for _, e in ranges])
    if end == 0:
        return None
    bitmap = np.zeros((end + 7) // 8, dtype=np.uint8)
    if len(ids):
        np.bitwise_or.at(bitmap, ids >> 3, (1 << (ids & 7)).astype(np.uint8))
    _mark_ranges(bitmap, ranges)
    excluded = faiss.IDSelectorBitmap(bitmap)
    selector = faiss.IDSelectorNot(excluded)
    selector.referenced_objects = (excluded, bitmap)  # SWIG does not keep the children alive
    return selector


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int, selector=None):
    """Searches (nq, d) float32 queries; returns distances float32 (nq, k) and ids int64 (nq, k)."""
    if faiss.try_extract_index_ivf(index) is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
    else:
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
    if isinstance(index, faiss.IndexPreTransform) and params is not None:
        params = faiss.SearchParametersPreTransform(index_params=params)
    return index.search(queries, k, params=params)
