"""One loaded shard: its FAISS index, stored keys and payloads, and search over them.

No gRPC here: `shard_server` wraps a `Shard` in a service, the benchmarks call it in process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore import index as ix
from retriever_server.datastore.headers import load_checked_array, read_checked_index
from retriever_server.datastore.manifest import Manifest, ShardEntry, read_manifest, verify_shard
from retriever_server.serving.merge import rank_neighbours, sort_neighbours
from retriever_server.serving.overfetch import OVERFETCH_BUCKETS, drop_excluded, overfetch
from retriever_server.wire.exclusions import Exclusions
from retriever_server.wire.request import DatastoreView, SearchSpec
from retriever_server.wire.result import SearchResult
from retriever_server.wire.tensors import nbytes

log = logging.getLogger(__name__)
RERANK_CHUNK_ELEMENTS = 1 << 24  # float32 elements of stored keys re-ranked at once (64 MiB)
SMALL_BATCH = 4  # batches this small search on one thread: waking an OpenMP team costs more than it saves
FIRST_CHUNK = 64  # queries of a search's first chunk; later chunks are sized by the time it took...
CHUNK_SECONDS = 0.05  # ...to about this, so a stop is noticed within about this long
MAX_CHUNK = 16384
SMALL_SEARCH_CODES = 1 << 16  # codes a search may scan and still count as small (well under 1 ms)
SMALL_RERANK = 1 << 12  # candidates a small search may re-rank (queries x candidates)
SMALL_ANSWER = 1 << 16  # values a small search's answer may hold (neighbours with their successors, x keys' width)
EACH_CHUNK = 64  # queries searched one by one (each its own exclusion) between two stop checks
# The most bytes the bitmaps of a chunk's queries may span (each spans the ids below the shard's end, the
# datastore's ids before it included); past it, each query gets a selector of its ranges and ids instead.
MAX_BITMAP_BYTES = 64 << 20
GPU_MAX_K = 2048  # the most neighbours a FAISS GPU search returns
TIE_SLACK = 16  # candidates fetched past the m-th, so that a tie there is seldom searched again (costs nothing seen)
TIE_BUDGET = 1 << 20  # candidates (rows x width) a wider search for ties may fetch: all-equal distances stop there
StopCheck = Callable[[], bool] | None


class SearchStopped(Exception):
    """A search given up between chunks: its deadline passed or its caller went away."""


def _by_id(distances: np.ndarray, ids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (n, m), best first, ties by id: only the rows holding a tie are sorted (FAISS's
    inner-product heap gives a tie's largest id first; FastScan and the GPU order ties as they come)."""
    tied = np.flatnonzero((distances[:, 1:] == distances[:, :-1]).any(axis=1))
    if len(tied):
        order = sort_neighbours(ids[tied], distances[tied], metric)
        distances[tied] = np.take_along_axis(distances[tied], order, axis=1)
        ids[tied] = np.take_along_axis(ids[tied], order, axis=1)
    return distances, ids


def _check(stop: StopCheck) -> None:
    """Raises SearchStopped when `stop` says the search should end."""
    if stop is not None and stop():
        raise SearchStopped("the search was stopped: its deadline passed or its caller went away")


@dataclass(frozen=True)
class ShardOptions:
    """How a shard is opened."""

    mmap: bool = True
    verify: bool = True
    gpu: bool = False
    threads: int = 0  # FAISS threads; 0 keeps FAISS's default


