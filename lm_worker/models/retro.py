"""RETRO (Borgeaud et al. 2022): a causal decoder with chunked cross-attention (CCA) to retrieved
neighbours, each neighbour (a chunk and its continuation, 2 * chunk_len tokens) encoded by a
bidirectional encoder that cross-attends to the input chunk it was retrieved for.

CCA is shifted by chunk_len - 1: position i attends to the neighbours of chunk (i - chunk_len + 1) // chunk_len,
so the first chunk_len - 1 positions attend to nothing, and the last token of chunk c with the first
chunk_len - 1 tokens of chunk c + 1 attend to chunk c's neighbours; no position sees neighbours retrieved
with tokens from its future.

Shapes: B batch, T positions, L chunk_len, C chunks, K neighbours per chunk, N = 2 * L neighbour length,
E d_model, H heads.

Example:
    >>> model = Retro(RetroConfig.tiny(vocab_size=100)).eval()
    >>> logits = model(tokens, neighbours)  # (B, T) and (B, T // L, K, 2 * L) -> (B, T, V)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_worker.models.layers import (
    Block,
    CrossAttention,
    FeedForward,
    KVCache,
    RMSNorm,
    SelfAttention,
    check_sizes,
    check_token_ids,
    init_weights,
)
from lm_worker.models.ragged_retro import RaggedRetroCache, cca_ragged, encode_ragged


@dataclass(frozen=True)
class RetroConfig:
    """Hyper-parameters of `Retro`. `cca_layers` and `enc_cross_layers` are 0-based layer indices;
    None means every third decoder layer from layer 2 (as in the paper) and every encoder layer."""

    vocab_size: int
    chunk_len: int = 64
    n_neighbours: int = 2
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    enc_n_layer: int = 2
    cca_layers: tuple[int, ...] | None = None
    enc_cross_layers: tuple[int, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self):
        check_sizes(self, ("vocab_size", "chunk_len", "n_neighbours", "n_layer", "n_head", "d_model", "d_ff",
                           "enc_n_layer"))
        for name in ("cca_layers", "enc_cross_layers"):
            layers = getattr(self, name)
            if layers is not None and not (isinstance(layers, tuple) and all(isinstance(i, int) for i in layers)):
                raise ValueError(f"{name} must be a tuple of layer indices or None, got {layers!r}")
        if not self.decoder_cca_layers:
            raise ValueError(f"no decoder layer attends to the neighbours: with cca_layers None, n_layer must be 3 "
                             f"or more (got {self.n_layer}); or name the layers in cca_layers")
        if not all(0 <= i < self.n_layer for i in self.decoder_cca_layers):
            raise ValueError(f"cca_layers {self.cca_layers} out of range for {self.n_layer} layers")
        if not all(0 <= i < self.enc_n_layer for i in self.encoder_cross_layers):
            raise ValueError(f"enc_cross_layers {self.enc_cross_layers} out of range for {self.enc_n_layer} layers")

    @property
    def neighbour_len(self) -> int:
        """Tokens per neighbour: the retrieved chunk and its continuation."""
        return 2 * self.chunk_len

    @property
    def decoder_cca_layers(self) -> tuple[int, ...]:
        return tuple(range(2, self.n_layer, 3)) if self.cca_layers is None else tuple(sorted(self.cca_layers))

    @property
    def encoder_cross_layers(self) -> tuple[int, ...]:
        return tuple(range(self.enc_n_layer)) if self.enc_cross_layers is None else tuple(self.enc_cross_layers)

    @classmethod
    def tiny(cls, vocab_size: int = 64, **overrides) -> RetroConfig:
        """For unit tests on CPU: chunks of 4, 3 decoder layers with CCA in layers 1 and 2."""
        base = dict(vocab_size=vocab_size, chunk_len=4, n_neighbours=2, n_layer=3, n_head=2, d_model=32, d_ff=64,
                    enc_n_layer=2, cca_layers=(1, 2))
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, vocab_size: int, **overrides) -> RetroConfig:
        """Trains on CPU in minutes: chunks of 16, 6 decoder layers (CCA in 2 and 5)."""
        base = dict(vocab_size=vocab_size, chunk_len=16, n_layer=6, n_head=4, d_model=192, d_ff=768, enc_n_layer=2)
        return cls(**{**base, **overrides})

    @classmethod
    def gpu(cls, vocab_size: int, **overrides) -> RetroConfig:
        """For one GPU: chunks of 64, 12 decoder layers (CCA in 2, 5, 8, 11), a 2-layer encoder."""
        base = dict(vocab_size=vocab_size, chunk_len=64, n_layer=12, n_head=12, d_model=768, d_ff=3072,
                    enc_n_layer=2, dropout=0.1)
        return cls(**{**base, **overrides})


class RetroCache(KVCache):
    """`KVCache` plus what CCA needs across calls: the decoder's hidden states at the first CCA layer
    (the encoder's view of the input chunks) and the neighbours encoded so far."""

    def __init__(self, n_layer: int, chunk_len: int):
        super().__init__(n_layer)
        self.chunk_len = chunk_len
        self.hidden: torch.Tensor | None = None  # (B, S, E)
        self.encoded: torch.Tensor | None = None  # (B, C, K, N, E)

    def rewind(self, n: int = 1) -> None:
        """Forgets the last `n` positions: their keys and values, their hidden states, and the encoding
        of every chunk they completed (encoded again once complete again)."""
        super().rewind(n)
        if self.hidden is not None:
            self.hidden = self.hidden[:, :self.offset]
        if self.encoded is not None:
            self.encoded = self.encoded[:, :self.offset // self.chunk_len]

    def state(self) -> tuple:
        return super().state(), self.hidden, self.encoded

    def restore(self, state: tuple) -> None:
        kv, self.hidden, self.encoded = state
        super().restore(kv)

    def reorder(self, indices: torch.Tensor) -> None:
        super().reorder(indices)
        self.hidden = None if self.hidden is None else self.hidden.index_select(0, indices)
        self.encoded = None if self.encoded is None else self.encoded.index_select(0, indices)


class NeighbourEncoder(nn.Module):
    """Bidirectional transformer over each neighbour, cross-attending to its input chunk's hidden states."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        E, n = cfg.d_model, cfg.enc_n_layer
        self.cross_layers = cfg.encoder_cross_layers
        self.norm_chunk = RMSNorm(E)
        self.norm_attn = nn.ModuleList(RMSNorm(E) for _ in range(n))
        self.attn = nn.ModuleList(SelfAttention(E, cfg.n_head, cfg.dropout, causal=False) for _ in range(n))
        self.norm_cross = nn.ModuleDict({str(i): RMSNorm(E) for i in self.cross_layers})
        self.cross = nn.ModuleDict({str(i): CrossAttention(E, cfg.n_head, cfg.dropout) for i in self.cross_layers})
        self.norm_ffn = nn.ModuleList(RMSNorm(E) for _ in range(n))
        self.ffn = nn.ModuleList(FeedForward(E, cfg.d_ff, cfg.dropout) for _ in range(n))
        self.norm_out = RMSNorm(E)

    def forward(self, e: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """Encode neighbour embeddings e (B, C, K, N, E) given input chunk hidden states (B, C, L, E)."""
        B, C, K, N, E = e.shape
        chunks = self.norm_chunk(chunks).flatten(0, 1)  # (B*C, L, E)
        e = e.reshape(B * C * K, N, E)
        for i in range(len(self.attn)):
            e = e + self.attn[i](self.norm_attn[i](e))  # (B*C*K, N, E)
            if str(i) in self.cross:
                q = self.norm_cross[str(i)](e).view(B * C, K * N, E)
                e = e + self.cross[str(i)](q, chunks)[0].view(B * C * K, N, E)
            e = e + self.ffn[i](self.norm_ffn[i](e))
        return self.norm_out(e).view(B, C, K, N, E)


class ChunkedCrossAttention(nn.Module):
    """CCA: position i attends to all K * N encoded neighbour tokens of chunk (i - L + 1) // L."""

    def __init__(self, cfg: RetroConfig):
        super().__init__()
        self.chunk_len, self.n_neighbours = cfg.chunk_len, cfg.n_neighbours
        self.attn = CrossAttention(cfg.d_model, cfg.n_head, cfg.dropout)

    def forward(self, x: torch.Tensor, encoded: torch.Tensor | None, offset: int = 0, need_weights: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from x (B, T, E) at absolute positions offset.. to encoded neighbours (B, C, K, N, E).

        Positions whose chunk has no encoded neighbours get zeros. Returns the output (B, T, E) and, if
        `need_weights`, the weights (B, H, T, K, N), zero where a position attends to nothing (else None).
        """
        B, T, E = x.shape
        L, H = self.chunk_len, self.attn.n_head
        n_enc = 0 if encoded is None else encoded.shape[1]
        K, N = (self.n_neighbours, 2 * L) if encoded is None else encoded.shape[2:4]
        out = x.new_zeros(B, T, E)
        weights = x.new_zeros(B, H, T, K, N) if need_weights else None
        start = max(offset, L - 1)  # first absolute position that has a chunk to attend to
        c_lo = (start - L + 1) // L
        c_hi = min((offset + T - L) // L, n_enc - 1)  # last chunk attended to by a position here
        if c_hi < c_lo:
            return out, weights
        # Shift: lay positions (c*L + L-1) .. (c*L + 2L-2) out as row c of a (chunks, L) grid.
        pos = torch.arange(start, min(offset + T, (c_hi + 2) * L - 1), device=x.device)  # absolute positions
        slot = pos - (L - 1) - c_lo * L  # index in the grid
        n_c = c_hi - c_lo + 1
        grid = x.new_zeros(B, n_c * L, E)
        grid[:, slot] = x[:, pos - offset]
        memory = encoded[:, c_lo:c_hi + 1].reshape(B * n_c, K * N, E)  # (B*n_c, K*N, E)
        y, w = self.attn(grid.view(B * n_c, L, E), memory)  # (B*n_c, L, E), (B*n_c, H, L, K*N)
        out[:, pos - offset] = y.view(B, n_c * L, E)[:, slot].to(out.dtype)  # bfloat16 under autocast
        if not need_weights:
            return out, None
        w = w.view(B, n_c, H, L, K, N).transpose(1, 2).reshape(B, H, n_c * L, K, N)
        weights[:, :, pos - offset] = w[:, :, slot].to(weights.dtype)
        return out, weights


class Retro(nn.Module):
    """The RETRO decoder: causal blocks, CCA in `config.decoder_cca_layers`, tied embeddings."""

    def __init__(self, config: RetroConfig):
        super().__init__()
        self.config = config
        E = config.d_model
        self.cca_layers = config.decoder_cca_layers
        self.tok_emb = nn.Embedding(config.vocab_size, E)  # shared by input tokens and neighbours
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(E, config.n_head, config.d_ff, config.dropout) for _ in range(config.n_layer))
        self.norm_cca = nn.ModuleDict({str(i): RMSNorm(E) for i in self.cca_layers})
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(config) for i in self.cca_layers})
        self.encoder = NeighbourEncoder(config)
        self.norm = RMSNorm(E)
        self.head = nn.Linear(E, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(init_weights)

    def new_cache(self, ragged: bool = False) -> RetroCache | RaggedRetroCache:
        """An empty cache for incremental decoding; its batch size is set by the first call. `ragged`: a
        `RaggedRetroCache`, whose rows each hold their own length (one-token forwards after the prompt)."""
        if ragged:
            return RaggedRetroCache(self.config.n_layer, self.config.chunk_len)
        return RetroCache(self.config.n_layer, self.config.chunk_len)

    def forward(self, tokens: torch.Tensor, neighbours: torch.Tensor | None = None, cache: RetroCache | None = None,
                return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Next-token logits for every position.

        Args:
            tokens: (B, T) token ids; with a cache, the positions after those already cached.
            neighbours: (B, C, K, 2 * chunk_len) token ids, row c retrieved for chunk c of the whole sequence
                (with a cache: counted from position 0, not from this call). Chunks without a row, and
                chunks not yet complete, are attended to by nobody. None: no retrieval.
            cache: a `RetroCache` from `new_cache()`, updated in place; or a `RaggedRetroCache`
                (`new_cache(ragged=True)`), whose rows take one token each at their own positions once
                the prompt (every row at one length) is in.
            return_attention: also return the CCA weights, one (B, H, T, K, 2 * chunk_len) per CCA layer
                (not with a `RaggedRetroCache`).

        Returns:
            logits (B, T, V), or (logits, weights) when `return_attention`.

        Raises:
            ValueError: if `neighbours` has the wrong rank, batch size or neighbour length, or a token id
                (input or neighbour) is outside the vocabulary.
        """
        check_token_ids(tokens, self.config.vocab_size)
        self._check_neighbours(tokens, neighbours)
        ragged = isinstance(cache, RaggedRetroCache)
        if ragged and return_attention:
            raise ValueError("return_attention is not available with a RaggedRetroCache")
        offset = cache.offset if cache is not None else 0
        x = self.drop(self.tok_emb(tokens))  # (B, T, E)
        encoded, weights = None, []
        for i, block in enumerate(self.blocks):
            x = x + block.attn(block.norm_attn(x), cache, i)  # (B, T, E)
            if str(i) in self.cca and ragged:
                if i == self.cca_layers[0]:
                    encode_ragged(self, x, neighbours, cache)
                x = x + cca_ragged(self.cca[str(i)], self.norm_cca[str(i)](x), cache)
            elif str(i) in self.cca:
                if i == self.cca_layers[0]:
                    encoded = self._encode(x, neighbours, cache)  # (B, C, K, N, E) or None
                y, w = self.cca[str(i)](self.norm_cca[str(i)](x), encoded, offset, return_attention)
                x = x + y
                weights.append(w)
            x = x + block.ffn(block.norm_ffn(x))
        if cache is not None:
            cache.offset += tokens.shape[1]
        logits = self.head(self.norm(x))  # (B, T, V)
        return (logits, weights) if return_attention else logits

    def _encode(self, x: torch.Tensor, neighbours: torch.Tensor | None, cache: RetroCache | None
                ) -> torch.Tensor | None:
        """Encoded neighbours of every complete chunk so far, (B, C, K, N, E); cached chunks are reused."""
        hidden = x if cache is None or cache.hidden is None else torch.cat([cache.hidden, x], dim=1)  # (B, S, E)
        done = None if cache is None else cache.encoded
        n_done = 0 if done is None else done.shape[1]
        n_ready = 0 if neighbours is None else min(neighbours.shape[1], hidden.shape[1] // self.config.chunk_len)
        encoded = done
        if n_ready > n_done:
            L = self.config.chunk_len
            chunks = hidden[:, n_done * L:n_ready * L].unflatten(1, (n_ready - n_done, L))  # (B, c, L, E)
            new = self.encoder(self.tok_emb(neighbours[:, n_done:n_ready]), chunks)  # (B, c, K, N, E)
            encoded = new if done is None else torch.cat([done, new], dim=1)
        if cache is not None:
            cache.hidden, cache.encoded = hidden, encoded
        return encoded

    def _check_neighbours(self, tokens: torch.Tensor, neighbours: torch.Tensor | None) -> None:
        if neighbours is None:
            return
        if neighbours.dim() != 4 or neighbours.shape[0] != tokens.shape[0]:
            raise ValueError(f"neighbours must be (B={tokens.shape[0]}, C, K, N), got {tuple(neighbours.shape)}")
        if neighbours.shape[3] != self.config.neighbour_len:
            raise ValueError(f"neighbour length {neighbours.shape[3]} != 2 * chunk_len = {self.config.neighbour_len}")
        if neighbours.shape[2] != self.config.n_neighbours:  # the encoder would attend over another number
            raise ValueError(f"{neighbours.shape[2]} neighbours per chunk, the model takes n_neighbours = "
                             f"{self.config.n_neighbours}")
        check_token_ids(neighbours, self.config.vocab_size, "neighbours")

    def loss(self, tokens: torch.Tensor, neighbours: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of `targets` (B, T) given `tokens` (B, T) and their neighbours."""
        logits = self(tokens, neighbours)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
