"""RaLMSpec's optimal stride scheduler: how many steps to guess before the next verification.

A row that guesses s steps and has them verified commits E_s = (1 - γ^s) / (1 - γ) tokens on average
(the steps up to the first wrong guess, and the verified token there), γ the rate at which a guess holds.
The window costs this process w(s) = s·a + c seconds (model and guess per step, and settling the
window) and the verification b(s) = b0 + s·β seconds (a plain request, plus what a guessed window's
successors and keys add per step). The stride is the s in 1..max_stride that maximises
E_s / (w(s) + b(s)), or, asynchronously (a window is guessed while the last one is verified, and a row
whose window failed loses the window guessed meanwhile), E_s / ((2 - γ^s) · max(w(s), b(s))). Where no
s ≥ 2 beats a serial step, 1 / (a0 + b0) (a0 its model, mixing and committing), the window is a
serial step (no guess); asynchronously s = 1 is a plan too, as its step overlaps the last one's
verification; with a probe now and then to keep γ current: a window of one guessed step,
which costs a serial step plus the guess (a rollback there drops no step); in a batch of fewer than
`_PROBE_GUESSES` rows, as many such windows in a row as make that many guesses (each window's answer
fills the caches for the next). Decoding starts serial, and the first probe comes after
`_PROBE_FIRST` serial windows, then, each time a probe leaves the plan clearly serial (guessing's best
rate under `_CLEAR` of serial's), after twice as many (up to `_PROBE_LAST`), so that where serial
retrieval keeps winning the probes and the successors and keys they need cost less and less, while a
close call keeps probing as often. A probe that turns the plan to guessing starts the count afresh.
All of a, c, a0, b0 and β are running averages of the windows settled so far. γ counts guesses, not
windows: the guesses held over the guesses verified, plus one of each (so a first window of two
guesses moves it only part of the way), each guess weighing less by a factor 1 - 1/`_MEMORY` with
every guess verified after it, however many windows they come in.
"""

from __future__ import annotations

import numpy as np

from lm_worker.decoding.ralmspec.config import SpeculationConfig

_RATE = 0.3  # weight of the newest measurement in the running estimates
_MEMORY = 32  # guesses that γ mostly remembers
_PROBE_FIRST = 4  # serial windows before the first probe
_PROBE_LAST = 64  # the most serial windows between two probes
_CLEAR = 0.95  # a plan is clearly serial where guessing's best rate is below this share of serial's
_PROBE_GUESSES = 4  # guesses a probe makes at least, over the rows of the batch
_PRIME = 1  # serial windows before a probe that fill the local caches