class Shard:
    """A datastore shard opened for search.

    Example:
        >>> shard = Shard.open(Path("ds"), 0)
        >>> result = shard.search(spec)
    """

    def __init__(self, directory: Path, manifest: Manifest, entry: ShardEntry, options: ShardOptions):
        self.directory = Path(directory)
        self.manifest = manifest
        self.entry = entry
        self.options = options
        base = self.directory / entry.name
        self.index = read_checked_index(base / "index.faiss", manifest, entry, mmap=options.mmap)
        # GPU indexes are not thread-safe and take no id selectors: searches with exclusions use
        # the memory-mapped CPU index, the others take turns on the GPU.
        self.gpu_index = ix.to_gpu(ix.read_index(base / "index.faiss", mmap=False)) if options.gpu else None
        self.gpu_lock = threading.Lock()
        ivf = faiss.try_extract_index_ivf(self.index)
        fastscan = ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)
        # FAISS's CPU L2 heap of an IVF scan orders a tie by id; its inner-product heap, FastScan, the GPU and
        # a flat index (ties in the order rows were added: by id only where a build added them so) do not
        self._ties_ordered = manifest.metric == "l2" and ivf is not None and not fastscan and self.gpu_index is None
        self._missing = np.float32(np.inf if manifest.metric == "l2" else -np.inf)  # a neighbour not found
        self._made_params: dict[tuple[int, int], object] = {}  # by (id(index), nprobe); FAISS only reads them
        self.threads = options.threads or faiss.omp_get_max_threads()
        self._view = DatastoreView(manifest.dimension, manifest.nlist, manifest.default_nprobe, manifest.has_keys,
                                   {p.name: nbytes(p.dtype, p.row_shape) for p in manifest.payloads}, manifest.version)
        n = entry.ntotal
        self.keys = load_checked_array(base / "keys.npy", "float16", (n, manifest.dimension)) \
            if manifest.has_keys else None
        self.payloads = {p.name: load_checked_array(base / f"payload.{p.name}.npy", p.dtype, (n, *p.row_shape))
                         for p in manifest.payloads}

    @classmethod
    def open(cls, directory: Path, shard: int, options: ShardOptions = ShardOptions()) -> Shard:
        """Reads the manifest, checks the shard's files (sizes, and sha256 unless `options.verify` is
        off) and their headers, and loads it; raises DatastoreError naming the file at fault."""
        manifest = read_manifest(directory)
        if not 0 <= shard < len(manifest.shards):
            raise ValueError(f"shard {shard} out of range: the datastore has {len(manifest.shards)} shards")
        entry = manifest.shards[shard]
        verify_shard(directory, entry, full=options.verify)
        log.info("loading %s of %s (%d rows)", entry.name, directory, entry.ntotal)
        return cls(directory, manifest, entry, options)

    def view(self) -> DatastoreView:
        """What requests to this shard are checked against."""
        return self._view

    def is_small(self, spec: SearchSpec) -> bool:
        """Whether the search is a few queries over a few lists, with no exclusions and no GPU, and a small
        answer to gather and encode: so little work that the caller had better run it where it is than
        hand it to another thread (a large answer, keys and successors above all, would hold up the
        event loop's other calls and health answers)."""
        per_list = self.entry.ntotal / max(1, self.manifest.nlist)
        rerank = spec.nq * spec.candidates if spec.exact_rerank else 0
        answer = spec.nq * spec.k * (1 + spec.successors) * (1 + len(spec.payloads)
                                                             + (self.manifest.dimension if spec.return_keys else 0))
        return (self.gpu_index is None and not spec.exclusions and spec.nq <= SMALL_BATCH
                and spec.nq * spec.nprobe * per_list <= SMALL_SEARCH_CODES and rerank <= SMALL_RERANK
                and answer <= SMALL_ANSWER)

    def _params(self, index: faiss.Index, nprobe: int) -> faiss.SearchParameters | None:
        """The search parameters for `nprobe` (no selector), made once per index and nprobe."""
        key = (id(index), nprobe)
        params = self._made_params.get(key)
        if params is None:
            params = self._made_params[key] = ix.search_params(index, nprobe)
        return params

    def _search_index(self, queries: np.ndarray, m: int, nprobe: int):
        # OpenMP's thread count belongs to the calling thread: this sets it for this search only.
        faiss.omp_set_num_threads(1 if len(queries) <= SMALL_BATCH else self.threads)
        if self.gpu_index is not None:
            with self.gpu_lock:
                return ix.search(self.gpu_index, queries, m, nprobe, params=self._params(self.gpu_index, nprobe))
        return ix.search(self.index, queries, m, nprobe, params=self._params(self.index, nprobe))

    def _search_rows(self, queries: np.ndarray, m: int, nprobe: int, stop: StopCheck):
        """Searches in chunks sized to take about CHUNK_SECONDS each, checking `stop` before each one."""
        if len(queries) <= FIRST_CHUNK:  # one chunk
            _check(stop)
            return self._search_index(queries, m, nprobe)
        distances = np.empty((len(queries), m), dtype=np.float32)
        ids = np.empty((len(queries), m), dtype=np.int64)
        start, size = 0, FIRST_CHUNK
        while start < len(queries):
            _check(stop)
            end = min(len(queries), start + size)
            began = time.perf_counter()
            distances[start:end], ids[start:end] = self._search_index(queries[start:end], m, nprobe)
            per_query = (time.perf_counter() - began) / (end - start)
            size = int(min(MAX_CHUNK, max(1, CHUNK_SECONDS / max(per_query, 1e-7))))
            start = end
        return distances, ids

    def _search_tied(self, queries: np.ndarray, m: int, nprobe: int, stop: StopCheck):
        """`_search_rows`, ties at the m-th place kept by smallest id (see `_widen_ties`)."""
        def search(rows: np.ndarray, wide: int):  # every row at first (no copy of the queries), then the tied ones
            return self._search_rows(queries if len(rows) == len(queries) else queries[rows], wide, nprobe, stop)

        return self._widen_ties(search, len(queries), m)

    def _widen_ties(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], n: int, m: int):
        """The top m candidates (n, m) of `search(rows, width)` (the candidates of those of the n queries),
        with the smallest ids kept where tied candidates straddle the m-th place. Which candidates of
        such a tie FAISS keeps depends on the order it scans them (an IVF scan takes a candidate only when
        strictly better than its worst), so TIE_SLACK more candidates are fetched, and rows whose tie at the
        m-th place runs past them are searched again, wider, until it ends inside what was fetched: then
        every tied candidate was taken; or until the rows tied still would fetch more than TIE_BUDGET
        candidates (a tie of nearly the whole shard), where those rows keep the tied candidates FAISS chose.
        Every row comes back in order, ties by id (as `drop_excluded` needs them): sorted by `_by_id` where
        FAISS does not order them so."""
        most = self.entry.ntotal if self.gpu_index is None else GPU_MAX_K
        rows = np.arange(n)
        if m >= most:  # every candidate there is
            return self._in_order(*search(rows, m))
        wide = min(most, m + TIE_SLACK)
        d, i = self._in_order(*search(rows, wide))
        distances, ids = np.ascontiguousarray(d[:, :m]), np.ascontiguousarray(i[:, :m])
        budget = max(TIE_BUDGET, n * wide)
        while wide < most and len(rows := rows[(i[:, -1] >= 0) & (d[:, -1] == d[:, m - 1])]):
            if len(rows) * min(most, 2 * wide) > budget:  # a tie as wide as the shard (every distance equal:
                log.debug("%d queries tie past %d candidates: FAISS's choice kept", len(rows), wide)  # zero or
                break  # huge queries): FAISS's pick of it stands, so that no request makes a shard scan it all
            wide = min(most, 2 * wide)  # the tie goes on past the last candidate fetched: wider
            d, i = self._in_order(*search(rows, wide))
            distances[rows], ids[rows] = d[:, :m], i[:, :m]
        return distances, ids

    def _in_order(self, distances: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidates best first, ties by id: as FAISS gives them where it orders ties so, else sorted."""
        return (distances, ids) if self._ties_ordered else _by_id(distances, ids, self.manifest.metric)

    def _selectors(self, exclusions: Exclusions, rows: np.ndarray) -> list:
        """One selector per query of `rows`: a range selector for a query excluding one range, else
        a bitmap over the shard's ids (all of them marked in one pass), or, where those bitmaps would
        pass MAX_BITMAP_BYTES (a shard far into a large datastore), a selector of each query's own."""
        lone = exclusions.lone_ranges(rows)
        selectors = [ix.range_selector(start, end) if start >= 0 else None for start, end in lone.tolist()]
        others = np.flatnonzero(lone[:, 0] < 0)
        width = self.entry.id_end  # FAISS asks a bitmap about global ids
        if len(others) * ((width + 7) // 8) > MAX_BITMAP_BYTES:
            for i in others.tolist():
                key = exclusions.key(int(rows[i]))
                selectors[i] = ix.exclusion_selector(key.ids, key.ranges)
        elif len(others):
            marked = ix.bitmap_selectors(len(others), width, *exclusions.side_by_side(rows[others], width))
            for i, selector in zip(others.tolist(), marked):
                selectors[i] = selector
        return selectors

    def _search_each(self, spec: SearchSpec, exclusions: Exclusions, rows: np.ndarray, stop: StopCheck):
        """Queries `rows`, each with a selector of its own exclusion, EACH_CHUNK at a time (checking
        `stop` between chunks), on one thread: one query's lists are too little work to share."""
        found = []
        for start in range(0, len(rows), EACH_CHUNK):
            _check(stop)
            chunk = rows[start:start + EACH_CHUNK]
            faiss.omp_set_num_threads(1)
            found.append(self._widen_ties(self._each_search(spec, chunk, self._selectors(exclusions, chunk)),
                                          len(chunk), spec.candidates))
        return np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found])

    def _each_search(self, spec: SearchSpec, chunk: np.ndarray, selectors: list):
        """search(rows, width) over the queries `chunk[rows]`, each with its own selector."""
        return lambda rows, wide: ix.search_each(self.index, spec.queries[chunk[rows]], wide, spec.nprobe,
                                                 [selectors[r] for r in rows.tolist()])

    def _search_candidates(self, spec: SearchSpec, stop: StopCheck) -> tuple[np.ndarray, np.ndarray]:
        """Candidates (nq, m): queries with exclusions in batches that fetch more neighbours
        (`overfetch`); those left with too few, each again alone with its own selector."""
        m = spec.candidates
        exclusions = spec.exclusions.within(self.entry.id_start, self.entry.id_end)
        if not exclusions:
            return self._search_tied(spec.queries, m, spec.nprobe, stop)
        distances = np.empty((spec.nq, m), dtype=np.float32)
        ids = np.empty((spec.nq, m), dtype=np.int64)
        sizes = exclusions.rows()
        extra = overfetch(sizes, self.entry.ntotal, OVERFETCH_BUCKETS[-1] if self.gpu_index is None else GPU_MAX_K - m)
        again = []
        for bound in np.unique(extra).tolist():
            batched = np.flatnonzero(extra == bound)
            found = self._search_tied(spec.queries[batched], m + bound, spec.nprobe, stop)
            if not sizes[batched].any():
                distances[batched], ids[batched] = found
                continue
            distances[batched], ids[batched], short = drop_excluded(*found, exclusions, batched, m, self._missing)
            again.append(batched[short])
        alone = np.concatenate(again) if again else np.zeros(0, dtype=np.int64)
        if len(alone):
            distances[alone], ids[alone] = self._search_each(spec, exclusions, alone, stop)
        return distances, ids

    def _rows_of(self, array: np.ndarray, ids: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
        """The rows of `array` (one per row of this shard) for the global `ids` (any shape), zeros for a
        missing neighbour (-1): every one of them where the shard holds no rows, as it may in a datastore
        not built here (a missing neighbour is otherwise read from row 0, then zeroed)."""
        shape = (*ids.shape, *array.shape[1:])
        if len(array) == 0:
            return np.zeros(shape, dtype=dtype or array.dtype)
        valid = ids >= 0
        rows = np.where(valid, ids - self.entry.id_start, 0)
        out = np.asarray(array[rows.ravel()], dtype=dtype).reshape(shape)
        out[~valid] = 0
        return out

    def _stored_keys(self, ids: np.ndarray) -> np.ndarray:
        return self._rows_of(self.keys, ids, np.float32)  # (nq, m, d)

    def _rerank(self, spec: SearchSpec, ids: np.ndarray, stop: StopCheck) -> np.ndarray:
        """Exact distances (nq, m) to the stored keys, a chunk of queries at a time (bounded memory),
        checking `stop` before each chunk."""
        out = np.empty(ids.shape, dtype=np.float32)
        step = max(1, RERANK_CHUNK_ELEMENTS // max(1, ids.shape[1] * self.manifest.dimension))
        for start in range(0, len(ids), step):
            _check(stop)
            rows = slice(start, start + step)
            keys = self._stored_keys(ids[rows])  # (c, m, d)
            queries = spec.queries[rows]  # (c, d)
            if self.manifest.metric == "l2":
                diff = keys - queries[:, None, :]  # (c, m, d)
                out[rows] = np.einsum("cmd,cmd->cm", diff, diff)
            else:
                out[rows] = np.einsum("cmd,cd->cm", keys, queries)
        return out

    def _payload(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self._rows_of(self.payloads[name], ids)

    def search(self, spec: SearchSpec, stop: StopCheck = None) -> SearchResult:
        """Top-k neighbours of the checked request, exactly re-ranked when asked.

        Args:
            spec: the checked request.
            stop: called between chunks of the search; when it returns True the search ends with
                `SearchStopped` (a passed deadline, a cancelled call), so no work outlives its caller
                by more than about a chunk (CHUNK_SECONDS).
        """
        distances, ids = self._search_candidates(spec, stop)  # (nq, m): best first, ties by id, missing last
        if spec.exact_rerank:
            distances = self._rerank(spec, ids, stop)
            ranked = rank_neighbours(SearchResult(ids, distances), spec.k, self.manifest.metric)
        else:  # m == k, and in the order an answer takes: nothing to check again
            ranked = SearchResult(ids, distances)
        ids = ranked.ids
        if ids.size and ids.min() < 0:
            ranked.distances[ids < 0] = self._missing
        _check(stop)  # before the gathers of payloads and keys (up to max_response_bytes)
        ranked.payloads = {name: self._payload(name, ids) for name in spec.payloads}
        ranked.keys = self._stored_keys(ids) if spec.return_keys else None
        ranked.datastore_version = self.manifest.version
        if spec.successors:
            after = self.successor_ids(ids, spec.successors, spec.exclusions)
            ranked.successor_ids = after
            ranked.successor_payloads = {name: self._payload(name, after) for name in spec.payloads}
            ranked.successor_keys = self._stored_keys(after) if spec.return_keys else None
        return ranked

    def successor_ids(self, ids: np.ndarray, n: int, exclusions: Exclusions | None = None) -> np.ndarray:
        """(nq, k, n) int64: the ids of the n rows after each neighbour of `ids` (nq, k), -1 past the end
        of this shard, for missing neighbours and for rows `exclusions` excludes for that query (a
        successor is a row the caller receives: one its request excludes must not reach it that way)."""
        after = ids[..., None] + np.arange(1, n + 1, dtype=np.int64)  # (nq, k, n)
        after[(ids[..., None] < 0) | (after >= self.entry.id_end)] = -1
        if exclusions:
            nq = after.shape[0]
            excluded = exclusions.mask(np.arange(nq, dtype=np.int64), after.reshape(nq, -1))
            after[excluded.reshape(after.shape)] = -1
        return after
