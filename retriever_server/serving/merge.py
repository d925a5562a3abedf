"""Ordering neighbours and the exact top-k merge of per-shard results: smallest L2 or largest
inner product first, ties by id, missing neighbours (-1) last.

Input from FAISS is almost in order (all but ties by id): `rank_neighbours` only checks the rows
that are and sorts the others. Shard answers come ranked so, over disjoint id ranges: the merge then
runs FAISS's k-way heap merge (`faiss.merge_knn_results`, in C++) on the stacked raw arrays, labelled
with each neighbour's position, and gathers ids, distances and payloads by position. Other input
(unranked parts, overlapping id ranges) is sorted whole on a packed key. A few neighbours with
nothing else attached (a single query's) are sorted in Python instead: fewer steps at that size.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from retriever_server.wire.result import SearchResult

_ID_BITS = 32
_SERIAL_MERGE = 100_000  # FAISS merges more neighbours than this at once with OpenMP threads
_SMALL_MERGE = 128  # neighbours (all parts, all rows) merged in Python (`_small_merge`) at most
_OPTIONAL = ("keys", "successor_ids", "successor_keys")  # per-neighbour arrays a result may lack
_NAMED = ("payloads", "successor_payloads")  # per-neighbour arrays by name


def _ordered_bits(scores: np.ndarray) -> np.ndarray:
    """float32 scores -> uint32 whose unsigned order is the float order, computed in place:
    negative floats have every bit flipped, the others only the sign bit."""
    bits = scores.view(np.uint32)
    flip = np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    np.bitwise_xor(bits, flip, out=bits)
    return bits


def _score(ids: np.ndarray, distances: np.ndarray, metric: str) -> np.ndarray:
    """A new float32 array, smaller is better, missing neighbours +inf; adding (or subtracting
    from) +0.0 also folds -0.0 into 0.0."""
    distances = np.asarray(distances, dtype=np.float32)
    score = distances + np.float32(0.0) if metric == "l2" else np.subtract(np.float32(0.0), distances)
    score[ids < 0] = np.inf
    return score


def _tie(ids: np.ndarray) -> np.ndarray:
    """Ids as the tie-break, missing neighbours last."""
    return np.where(ids < 0, np.iinfo(np.int64).max, ids)


def sort_neighbours(ids: np.ndarray, distances: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise order of (nq, m) candidates: best distance first, ties by id, missing (-1) last.

    One sort on a packed uint64 key (ordered float bits, then the id) when every id fits in 32
    bits; two-key lexsort otherwise. Keys are unique, so "stable" only picks timsort, which
    merges the already-sorted runs that FAISS and each shard return in linear time.
    """
    score = _score(ids, distances, metric)
    if ids.size == 0 or ids.max() < 2**_ID_BITS - 1:
        key = _ordered_bits(score).astype(np.uint64)
        key <<= np.uint64(_ID_BITS)
        key |= ids.astype(np.int64, copy=False).view(np.uint64) & np.uint64(2**_ID_BITS - 1)  # -1: largest
        return np.argsort(key, axis=-1, kind="stable")
    return np.lexsort((_tie(ids), score), axis=-1)


def _strictly_ranked(ids: np.ndarray, distances: np.ndarray, metric: str) -> bool:
    """Whether every row is best first with no ties and nothing missing: the usual FAISS answer, told
    in fewer steps than the full check (NaN, -0.0 and ties all say no, and go to the full check)."""
    if not len(ids) or (ids < 0).any():
        return False
    later, earlier = distances[:, 1:], distances[:, :-1]
    return bool((later > earlier).all() if metric == "l2" else (later < earlier).all())


def rows_out_of_order(ids: np.ndarray, distances: np.ndarray, metric: str) -> np.ndarray:
    """(nq,) bool: the rows of (nq, m) candidates that are not best first, ties by id, missing last."""
    if _strictly_ranked(ids, distances, metric):
        return np.zeros(len(ids), dtype=bool)
    score, tie = _score(ids, distances, metric), _tie(ids)
    worse = score[:, 1:] < score[:, :-1]  # (nq, m-1)
    worse |= (score[:, 1:] == score[:, :-1]) & (tie[:, 1:] < tie[:, :-1])
    return worse.any(axis=1)


