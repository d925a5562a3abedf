"""Transformer building blocks shared by the LM and RETRO: RMSNorm, rotary embeddings,
self-attention with a key/value cache, cross-attention, feed-forward and a pre-norm block.

Shapes: B batch, T new positions, S positions attended to (past + new), C channels (d_model),
H heads, D head size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def check_sizes(config: object, names: tuple[str, ...]) -> None:
    """ValueError unless the config's `names` are positive integers (not bools), its dropout a number in
    [0, 1), and d_model splits into n_head heads of even size (rotary embeddings pair the channels)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    dropout = config.dropout
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    if config.d_model % config.n_head or (config.d_model // config.n_head) % 2:
        raise ValueError(f"d_model {config.d_model} must split into {config.n_head} heads of even size")


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias), as in RETRO and LLaMA."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x * rms * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al.): rotate pairs of query/key features by position."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate x (B, H, T, D) whose first position is absolute position `offset`: an int, or one
        per row (B,) long (a `RaggedKVCache`'s rows)."""
        T = x.shape[-2]
        steps = torch.arange(T, device=x.device, dtype=self.inv_freq.dtype)  # (T,)
        if isinstance(offset, torch.Tensor):
            pos = offset.to(x.device, self.inv_freq.dtype)[:, None] + steps  # (B, T)
            angles = (pos[..., None] * self.inv_freq)[:, None]  # (B, 1, T, D/2)
        else:
            angles = torch.outer(steps + offset, self.inv_freq)  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D) or (B, 1, T, D)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, D)
        return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


class KVCache:
    """Per-layer keys and values of past positions, for incremental decoding.

    `offset` is the number of positions already processed; the model advances it after each
    forward pass. `reorder(indices)` selects batch rows (beam search); `rewind(n)` forgets the last
    n positions (speculative decoding).

    Example:
        >>> cache = model.new_cache()
        >>> logits = model(prompt, cache=cache)             # (B, T, V)
        >>> logits = model(next_token[:, None], cache=cache)  # (B, 1, V), reuses the prompt's keys
    """

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer  # each (B, H, S, D)
        self.values: list[torch.Tensor | None] = [None] * n_layer  # each (B, H, S, D)
        self.offset = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values (B, H, T, D) of one layer; return all of them (B, H, S, D)."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows `indices` (1-D long tensor), in that order, e.g. the surviving beams."""
        self.keys = [None if k is None else k.index_select(0, indices) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, indices) for v in self.values]

    def state(self) -> tuple:
        """The cache as it is now, for `restore`: references suffice, as every forward appends new tensors."""
        return list(self.keys), list(self.values), self.offset

    def restore(self, state: tuple) -> None:
        """Back to a `state()` taken earlier on this cache (a rejected speculative chunk)."""
        keys, values, self.offset = state
        self.keys, self.values = list(keys), list(values)

    def rewind(self, n: int = 1) -> None:
        """Forget the last `n` positions, as if they had never been fed (a rejected speculative step)."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot rewind {n} of {self.offset} cached positions")
        keep = self.offset - n
        self.keys = [None if k is None else k[:, :, :keep] for k in self.keys]
        self.values = [None if v is None else v[:, :, :keep] for v in self.values]
        self.offset = keep


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary embeddings, causal or bidirectional, optionally cached."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(d_model // n_head)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with a cache, attends to the cached positions too."""
        B, T, C = x.shape
        offset = cache.offset if cache is not None else 0
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q, k = self.rotary(q, offset), self.rotary(k, offset)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, D)
        ragged = isinstance(offset, torch.Tensor)  # a `RaggedKVCache`: its rows' own ends, for every layer
        dropout = self.dropout if self.training else 0.0
        if ragged and cache.groups is not None:
            y = attend_by_length(q, k, v, cache.groups, dropout)  # (B, H, 1, D)
        else:
            mask = cache.mask if ragged else self._mask(T, k.shape[2], x.device)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and k.shape[2] == T, dropout_p=dropout,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))

    def _mask(self, T: int, S: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (T, S) mask for new queries after S - T cached positions; None when not needed."""
        if not self.causal or S == T:
            return None
        q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
        return q_pos >= torch.arange(S, device=device)[None, :]  # (T, S)


def length_groups(lengths: torch.Tensor, idle: list[int] = ()) -> list[tuple[torch.Tensor | None, int]]:
    """Rows (B,) grouped by cached length, for one new position each: (rows, S) with S = length + 1 the
    positions the group attends to; rows None when every row has the one length. `idle` rows, whose
    outputs are dropped, join the first group whatever their length."""
    counted = lengths
    if len(idle):
        counted = lengths.clone()
        counted[list(idle)] = -1
    values = [v for v in counted.unique().tolist() if v >= 0] or [int(lengths.min())]
    if len(values) == 1:
        return [(None, values[0] + 1)]
    groups = [((counted == length).nonzero()[:, 0], length + 1) for length in values]
    if len(idle):
        groups[0] = (torch.cat([groups[0][0], torch.tensor(list(idle), device=lengths.device)]), groups[0][1])
    return groups


def attend_by_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[tuple[torch.Tensor | None, int]],
                     dropout: float = 0.0) -> torch.Tensor:
    """One new position per row, q (B, H, 1, D), attending to each row's own S positions of k, v (B, H, S', D),
    group by group (`length_groups`): each group sees exactly its positions, under the all-seeing mask a
    cache without padding uses, so a row's output has the bits it has when every row is that long (a masked
    tail of padding slots would change the softmax's sums in the last bits). Returns (B, H, 1, D)."""
    y = q.new_empty(q.shape)
    for rows, S in groups:
        mask = torch.ones(1, S, dtype=torch.bool, device=q.device)  # as `SelfAttention._mask(1, S)`
        if rows is None:
            return F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], attn_mask=mask, dropout_p=dropout)
        y[rows] = F.scaled_dot_product_attention(q[rows], k[rows, :, :S], v[rows, :, :S], attn_mask=mask,
                                                 dropout_p=dropout)
    return y


