"""Each sequence's local cache of datastore rows: the kNN-LM neighbours it has retrieved and the rows
that follow them, with their keys and values, searched exactly in process.

Speculative retrieval (RaLMSpec, Zhang et al. 2024) guesses a query's neighbours from this cache instead
of asking the service: consecutive queries of one sequence retrieve overlapping rows, and in a kNN-LM
datastore row i + 1 continues the context of row i, so the successors of the rows just retrieved are
likely neighbours of the next position (RetoMaton's observation). The guess is then verified against the
service's answer; the cache itself never decides a token.

The caches of a batch's sequences share one array per field, (B, capacity, ...), so that one batched
distance computation searches every sequence's own rows. A full cache overwrites its oldest rows.

Example:
    >>> caches = LocalCaches(rows=8, capacity=2048, dimension=32)
    >>> caches.add_neighbours(0, found)                     # a `KnnNeighbours` asked with successors and keys
    >>> distances, values = caches.search(queries, k=16)   # (8, 16) squared L2 ascending, (8, 16) next tokens
"""

from __future__ import annotations

import numpy as np
import torch

from lm_worker.retrieval.config import KnnNeighbours


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
        self.capacity = capacity
        self.keys = np.zeros((rows, capacity, dimension), dtype=np.float32)  # (B, C, d)
        self.norms = np.full((rows, capacity), np.inf, dtype=np.float32)  # (B, C) squared norms; inf: empty
        self.values = np.full((rows, capacity), -1, dtype=np.int64)  # (B, C)
        self.ids = np.full((rows, capacity), -1, dtype=np.int64)  # (B, C) datastore id per slot
        self.held: list[dict[int, int]] = [{} for _ in range(rows)]  # per sequence: datastore id -> slot
        self.written = [0] * rows  # rows ever written per sequence: the next slot is written % capacity

    def __len__(self) -> int:
        return len(self.ids)

    def size(self, row: int) -> int:
        """Datastore rows sequence `row` holds."""
        return len(self.held[row])

    def add(self, row: int, ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Adds datastore rows ids (n,), keys (n, d), values (n,) to sequence `row`'s cache; ids < 0 and
        rows it already holds are skipped."""
        ids, values = ids.reshape(-1), values.reshape(-1)
        keys = keys.reshape(len(ids), -1)
        held, fresh = self.held[row], {}
        for i, row_id in enumerate(ids.tolist()):
            if row_id >= 0 and row_id not in held and row_id not in fresh:
                fresh[row_id] = i
        if not fresh:
            return
        take = np.fromiter(fresh.values(), dtype=np.int64, count=len(fresh))[-self.capacity:]
        slots = (self.written[row] + np.arange(len(take))) % self.capacity
        self.written[row] += len(take)
        for old in self.ids[row, slots].tolist():
            held.pop(old, None)
        held.update(zip(ids[take].tolist(), slots.tolist()))
        self.ids[row, slots] = ids[take]
        self.keys[row, slots] = keys[take]
        self.norms[row, slots] = np.einsum("nd,nd->n", self.keys[row, slots], self.keys[row, slots])
        self.values[row, slots] = values[take]

    def add_neighbours(self, row: int, found: KnnNeighbours, queries: slice | int) -> None:
        """Adds to sequence `row` the neighbours of `found`'s queries `queries` and their successors,
        which must have been asked for with keys (`Retriever.knn(..., successors=s, return_keys=True)`)."""
        if found.keys is None:
            raise ValueError("the neighbours carry no keys: ask with return_keys=True")
        d = found.keys.shape[-1]
        ids, keys, values = [found.ids[queries]], [found.keys[queries]], [found.values[queries]]
        if found.next_ids is not None and found.next_keys is not None:
            ids.append(found.next_ids[queries])
            keys.append(found.next_keys[queries])
            values.append(found.next_values[queries])
        self.add(row, np.concatenate([i.reshape(-1) for i in ids]),
                 np.concatenate([k.reshape(-1, d) for k in keys]), np.concatenate([v.reshape(-1) for v in values]))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each sequence's k rows nearest its query (B, d), or each of its m queries (B, m, d), by squared
        L2: distances (B, k) or (B, m, k) float32 ascending, values likewise int64; inf and -1 past the
        rows a sequence holds."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        grouped = q if q.ndim == 3 else q[:, None]  # (B, m, d)
        dots = self.keys @ grouped.transpose(0, 2, 1)  # (B, C, m)
        norms = np.einsum("bmd,bmd->bm", grouped, grouped)[..., None]  # (B, m, 1)
        d2 = self.norms[:, None, :] - 2 * dots.transpose(0, 2, 1) + norms  # (B, m, C), inf on empty slots
        m = min(k, self.capacity)
        nearest, slots = torch.topk(torch.from_numpy(d2), m, dim=-1, largest=False, sorted=True)  # (B, m, k')
        nearest, slots = nearest.numpy(), slots.numpy()
        distances = np.full(d2.shape[:2] + (k,), np.inf, dtype=np.float32)
        found = np.full(d2.shape[:2] + (k,), -1, dtype=np.int64)
        values = np.take_along_axis(self.values[:, None, :], slots, axis=2)
        distances[..., :m] = np.maximum(nearest, 0)
        found[..., :m] = np.where(np.isinf(nearest), -1, values)
        return (distances, found) if q.ndim == 3 else (distances[:, 0], found[:, 0])
