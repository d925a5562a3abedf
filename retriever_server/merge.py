"""Ordering neighbours and the exact top-k merge of per-shard results: smallest L2 or largest
inner product first, ties by id, missing neighbours (-1) last."""

from __future__ import annotations

import numpy as np

from retriever_server.result import SearchResult

_ID_BITS = 32


def _ordered_bits(scores: np.ndarray) -> np.ndarray:
    """float32 scores -> uint32 whose unsigned order is the float order, computed in place:
    negative floats have every bit flipped, the others only the sign bit."""
    bits = scores.view(np.uint32)
    flip = np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    np.bitwise_xor(bits, flip, out=bits)
    return bits


def sort_neighbours(ids: np.ndarray, distances: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise order of (nq, m) candidates: best distance first, ties by id, missing (-1) last.

    One sort on a packed uint64 key (ordered float bits, then the id) when every id fits in 32
    bits; two-key lexsort otherwise. Keys are unique, so "stable" only picks timsort, which
    merges the already-sorted runs that FAISS and each shard return in linear time.
    """
    distances = np.asarray(distances, dtype=np.float32)
    # smaller is better; adding (or subtracting from) +0.0 also folds -0.0 into 0.0
    score = distances + np.float32(0.0) if metric == "l2" else np.subtract(np.float32(0.0), distances)
    missing = ids < 0
    score[missing] = np.inf
    if ids.size == 0 or ids.max() < 2**_ID_BITS - 1:
        key = _ordered_bits(score).astype(np.uint64)
        key <<= np.uint64(_ID_BITS)
        key |= ids.astype(np.int64, copy=False).view(np.uint64) & np.uint64(2**_ID_BITS - 1)  # -1: largest
        return np.argsort(key, axis=-1, kind="stable")
    tie = np.where(missing, np.iinfo(np.int64).max, ids)
    return np.lexsort((tie, score), axis=-1)


def take_neighbours(result: SearchResult, order: np.ndarray) -> SearchResult:
    """Reorders (and trims) a result's columns by `order` (nq, k); payloads and keys follow."""
    def take(array: np.ndarray) -> np.ndarray:
        index = order.reshape(*order.shape, *([1] * (array.ndim - 2)))
        return np.take_along_axis(array, index, axis=1)

    return SearchResult(
        ids=take(result.ids), distances=take(result.distances),
        payloads={name: take(array) for name, array in result.payloads.items()},
        keys=take(result.keys) if result.keys is not None else None,
        datastore_version=result.datastore_version,
    )


def merge_results(parts: list[SearchResult], k: int, metric: str) -> SearchResult:
    """Merges shard results (each (nq, k_i)) into the global top-k.

    Each shard returns its own top-k over disjoint rows, so the top-k of their union is the top-k
    over the whole datastore: the merge is exact. Payloads and keys follow their neighbours.
    """
    if not parts:
        raise ValueError("merge_results needs at least one shard result")
    if len(parts) == 1 and parts[0].ids.shape[1] == k:
        return parts[0]
    joined = SearchResult(
        ids=np.concatenate([p.ids for p in parts], axis=1),  # (nq, S*k)
        distances=np.concatenate([p.distances for p in parts], axis=1),  # (nq, S*k)
        payloads={name: np.concatenate([p.payloads[name] for p in parts], axis=1) for name in parts[0].payloads},
        keys=np.concatenate([p.keys for p in parts], axis=1) if parts[0].keys is not None else None,
        datastore_version=parts[0].datastore_version,
    )
    return take_neighbours(joined, sort_neighbours(joined.ids, joined.distances, metric)[:, :k])