def rank_neighbours(result: SearchResult, k: int, metric: str) -> SearchResult:
    """The best `k` of each row of `result`, in order; rows already in order (as FAISS returns
    them, but for ties) are only checked, the others sorted."""
    bad = rows_out_of_order(result.ids, result.distances, metric)
    if not bad.any():
        if result.ids.shape[1] == k:
            return result
        order = np.broadcast_to(np.arange(k), (len(result.ids), k))
    else:
        order = np.tile(np.arange(k), (len(result.ids), 1))
        order[bad] = sort_neighbours(result.ids[bad], result.distances[bad], metric)[:, :k]
    return take_neighbours(result, order)


def _neighbour_arrays(result: SearchResult) -> dict[tuple[str, str | None], np.ndarray]:
    """Every array of `result` with one entry per neighbour besides ids and distances (payloads, keys
    and the successors'), by (field, payload name or None); each (nq, k, ...)."""
    arrays = {(f, name): a for f in _NAMED for name, a in getattr(result, f).items()}
    arrays.update({(f, None): getattr(result, f) for f in _OPTIONAL if getattr(result, f) is not None})
    return arrays


def _result(ids: np.ndarray, distances: np.ndarray, arrays: dict[tuple[str, str | None], np.ndarray],
            version: str) -> SearchResult:
    """A SearchResult of ids, distances and the `_neighbour_arrays` that go with them."""
    result = SearchResult(ids, distances, datastore_version=version)
    for (f, name), array in arrays.items():
        if name is None:
            setattr(result, f, array)
        else:
            getattr(result, f)[name] = array
    return result


def take_neighbours(result: SearchResult, order: np.ndarray) -> SearchResult:
    """Reorders (and trims) a result's columns by `order` (nq, k); payloads and keys follow."""
    nq, m = result.ids.shape
    flat = (order + (np.arange(nq, dtype=np.int64) * m)[:, None]).ravel()  # (nq*k,) into the flattened rows

    def take(array: np.ndarray) -> np.ndarray:
        return np.take(array.reshape(nq * m, *array.shape[2:]), flat, axis=0).reshape(*order.shape, *array.shape[2:])

    arrays = {key: take(array) for key, array in _neighbour_arrays(result).items()}
    return _result(take(result.ids), take(result.distances), arrays, result.datastore_version)


def _id_span(ids: np.ndarray) -> tuple[int, int] | None:
    """The smallest and largest id of `ids` that is not missing (-1), or None when all are; without
    a copy of the valid ones when none is missing (a shard's usual answer)."""
    if not ids.size:
        return None
    low = int(ids.min())
    if low >= 0:
        return low, int(ids.max())
    valid = ids[ids >= 0]
    return (int(valid.min()), int(valid.max())) if valid.size else None


def _in_id_order(parts: list[SearchResult], metric: str, ranked: bool) -> list[SearchResult] | None:
    """The parts ordered by their ids when each is ranked (checked unless `ranked`) and their id ranges
    do not overlap (as shards answer), else None."""
    if len({p.ids.shape for p in parts}) != 1:
        return None
    spans = []
    for part in parts:
        span = _id_span(part.ids)
        if span is not None and not ranked and rows_out_of_order(part.ids, part.distances, metric).any():
            return None
        spans.append(span)
    order = sorted((i for i, span in enumerate(spans) if span is not None), key=lambda i: spans[i][0])
    if any(spans[a][1] >= spans[b][0] for a, b in zip(order, order[1:])):
        return None
    return [parts[i] for i in order] + [p for p, span in zip(parts, spans) if span is None]


