"""How `RaLMSpecKnnLM` speculates (`SpeculationConfig`) and what it counts (`SpeculationStats`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from lm_worker.decoding.stepper_stats import StepperStats

GUESSES = ("cache", "lm")  # where a row's guessed token comes from (`SpeculationConfig.guess`)


@dataclass(frozen=True)
class SpeculationConfig:
    """How `RaLMSpecKnnLM` speculates.

    stride: steps between verifications; 0 chooses it adaptively (see the module doc) up to `max_stride`.
    asynchronous: speculate the next steps while a verification is in flight.
    successors: rows after each retrieved neighbour that also enter the local cache (0..16).
    cache_rows: rows each sequence's local cache keeps.
    guess: where a row's guessed token comes from. "cache": kNN-LM with the neighbours its local cache
        holds (RaLMSpec). "lm": the LM alone (its argmax; sampling: a draw from its distribution), which
        needs no local cache, no stored keys and no successors or keys in the verification requests; it
        pays where the LM alone mostly picks kNN-LM's token and, with `asynchronous`, a model step costs
        about what a request waits (a stride of 1 then computes each step while the last is verified).
        Greedy decoding and sampling; beam search takes "cache" alone.
    """

    stride: int = 0
    max_stride: int = 8
    asynchronous: bool = False
    successors: int = 4
    cache_rows: int = 2048
    guess: str = "cache"

    def __post_init__(self):
        for name in ("stride", "max_stride", "successors", "cache_rows"):  # 1.5 decoded strides of 1.5
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.stride < 0 or self.max_stride < 1 or not 0 <= self.successors <= 16 or self.cache_rows < 1:
            raise ValueError("stride >= 0, max_stride >= 1, successors in 0..16 and cache_rows >= 1 required")
        if self.guess not in GUESSES:
            raise ValueError(f"guess must be one of {', '.join(GUESSES)}, got {self.guess!r}")


@dataclass
class SpeculationStats(StepperStats):
    """`StepperStats` plus speculation's own counts.

    speculated: row-steps whose neighbours came from a local cache; verified: those checked against the
    service (a row's up to its first wrong guess or its end); accepted: those whose token held; rollbacks:
    rows rolled back; wasted: row-steps dropped unverified by a rollback; verifications: batched verification
    requests; ticks: batched model steps; strides: the stride of each verification window (0: a serial
    step); windows: per verification, the rows it verified and how many of them rolled back. In beam
    search the row is a prompt, whose beams guess, are verified and roll back together: each of these
    counts prompt-steps (speculated = verified + wasted). `steps` counts model steps as `StepperStats`
    does: the prompt's forward and every batched step after it (kNN-LM: 1 + ticks; settling runs none);
    `retrieval_calls` counts requests, a request split to fit the service's limits as its pieces.
    """

    speculated: int = 0
    verified: int = 0
    accepted: int = 0
    rollbacks: int = 0
    wasted: int = 0
    verifications: int = 0
    ticks: int = 0
    strides: list[int] = field(default_factory=list)
    windows: list[tuple[int, int]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        """The share of verified speculative steps whose token held."""
        return self.accepted / self.verified if self.verified else 0.0
