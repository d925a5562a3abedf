"""Each sequence's local cache of datastore rows: the kNN-LM neighbours it has retrieved and the rows
that follow them, with their keys and values, searched exactly in process.

Speculative retrieval (RaLMSpec, Zhang et al. 2024) guesses a query's neighbours from this cache instead
of asking the service: consecutive queries of one sequence retrieve overlapping rows, and in a kNN-LM
datastore row i + 1 continues the context of row i, so the successors of the rows just retrieved are
likely neighbours of the next position (RetoMaton's observation). The guess is then verified against the
service's answer; the cache itself never decides a token.

The caches of a batch's sequences share one array per field, (B, capacity, ...), so that one batched
distance computation searches every sequence's own rows. A full cache overwrites its oldest rows: those
least recently added, or found again by an answer (`add_ranked`).

Example:
    >>> caches = LocalCaches(rows=8, capacity=2048, dimension=32)
    >>> caches.add_neighbours(0, found, 0)                 # query 0 of a `KnnNeighbours` with successors, keys
    >>> distances, values = caches.search(queries, k=16)   # (8, 16) squared L2 ascending, (8, 16) next tokens

The answers that fill these caches carry each neighbour's successors and stored keys, some 20 x d bytes a
neighbour against 12 for a plain one: `queries_per_request` says how many queries one request may carry
for its answer to stay within the service's limits.
"""

from __future__ import annotations

import numpy as np
import torch

from lm_worker.retrieval.config import KnnNeighbours
from retriever_server.wire.request import Limits

_ROW_SHIFT = 1 << 40  # a (sequence, datastore id) pair as one int64: sequence * _ROW_SHIFT + id
SERVER_LIMITS = Limits()  # what a shard server or router enforces unless configured otherwise
RESPONSE_BUDGET = SERVER_LIMITS.max_response_bytes // 2  # an answer's bytes at most: well inside the default


