"""The stepper protocol: a model with its key/value cache (and its retrieval, for kNN-LM and RETRO)
advanced one token per row at a time.

    start(prompt (B, T) long) -> (B, V)    step(tokens (B,) long) -> (B, V)    reorder(indices (B',) long)

`reorder` keeps (and duplicates) batch rows, as beam search needs. A `SplitStepper` also offers each
step in two phases, `submit_start` / `submit_step` (the model runs and the retrieval is sent; a handle
comes back) and `finish(handle)` (wait for the neighbours, mix). Optional hooks tell a stepper where
its decode loop ends (`expect_positions`, before it starts; `finish_last`; `end_decoding`), so that it
begins no work for steps that will not come. The steppers themselves:
`lm_stepper`, `knnlm_stepper`, `speculative`, `retro_stepper`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Protocol

import torch


class Stepper(Protocol):
    """An LM advanced one token per row at a time (see the module doc)."""

    def start(self, prompt: torch.Tensor) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, indices: torch.Tensor) -> None: ...


class SplitStepper(Protocol):
    """A stepper whose steps come in two phases: `submit_*` runs the model and sends the retrieval,
    `finish` waits for it and returns the log-probs (b, V). `reorder` only between a finish and the next submit."""

    def submit_start(self, prompt: torch.Tensor) -> Any: ...

    def submit_step(self, tokens: torch.Tensor) -> Any: ...

    def finish(self, handle: Any) -> torch.Tensor: ...

    def reorder(self, indices: torch.Tensor) -> None: ...


class WholeSteps:
    """A plain `Stepper` as a `SplitStepper`: submitting runs the whole step, its log-probs are the handle."""

    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    def submit_start(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.stepper.start(prompt)

    def submit_step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.stepper.step(tokens)

    def finish(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def reorder(self, indices: torch.Tensor) -> None:
        self.stepper.reorder(indices)

    def end_decoding(self) -> None:
        """The stepper's own `end_decoding`, where it has one (a RETRO stepper drops its unused prefetches)."""
        end_decoding(self.stepper)


def split_phase(stepper: Stepper | SplitStepper) -> SplitStepper:
    """The stepper itself if it has the two-phase API, else an adapter that runs whole steps."""
    return stepper if hasattr(stepper, "submit_step") else WholeSteps(stepper)


def await_step(stepper: SplitStepper, handle: Any, last: bool = False) -> Generator[None, None, torch.Tensor]:
    """Yields once while the step `handle` is in flight (other loops compute meanwhile), then finishes it.
    `last`: no step follows it, so a stepper with `finish_last` prepares none (e.g. no speculative step)."""
    yield
    finish = getattr(stepper, "finish_last", None) if last else None
    return (finish or stepper.finish)(handle)


def expect_positions(stepper: Stepper | SplitStepper, positions: int) -> None:
    """Tells the stepper, before its decode loop starts, the most positions the loop will feed (the prompt's
    and max_new_tokens - 1: the last token is never fed), through its `expect_positions` where it has one,
    so that no work begins for positions past them (a RETRO prefetch for a chunk that never completes)."""
    expect = getattr(stepper, "expect_positions", None)
    if expect is not None:
        expect(positions)


def end_decoding(stepper: SplitStepper) -> None:
    """Tells the stepper its decode loop is over (its `end_decoding`, where it has one), so that work begun
    for a step that will not come (a loop ended early, by EOS) is dropped."""
    end = getattr(stepper, "end_decoding", None)
    if end is not None:
        end()

