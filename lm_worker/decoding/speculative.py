"""Speculative kNN-LM decoding: the next step's model forward and retrieval run while this step's
neighbours are in flight, on the token the LM alone would choose.

kNN-LM cannot choose token t+1 before the neighbours of position t are in, and cannot form the query
of position t+1 before it has chosen token t+1, so serially every step waits for its retrieval:

    forward t, send t ── wait t ── mix, choose y ── forward t+1, send t+1 ── wait t+1 ── ...

`SpeculativeKnnLMStepper` guesses each row's token as the LM's own argmax ŷ while the neighbours of t
are on their way, and runs the forward of t+1 on ŷ and sends its request before it waits:

    forward t, send t, forward t+1 on ŷ, send t+1 ── wait t ── mix, choose y ── (y = ŷ) ── wait t+1 ── ...

When the decoder chooses ŷ for every row, the next step is already computed and its request in flight.
When some rows chose otherwise, the cache is rewound one position, the step is computed again on the
chosen tokens and only those rows are searched again; the rows that guessed right keep their
speculative neighbours (same key, same neighbours). The tokens are exactly those of serial decoding.

The guess is right wherever the neighbours do not move the argmax: most steps of greedy decoding with
a small λ or a high kNN temperature, fewer when sampling. Rows that have emitted `eos_id` are guessed
to emit it again, as the decoder does. Beam search reorders rows between steps, which drops every
speculation (its work is wasted, its request cancelled where not yet started) and counts as a miss, so
with `adaptive` the stepper stops guessing after a few steps: use `KnnLMStepper(overlap=True)` there.

A guess pays only when every row's holds: one wrong row costs a second forward (on a CPU a forward
costs about the same for one row as for all) and a second request. So, with `adaptive`, the stepper
guesses only while p·min(F, R) > (1 - p)·(F + R), where p is the recent rate at which every row's guess
held (tracked on every step, guessed or not), F a forward's and R a request's recent seconds. One
prompt, whose guesses hold on most steps, is decoded speculatively; many prompts, of which some row
nearly always differs from its guess, serially.

Example:
    >>> stepper = SpeculativeKnnLMStepper(lm, ServiceRetriever(address, RetrievalConfig(k=64)), lam=0.25)
    >>> out = generate(stepper, prompt, GenerateConfig(max_new_tokens=32))  # the tokens serial gives
    >>> stepper.stats.guessed_right / stepper.stats.guessed                  # how often the guess held
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lm_worker.decoding.knnlm_stepper import KnnLMStepper, KnnStep
from lm_worker.decoding.stepper_stats import Pending, wait_for
from lm_worker.retrieval.config import KnnNeighbours

_RATE = 0.2  # weight of the newest step in the running averages


def _average(mean: float | None, value: float) -> float:
    return value if mean is None else (1 - _RATE) * mean + _RATE * value


@dataclass
class _Guess:
    """A speculative step: the guessed tokens (B,) and the model step on them, its request in flight."""

    tokens: torch.Tensor
    step: KnnStep


@dataclass
class _Patched:
    """Neighbours of a recomputed step: the speculative request's (every row) with the rows in `redo`
    (n,) replaced by a new request's (n rows)."""

    speculative: Pending | KnnNeighbours
    redo: np.ndarray
    again: Pending


