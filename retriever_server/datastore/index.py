"""FAISS indexes: factory strings, seeded training, adding with global ids, saving, loading, search.

Everything FAISS-specific lives here, so the build, the shard and the benchmarks share one way of training,
loading and searching an index.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore import coarse
from retriever_server.datastore.row_parts import escaped

log = logging.getLogger(__name__)

METRICS = {"l2": faiss.METRIC_L2, "inner_product": faiss.METRIC_INNER_PRODUCT}
METRIC_ALIASES = {"l2": "l2", "ip": "inner_product", "inner_product": "inner_product"}


def canonical_metric(metric: str) -> str:
    """'l2', 'ip' or 'inner_product' -> 'l2' or 'inner_product'; raises ValueError otherwise."""
    if metric.lower() not in METRIC_ALIASES:
        raise ValueError(f"metric must be one of l2, ip, inner_product; got {metric!r}")
    return METRIC_ALIASES[metric.lower()]


PQ_MIN_ROWS = 39 * 256  # below this many rows `auto` keeps the vectors whole (IVF-Flat)


def resolve_factory(factory: str, n: int, d: int) -> str:
    """Turns "auto" into a concrete factory string sized for n rows of dimension d: IVF with about 4*sqrt(n) lists
    and an 8-bit scalar quantizer of each list's residuals (d bytes a row), or IVF-Flat when n is under
    PQ_MIN_ROWS. From `coarse.LARGE_NLIST` lists on, an HNSW graph over the centroids finds a query's lists (and
    a row's, when it is added).

    The codec was chosen by `benchmarks/recall_sweep.py` (docs/scaling.md): on 384-d keys drawn around real MiniLM
    keys, with exact re-rank of 100 candidates per shard, the 8-bit `PQ48` and the FastScan `PQ192x4fs` stop
    below 0.9 recall@10 at 10^7 rows whatever the nprobe; the FastScan `PQ384x4fs` holds it at half SQ8's CPU,
    but FAISS reads FastScan lists into memory where SQ8's stay memory-mapped, and serving mapped is what lets a
    shard outgrow its RAM."""
    if factory != "auto":
        return factory
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = int(max(1, min(nlist, 65536, n // 39 or 1)))
    if n < PQ_MIN_ROWS:
        return f"IVF{nlist},Flat"
    lists = f"IVF{nlist}_HNSW32" if nlist >= coarse.LARGE_NLIST else f"IVF{nlist}"  # see `coarse`
    return f"{lists},SQ8"


def faiss_reason(err: BaseException) -> str:
    """FAISS's reason for `err` on one line: less the C++ function it starts with, control characters escaped."""
    return escaped(re.sub(r"^Error in .*? at \S+:\d+: ", "", str(err).strip(), count=1)) or type(err).__name__


def _parts(index: faiss.Index) -> list[faiss.Index]:
    """The index and those inside it (a transform's, an id map's, an IVF index, its coarse quantizer), downcast."""
    parts, index = [], faiss.downcast_index(index)
    while index is not None:
        parts.append(index)
        inner = getattr(index, "index", None)
        index = faiss.downcast_index(inner) if isinstance(inner, faiss.Index) else None
    ivf = faiss.try_extract_index_ivf(parts[0])
    return parts + ([faiss.downcast_index(ivf), faiss.downcast_index(ivf.quantizer)] if ivf is not None else [])


