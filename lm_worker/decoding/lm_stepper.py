"""The plain LM as a stepper: log-softmax of the last position's logits, on a key/value cache."""

from __future__ import annotations

import time

import torch

from lm_worker.decoding.stepper_stats import StepperStats, last_log_probs


class LMStepper:
    """A plain LM with its key/value cache: anything with `forward(tokens, cache)` and `new_cache()`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = None
        self.stats = StepperStats()

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, V) of the token after the prompt (B, T); resets the cache."""
        self.cache = self.model.new_cache()
        return self._forward(prompt)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, V) after feeding one token (B,) per row."""
        return self._forward(tokens[:, None])

    @torch.no_grad()
    def reorder(self, indices: torch.Tensor) -> None:
        self.cache.reorder(indices)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = last_log_probs(self.model(tokens, cache=self.cache))
        self.stats.compute_s += time.perf_counter() - started
        self.stats.steps += 1
        return out