class SpeculativeKnnLMStepper(KnnLMStepper):
    """`KnnLMStepper` whose `finish` computes the next step on the LM's own argmax before waiting for
    this step's neighbours (see the module doc). Same tokens as serial decoding.

    Args:
        model: a `TransformerLM` or `HFCausalLM`: its cache must `rewind`.
        retriever: as for `KnnLMStepper`; requests are sent as futures (`submit_knn`).
        lam: λ, the weight of p_kNN.
        temperature: of the neighbour softmax over -distance.
        eos_id: the token rows repeat once finished (GenerateConfig.eos_id), guessed for them.
        adaptive: guess only while guessing pays (see the module doc); False guesses at every step.

    Attributes:
        hold_rate: the recent rate at which every row's guess held (an exponential average).
    """

    def __init__(self, model: torch.nn.Module, retriever, lam: float = 0.25, temperature: float = 1.0,
                 eos_id: int | None = None, adaptive: bool = True):
        super().__init__(model, retriever, lam, temperature, overlap=False)
        self.eos_id, self.adaptive = eos_id, adaptive
        self.hold_rate = 1.0
        self._forward_s: float | None = None  # recent seconds of a forward, of a request
        self._request_s: float | None = None
        self._guess: _Guess | None = None
        self._candidate: torch.Tensor | None = None  # (B,) the guess for the step being chosen, made or not
        self._last: torch.Tensor | None = None  # (B,) the token each row was last fed

    @property
    def pipelined(self) -> bool:
        """Never: one batch, overlapped with its own next step."""
        return False

    @torch.no_grad()
    def submit_start(self, prompt: torch.Tensor) -> KnnStep:
        """Runs the prompt (B, T) through a fresh cache and sends the request for its last position."""
        self.cache = self.model.new_cache()
        self._guess, self._candidate, self._last = None, None, prompt[:, -1]
        return self._submit(prompt, in_flight=True)

    @torch.no_grad()
    def submit_step(self, tokens: torch.Tensor) -> KnnStep:
        """The step on `tokens` (B,): the speculative one where every row guessed right, else computed
        again (see the module doc)."""
        guess, candidate = self._guess, self._candidate
        self._guess, self._candidate, self._last = None, None, tokens
        right = tokens == candidate if candidate is not None else None  # (B,)
        if right is not None:
            held = bool(right.all())
            self.hold_rate = _average(self.hold_rate, float(held))
            self.stats.steps_checked += 1
            self.stats.steps_held += held
        if guess is None:
            return self._submit(tokens[:, None], in_flight=True)
        self.stats.guessed += len(right)
        self.stats.guessed_right += int(right.sum())
        if bool(right.all()):
            return guess.step
        self.cache.rewind(1)
        lm_log_probs, keys = self._model_step(tokens[:, None])
        redo = (~right).nonzero().squeeze(1).cpu().numpy()  # (n,)
        again = self._request(keys[redo], in_flight=True)
        return KnnStep(lm_log_probs, _Patched(guess.step.found, redo, again))

    @torch.no_grad()
    def finish(self, step: KnnStep) -> torch.Tensor:
        """Sends the next step on the guessed tokens (when guessing pays), then waits for this step's
        neighbours and mixes."""
        self._candidate = self._guess_tokens(step.lm_log_probs)
        if self._worth_guessing():
            self._guess = self._speculate(self._candidate)
        return self._settle(step)

    @torch.no_grad()
    def finish_last(self, step: KnnStep) -> torch.Tensor:
        """`finish` for the decode loop's last step: no step follows, so none is speculated."""
        return self._settle(step)

    def _settle(self, step: KnnStep) -> torch.Tensor:
        """Waits for the step's neighbours and mixes: the log-probs (B, V)."""
        found = self._collect(step.found)
        self.stats.steps += 1
        return self._mix(step.lm_log_probs, found)

    def end_decoding(self) -> None:
        """Drops a speculative step made for a step that will not come (the loop ended early, on EOS or a
        finished beam search): its cache position, and its request where it has not started."""
        self._drop_guess()

    @torch.no_grad()
    def reorder(self, indices: torch.Tensor) -> None:
        """Selects batch rows (B',); drops a speculative step first (as `end_decoding` does) and counts the
        guess, made or only computed, as missed: beam search reorders every step, so there it never holds,
        and the adaptive rule soon stops guessing."""
        if self._candidate is not None:
            self.hold_rate = _average(self.hold_rate, 0.0)
            self.stats.steps_checked += 1
        self._drop_guess()
        self.cache.reorder(indices)
        self._last = None if self._last is None else self._last.index_select(0, indices)

    def _drop_guess(self) -> None:
        """Forgets the speculative step, if any: its cache position, and its request where it has not started."""
        if self._guess is not None:
            self.cache.rewind(1)
            if isinstance(self._guess.step.found, Pending):
                self._guess.step.found.future.cancel()
        self._guess, self._candidate = None, None

    def _guess_tokens(self, lm_log_probs: torch.Tensor) -> torch.Tensor:
        """The guess (B,): the LM's argmax, eos for rows that have emitted it."""
        tokens = lm_log_probs.argmax(dim=-1)  # (B,)
        if self.eos_id is not None and self._last is not None:
            tokens = torch.where(self._last == self.eos_id, torch.full_like(tokens, self.eos_id), tokens)
        return tokens

    def _worth_guessing(self) -> bool:
        """p·min(F, R) > (1 - p)·(F + R): the time a held guess saves against what a failed one costs."""
        if not self.adaptive or self._forward_s is None or self._request_s is None:
            return True
        p, f, r = self.hold_rate, self._forward_s, self._request_s
        return p * min(f, r) > (1 - p) * (f + r)

    def _speculate(self, tokens: torch.Tensor) -> _Guess | None:
        """The model step on the guessed tokens (B,), its request sent; None at the model's max_len."""
        max_len = getattr(getattr(self.model, "config", None), "max_len", None)
        if max_len is not None and self.cache.offset >= max_len:
            return None
        return _Guess(tokens, self._submit(tokens[:, None], in_flight=True))

    def _model_step(self, tokens: torch.Tensor, on_keys=None) -> tuple[torch.Tensor, np.ndarray]:
        started = time.perf_counter()
        out = super()._model_step(tokens, on_keys)
        self._forward_s = _average(self._forward_s, time.perf_counter() - started)
        return out

    def _collect(self, found) -> KnnNeighbours:
        """The neighbours of a step, waiting for whatever is still in flight."""
        if isinstance(found, Pending):
            neighbours = wait_for(found, self.stats)
            self._request_s = _average(self._request_s, (found.finished or time.perf_counter()) - found.sent)
            return neighbours
        if not isinstance(found, _Patched):
            return found
        speculative, again = self._collect(found.speculative), wait_for(found.again, self.stats)
        patched = KnnNeighbours(speculative.distances.copy(), speculative.values.copy(), speculative.ids.copy())
        for name in ("distances", "values", "ids"):
            getattr(patched, name)[found.redo] = getattr(again, name)
        return patched
