"""Each sequence's local cache of RETRO datastore chunks (the chunks its queries found and the chunks after
them), and the neighbours guessed from it: speculative RETRO decoding's memory (`RaLMSpecRetro`).

Example:
    >>> caches = ChunkCaches(B, capacity=1024)
    >>> caches.add(found, rows=[0, 1, 2])                 # an answer for rows 0..2, one query each
    >>> guessed = caches.guess(queries, K)                # (B, K, 2L) tokens, or None if a row holds < K
"""

from __future__ import annotations

import numpy as np
import torch

from lm_worker.retrieval.config import ChunkNeighbours
from lm_worker.retrieval.local_cache import LocalCaches


class ChunkCaches:
    """Per-sequence caches of datastore chunks, ranked by L2 distance of their stored keys to a query.

    Args:
        B: sequences.
        capacity: chunks each sequence keeps (its oldest overwritten past that).
    """

    def __init__(self, B: int, capacity: int):
        self.B, self.capacity = B, capacity
        self.local: LocalCaches | None = None  # made with the first answer (its key dimension)
        self.tokens: dict[int, np.ndarray] = {}  # datastore chunk id -> its (2L,) tokens

    def add(self, found: ChunkNeighbours, rows: list[int], chunks: int = 1) -> None:
        """Puts an answer's chunks and their successors (ids, keys, tokens) into the caches of its queries'
        rows (`rows[q]`: query q's), a group of len(rows) // chunks queries at a time: the prompt's answer,
        chunk-major, goes chunk by chunk, so that a chunk which the prompt's earlier chunks pushed out of a
        row's cache and a later one found is kept."""
        if found.keys is None or found.next_ids is None or found.next_keys is None:
            raise ValueError("the retriever returned no keys or successors: speculative retrieval ranks its "
                             "local caches by the stored keys of the chunks found and the chunks after them "
                             "(a datastore built with --keep-keys)")
        d = found.keys.shape[-1]
        if self.local is None:
            self.local = LocalCaches(self.B, self.capacity, d)
        ids = np.concatenate([found.ids[..., None], found.next_ids], axis=-1)  # (n, k, 1 + s)
        keys = np.concatenate([found.keys[:, :, None], found.next_keys], axis=2)  # (n, k, 1 + s, d)
        tokens = np.concatenate([found.tokens[:, :, None], found.next_tokens], axis=2)  # (n, k, 1 + s, 2L)
        for chunk_tokens, chunk_id in zip(tokens.reshape(-1, tokens.shape[-1]), ids.reshape(-1).tolist()):
            if chunk_id >= 0:
                self.tokens.setdefault(chunk_id, chunk_tokens.astype(np.int64))
        n, per_query = len(rows), ids[0].size  # k (1 + s) chunks a query, ranked nearest first
        owners = np.asarray(rows, dtype=np.int64)
        ids, keys = ids.reshape(n, per_query), keys.reshape(n, per_query, d)
        group = n // chunks
        for first in range(0, n, group):  # the nearest of the newest query kept where a row's cache is full
            part = slice(first, first + group)
            self.local.add_ranked(owners[part], ids[part], keys[part], ids[part])

    def guess(self, queries: np.ndarray, K: int, rows: list[int] | None = None) -> torch.Tensor | None:
        """The K cached chunks nearest each sequence's query (queries (B, d), every sequence's), as tokens
        (n, K, 2L) for `rows` (default all), or None if one of them holds fewer than K."""
        if self.local is None:
            return None
        _, ids = self.local.search(queries, K)  # (B, K) datastore ids, -1 where too few
        if rows is not None:
            ids = ids[rows]
        if (ids < 0).any():
            return None
        return torch.from_numpy(np.stack([[self.tokens[i] for i in row] for row in ids.tolist()]))  # (n, K, 2L)
