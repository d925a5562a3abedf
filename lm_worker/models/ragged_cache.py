"""A key/value cache whose rows hold different numbers of positions, so each row of a batch can be
rewound on its own (speculative retrieval rolls back only the rows whose guess failed).

Each layer's keys and values live in a buffer (B, H, capacity, D); row b's first `lengths[b]` slots
are its past. A forward of T new positions writes row b's at slots lengths[b] .. lengths[b] + T - 1,
rotates them from position lengths[b] and masks every slot past each row's own end
(`layers.ragged_mask`), so a row's outputs do not depend on how far the other rows have gone; the
masked slots change the attention's last bits (about 1e-7). With `by_length`, a forward of one
position per row attends group by group of rows of one length, each over exactly its positions
(`layers.attend_by_length`): a row then gets the bits it gets from a cache without padding, for a
call per length (the speculative decoders use it, whose tokens must be serial decoding's; kNN-LM's,
whose rows spread over many lengths, pays 10-15% of its speed for it, docs/results.md).

Example:
    >>> cache = RaggedKVCache(model.config.n_layer)
    >>> logits = model(prompt, cache=cache)               # (B, T, V), every row at length T
    >>> logits = model(tokens[:, None], cache=cache)      # (B, 1, V), each row one further
    >>> cache.truncate(torch.tensor([2]), torch.tensor([T]))  # row 2 forgets its last position
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lm_worker.models.layers import length_groups, ragged_mask


@dataclass(frozen=True)
class CacheSnapshot:
    """A `RaggedKVCache` as it was: its buffers (shared, not copied) and its lengths."""

    keys: tuple[torch.Tensor | None, ...]
    values: tuple[torch.Tensor | None, ...]
    lengths: torch.Tensor


class RaggedKVCache:
    """Per-layer keys and values with one length per row (see the module doc).

    `offset` is the lengths (B,) long, which the layers read as per-row positions; the model advances
    it by T after each forward. `reorder(indices)` selects rows; `truncate(rows, lengths)` shortens rows;
    `snapshot()` and `restore_rows` take rows back to an earlier state (beam search rolled back).
    `by_length`: one-token forwards attend per group of rows of one length, for exact bits (module doc).
    """

    def __init__(self, n_layer: int, by_length: bool = False):
        self.by_length = by_length
        self.keys: list[torch.Tensor | None] = [None] * n_layer  # each (B, H, capacity, D)
        self.values: list[torch.Tensor | None] = [None] * n_layer  # each (B, H, capacity, D)
        self.lengths: torch.Tensor | None = None  # (B,) long, set by the first update
        self.mask: torch.Tensor | None = None  # (B, 1, T, S) the current forward's, made by its first layer
        self.end = 0  # the current forward's longest row's new end S
        self.groups: list | None = None  # one-token forwards: the rows by length (`layers.length_groups`)
        self.idle: list[int] = []  # within `holding`: the rows whose new position is dropped again

    @property
    def offset(self) -> torch.Tensor | int:
        """Positions cached per row (B,), or 0 before the first forward."""
        return 0 if self.lengths is None else self.lengths

    @offset.setter
    def offset(self, value: torch.Tensor | int) -> None:
        self.lengths = value if isinstance(value, torch.Tensor) else torch.full_like(self.lengths, value)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, H, T, D) of one layer after each row's past; return the buffers
        (B, H, S, D) up to the longest row's new end S."""
        B, H, T, D = k.shape
        if self.lengths is None:
            self.lengths = torch.zeros(B, dtype=torch.long, device=k.device)
        if layer == 0:  # every layer of this forward masks alike
            self.end = int(self.lengths.max()) + T
            self.groups = length_groups(self.lengths, self.idle) if T == 1 and self.by_length else None
            self.mask = None if self.groups is not None else ragged_mask(self.lengths, T, self.end)
        end = self.end
        self._reserve(layer, k, end)
        slots = (self.lengths[:, None] + torch.arange(T, device=k.device))  # (B, T)
        index = slots[:, None, :, None].expand(B, H, T, D)
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _reserve(self, layer: int, like: torch.Tensor, end: int) -> None:
        """Grows layer's buffers (doubling) to at least `end` slots."""
        buffer = self.keys[layer]
        if buffer is not None and buffer.shape[2] >= end:
            return
        B, H, _, D = like.shape
        capacity = max(end, 2 * (buffer.shape[2] if buffer is not None else 16))
        grown_k, grown_v = (like.new_zeros(B, H, capacity, D) for _ in range(2))
        if buffer is not None:
            grown_k[:, :, :buffer.shape[2]] = buffer
            grown_v[:, :, :buffer.shape[2]] = self.values[layer]
        self.keys[layer], self.values[layer] = grown_k, grown_v

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows `indices` (1-D long tensor), in that order."""
        self.keys = [None if k is None else k.index_select(0, indices) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, indices) for v in self.values]
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, indices)

    def snapshot(self) -> CacheSnapshot:
        """The cache as it is now, without copying: later forwards write only past each row's length,
        and `reorder` and growing make new buffers, so a row's snapshot stays valid for `restore_rows`
        until the row itself is restored or truncated and then written again."""
        return CacheSnapshot(tuple(self.keys), tuple(self.values), self.lengths.clone())

    def restore_rows(self, snapshot: CacheSnapshot, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Row rows[i] becomes the snapshot's row sources[i] (its keys, values and length)."""
        for layer, (keys, values) in enumerate(zip(snapshot.keys, snapshot.values)):
            if keys is None:
                continue
            width = keys.shape[2]
            self.keys[layer][rows, :, :width] = keys[sources]
            self.values[layer][rows, :, :width] = values[sources]
        self.lengths[rows] = snapshot.lengths[sources]

    @contextmanager
    def holding(self, rows: list[int], max_len: int) -> Iterator[None]:
        """Within the block, a forward of the whole batch keeps its new positions only for the rows not
        in `rows`: the held rows go back to their lengths after it. A held row already `max_len` long
        has that dropped position written over its last slot instead of past `max_len`, so it must be a
        row whose last slot is never read again (a row that holds all its tokens, its last never fed).
        The held rows go back to their lengths however the block ends, a forward that raised included."""
        if not rows:
            yield
            return
        before = self.lengths.clone()
        held = torch.tensor(rows, device=before.device)
        full = [r for r in rows if int(before[r]) >= max_len]
        if full:
            self.truncate(torch.tensor(full), before[full] - 1)
        self.idle = list(rows)
        try:
            yield
        finally:
            self.idle = []
            # a forward that raised left the full rows one short: their slot is there, as the docstring says
            self.lengths[held] = torch.maximum(self.lengths[held], before[held])
            self.truncate(held, before[held])

    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Row rows[i] keeps only its first lengths[i] positions (no longer than it has)."""
        rows, lengths = rows.to(self.lengths.device), lengths.to(self.lengths.device)  # host ids welcome
        if bool((lengths > self.lengths[rows]).any()) or bool((lengths < 0).any()):
            raise ValueError("truncate can only shorten rows")
        self.lengths[rows] = lengths
