"""Speculative kNN-LM decoding with beam search: every step reorders the beams, which drops the guess,
so the adaptive stepper counts each drop as a miss and soon stops guessing. Its requests are then
serial retrieval's, with a bounded few more for the guesses made before it learned; the same tokens."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch
from test_steppers import TEMP, FakeRetriever, knn_datastore, random_tokens

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.knnlm_stepper import KnnLMStepper
from lm_worker.decoding.speculative import SpeculativeKnnLMStepper

GUESSES_BEFORE_IT_STOPS = 3  # the hold rate falls 1, 0.8, 0.64, ...: below any break-even within a few steps


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def lm():
    from test_steppers import V, sharpened

    from lm_worker.models.transformer_lm import LMConfig, TransformerLM

    torch.manual_seed(0)
    return sharpened(TransformerLM(LMConfig.tiny(vocab_size=V)))


def test_beam_search_stops_guessing_and_retrieves_as_serial_does(lm):
    keys, values = knn_datastore(lm)
    prompt = random_tokens((3, 5), seed=11)
    cfg = GenerateConfig(strategy="beam", num_beams=3, max_new_tokens=12)
    serial = KnnLMStepper(lm, FakeRetriever(keys, values, k=6, delay_s=0.002), lam=0.5, temperature=TEMP)
    fake = FakeRetriever(keys, values, k=6, delay_s=0.002)
    spec = SpeculativeKnnLMStepper(lm, fake, lam=0.5, temperature=TEMP)
    want, got = generate(serial, prompt, cfg), generate(spec, prompt, cfg)
    assert torch.equal(want.tokens, got.tokens) and torch.equal(want.scores, got.scores)
    extra_calls = spec.stats.retrieval_calls - serial.stats.retrieval_calls
    extra_queries = spec.stats.queries - serial.stats.queries
    assert 0 <= extra_calls <= GUESSES_BEFORE_IT_STOPS, (spec.stats.retrieval_calls, serial.stats.retrieval_calls)
    assert 0 <= extra_queries <= GUESSES_BEFORE_IT_STOPS * 3 * 3
    assert spec.hold_rate < 0.5 and spec.stats.steps_held == 0 < spec.stats.steps_checked
    assert spec.stats.guessed_right == 0


class Deferred(Future):
    """A search run only when its result is asked for: one never asked for stays pending, unless cancelled."""

    def __init__(self, search):
        super().__init__()
        self.search = search

    def result(self, timeout=None):
        if self.set_running_or_notify_cancel():
            self.set_result(self.search())
        return super().result(timeout)


class DeferredRetriever(FakeRetriever):
    """Its requests run when waited for; keeps every request's future."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.futures: list[Deferred] = []

    def submit_knn(self, keys, exclude=None):
        self.futures.append(Deferred(lambda: self.knn(keys)))
        return self.futures[-1]


def test_a_guess_dropped_by_a_reorder_has_its_request_cancelled(lm):
    """Guessing at every step (adaptive=False), each guess is dropped by the next reorder: its request,
    never waited for, is cancelled, so none is left pending once decoding is over."""
    keys, values = knn_datastore(lm)
    prompt = random_tokens((2, 5), seed=12)
    cfg = GenerateConfig(strategy="beam", num_beams=2, max_new_tokens=6)
    fake = DeferredRetriever(keys, values, k=6)
    want = generate(KnnLMStepper(lm, FakeRetriever(keys, values, k=6), lam=0.5, temperature=TEMP), prompt, cfg)
    spec = SpeculativeKnnLMStepper(lm, fake, lam=0.5, temperature=TEMP, adaptive=False)
    assert torch.equal(generate(spec, prompt, cfg).tokens, want.tokens)
    assert spec.stats.retrieval_calls > spec.stats.steps  # guesses were made
    assert [f for f in fake.futures if not f.done()] == []
    assert sum(f.cancelled() for f in fake.futures) == len(fake.futures) - len(fake.calls) > 0
