"""kNN-LM decoding: log(λ p_kNN + (1-λ) p_LM), with the neighbours of the newest position's key
retrieved for every row in one call per step. The call leaves as soon as the model has the keys (the
input of its last feed-forward block), so the service searches while the forward finishes: the last
feed-forward block, the output head over the vocabulary and the log-softmax (`early`, the default; the
same work and requests as sending after the forward).

Its steps also come in two phases (`submit_step`: model step and request sent; `finish`: wait and mix),
and `fork` makes a copy with its own cache, so with `overlap=True` `generate` pipelines two prompt
groups across steps (`lm_worker.decoding.pipelined`): one group's request is in flight while the other
group's model step runs. Same tokens, less time blocked. `SpeculativeKnnLMStepper`
(`lm_worker.decoding.speculative`) instead computes the next step on the LM's own argmax while this
step's neighbours are in flight.

Example:
    >>> stepper = KnnLMStepper(lm, ServiceRetriever(address, RetrievalConfig(k=64)), lam=0.25, overlap=True)
    >>> out = generate(stepper, prompt, GenerateConfig(max_new_tokens=32))  # two groups, interleaved
    >>> stepper.stats.wait_s, stepper.stats.retrieval_s  # summed over both groups
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lm_worker.decoding.stepper_stats import Pending, StepperStats, blocking, last_keys, last_log_probs, wait_for
from lm_worker.evaluation.knnlm import check_knnlm_inputs, check_mixing, mix_log_probs


@dataclass
class KnnStep:
    """A kNN-LM step in flight: the LM's log-probs (b, V) and its neighbours, found (serial) or a `Pending`."""

    lm_log_probs: torch.Tensor
    found: Any