def _unsized(part: faiss.Index) -> str | None:
    """What in one part of an untrained index has size 0 (a transform's output, an OPQ's, a quantizer's or a graph's
    parts, bits or code bytes): FAISS trains it to a codec it cannot read back (RQ2x0) or kills the process in
    training (PCA0: SIGFPE, RQ0x8: SIGSEGV), so the sizes are read off the index's fields; nothing is trained."""
    chain = [faiss.downcast_VectorTransform(part.chain.at(i)) for i in range(part.chain.size())] \
        if isinstance(part, faiss.IndexPreTransform) else []
    sizes = [(f"{type(t).__name__} transform", t.d_out, "output dimensions") for t in chain]
    sizes += [("OPQMatrix transform", t.M, "sub-quantizers") for t in chain if isinstance(t, faiss.OPQMatrix)]
    if (graph := getattr(part, "hnsw", None)) is not None:
        levels = faiss.vector_to_array(graph.cum_nneighbor_per_level)  # HNSW1's has no level: 0 neighbours
        sizes.append((f"{type(part).__name__} graph", int(levels[1]) if len(levels) > 1 else 0, "neighbours per node"))
    for q in (q for name in ("pq", "aq", "sq", "rabitq") if (q := getattr(part, name, None)) is not None):
        bits = q.nbits if hasattr(q, "nbits") else getattr(q, "bits", 1)  # an additive quantizer's: one each
        bits = bits if isinstance(bits, int) else min(faiss.vector_to_array(bits).tolist(), default=0)
        sizes += [(f"{type(part).__name__}'s quantizer", size, what) for size, what in (
            (getattr(q, "M", 1), "sub-quantizers"), (bits, "bits in a sub-quantizer"), (q.code_size, "bytes of code"))]
    sizes.append((type(part).__name__, getattr(part, "code_size", 1), "bytes of code"))
    return next((f"{where} has {size} {what}" for where, size, what in sizes if size < 1), None)


USE_IVF = 'use an IVF index ("auto", or e.g. "IVF256,Flat"), or, for exact search, "IDMap,Flat"'


def check_factory(factory: str, d: int, metric: str) -> None:
    """Raises ValueError when FAISS cannot build `factory` for dimension d, builds an index it cannot train or read
    back, or one that cannot hold a datastore: one that keeps no row ids (a bare "Flat" or "HNSW32"), or whose
    rows have no fixed code size (a graph), which the build plans its shards and spills by."""
    try:
        index = faiss.index_factory(d, factory, METRICS[metric])
    except RuntimeError as err:
        raise ValueError(f"FAISS cannot build factory string {factory!r} for dimension {d}: "
                         f"{faiss_reason(err)}") from None
    for part in _parts(index):  # what FAISS builds but cannot train or read back: found now, not after the shards
        pq = getattr(part, "pq", None)
        if pq is not None and not 1 <= pq.nbits <= 24:
            raise ValueError(f"factory string {factory!r} makes a product quantizer of {pq.nbits} bits per code, "
                             "which FAISS cannot read back: give 1 to 24 (e.g. PQ8x8)")
        if (fault := _unsized(part)) is not None:
            raise ValueError(f"factory string {factory!r}: its {fault}, which FAISS cannot train nor read back: "
                             "give every size in the string 1 or more")
        if isinstance(part, faiss.IndexIVFFlatDedup):  # one index drops a row equal to one it holds; shards cannot
            raise ValueError(f"factory string {factory!r} makes an IVF FlatDedup index, which drops rows equal to "
                             f"others as shards filled in parts cannot: use {factory.replace('FlatDedup', 'Flat')!r}")
        if isinstance(part, faiss.IndexIVFPQR):  # its refine codes are found by row id
            raise ValueError(f"factory string {factory!r} makes an IVFPQR index, whose refine codes are found by "
                             "row id: a shard's global ids end its server's first search. Build without the +N "
                             "refinement, with --keep-keys, and search with exact re-ranking instead")
    if isinstance(index, faiss.IndexRefine):  # its rows are added to its base and refine index at once
        raise ValueError(f"factory string {factory!r} makes a refine index, which datastore shards cannot fill: build "
                         "without RFlat / Refine(...), with --keep-keys, and search with exact re-ranking instead")
    if (ivf := faiss.try_extract_index_ivf(index)) is not None:
        if ivf.nlist < 1:
            raise ValueError(f"factory string {factory!r} makes an IVF index of {ivf.nlist} lists: give it one "
                             "or more (e.g. \"IVF256,Flat\")")
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.MultiIndexQuantizer):
            raise ValueError(f"factory string {factory!r} makes a multi-index (IMI) quantizer, which the build "
                             "cannot train in parts nor add to: use an IVF index (\"auto\", or e.g. \"IVF4096,SQ8\")")
        return
    core, *inner = [p for p in _parts(index) if not isinstance(p, faiss.IndexPreTransform)]  # "PCA32,IDMap,Flat"
    if not isinstance(core, faiss.IndexIDMap | faiss.IndexIDMap2):
        raise ValueError(f"factory string {factory!r} makes an index that keeps no row ids: {USE_IVF}")
    if not isinstance(inner[0], faiss.IndexFlat | faiss.IndexScalarQuantizer | faiss.IndexHNSW):  # HNSW: below
        raise ValueError(f"factory string {factory!r} puts an {type(inner[0]).__name__} under its id map, which "
                         f"FAISS searches with no exclusions (it takes no search parameters): {USE_IVF}")
    try:
        index.sa_code_size()
    except RuntimeError:
        raise ValueError(f"factory string {factory!r} makes an index without a fixed code size per row (a "
                         f"graph), which a datastore cannot hold: {USE_IVF}") from None


