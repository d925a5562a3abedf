"""RaLMSpec's optimal stride scheduler: how many steps to guess before the next verification.

A row that guesses s steps and has them verified commits E_s = (1 - γ^s) / (1 - γ) tokens on average
(the steps up to the first wrong guess, and the verified token there), γ the rate at which a guess holds.
The window costs this process s·a seconds (model, guess and settling per step) and the verification
b(s) = b0 + s·β seconds (a plain request, plus what a guessed window's successors and keys add per step).
The stride is the s in 1..max_stride that maximises E_s / (s·a + b(s)), or, asynchronously (a window is
guessed while the last one is verified, and a row whose window failed loses the window guessed
meanwhile), E_s / ((2 - γ^s) · max(s·a, b(s))). Where no s ≥ 2 beats a serial step, 1 / (a0 + b0), the
window is a serial step (no guess), with a probe at stride 2 every `_PROBE` windows to keep γ current.
All of a, a0, b0, β and γ are running averages of the windows settled so far.
"""

from __future__ import annotations

import numpy as np

from lm_worker.decoding.ralmspec.config import SpeculationConfig

_RATE = 0.3  # weight of the newest measurement in the running estimates
_PROBE = 8  # a window that would be serial guesses anyway once in this many
_PRIME = 2  # serial windows before a probe that fill the local caches


class StrideScheduler:
    """RaLMSpec's optimal stride, from running estimates measured window by window (see the module doc):
    γ; this process's seconds per step of a guessed window (model, guess and settling: a) and of a serial
    step (a0); a plain verification's seconds (b0) and what a guessed window's adds per step (β), as it
    also carries successors and keys: b(s) = b0 + s·β."""

    def __init__(self, spec: SpeculationConfig):
        self.spec = spec
        self.gamma: float | None = None
        self.step_s: float | None = None  # a
        self.serial_step_s: float | None = None  # a0
        self.plain_verify_s: float | None = None  # b0
        self.verify_per_step_s: float | None = None  # β
        self.serial_windows = 0
        self.primes = False  # the serial window planned last fills the local caches for the probe after it

    def rates(self) -> tuple[float, np.ndarray]:
        """Expected tokens per second of a row: serial, and guessing at strides 1..max_stride."""
        spec, gamma = self.spec, min(self.gamma, 0.999)
        b0 = self.plain_verify_s or 0.0
        serial = 1.0 / ((self.serial_step_s or self.step_s) + b0)
        s = np.arange(1, spec.max_stride + 1)
        tokens = (1 - gamma ** s) / (1 - gamma)  # expected tokens a row commits per window
        work, verify = s * self.step_s, b0 + s * self.verify_per_step_s  # seconds per window
        if spec.asynchronous:
            return serial, tokens / ((2 - gamma ** s) * np.maximum(work, verify))
        return serial, tokens / (work + verify)

    def plan(self) -> int:
        """The next window's stride, or 0 for a serial step (no guess) where no stride beats serial
        retrieval. Every `_PROBE`-th serial window guesses at stride 2 anyway, to keep γ current. Serial
        windows ask for no successors or keys and leave the local caches as they are, but the `_PRIME`
        windows before a probe, which fill them so that the probe measures γ on a current cache."""
        self.primes = False
        if self.spec.stride:
            return self.spec.stride
        if self.gamma is None or self.step_s is None:
            return min(2, self.spec.max_stride)
        serial, guessing = self.rates()
        if guessing.max() > serial and int(np.argmax(guessing)) > 0:
            return int(np.argmax(guessing)) + 1
        self.serial_windows += 1
        self.primes = self.serial_windows % _PROBE >= _PROBE - _PRIME
        return min(2, self.spec.max_stride) if self.serial_windows % _PROBE == 0 else 0

    def observe(self, stride: int, work_s: float, verify_s: float, accepted: int = 0, verified: int = 0) -> None:
        """Folds one settled window into the estimates: its stride (0: serial), this process's seconds
        on it, its verification's seconds, and its guesses verified and held."""
        def fold(mean: float | None, value: float) -> float:
            return value if mean is None else (1 - _RATE) * mean + _RATE * value

        if stride == 0:
            self.serial_step_s = fold(self.serial_step_s, work_s)
            self.plain_verify_s = fold(self.plain_verify_s, verify_s)
            return
        self.step_s = fold(self.step_s, work_s / stride)
        extra = max(0.0, verify_s - (self.plain_verify_s or 0.0))  # over a plain verification's
        self.verify_per_step_s = fold(self.verify_per_step_s, extra / stride)
        if verified:
            self.gamma = fold(self.gamma, accepted / verified)
