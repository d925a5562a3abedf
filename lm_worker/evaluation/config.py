"""How an evaluation runs (`EvalConfig`) and the perplexity of a summed negative log-likelihood."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field

from lm_worker.data.token_store import TokenStore
from lm_worker.retrieval.config import RetrievalConfig

log = logging.getLogger(__name__)


DEFAULT_LAMBDAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    `stride` positions are scored per window after the first; `max_tokens` caps the scored positions
    (0: the whole store); `lambdas` and `temperature` are kNN-LM's; `exclude_own_document` makes each
    query skip the datastore rows of its own document (for a datastore built from this very store).
    `overlap` sends a batch's kNN-LM retrieval while the model runs the next batch. `pointer_steps` > 0
    retrieves approximately: a position whose previous position's neighbours still point at the text
    (at least `min_pointers` of them) takes their successors instead of a search, for up to
    `pointer_steps` positions after each search (`lm_worker.evaluation.pointers`). Followed positions
    mix with λs of their own (swept over `lambdas` apart from the searched positions') and a temperature
    of `pointer_temperature_scale` × `temperature`: their few neighbours all agree with the text so far.
    `pointer_agreement` θ > 0 follows only where the chains give θ of their weight to one next token;
    with `pointer_crowd` M > 0, only where fewer than M chains hold (M or more are followed as they split).
    Each window's scored positions are a run of chains of their own, so the `batch_size` windows of a
    batch share each round's request and the batch size does not change which positions are searched.
    """

    context_len: int = 256
    stride: int = 128
    batch_size: int = 8
    max_tokens: int = 0
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    temperature: float = 1.0
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    exclude_own_document: bool = False
    overlap: bool = True
    pointer_steps: int = 0
    min_pointers: int = 1
    pointer_temperature_scale: float = 2.0
    pointer_agreement: float = 0.0
    pointer_crowd: int = 0

    def __post_init__(self):
        for name in ("context_len", "stride", "batch_size", "max_tokens", "pointer_steps", "min_pointers",
                     "pointer_crowd"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # 8.0 failed late, 2.5 ran as 3
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.context_len < 1 or not 1 <= self.stride <= self.context_len:
            raise ValueError(f"need 1 <= stride <= context_len, got stride {self.stride}, "
                             f"context_len {self.context_len}")
        if self.batch_size < 1 or self.max_tokens < 0:
            raise ValueError(f"batch_size must be >= 1 and max_tokens >= 0, got {self.batch_size}, {self.max_tokens}")
        if not self.lambdas or not all(0.0 <= lam <= 1.0 for lam in self.lambdas):
            raise ValueError(f"lambdas must be a non-empty list of values in [0, 1], got {self.lambdas}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if not 0 <= self.pointer_steps <= 16 or self.min_pointers < 1:
            raise ValueError(f"pointer_steps must be in [0, 16] and min_pointers >= 1, got {self.pointer_steps}, "
                             f"{self.min_pointers}")
        if not 0 < self.pointer_temperature_scale < math.inf:
            raise ValueError(f"pointer_temperature_scale must be > 0 and finite, got {self.pointer_temperature_scale}")
        if not 0.0 <= self.pointer_agreement <= 1.0:
            raise ValueError(f"pointer_agreement must be in [0, 1], got {self.pointer_agreement}")
        for name, default in (("min_pointers", 1), ("pointer_temperature_scale", 2.0), ("pointer_agreement", 0.0)):
            if getattr(self, name) != default and not self.pointer_steps:
                raise ValueError(f"{name} applies to followed pointers: give pointer_steps too")
        if self.pointer_crowd < 0:
            raise ValueError(f"pointer_crowd must be >= 0, got {self.pointer_crowd}")
        if self.pointer_crowd and not self.pointer_agreement:
            raise ValueError("pointer_crowd lifts the agreement check for many chains: give pointer_agreement too")
        if self.pointer_steps and self.exclude_own_document:
            raise ValueError("pointer_steps cannot follow pointers with exclude_own_document: a chain could walk "
                             "into the excluded document")


def scored_positions(store: TokenStore, max_tokens: int = 0) -> int:
    """How many positions (tokens predicted) an evaluation of `store` scores."""
    n = max(len(store) - 1, 0)
    return min(n, max_tokens) if max_tokens else n


def perplexity(nll: float, tokens: int) -> float:
    """exp(nll / tokens): the perplexity of a summed negative log-likelihood (inf when it overflows).

    Raises:
        ValueError: `nll` is NaN (a model whose log-probabilities hold NaN), which no perplexity stands for.
    """
    if math.isnan(nll):
        raise ValueError(f"the negative log-likelihood of {tokens} tokens is NaN: the model's log-probabilities hold "
                         "NaN (an overflow in half precision, or weights that hold NaN)")
    mean = nll / max(tokens, 1)
    return math.exp(mean) if mean < 700 else math.inf

