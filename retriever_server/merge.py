"""Exact top-k merge of per-shard results: smallest L2 or largest inner product, ties by id."""

from __future__ import annotations

import numpy as np

from retriever_server.result import SearchResult
from retriever_server.shard import sort_neighbours


def merge_results(parts: list[SearchResult], k: int, metric: str) -> SearchResult:
    """Merges shard results (each (nq, k_i), sorted or not) into the global top-k.

    Each shard returns its own top-k over disjoint rows, so the top-k of their union is the top-k
    over the whole datastore: the merge is exact. Payloads and keys follow their neighbours.
    """
    if not parts:
        raise ValueError("merge_results needs at least one shard result")
    if len(parts) == 1 and parts[0].ids.shape[1] == k:
        return parts[0]
    ids = np.concatenate([p.ids for p in parts], axis=1)  # (nq, S*k)
    distances = np.concatenate([p.distances for p in parts], axis=1)  # (nq, S*k)
    order = sort_neighbours(ids, distances, metric)[:, :k]  # (nq, k)
    merged = SearchResult(
        ids=np.take_along_axis(ids, order, axis=1),
        distances=np.take_along_axis(distances, order, axis=1),
        datastore_version=parts[0].datastore_version,
    )
    for name in parts[0].payloads:
        stacked = np.concatenate([p.payloads[name] for p in parts], axis=1)  # (nq, S*k, ...)
        index = order.reshape(*order.shape, *([1] * (stacked.ndim - 2)))
        merged.payloads[name] = np.take_along_axis(stacked, index, axis=1)
    if parts[0].keys is not None:
        stacked = np.concatenate([p.keys for p in parts], axis=1)  # (nq, S*k, d)
        merged.keys = np.take_along_axis(stacked, order[:, :, None], axis=1)
    return merged
