"""RETRO over a cache whose rows hold different numbers of positions, so each row of a batch can be
rewound on its own (speculative retrieval per chunk rolls back only the rows whose guess failed).

`RaggedRetroCache` is a `RaggedKVCache` that also keeps, per row, the decoder's hidden states at the
first CCA layer (the encoder's view of the input chunks) and the neighbours encoded so far. `Retro`
takes it in place of its `RetroCache`: a forward of several positions needs every row at the same
length (the prompt), a one-token forward takes each row at its own position. Each row's chunk is
encoded and cross-attended in a batch of the same shape as with a `RetroCache`, so a row's outputs do
not depend on how far the other rows have gone.

Shapes: B batch, T positions, L chunk_len, C chunks, K neighbours per chunk, N = 2 * L neighbour length,
E d_model.

Example:
    >>> cache = RaggedRetroCache(model.config.n_layer, model.config.chunk_len)
    >>> logits = model(prompt, neighbours, cache=cache)          # (B, S, V), every row at length S
    >>> logits = model(tokens[:, None], neighbours, cache=cache)  # (B, 1, V), each row one further
    >>> cache.truncate(torch.tensor([2]), torch.tensor([S]))      # row 2 forgets its last position
"""

from __future__ import annotations

import torch
from torch import nn

from lm_worker.models.ragged_cache import CacheSnapshot, RaggedKVCache