class StrideScheduler:
    """RaLMSpec's optimal stride, from running estimates measured window by window (see the module doc):
    γ; this process's seconds per step of a guessed window (model and guess: a), settling one (c) and
    a serial step (a0); a plain verification's seconds (b0) and what a guessed window's adds per step
    (β), as it also carries successors and keys: b(s) = b0 + s·β."""

    def __init__(self, spec: SpeculationConfig):
        self.spec = spec
        self.held = 0.0  # guesses that held, older ones weighing less
        self.checked = 0.0  # guesses verified, weighed alike
        self.early_verify: tuple[float, int] | None = None  # a guessed window's (verify_s, stride) before b0
        self.step_s: float | None = None  # a
        self.settle_s: float | None = None  # c
        self.serial_step_s: float | None = None  # a0
        self.plain_verify_s: float | None = None  # b0
        self.verify_per_step_s: float | None = None  # β
        self.probe_every = _PROBE_FIRST  # serial windows from one probe to the next
        self.until_probe = _PROBE_FIRST  # serial windows left before the next probe
        self.probed = False  # the window planned last was a probe
        self.rows = _PROBE_GUESSES  # rows of the batch being decoded (the decoder sets it)
        self.burst = 0  # windows left of the probe under way
        self.primes = False  # the serial window planned last fills the local caches for the probe after it

    @property
    def gamma(self) -> float | None:
        """The estimated rate at which a guess holds; None before any guess was verified."""
        return None if self.checked == 0 else (self.held + 1) / (self.checked + 2)

    def rates(self) -> tuple[float, np.ndarray]:
        """Expected tokens per second of a row: serial, and guessing at strides 1..max_stride."""
        spec, gamma = self.spec, min(self.gamma, 0.999)
        b0, beta = self.plain_verify_s or 0.0, self.verify_per_step_s or 0.0
        serial = 1.0 / ((self.serial_step_s or self.step_s) + b0)
        s = np.arange(1, spec.max_stride + 1)
        tokens = (1 - gamma ** s) / (1 - gamma)  # expected tokens a row commits per window
        work, verify = s * self.step_s + (self.settle_s or 0.0), b0 + s * beta  # seconds per window
        if spec.asynchronous:
            return serial, tokens / ((2 - gamma ** s) * np.maximum(work, verify))
        return serial, tokens / (work + verify)

    def plan(self) -> int:
        """The next window's stride, or 0 for a serial step (no guess) where no stride beats serial
        retrieval. Now and then a window that would be serial guesses one step anyway (a probe), to
        keep γ current; the probes grow rarer while they leave the plan serial (see the module doc).
        Serial windows ask for no successors or keys and leave the local caches as they are, but the
        `_PRIME` windows before a probe, which fill them so that the probe measures γ on a current cache."""
        self.primes = False
        if self.spec.stride:
            return self.spec.stride
        probed, self.probed = self.probed, False
        if self.gamma is not None and self.step_s is not None and self.plain_verify_s is not None:
            serial, guessing = self.rates()
            least = 0 if self.spec.asynchronous else 1  # a stride of 1 overlaps only asynchronously
            best = guessing[least:].max(initial=0.0)  # the strides a plan can choose
            if best > serial:
                self.probe_every = self.until_probe = _PROBE_FIRST
                self.burst = 0
                return least + int(np.argmax(guessing[least:])) + 1
            if probed and not self.burst and best < _CLEAR * serial:  # the probe left the plan clearly
                self.probe_every = min(2 * self.probe_every, _PROBE_LAST)  # serial: probe less often
        if self.burst:  # the probe goes on
            self.burst -= 1
            self.probed = True
            return 1
        if probed:
            self.until_probe = self.probe_every
        self.until_probe -= 1  # until the estimates exist: serial windows, then a first probe
        if self.until_probe <= 0:
            self.probed = True
            self.burst = -(-_PROBE_GUESSES // max(1, self.rows)) - 1  # its windows after this one
            return 1
        self.primes = self.until_probe <= _PRIME
        return 0

    def observe(self, stride: int, work_s: float, verify_s: float, accepted: int = 0, verified: int = 0,
                settle_s: float = 0.0) -> None:
        """Folds one settled window into the estimates: its stride (0: serial), this process's seconds
        on its steps and on settling it, its verification's seconds, and its guesses verified and held."""
        def fold(mean: float | None, value: float) -> float:
            return value if mean is None else (1 - _RATE) * mean + _RATE * value

        def fold_extra(verify_s: float, stride: int) -> None:  # over a plain verification's, per step
            extra = max(0.0, verify_s - self.plain_verify_s)
            self.verify_per_step_s = fold(self.verify_per_step_s, extra / stride)

        if stride == 0:
            self.serial_step_s = fold(self.serial_step_s, work_s + settle_s)
            self.plain_verify_s = fold(self.plain_verify_s, verify_s)
            if self.early_verify is not None:  # b0 is known now: the first guessed windows' β too
                fold_extra(*self.early_verify)
                self.early_verify = None
            return
        self.step_s = fold(self.step_s, work_s / stride)
        self.settle_s = fold(self.settle_s, settle_s)
        if self.plain_verify_s is None:
            self.early_verify = (verify_s, stride)
        else:
            fold_extra(verify_s, stride)
        older = (1 - 1 / _MEMORY) ** verified  # the weight left to the guesses before these
        self.held = older * self.held + accepted
        self.checked = older * self.checked + verified
