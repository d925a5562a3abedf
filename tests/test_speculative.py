"""Speculative kNN-LM decoding: the same tokens, scores and per-step log-probs as serial decoding for
every strategy (guesses right and wrong, rows finished with EOS, beams reordered), and the retrieval
hidden behind the speculative forward when the guesses hold; with beam search, whose reorders drop every
guess, it soon stops guessing and retrieves as serial decoding does."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch
from test_steppers import LAM, TEMP, FakeRetriever, SlowLM, during_a_search, knn_datastore, random_tokens

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.knnlm_stepper import KnnLMStepper
from lm_worker.decoding.speculative import SpeculativeKnnLMStepper


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def lm():
    from test_steppers import V, sharpened

    from lm_worker.models.transformer_lm import LMConfig, TransformerLM

    torch.manual_seed(0)
    return sharpened(TransformerLM(LMConfig.tiny(vocab_size=V)))


@pytest.fixture
def fake_knn(lm) -> FakeRetriever:
    keys, values = knn_datastore(lm)
    return FakeRetriever(keys, values, k=6, delay_s=0.002)


class Recording(SpeculativeKnnLMStepper):
    """Keeps every step's finished log-probs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outputs: list[torch.Tensor] = []

    def finish(self, step):
        self.outputs.append(super().finish(step))
        return self.outputs[-1]

    def finish_last(self, step):
        self.outputs.append(super().finish_last(step))
        return self.outputs[-1]