def ragged_mask(lengths: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) causal mask for T new positions per row after `lengths` (B,) cached ones,
    each row's in a buffer of S slots: slot s is seen by new position t of row b iff s <= lengths[b] + t."""
    last = lengths[:, None] + torch.arange(T, device=lengths.device)  # (B, T)
    return (torch.arange(S, device=lengths.device) <= last[..., None])[:, None]  # (B, 1, T, S)


class CrossAttention(nn.Module):
    """Multi-head attention from queries x (N, Tq, C) to a memory m (N, Tk, C), no positions."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the output (N, Tq, C) and the attention weights (N, H, Tq, Tk)."""
        N, Tq, C = x.shape
        D = C // self.n_head
        q = self.q(x).view(N, Tq, self.n_head, D).transpose(1, 2)  # (N, H, Tq, D)
        k, v = self.kv(m).split(C, dim=-1)
        k = k.view(N, -1, self.n_head, D).transpose(1, 2)  # (N, H, Tk, D)
        v = v.view(N, -1, self.n_head, D).transpose(1, 2)  # (N, H, Tk, D)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)  # (N, H, Tq, Tk)
        y = self.attn_drop(weights) @ v  # (N, H, Tq, D)
        y = y.transpose(1, 2).reshape(N, Tq, C)
        return self.resid_drop(self.proj(y)), weights


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.norm_attn = RMSNorm(d_model)
        self.attn = SelfAttention(d_model, n_head, dropout, causal)
        self.norm_ffn = RMSNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
        on_ffn_input: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the block output (B, T, C) and the feed-forward input (B, T, C) (the kNN-LM key);
        `on_ffn_input` is called with the latter before the feed-forward runs."""
        x = x + self.attn(self.norm_attn(x), cache, layer)
        ffn_in = self.norm_ffn(x)  # (B, T, C)
        if on_ffn_input is not None:
            on_ffn_input(ffn_in)
        return x + self.ffn(ffn_in), ffn_in


def check_length(offset: int | torch.Tensor, length: int, max_len: int) -> None:
    """ValueError when `length` more positions after `offset` cached ones (per row: the longest row's)
    would pass `max_len`."""
    longest = int(offset.max()) if isinstance(offset, torch.Tensor) else offset
    if longest + length > max_len:
        raise ValueError(f"sequence length {longest + length} exceeds max_len {max_len}")


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str = "tokens") -> None:
    """ValueError when `ids` holds an id outside [0, vocab_size): the embedding would raise a bare
    IndexError on a CPU, and a device-side assert (the CUDA context lost) on a GPU."""
    if ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one read back from a GPU, not two
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")


def init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