class KnnLMStepper:
    """kNN-LM decoding: the LM's next-token distribution mixed with its neighbours', every step.

    `start` / `step` run a whole step; `submit_start` / `submit_step` run the model and send the request
    (a `KnnStep` comes back) and `finish(step)` waits for the neighbours and mixes, so a caller can compute
    in between. `fork()` gives a stepper with the same model, retriever and settings, its own cache and
    the same `stats` object: the pipeline decodes each prompt group with a fork and their times add up.

    Args:
        model: a `TransformerLM` (or anything with `forward(tokens, cache, return_keys)` and `new_cache()`).
        retriever: a `ServiceRetriever` or `InProcessRetriever` over a kNN-LM datastore of this LM's keys.
        lam: λ, the weight of p_kNN.
        temperature: of the neighbour softmax over -distance.
        overlap: send each request as a future (`submit_knn`) and let `generate` pipeline two prompt groups
            (`pipelined` is then true; see `lm_worker.decoding.pipelined`); False retrieves one step at a time
            (with `early`, sent from within the forward and waited for in `finish`; else one blocking call).
            Either way each row gets the same neighbours and the same tokens. The pipeline runs two half-batch
            forwards and two requests per step, so it pays only where a half-batch forward costs
            clearly less than a full one (large batches) and the requests' latency does not compete with the
            model for the same cores; at small batches, where a forward's cost hardly depends on its rows,
            it is slower than serial (see `benchmarks/decoding.py`).
        early: send each step's request as soon as the model has its keys (`on_keys` of its forward), so the
            service searches while the forward finishes (the last feed-forward block, the output head and
            the log-softmax), and wait for it in `finish`; False sends it once the forward is done (with
            `overlap` False, one blocking call: serial retrieval). The same work, requests and tokens
            either way. A model whose forward takes no `on_keys` sends after the forward.
    """

    def __init__(self, model: torch.nn.Module, retriever, lam: float = 0.25, temperature: float = 1.0,
                 overlap: bool = False, early: bool = True):
        check_mixing(lam, temperature)
        check_knnlm_inputs(model, retriever)
        self.model, self.retriever = model, retriever
        self.lam, self.temperature, self.overlap = lam, temperature, overlap
        self.early = early and "on_keys" in inspect.signature(model.forward).parameters
        self.stats = StepperStats()
        self.cache = None

    @property
    def pipelined(self) -> bool:
        """Whether `generate` decodes with this stepper in interleaved groups."""
        return self.overlap

    def fork(self) -> KnnLMStepper:
        """A copy with the same model, retriever, settings and `stats`, and no cache yet."""
        twin = copy.copy(self)
        twin.cache = None
        return twin

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Mixed log-probs (B, V) of the token after the prompt (B, T); resets the cache."""
        return self.finish(self.submit_start(prompt))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mixed log-probs (B, V) after feeding one token (B,) per row."""
        return self.finish(self.submit_step(tokens))

    @torch.no_grad()
    def submit_start(self, prompt: torch.Tensor) -> KnnStep:
        """Runs the prompt (B, T) through a fresh cache and sends the retrieval for its last position."""
        self.cache = self.model.new_cache()
        return self._submit(prompt)

    @torch.no_grad()
    def submit_step(self, tokens: torch.Tensor) -> KnnStep:
        """Feeds one token (B,) per row and sends the retrieval for the new position."""
        return self._submit(tokens[:, None])

    @torch.no_grad()
    def finish(self, step: KnnStep) -> torch.Tensor:
        """Mixed log-probs (B, V) of a submitted step, once its neighbours are in."""
        found = wait_for(step.found, self.stats) if isinstance(step.found, Pending) else step.found
        self.stats.steps += 1
        return self._mix(step.lm_log_probs, found)

    @torch.no_grad()
    def reorder(self, indices: torch.Tensor) -> None:
        """Selects batch rows (B',) of the cache; call it between a `finish` and the next submit."""
        self.cache.reorder(indices)

    def _submit(self, tokens: torch.Tensor, in_flight: bool | None = None) -> KnnStep:
        """Model step on `tokens` (B, T) and the request for the last position's neighbours: sent as a
        future when `in_flight` (default: `overlap` or `early`), from within the forward when `early`,
        else answered at once."""
        in_flight = self.overlap or self.early if in_flight is None else in_flight
        sent: list[Pending] = []

        def send(keys: torch.Tensor) -> None:  # (B, T, d)
            sent.append(self._request(last_keys(keys), in_flight=True))

        lm_log_probs, keys = self._model_step(tokens, send if in_flight and self.early else None)
        return KnnStep(lm_log_probs, sent[0] if sent else self._request(keys, in_flight))

    def _model_step(self, tokens: torch.Tensor, on_keys: Callable[[torch.Tensor], None] | None = None
                    ) -> tuple[torch.Tensor, np.ndarray]:
        """The LM's log-probs (B, V) and kNN-LM keys (B, d) at the last of `tokens` (B, T), cache advanced;
        `on_keys` goes to the model's forward (called with the keys (B, T, d) before it finishes)."""
        started = time.perf_counter()
        hook = {} if on_keys is None else {"on_keys": on_keys}
        logits, keys = self.model(tokens, cache=self.cache, return_keys=True, **hook)  # (B, T, V), (B, T, d)
        lm_log_probs = last_log_probs(logits)  # (B, V)
        self.stats.compute_s += time.perf_counter() - started
        return lm_log_probs, last_keys(keys)

    def _request(self, keys: np.ndarray, in_flight: bool):
        """The neighbours of `keys` (n, d): a `Pending` future, or found now (blocking)."""
        self.stats.queries += len(keys)
        if in_flight:
            self.stats.retrieval_calls += 1
            return Pending(self.retriever.submit_knn(keys))
        return blocking(lambda: self.retriever.knn(keys), self.stats)

    def _mix(self, lm_log_probs: torch.Tensor, found) -> torch.Tensor:
        """log(λ p_kNN + (1-λ) p_LM) (B, V) from the LM's log-probs and the neighbours found."""
        started = time.perf_counter()
        device = lm_log_probs.device
        out = mix_log_probs(lm_log_probs, torch.tensor(found.distances, device=device),
                            torch.tensor(found.values, dtype=torch.long, device=device),
                            self.lam, self.temperature)  # (B, V)
        self.stats.compute_s += time.perf_counter() - started
        return out