CONFIGS = {
    "greedy": GenerateConfig(max_new_tokens=12),
    "greedy-eos": GenerateConfig(max_new_tokens=12, eos_id=3),
    "sample": GenerateConfig(strategy="sample", temperature=1.5, top_p=0.95, max_new_tokens=10, eos_id=2, seed=3),
    "beam": GenerateConfig(strategy="beam", num_beams=3, max_new_tokens=8, eos_id=0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lam", [LAM, 0.9])
def test_speculative_decoding_equals_serial(lm, fake_knn, name, lam):
    cfg = CONFIGS[name]
    prompt = random_tokens((5, 4), seed=21)
    serial = KnnLMStepper(lm, fake_knn, lam=lam, temperature=TEMP)
    serial_outputs = []
    serial_finish = serial.finish
    serial.finish = lambda step: serial_outputs.append(serial_finish(step)) or serial_outputs[-1]
    spec = Recording(lm, fake_knn, lam=lam, temperature=TEMP, eos_id=cfg.eos_id, adaptive=False)
    a, b = generate(serial, prompt, cfg), generate(spec, prompt, cfg)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.log_probs, b.log_probs)
    assert len(spec.outputs) == len(serial_outputs)
    for got, want in zip(spec.outputs, serial_outputs):
        assert torch.equal(got, want)
    stats = spec.stats
    assert stats.guessed >= stats.guessed_right
    if name.startswith("greedy"):  # one guess per row and step, checked at the next step
        assert stats.guessed == 5 * (len(spec.outputs) - 1)
        assert 0 < stats.guessed_right < stats.guessed  # both paths ran: kept, and computed again
        assert stats.steps_checked == len(spec.outputs) - 1  # every step after the first checks a guess
        assert 0 <= stats.steps_held < stats.steps_checked  # some step had a row that guessed wrong
        assert stats.steps_held * 5 <= stats.guessed_right  # a step held only if all 5 of its rows did
    if name == "beam":  # every step reorders the beams, which drops the speculation
        assert stats.guessed_right == 0


@pytest.mark.parametrize("lam, rows, guesses", [(0.0, 5, "every step"), (1.0, 5, "few steps"), (0.9, 1, "equal")])
def test_adaptive_guessing_stops_where_guesses_fail(lm, fake_knn, lam, rows, guesses):
    """λ = 0: every guess holds and every step is guessed. λ = 1 over 5 rows: some row's neighbours
    nearly always move its argmax, and the stepper soon stops guessing. Either way, serial's tokens."""
    prompt, cfg = random_tokens((rows, 4), seed=22), GenerateConfig(max_new_tokens=12)
    serial = generate(KnnLMStepper(lm, fake_knn, lam=lam, temperature=TEMP), prompt, cfg)
    spec = SpeculativeKnnLMStepper(lm, fake_knn, lam=lam, temperature=TEMP)
    assert torch.equal(generate(spec, prompt, cfg).tokens, serial.tokens)
    steps = spec.stats.steps
    if guesses == "every step":
        assert spec.stats.guessed == spec.stats.guessed_right == rows * (steps - 1) and spec.hold_rate == 1.0
        assert spec.stats.steps_held == spec.stats.steps_checked == steps - 1
    elif guesses == "few steps":
        assert spec.stats.guessed <= rows * steps // 2 and spec.hold_rate < 0.5


def test_finished_rows_are_guessed_to_repeat_eos(lm, fake_knn):
    """With EOS early, the finished rows' forced EOS is guessed right: no step is computed twice for them."""
    prompt = random_tokens((5, 4), seed=21)
    cfg = CONFIGS["greedy-eos"]
    with_eos = SpeculativeKnnLMStepper(lm, fake_knn, lam=0.0, temperature=TEMP, eos_id=cfg.eos_id)
    out = generate(with_eos, prompt, cfg)
    assert (out.lengths < cfg.max_new_tokens).any()  # some row finished early
    assert with_eos.stats.guessed_right == with_eos.stats.guessed > 0


def test_speculation_overlaps_each_request_with_the_next_forward(lm):
    """Model steps of 40 ms against requests of 40 ms, λ = 0 (every guess holds), guessing at every step:
    each step's request is in flight while the next step's forward runs, so every forward after the
    first starts with a request out; serially none does. Same tokens either way. (How much time this
    hides, and whether the adaptive policy guesses, depend on timings: benchmarks/decoding.py.)"""
    keys, values = knn_datastore(lm)
    prompt, cfg = random_tokens((4, 4), seed=17), GenerateConfig(max_new_tokens=6)
    serial_events, spec_events = [], []
    serial = KnnLMStepper(SlowLM(lm, 0.04, serial_events),
                          FakeRetriever(keys, values, k=6, delay_s=0.04, events=serial_events),
                          lam=0.0, temperature=TEMP)
    spec = SpeculativeKnnLMStepper(SlowLM(lm, 0.04, spec_events),
                                   FakeRetriever(keys, values, k=6, delay_s=0.04, events=spec_events),
                                   lam=0.0, temperature=TEMP, adaptive=False)
    assert torch.equal(generate(serial, prompt, cfg).tokens, generate(spec, prompt, cfg).tokens)
    assert spec.stats.guessed_right == spec.stats.guessed == 4 * 5
    assert during_a_search(serial_events) == 0
    forwards = spec_events.count("forward-start")  # the serial 6: no guess follows the last token
    assert forwards == 6 and during_a_search(spec_events) == forwards - 1


@pytest.mark.parametrize("ending", ["max_new_tokens", "eos"])
def test_nothing_is_speculated_past_the_last_step(lm, ending):
    """A decode loop that ends leaves no guessed step behind. At max_new_tokens none is made: serial
    retrieval's requests, one per token. On EOS the guess made before the token was chosen is dropped
    again. Either way the cache holds the positions fed, no more. λ = 0: every guess holds, and one is
    made at every step it may be."""
    keys, values = knn_datastore(lm)
    prompt = random_tokens((1, 4), seed=5)
    cfg = GenerateConfig(max_new_tokens=6)
    if ending == "eos":  # the token serial decoding emits first, as EOS: the loop ends after one token
        serial = generate(KnnLMStepper(lm, FakeRetriever(keys, values, k=6), lam=0.0, temperature=TEMP), prompt, cfg)
        cfg = GenerateConfig(max_new_tokens=12, eos_id=int(serial.tokens[0, 0]))
    fake = FakeRetriever(keys, values, k=6)
    spec = SpeculativeKnnLMStepper(lm, fake, lam=0.0, temperature=TEMP, eos_id=cfg.eos_id, adaptive=False)
    out = generate(spec, prompt, cfg)
    emitted = int(out.lengths[0])
    assert emitted == (1 if ending == "eos" else cfg.max_new_tokens)
    guessed_past_the_end = 1 if ending == "eos" else 0
    fake.drain()  # the dropped guess's search runs on the fake's pool, maybe after the loop has ended...
    assert fake.submitted == spec.stats.retrieval_calls == emitted + guessed_past_the_end
    assert emitted <= len(fake.calls) <= fake.submitted  # ...unless its cancel came before the pool started it
    assert spec.cache.offset == prompt.shape[1] + emitted - 1  # the last token is never fed


def test_no_speculation_past_the_models_length(lm, fake_knn):
    """The last step fills the model's max_len: there is no room for a guess, and none is made.
    Guessing at every step (adaptive=False): whether it pays depends on timings, which this test is not about."""
    T = lm.config.max_len - 5
    prompt, cfg = random_tokens((2, T), seed=23), GenerateConfig(max_new_tokens=6)
    serial = generate(KnnLMStepper(lm, fake_knn, lam=LAM, temperature=TEMP), prompt, cfg)
    spec = SpeculativeKnnLMStepper(lm, fake_knn, lam=LAM, temperature=TEMP, adaptive=False)
    assert torch.equal(generate(spec, prompt, cfg).tokens, serial.tokens)
    assert spec.cache.offset == lm.config.max_len and spec.stats.guessed == 2 * 5


GUESSES_BEFORE_IT_STOPS = 3  # the hold rate falls 1, 0.8, 0.64, ...: below any break-even within a few steps


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