def train_size_for(factory: str, d: int, metric: str) -> int:
    """A training-sample size that FAISS does not warn about for this factory string."""
    return max(39 * nlist_of(faiss.index_factory(d, factory, METRICS[metric])), 39 * 256, 1000)


def _skip_polysemous_training(index: faiss.Index) -> None:
    """Turns off the polysemous training FAISS's factory turns on for a PQ codec ("PQ8", "IVF256,PQ32"; "np" turns
    it off): it reorders each sub-quantizer's centroids (simulated annealing) so that Hamming distances between
    codes follow their distances, which only a Hamming-filtered search (`polysemous_ht`) uses, and this service
    never runs one. The centroids and every distance are the same either way; the training took 28 of 30 s for
    IVF256,PQ32 on 20,000 rows of dimension 384."""
    for part in _parts(index):  # down through IDMap and pre-transform wrappers, to the codec
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def new_trained_index(factory: str, metric: str, sample: np.ndarray, seed: int, gpu: bool = False) -> faiss.Index:
    """Builds the index from `factory` and trains it on `sample` (float32 (n, d)) with a fixed seed; with `gpu`, the
    k-means of its inverted lists assigns rows on the GPUs (the result is saved on CPU)."""
    d = sample.shape[1]
    index = faiss.index_factory(d, factory, METRICS[metric])
    if gpu:
        require_gpu()
    if (ivf := faiss.try_extract_index_ivf(index)) is not None:
        if gpu:  # FAISS's own way: a GPU flat index does the k-means assignment steps
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(d, METRICS[metric]))
        ivf.cp.seed = seed
        if (pq := getattr(faiss.downcast_index(ivf), "pq", None)) is not None:
            pq.cp.seed = seed + 1
    _skip_polysemous_training(index)
    log.info("training %s (%s) on %d vectors of dimension %d", factory, metric, len(sample), d)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if coarse.is_large(index):
        coarse.train_two_level(index, sample, seed, gpu)  # the lists; `train` below trains the codec alone
    index.train(sample)
    return index


def nlist_of(index: faiss.Index) -> int:
    """Number of inverted lists, or 0 for an index that is not IVF."""
    return int(ivf.nlist) if (ivf := faiss.try_extract_index_ivf(index)) is not None else 0