def _heap_merge(parts: list[SearchResult], k: int, metric: str) -> SearchResult | None:
    """The k-way merge of ranked parts over ordered, disjoint id ranges; None when some row has
    fewer than k neighbours (those keep the sort, whose missing neighbours keep their distances).
    Parts with payloads or keys are merged by position, which then gathers every array; parts of ids
    and distances alone are merged with the ids as FAISS's labels, nothing left to gather.

    Rows go in pieces small enough that FAISS merges them on the calling thread (no OpenMP team)."""
    nq, m = parts[0].ids.shape
    arrays = [_neighbour_arrays(p) for p in parts]
    out = _result(np.empty((nq, k), dtype=np.int64), np.empty((nq, k), dtype=np.float32),
                  {key: np.empty((nq, k, *a.shape[2:]), dtype=a.dtype) for key, a in arrays[0].items()},
                  parts[0].datastore_version)
    out_arrays = _neighbour_arrays(out)
    step = max(1, _SERIAL_MERGE // (len(parts) * m))
    for start in range(0, nq, step):
        rows = slice(start, start + step)
        ids = np.stack([p.ids[rows] for p in parts])  # (S, r, m)
        scores = np.stack([p.distances[rows] for p in parts]).astype(np.float32, copy=False)  # (S, r, m)
        if metric != "l2":
            np.negative(scores, out=scores)  # largest inner product first; ties by part order, as for L2
        if not out_arrays:  # ids and distances alone: the ids are the labels, and FAISS's output the answer
            best, found = faiss.merge_knn_results(scores, ids, keep_max=False)  # (r, m) each
            if found[:, :k].min(initial=0) < 0:
                return None
            out.ids[rows] = found[:, :k]
            out.distances[rows] = best[:, :k] if metric == "l2" else np.negative(best[:, :k])
            continue
        labels = np.arange(ids.size, dtype=np.int64).reshape(ids.shape)  # each neighbour's flat position
        labels[ids < 0] = -1
        chosen = faiss.merge_knn_results(scores, labels, keep_max=False)[1][:, :k]  # (r, k) positions
        if chosen.min(initial=0) < 0:
            return None
        out.ids[rows] = np.take(ids.reshape(-1), chosen)
        out.distances[rows] = _take_stacked([p.distances for p in parts], rows, chosen)
        for key, array in out_arrays.items():
            array[rows] = _take_stacked([a[key] for a in arrays], rows, chosen)
    return out


def _take_stacked(arrays: list[np.ndarray], rows: slice, chosen: np.ndarray) -> np.ndarray:
    """The entries at flat positions `chosen` (r, k) of the parts' `rows`, stacked (S, r, m, ...)."""
    stacked = np.stack([a[rows] for a in arrays])
    return np.take(stacked.reshape(-1, *stacked.shape[3:]), chosen, axis=0)


def _small_merge(parts: list[SearchResult], k: int, metric: str) -> SearchResult | None:
    """The merge of a few neighbours with nothing else per neighbour (no payloads, no keys), sorted
    row by row in Python: for the single queries of decoding, fewer steps than numpy's dozen calls.
    None when it does not apply (too many neighbours, arrays per neighbour, a NaN distance)."""
    nq = len(parts[0].ids)
    if not nq or nq * sum(p.ids.shape[1] for p in parts) > _SMALL_MERGE or any(_neighbour_arrays(p) for p in parts):
        return None
    sign, last = (1.0 if metric == "l2" else -1.0), (math.inf, math.inf)
    ids, distances = [], []
    for row in range(nq):
        found = [(i, d) for p in parts for i, d in zip(p.ids[row].tolist(), p.distances[row].tolist())]
        if any(d != d for _, d in found):
            return None
        found.sort(key=lambda n: last if n[0] < 0 else (sign * n[1], n[0]))  # -0.0 == 0.0: a tie, by id
        ids.append([i for i, _ in found[:k]])
        distances.append([d for _, d in found[:k]])
    return SearchResult(np.array(ids, dtype=np.int64).reshape(nq, -1),
                        np.array(distances, dtype=np.float32).reshape(nq, -1),
                        datastore_version=parts[0].datastore_version)


def merge_results(parts: list[SearchResult], k: int, metric: str, ranked: bool = False) -> SearchResult:
    """Merges shard results (each (nq, k_i)) into the global top-k.

    Each shard returns its own top-k over disjoint rows, so the top-k of their union is the top-k
    over the whole datastore: the merge is exact. Payloads and keys follow their neighbours.
    `ranked` says every part's rows are already best first, ties by id, missing last (as shard
    servers answer), which is then not checked again.
    """
    if not parts:
        raise ValueError("merge_results needs at least one shard result")
    if len(parts) == 1 and parts[0].ids.shape[1] == k:
        return parts[0]
    small = _small_merge(parts, k, metric)
    if small is not None:
        return small
    ordered = _in_id_order(parts, metric, ranked) if len(parts) > 1 and parts[0].ids.shape[1] >= k else None
    merged = _heap_merge(ordered, k, metric) if ordered is not None else None
    if merged is not None:
        return merged
    arrays = [_neighbour_arrays(p) for p in parts]
    joined = _result(np.concatenate([p.ids for p in parts], axis=1),  # (nq, S*k)
                     np.concatenate([p.distances for p in parts], axis=1),  # (nq, S*k)
                     {key: np.concatenate([a[key] for a in arrays], axis=1) for key in arrays[0]},
                     parts[0].datastore_version)
    return take_neighbours(joined, sort_neighbours(joined.ids, joined.distances, metric)[:, :k])
