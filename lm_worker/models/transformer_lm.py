"""A decoder-only transformer LM (nanoGPT-like, rotary positions, RMSNorm, tied embeddings)
that also returns kNN-LM keys: the input of the last feed-forward block (Khandelwal et al. 2020).

Example:
    >>> cfg = LMConfig.tiny(vocab_size=100)
    >>> model = TransformerLM(cfg).eval()
    >>> logits, keys = model(tokens, return_keys=True)  # (B, T, V), (B, T, d_model)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_worker.models.layers import Block, KVCache, RMSNorm, check_length, check_sizes, check_token_ids, init_weights


@dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of `TransformerLM`."""

    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    max_len: int = 512
    dropout: float = 0.0

    def __post_init__(self):
        check_sizes(self, ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_len"))

    @classmethod
    def tiny(cls, vocab_size: int = 64, **overrides) -> LMConfig:
        """A few thousand parameters: for unit tests on CPU."""
        base = dict(vocab_size=vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64, max_len=128)
        return cls(**{**base, **overrides})

    @classmethod
    def small(cls, vocab_size: int, **overrides) -> LMConfig:
        """About 2M parameters plus embeddings: trains on CPU in minutes."""
        base = dict(vocab_size=vocab_size, n_layer=4, n_head=4, d_model=192, d_ff=768, max_len=256)
        return cls(**{**base, **overrides})

    @classmethod
    def gpu(cls, vocab_size: int, **overrides) -> LMConfig:
        """About 85M parameters plus embeddings (GPT-2 small shape): for one GPU."""
        base = dict(vocab_size=vocab_size, n_layer=12, n_head=12, d_model=768, d_ff=3072, max_len=1024, dropout=0.1)
        return cls(**{**base, **overrides})


class TransformerLM(nn.Module):
    """Decoder-only causal LM with a key/value cache and kNN-LM key capture."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_head, config.d_ff, config.dropout) for _ in range(config.n_layer)
        )
        self.norm = RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(init_weights)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for incremental decoding; its batch size is set by the first call."""
        return KVCache(self.config.n_layer)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, return_keys: bool = False,
        on_keys: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits for every position.

        Args:
            tokens: (B, T) token ids; with a cache, the positions after those already cached.
            cache: a `KVCache` from `new_cache()`, updated in place (keys/values appended, offset advanced).
            return_keys: also return the kNN-LM keys, the input of the last feed-forward block.
            on_keys: called with those keys (B, T, d_model) as soon as they exist, before the last
                feed-forward block and the output head run: a caller can send their retrieval meanwhile.

        Returns:
            logits (B, T, V), or (logits, keys (B, T, d_model)) when `return_keys`.

        Raises:
            ValueError: if the sequence would grow past `config.max_len`, or a token id is outside the
                vocabulary.
        """
        T = tokens.shape[1]
        check_token_ids(tokens, self.config.vocab_size)
        check_length(cache.offset if cache is not None else 0, T, self.config.max_len)
        x = self.drop(self.tok_emb(tokens))  # (B, T, C)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            x, keys = block(x, cache, layer, on_keys if layer == last else None)  # (B, T, C), (B, T, C)
        if cache is not None:
            cache.offset += T
        logits = self.head(self.norm(x))  # (B, T, V)
        return (logits, keys) if return_keys else logits

    def keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """kNN-LM keys (B, T, d_model) of `tokens` (B, T) alone: stops before the last feed-forward
        block and skips the output head, so encoding a datastore costs less than a full forward."""
        check_token_ids(tokens, self.config.vocab_size)
        check_length(0, tokens.shape[1], self.config.max_len)
        x = self.drop(self.tok_emb(tokens))  # (B, T, C)
        for block in self.blocks[:-1]:
            x, _ = block(x)  # (B, T, C)
        last = self.blocks[-1]
        x = x + last.attn(last.norm_attn(x), None, len(self.blocks) - 1)
        return last.norm_ffn(x)  # (B, T, C)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of `targets` (B, T) given `tokens` (B, T); `ignore_index` masks targets."""
        logits = self(tokens)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)

    def num_parameters(self) -> int:
        """Number of distinct trainable parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

