"""How to decode (`GenerateConfig`) and what decoding returns (`GenerateOutput`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Generator
from dataclasses import dataclass

import torch

STRATEGIES = ("greedy", "sample", "beam")


LENGTH_NORMS = ("gnmt", "power", "none")
MAX_LENGTH_PENALTY = 10.0  # |alpha| of the length normalisation: lp(n) = n ** alpha stays finite and non-zero


@dataclass(frozen=True)
class GenerateConfig:
    """How to decode.

    strategy: "greedy" (argmax), "sample" (temperature, then top-k, then top-p) or "beam".
    top_k: keep the k most likely tokens when sampling (0: all). top_p: keep the smallest set of most
    likely tokens whose probability reaches p (1.0: all). length_penalty is alpha of `length_norm`
    (`lm_worker.decoding.beam`). eos_id: rows stop after emitting it (None: no EOS). seed: of the samplers,
    one per row (`row_generators`). first_row: the index of the prompt batch's first row in a larger batch
    decoded in parts: row r samples with the generator of row first_row + r, seeded as in the whole batch
    (its log-probs agree with the whole batch's to about 1e-6, so its tokens do except at near-ties).
    rows: instead, each row's index in the whole batch, one per prompt row (a part whose rows are not
    consecutive there, e.g. the prompts of one length); () for first_row + r.
    """

    strategy: str = "greedy"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 0.6
    length_norm: str = "gnmt"
    eos_id: int | None = None
    seed: int = 0
    first_row: int = 0
    rows: tuple[int, ...] = ()

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.length_norm not in LENGTH_NORMS:
            raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {self.length_norm!r}")
        for name, least in (("max_new_tokens", 1), ("num_beams", 1), ("top_k", 0), ("first_row", 0), ("seed", None),
                            ("eos_id", 0)):
            value = getattr(self, name)
            if name == "eos_id" and value is None:
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # 2.5 failed steps later, in torch
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if least is not None and value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in self.rows) or \
                any(r < 0 for r in self.rows) or len(set(self.rows)) != len(self.rows):
            raise ValueError(f"rows must be distinct row indices >= 0, got {self.rows[:8]}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:  # NaN too
            raise ValueError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}], got "
                             f"{self.length_penalty} (a length's power past it overflows)")

    def row_indices(self, n: int, offset: int = 0) -> list[int]:
        """The whole-batch indices of rows offset .. offset + n - 1 of the prompt, which seed their samplers."""
        if not self.rows:
            return list(range(self.first_row + offset, self.first_row + offset + n))
        if offset + n > len(self.rows):
            raise ValueError(f"rows names {len(self.rows)} rows; the prompt has at least {offset + n}")
        return list(self.rows[offset:offset + n])


@dataclass
class GenerateOutput:
    """What `generate` returns, one row per prompt.

    tokens: (B, T_new) long generated tokens, rows that finished early padded with eos_id.
    log_probs: (B,) summed log-prob of each row's tokens under the stepper (through its EOS; sampling
        filters do not change it). lengths: (B,) tokens generated per row, EOS included.
    scores: (B,) beam search: the best hypothesis's length-normalised score; otherwise `log_probs`.
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor


DecodeLoop = Generator[None, None, GenerateOutput]  # yields while a step is in flight, returns the output