class RaggedRetroCache(RaggedKVCache):
    """`RaggedKVCache` plus RETRO's per-row hidden states (B, capacity, E) and encoded neighbours
    (B, chunk capacity, K, N, E), of which row b holds `lengths[b]` and `n_encoded[b]`. Truncating a row
    forgets the encoding of every chunk its kept positions no longer complete."""

    def __init__(self, n_layer: int, chunk_len: int):
        super().__init__(n_layer, by_length=True)
        self.chunk_len = chunk_len
        self.hidden: torch.Tensor | None = None  # (B, capacity, E)
        self.encoded: torch.Tensor | None = None  # (B, chunk capacity, K, N, E)
        self.n_encoded: torch.Tensor | None = None  # (B,) long

    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        super().truncate(rows, lengths)
        if self.n_encoded is not None:  # the caller's rows and lengths may be on the CPU, the cache on a GPU
            rows, lengths = rows.to(self.n_encoded.device), lengths.to(self.n_encoded.device)
            self.n_encoded[rows] = torch.minimum(self.n_encoded[rows], lengths // self.chunk_len)

    def reorder(self, indices: torch.Tensor) -> None:
        super().reorder(indices)
        for name in ("hidden", "encoded", "n_encoded"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else value.index_select(0, indices))

    def snapshot(self) -> CacheSnapshot:
        """Not kept for RETRO: a row goes back with `truncate`, which keeps its earlier positions."""
        raise NotImplementedError("RaggedRetroCache rows go back with truncate")

    def counts(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's cached positions and encoded chunks, (B,) long each, zeros before any (B of `like`):
        copies, which stay as they are while the cache advances (`store_encoded` raises its own in place)."""
        zeros = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        lengths = zeros if self.lengths is None else self.lengths.clone()
        return lengths, (zeros if self.n_encoded is None else self.n_encoded.clone())

    def write_hidden(self, x: torch.Tensor) -> None:
        """Stores hidden states x (B, T, E) after each row's cached positions (the lengths before this
        forward advances them); T > 1 needs every row at the same length."""
        B, T, E = x.shape
        lengths, _ = self.counts(x)
        end = int(lengths.max()) + T
        if self.hidden is None or self.hidden.shape[1] < end:
            grown = x.new_zeros(B, max(end, 2 * (0 if self.hidden is None else self.hidden.shape[1])), E)
            if self.hidden is not None:
                grown[:, :self.hidden.shape[1]] = self.hidden
            self.hidden = grown
        if T == 1:
            self.hidden[torch.arange(B, device=x.device), lengths] = x[:, 0]
        else:
            start = same_length(lengths)
            self.hidden[:, start:start + T] = x

    def store_encoded(self, rows: torch.Tensor, chunks: torch.Tensor, encoded: torch.Tensor) -> None:
        """Row rows[i]'s chunk chunks[i] is now encoded[i] (K, N, E); it must be the row's next chunk."""
        need = int(chunks.max()) + 1 if len(chunks) else 0
        B = self.hidden.shape[0]
        if self.n_encoded is None:
            self.n_encoded = torch.zeros(B, dtype=torch.long, device=encoded.device)
        if self.encoded is None or self.encoded.shape[1] < need:
            old = 0 if self.encoded is None else self.encoded.shape[1]
            grown = encoded.new_zeros(B, max(need, 2 * old, 4), *encoded.shape[1:])
            if self.encoded is not None:
                grown[:, :old] = self.encoded
            self.encoded = grown
        self.encoded[rows, chunks] = encoded
        self.n_encoded.scatter_reduce_(0, rows, chunks + 1, reduce="amax", include_self=False)


def same_length(lengths: torch.Tensor) -> int:
    """The one length (B,) of every row; ValueError if the rows differ (a forward of several positions)."""
    first = int(lengths[0])
    if bool((lengths != first).any()):
        raise ValueError("a forward of several positions needs every row of a RaggedRetroCache at the same length")
    return first


def encode_ragged(model: nn.Module, x: torch.Tensor, neighbours: torch.Tensor | None, cache: RaggedRetroCache) -> None:
    """Stores x (B, T, E), the hidden states at the first CCA layer, and encodes each row's chunks that this
    forward completes and `neighbours` (B, C, K, N) covers. Several positions (every row at one length)
    encode their chunks as `Retro` does without a ragged cache; one position per row encodes each row's
    next chunk, in one batch of every row (B, 1, K, N, E), keeping it for the rows it completes."""
    B, T, _ = x.shape
    L = cache.chunk_len
    lengths, done = cache.counts(x)
    cache.write_hidden(x)
    if neighbours is None or neighbours.shape[1] == 0:
        return
    ready = torch.clamp((lengths + T) // L, max=neighbours.shape[1])  # (B,) chunks complete and covered
    if T > 1:
        n_done, n_ready = same_length(done), same_length(ready)
        if n_ready > n_done:
            chunks = cache.hidden[:, n_done * L:n_ready * L].unflatten(1, (n_ready - n_done, L))  # (B, c, L, E)
            new = model.encoder(model.tok_emb(neighbours[:, n_done:n_ready]), chunks)  # (B, c, K, N, E)
            rows = torch.arange(B, device=x.device).repeat_interleave(n_ready - n_done)
            index = torch.arange(n_done, n_ready, device=x.device).repeat(B)
            cache.store_encoded(rows, index, new.flatten(0, 1))
        return
    while True:  # one chunk a row a pass: more where neighbours came for several complete chunks at once
        due = ready > done  # (B,) rows whose position completes their next chunk (held rows' is dropped)
        due[cache.idle] = False
        if not bool(due.any()):
            return
        chunk = torch.clamp(done, max=neighbours.shape[1] - 1)  # (B,) each row's next chunk (any, where not due)
        positions = chunk[:, None] * L + torch.arange(L, device=x.device)  # (B, L)
        positions = positions.clamp(max=cache.hidden.shape[1] - 1)
        inputs = cache.hidden[torch.arange(B, device=x.device)[:, None], positions][:, None]  # (B, 1, L, E)
        found = neighbours[torch.arange(B, device=x.device), chunk][:, None]  # (B, 1, K, N)
        new = model.encoder(model.tok_emb(found), inputs)[:, 0]  # (B, K, N, E)
        rows = due.nonzero()[:, 0]
        cache.store_encoded(rows, chunk[rows], new[rows])
        done = torch.where(due, done + 1, done)


def cca_ragged(cca: nn.Module, x: torch.Tensor, cache: RaggedRetroCache) -> torch.Tensor:
    """Chunked cross-attention (a `ChunkedCrossAttention`) from x (B, T, E) at each row's positions to its
    encoded neighbours: (B, T, E). Several positions (every row at one length) go through `cca` itself; one
    position per row attends in one batch of every row, each row's position in its chunk's slot, as `cca`
    lays out a single position, and gets zeros where its chunk is not encoded."""
    B, T, E = x.shape
    L = cache.chunk_len
    lengths, n_encoded = cache.counts(x)
    if T > 1:
        n = same_length(n_encoded)
        encoded = None if n == 0 else cache.encoded[:, :n]
        return cca(x, encoded, same_length(lengths))[0]
    shifted = lengths - (L - 1)  # (B,) the position counted from the first one that attends to a chunk
    chunk = torch.div(shifted, L, rounding_mode="floor")  # (B,) the chunk it attends to
    attends = (shifted >= 0) & (chunk < n_encoded)  # (B,)
    if not bool(attends.any()):
        return torch.zeros_like(x)
    slot = torch.where(attends, shifted - chunk * L, 0)  # (B,) its row in the (L,) grid of its chunk
    chunk = torch.where(attends, chunk, 0)
    rows = torch.arange(B, device=x.device)
    grid = x.new_zeros(B, L, E)
    grid[rows, slot] = x[:, 0]
    memory = cache.encoded[rows, chunk].flatten(1, 2)  # (B, K * N, E)
    y, _ = cca.attn(grid, memory)  # (B, L, E)
    return torch.where(attends[:, None, None], y[rows, slot][:, None], 0.0)  # (B, 1, E)
