"""Where a stepper's time goes, and the retrievals in flight it waits on.

Every stepper counts its time in `stats` (`StepperStats`): model compute, query encoding, time blocked
on retrieval, and the latency of the retrievals themselves, so a caller can tell how much was hidden.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class StepperStats:
    """Where a stepper's time went (seconds) and how often it retrieved.

    compute_s: model forwards and mixing. wait_s: blocked on retrieval (blocking calls, or waiting on a
    future). retrieval_s: the retrievals' own latency (a blocking call's duration, or a future's
    submit-to-done time); for RETRO it includes embedding the queries, of which encode_s is the part.
    retrieval_s - wait_s is the retrieval time hidden behind compute. steps: model steps (start included);
    a pipelined generate counts each group's, and its forks share one `StepperStats`, so all of it is summed.
    guessed, guessed_right: rows whose guessed next token a speculative stepper checked against the token
    the decoder chose, and how many of those it had right (`lm_worker.decoding.speculative`). steps_checked,
    steps_held: steps whose guess (made or only computed) it checked, and those where every row's held.
    """

    compute_s: float = 0.0
    encode_s: float = 0.0
    wait_s: float = 0.0
    retrieval_s: float = 0.0
    retrieval_calls: int = 0
    queries: int = 0
    steps: int = 0
    guessed: int = 0
    guessed_right: int = 0
    steps_checked: int = 0
    steps_held: int = 0

    @property
    def hidden_s(self) -> float:
        return max(0.0, self.retrieval_s - self.wait_s)


class Pending:
    """A retrieval in flight: its future, when it was sent, when it finished, and which of its rows
    each row of the current batch takes (None: all, in order), composed through every `reorder`."""

    def __init__(self, future: Future):
        self.future = future
        self.sent = time.perf_counter()
        self.finished: float | None = None
        self.rows: torch.Tensor | None = None
        future.add_done_callback(self._done)

    def _done(self, _future: Future) -> None:
        self.finished = time.perf_counter()

    def reorder(self, indices: torch.Tensor) -> None:
        self.rows = indices if self.rows is None else self.rows.index_select(0, indices)


def wait_for(pending: Pending, stats: StepperStats) -> Any:
    """The future's result, counting the time blocked on it and its latency."""
    started = time.perf_counter()
    result = pending.future.result()
    now = time.perf_counter()
    stats.wait_s += now - started
    stats.retrieval_s += (pending.finished or now) - pending.sent
    return result


def blocking(call, stats: StepperStats) -> Any:
    """A blocking retrieval: all of its time is both latency and waiting."""
    started = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - started
    stats.wait_s += elapsed
    stats.retrieval_s += elapsed
    stats.retrieval_calls += 1
    return result


def last_keys(keys: torch.Tensor) -> np.ndarray:
    """The last position's kNN-LM keys (B, d) of keys (B, T, d), as a float32 array of their own."""
    return np.ascontiguousarray(keys[:, -1].float().cpu().numpy())


def last_log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)