def default_nprobe(nlist: int) -> int:
    """A default nprobe: 64 lists (all of them when there are fewer), and nlist/256 past 16,384 lists, at most 128.
    With `auto`'s codec and exact re-rank of 100 candidates per shard, 64 lists keep recall@10 at 0.9 or more
    from 10^5 to 10^7 rows drawn around the stdlib's real keys, where 32 fell to 0.879 at 10^6 (docs/scaling.md)."""
    return int(min(nlist, max(64, min(128, nlist // 256)))) if nlist else 1


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


def require_gpu() -> None:
    """Raises RuntimeError unless this FAISS build sees a GPU."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        raise RuntimeError("--gpu needs the faiss GPU build and a visible GPU; none was found")


GPU_ASSIGN_TEMP_BYTES = 256 << 20  # scratch memory of one shard task's GPU quantizer


@contextlib.contextmanager
def gpu_assignment(index: faiss.Index):
    """Within the block, rows added to an IVF index find their list through a flat index over its centroids on the
    GPU (the codes are still computed on CPU, into CPU lists that can spill). A no-op for an index not IVF."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        yield
        return
    require_gpu()
    ivf = faiss.downcast_index(ivf)
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    resources = faiss.StandardGpuResources()
    resources.setTempMemory(GPU_ASSIGN_TEMP_BYTES)
    on_gpu = faiss.index_cpu_to_gpu(resources, 0, flat)
    with coarse.quantizer_stand_in(ivf, on_gpu):
        yield


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """Moves the index onto a GPU; raises RuntimeError when this FAISS build sees no GPU."""
    require_gpu()
    if isinstance(faiss.try_extract_index_ivf(index), faiss.IndexIVFFastScan):
        raise RuntimeError("FAISS on GPU cannot search a FastScan codec (x4fs); "
                           "build the datastore with an 8-bit codec for a GPU shard, e.g. --factory IVF4096,PQ48")
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    gpu_index = faiss.index_cpu_to_gpu(resources, device, index, options)
    gpu_index.referenced_resources = resources  # keep the resources alive with the index
    return gpu_index


def _mark_ids(bitmap: np.ndarray, ids: np.ndarray) -> None:
    """Sets the bits of sorted, unique ids (bits that share a byte are summed into it at once)."""
    if not len(ids):
        return
    byte = ids >> 3
    first = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
    bitmap[byte[first]] |= np.add.reduceat((1 << (ids & 7)).astype(np.uint8), first)


WHOLE_BYTES_AT_ONCE = 1 << 20  # ranges covering fewer whole bytes than this are set by one indexed write


def _mark_ranges(bitmap: np.ndarray, ranges: np.ndarray) -> None:
    """Sets the bits of disjoint [start, end) id ranges (m, 2): the whole bytes inside each range, then
    the loose bits at either end of it (at most 15 per range)."""
    if not len(ranges):
        return
    starts, ends = ranges[:, 0], ranges[:, 1]
    full_from, full_to = -(-starts // 8), ends // 8
    whole = full_from < full_to
    lengths = (full_to - full_from)[whole]
    if lengths.sum() <= WHOLE_BYTES_AT_ONCE:
        offsets = np.repeat(full_from[whole] - np.cumsum(lengths) + lengths, lengths)
        bitmap[offsets + np.arange(lengths.sum())] = 0xFF
    else:
        for a, b in zip(full_from[whole].tolist(), full_to[whole].tolist()):
            bitmap[a:b] = 0xFF
    steps = np.arange(16)
    head = starts[:, None] + steps  # (m, 16)
    head = head[head < np.where(whole, full_from * 8, ends)[:, None]]
    tail = (full_to * 8)[:, None] + steps
    tail = tail[whole[:, None] & (tail < ends[:, None])]
    _mark_ids(bitmap, np.sort(np.concatenate([head, tail])))  # disjoint ranges: no bit twice


def _excluding(excluded, *alive):
    """A FAISS selector accepting every id `excluded` does not, keeping it and `alive` alive (SWIG does not)."""
    selector = faiss.IDSelectorNot(excluded)
    selector.referenced_objects = (excluded, *alive)
    return selector


def range_selector(start: int, end: int):
    """A FAISS selector accepting every id outside [start, end)."""
    return _excluding(faiss.IDSelectorRange(start, end))


def id_selector(excluded_ids, ranges):
    """A FAISS selector accepting every id except the given ids and disjoint [start, end) ranges (sequences or
    arrays: (n,) ids, (m, 2) ranges); None if there are none. The excluded rows are bits of one bitmap
    (`IDSelectorBitmap`), so whatever their number a candidate is checked in constant time; the bitmap spans ids
    up to the largest excluded one (ids past it are accepted without a look), its untouched pages free."""
    ids = np.asarray(excluded_ids, dtype=np.int64)
    if not (ids[1:] > ids[:-1]).all():
        ids = np.unique(ids)
    ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    if not len(ids) and len(ranges) == 1:  # one range (a query's own document): no bitmap to fill
        return range_selector(int(ranges[0, 0]), int(ranges[0, 1]))
    end = max(int(ids[-1]) + 1 if len(ids) else 0, int(ranges[:, 1].max()) if len(ranges) else 0)
    if end == 0:
        return None
    bitmap = np.zeros((end + 7) // 8, dtype=np.uint8)
    _mark_ids(bitmap, ids)
    _mark_ranges(bitmap, ranges)
    return _excluding(faiss.IDSelectorBitmap(bitmap), bitmap)


def ivf_params(index: faiss.Index, nprobe: int, selector=None) -> faiss.SearchParametersIVF:
    """Search parameters of an IVF index: nprobe lists, the selector, and, when a graph finds the lists
    (`coarse`), a search breadth that finds all nprobe of them."""
    params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
    if (graph := coarse.graph_params(faiss.extract_index_ivf(index), nprobe)) is not None:
        params.quantizer_params = graph
        params.referenced_objects = (graph,)  # SWIG does not keep it alive
    return params


def search_params(index: faiss.Index, nprobe: int, selector=None) -> faiss.SearchParameters | None:
    """What `search` passes FAISS: nprobe and the selector, for an index of any kind. Reusable by
    searches that share them (FAISS only reads them), which saves building them each time."""
    if faiss.try_extract_index_ivf(index) is not None:
        params = ivf_params(index, nprobe, selector)
    else:
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
    if isinstance(index, faiss.IndexPreTransform) and params is not None:
        inner, params = params, faiss.SearchParametersPreTransform(index_params=params)
        params.referenced_objects = (inner,)  # kept alive as long as the cached outer parameters
    return params


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int, selector=None, params=None):
    """Searches (nq, d) float32 queries; returns distances float32 (nq, k) and ids int64 (nq, k).
    `params`, when given, are `search_params(index, nprobe, selector)` made earlier."""
    return index.search(queries, k, params=search_params(index, nprobe, selector) if params is None else params)


def exclusion_selector(ids: np.ndarray, ranges: np.ndarray):
    """A FAISS selector accepting every id except `ids` and those in the [start, end) `ranges` (m, 2): a few
    comparisons per candidate, and memory by the exclusion's size alone, where a bitmap spans every id below its
    largest (`bitmap_selectors`). None if there are none."""
    parts = [faiss.IDSelectorRange(int(a), int(b)) for a, b in np.asarray(ranges).reshape(-1, 2).tolist()]
    if len(ids):
        parts.append(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
    if not parts:
        return None
    excluded, kept = parts[0], list(parts)
    for part in parts[1:]:
        excluded = faiss.IDSelectorOr(excluded, part)
        kept.append(excluded)
    return _excluding(excluded, *kept)


def bitmap_selectors(count: int, width: int, ids: np.ndarray, ranges: np.ndarray) -> list:
    """`count` selectors, selector i excluding the ids and ranges among [i * width, (i + 1) * width)
    (shifted down by i * width), from one bitmap marked in one pass for all of them. `ids` sorted
    and unique, `ranges` (m, 2) sorted and disjoint, as `Exclusions.side_by_side` gives them."""
    row_bytes = (width + 7) // 8
    bitmap = np.zeros(count * row_bytes, dtype=np.uint8)  # untouched pages cost no memory
    _mark_ids(bitmap, ids + ids // width * (row_bytes * 8 - width))  # rows start on whole bytes
    # a range may run on into the next rows (side_by_side joins one row's last range to the next row's
    # first): its start moves with its first row, its end with its last, and the padding between is marked
    rows = np.concatenate([ranges[:, :1] // width, (ranges[:, 1:] - 1) // width], axis=1)  # (m, 2)
    _mark_ranges(bitmap, ranges + rows * (row_bytes * 8 - width))
    return [_excluding(faiss.IDSelectorBitmap(bitmap[i * row_bytes:(i + 1) * row_bytes]), bitmap)
            for i in range(count)]


def search_each(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int, selectors: list):
    """Searches each query with its own selector (None: none); the same as `search` on each query alone. For a
    plain IVF index the coarse quantizer runs once for the whole batch and each query then scans its lists alone;
    other indexes search query by query. Returns distances (nq, k) float32 and ids (nq, k) int64."""
    if not isinstance(index, faiss.IndexIVF):
        found = [search(index, queries[i:i + 1], k, nprobe, selector) for i, selector in enumerate(selectors)]
        return np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found])
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    coarse_distances, coarse_ids = index.quantizer.search(queries, nprobe, params=coarse.graph_params(index, nprobe))
    distances = np.empty((len(queries), k), dtype=np.float32)  # coarse_*: (nq, nprobe) each
    ids = np.empty((len(queries), k), dtype=np.int64)
    for i, selector in enumerate(selectors):
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
        index.search_preassigned_c(1, faiss.swig_ptr(queries[i]), k, faiss.swig_ptr(coarse_ids[i]),
                                   faiss.swig_ptr(coarse_distances[i]), faiss.swig_ptr(distances[i]),
                                   faiss.swig_ptr(ids[i]), False, params)
    return distances, ids