def queries_per_request(retriever, k: int, dimension: int, successors: int, keys: bool, payload_bytes: int) -> int:
    """The most queries one request of `retriever` may carry (at least 1) so that its answer, k neighbours
    a query with `successors` rows after each, a payload of `payload_bytes` a row (an upper bound) and,
    with `keys`, float32 keys of `dimension`, stays within `RESPONSE_BUDGET` (or the retriever's own
    `limits`, where it has them: `InProcessRetriever.limits`, if lower), counted as a server counts it,
    and within their batch and neighbour limits (k or, re-ranking, its candidates) and half their request
    size limit."""
    limits = getattr(retriever, "limits", None) or SERVER_LIMITS
    config = getattr(retriever, "config", None)
    scored = max(k, config.rerank_candidates if config is not None and config.exact_rerank else 0, 1)
    per_row = payload_bytes + (4 * dimension if keys else 0)
    per_query = k * (12 + per_row + successors * (8 + per_row))
    most = min(RESPONSE_BUDGET, limits.max_response_bytes) // per_query
    sent = limits.max_request_bytes // 2 // (4 * dimension + 16)  # a query's floats, and its share of framing
    return max(1, min(most, sent, limits.max_batch, limits.max_neighbours // scored))


class LocalCaches:
    """Datastore rows (id, key, value) kept per sequence, at most `capacity` each.

    Args:
        rows: sequences (B).
        capacity: most datastore rows kept per sequence.
        dimension: of the keys.
    """

    def __init__(self, rows: int, capacity: int, dimension: int):
        if rows < 1 or capacity < 1:
            raise ValueError(f"rows and capacity must be >= 1, got {rows}, {capacity}")
        if rows >= (1 << 62) // _ROW_SHIFT:
            raise ValueError(f"at most {(1 << 62) // _ROW_SHIFT - 1} sequences, got {rows}")
        self.capacity = capacity
        self.keys = np.zeros((rows, capacity, dimension), dtype=np.float32)  # (B, C, d)
        self.norms = np.full((rows, capacity), np.inf, dtype=np.float32)  # (B, C) squared norms; inf: empty
        self.values = np.full((rows, capacity), -1, dtype=np.int64)  # (B, C)
        self.ids = np.full((rows, capacity), -1, dtype=np.int64)  # (B, C) datastore id per slot, -1: empty
        self.written = np.zeros(rows, dtype=np.int64)  # rows ever written per sequence: slots [0, written) used
        self.stamps = np.full((rows, capacity), -1, dtype=np.int64)  # (B, C) when each slot was last added; -1: empty
        self._clock = 0  # the next stamp
        self._slots: dict[int, int] = {}  # sequence * _ROW_SHIFT + id of every row held -> its slot

    def __len__(self) -> int:
        return len(self.ids)

    def size(self, row: int) -> int:
        """Datastore rows sequence `row` holds."""
        return int((self.ids[row] >= 0).sum())

    def held(self, row: int) -> np.ndarray:
        """The datastore ids sequence `row` holds, oldest first."""
        ids = self.ids[row, np.argsort(self.stamps[row], kind="stable")]
        return ids[ids >= 0]

    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Adds datastore rows ids (n,), keys (n, d), values (n,) to sequence `row`'s cache; ids < 0 and
        rows it already holds are skipped."""
        ids = np.asarray(ids).reshape(-1)
        keys = np.asarray(keys).reshape(len(ids), self.keys.shape[2])  # (n, d): n may be 0
        self.add_many(np.full(len(ids), row, dtype=np.int64), ids, keys, np.asarray(values).reshape(-1))

    def add_many(self, rows: np.ndarray, ids: np.ndarray, keys: np.ndarray, values: np.ndarray,
                 refresh: bool = False) -> None:
        """Adds datastore row ids[i] (key keys[i], value values[i]) to sequence rows[i]'s cache, for every
        i of (n,), (n,), (n, d), (n,) at once: per sequence in the given order, ids < 0 and repeats skipped,
        its oldest rows overwritten past capacity (more rows than slots: the last given are kept). A row it
        already holds when the call begins is skipped, or with `refresh` made newer in its place in the
        order, as if added again (without: a row that the call itself overwrites is not added again; add
        in several calls where that matters)."""
        rows, ids = np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # each sequence's rows together, in their order
        order = order[ids[order] >= 0]
        if not len(order):
            return
        codes = rows[order] * _ROW_SHIFT + ids[order]
        _, first = np.unique(codes, return_index=True)
        keep = np.sort(first)  # first time each (sequence, id) comes
        held = np.fromiter((c in self._slots for c in codes[keep].tolist()), dtype=bool, count=len(keep))
        if not refresh:
            keep, held = keep[~held], held[~held]
        take, seq, codes = order[keep], rows[order][keep], codes[keep]  # grouped by sequence, ascending
        if not len(take):
            return
        rank = np.arange(len(seq)) - np.searchsorted(seq, seq, side="left")  # place within its sequence's rows
        count = np.bincount(seq, minlength=len(self.ids))  # rows per sequence
        kept = rank >= count[seq] - self.capacity  # more rows than slots: the earliest give way
        take, seq, codes, held = take[kept], seq[kept], codes[kept], held[kept]
        stamps = self._clock + np.arange(len(take))  # ascending within each sequence, past every stamp held
        self._clock += len(take)
        again = np.fromiter((self._slots[c] for c in codes[held].tolist()), dtype=np.int64, count=int(held.sum()))
        self.stamps[seq[held], again] = stamps[held]  # the rows held, found again: newer, in the same slots
        self._write(take[~held], seq[~held], codes[~held], stamps[~held], ids, keys, values)

    def _write(self, take: np.ndarray, seq: np.ndarray, codes: np.ndarray, stamps: np.ndarray, ids: np.ndarray,
               keys: np.ndarray, values: np.ndarray) -> None:
        """Writes rows take (n,) of ids, keys and values, new to their sequences seq (n,) (grouped, ascending),
        over each sequence's oldest slots: no more than the slots not stamped by this call."""
        if not len(take):
            return
        first, where = np.unique(seq, return_inverse=True)
        rank = np.arange(len(seq)) - np.searchsorted(seq, seq, side="left")
        slots = self._oldest(first, int(rank.max()) + 1)[where, rank]
        self.written += np.bincount(seq, minlength=len(self.ids))
        gone = self.ids[seq, slots]  # the rows overwritten
        for c in (seq[gone >= 0] * _ROW_SHIFT + gone[gone >= 0]).tolist():
            del self._slots[c]
        self._slots.update(zip(codes.tolist(), slots.tolist()))
        self.ids[seq, slots] = ids[take]
        self.keys[seq, slots] = keys[take]
        self.norms[seq, slots] = np.einsum("nd,nd->n", keys[take], keys[take])
        self.values[seq, slots] = values[take]
        self.stamps[seq, slots] = stamps

    def _oldest(self, seqs: np.ndarray, n: int) -> np.ndarray:
        """(len(seqs), n) the slots of sequences seqs, oldest first (empty ones first, by slot): a stable sort of
        their stamps, of the n oldest alone (a partition first, where n is below the capacity)."""
        capacity = self.stamps.shape[1]
        order = self.stamps[seqs] * capacity + np.arange(capacity)  # (S, C) unique keys, in the stamps' stable order
        if n >= capacity:
            return np.argsort(order, axis=1)
        part = np.argpartition(order, n - 1, axis=1)[:, :n]  # (S, n) the n oldest, unordered
        return np.take_along_axis(part, np.argsort(np.take_along_axis(order, part, axis=1), axis=1), axis=1)

    def add_ranked(self, rows: np.ndarray, ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Adds answers' rows: query q's ids (m, n) ranked nearest first, keys (m, n, d) and values (m, n),
        to sequence rows[q]'s cache (rows (m,)), query after query. Each query's rows go in nearest last,
        so where a sequence gets more rows than it has slots the newest query's nearest rows are the ones
        kept, and they are the last that later answers overwrite; a row found twice, or already held, goes
        in where it comes last (its best rank in the newest query that found it: `add_many` with refresh)."""
        m, n = ids.shape
        flat = np.ascontiguousarray(ids[:, ::-1]).reshape(-1)  # (m n,) each query's farthest first
        owners = np.repeat(np.asarray(rows, dtype=np.int64), n)  # (m n,)
        codes = owners * _ROW_SHIFT + flat
        _, last = np.unique(codes[::-1], return_index=True)  # each (sequence, id)'s last place, from the end
        keep = np.zeros(len(flat), dtype=bool)
        keep[len(flat) - 1 - last] = True
        self.add_many(owners, np.where(keep, flat, -1), keys[:, ::-1].reshape(m * n, -1),
                      values[:, ::-1].reshape(-1), refresh=True)

    def add_neighbours(self, row: int | np.ndarray, found: KnnNeighbours, queries: slice | int | np.ndarray) -> None:
        """Adds the neighbours of `found`'s queries `queries` and their successors, which must have been
        asked for with keys (`Retriever.knn(..., successors=s, return_keys=True)`), to sequence `row`, or
        with `row` an array, query queries[i]'s to sequence row[i]; ranked as `add_ranked` ranks them (a
        neighbour, then its successors)."""
        if found.keys is None:
            raise ValueError("the neighbours carry no keys: ask with return_keys=True")
        d = found.keys.shape[-1]
        ids, keys, values = found.ids[queries], found.keys[queries], found.values[queries]  # (m, k), (m, k, d), (m, k)
        with_next = found.next_ids is not None and found.next_keys is not None
        if with_next:
            ids = np.concatenate([ids[..., None], found.next_ids[queries]], axis=-1)  # (m, k, 1 + s)
            keys = np.concatenate([keys[..., None, :], found.next_keys[queries]], axis=-2)  # (m, k, 1 + s, d)
            values = np.concatenate([values[..., None], found.next_values[queries]], axis=-1)  # (m, k, 1 + s)
        per_query = found.ids.shape[1] * (1 + found.next_ids.shape[-1] if with_next else 1)  # k (1 + s)
        m = ids.size // per_query
        owners = np.asarray(row, dtype=np.int64) if np.ndim(row) else np.full(m, row, dtype=np.int64)
        self.add_ranked(owners, ids.reshape(m, per_query), keys.reshape(m, per_query, d),
                        values.reshape(m, per_query))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's k rows nearest its query (B, d), or each of its m queries (B, m, d), by squared
        L2: distances (B, k) or (B, m, k) float32 ascending, values likewise int64; inf and -1 past the
        rows a sequence holds."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        grouped = q if q.ndim == 3 else q[:, None]  # (B, m, d)
        used = int(min(self.capacity, self.written.max()))  # slots past this are empty in every sequence
        distances = np.full(grouped.shape[:2] + (k,), np.inf, dtype=np.float32)
        found = np.full(grouped.shape[:2] + (k,), -1, dtype=np.int64)
        if used:
            dots = self.keys[:, :used] @ grouped.transpose(0, 2, 1)  # (B, C', m)
            norms = np.einsum("bmd,bmd->bm", grouped, grouped)[..., None]  # (B, m, 1)
            d2 = self.norms[:, None, :used] - 2 * dots.transpose(0, 2, 1) + norms  # (B, m, C'), inf on empty slots
            m = min(k, used)
            nearest, slots = torch.topk(torch.from_numpy(d2), m, dim=-1, largest=False, sorted=True)  # (B, m, k')
            nearest, slots = nearest.numpy(), slots.numpy()
            values = np.take_along_axis(self.values[:, None, :used], slots, axis=2)
            distances[..., :m] = np.maximum(nearest, 0)
            found[..., :m] = np.where(np.isinf(nearest), -1, values)
        return (distances, found) if q.ndim == 3 else (distances[:, 0], found[:, 0])
