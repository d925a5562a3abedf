"""Speculative retrieval (RaLMSpec) for batched kNN-LM decoding, against a real datastore served by real
shard servers: the same tokens and log-probs as serial retrieval, bit for bit, for greedy, top-k and top-p sampling
and beam search; guesses that hold and guesses that fail, rolled back row by row; and its parts: the
per-row key/value cache against a cache-free forward, the local caches against brute force, the stride
scheduler."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from conftest import build, serve
from test_steppers import V, knn_datastore, random_tokens, sharpened

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.knnlm_stepper import KnnLMStepper
from lm_worker.decoding.ralmspec.config import SpeculationConfig
from lm_worker.decoding.ralmspec.decoder import RaLMSpecKnnLM
from lm_worker.decoding.ralmspec.scheduler import StrideScheduler
from lm_worker.models.ragged_cache import RaggedKVCache
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import KnnNeighbours, RetrievalConfig
from lm_worker.retrieval.local_cache import LocalCaches
from lm_worker.retrieval.service import ServiceRetriever
from retriever_server.client import RetrieverError

LAM, TEMP = 0.5, 4.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    torch.manual_seed(0)
    return sharpened(TransformerLM(LMConfig.tiny(vocab_size=V)))


def knn_store(lm: TransformerLM, folder) -> object:
    """The LM's keys over random text, the next token as value, in 2 shards that keep their keys."""
    with torch.no_grad():
        keys, values = knn_datastore(lm, n_seq=6, length=60)
    return build(folder, keys, "ds", shards=2, factory="IVF8,Flat", keep_keys=True, payload_arrays={"values": values})


@pytest.fixture(scope="module")
def datastore(lm, tmp_path_factory):
    return knn_store(lm, tmp_path_factory.mktemp("ralmspec"))


@pytest.fixture(scope="module")
def retriever(aio, datastore):
    with serve(aio, datastore, 2) as served, \
            ServiceRetriever(served.shard_addresses(), RetrievalConfig(k=6, nprobe=8)) as service:
        yield service


CONFIGS = {
    "greedy": GenerateConfig(max_new_tokens=16),
    "greedy-eos": GenerateConfig(max_new_tokens=16, eos_id=3),
    "top-k": GenerateConfig(strategy="sample", top_k=4, max_new_tokens=14, seed=5),
    "top-p": GenerateConfig(strategy="sample", temperature=1.3, top_p=0.9, max_new_tokens=14, eos_id=2, seed=3),
}
SPECS = {
    "stride-3": SpeculationConfig(stride=3, successors=4),
    "adaptive": SpeculationConfig(),
    "async-stride-2": SpeculationConfig(stride=2, asynchronous=True, successors=2, cache_rows=64),
    "lm-guess-async-stride-1": SpeculationConfig(stride=1, asynchronous=True, guess="lm"),
    "lm-guess-stride-3": SpeculationConfig(stride=3, guess="lm"),
}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_speculative_retrieval_decodes_the_tokens_of_serial_retrieval(lm, retriever, name, spec):
    cfg = CONFIGS[name]
    prompt = random_tokens((6, 5), seed=11)
    serial = KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SPECS[spec])
    want, got = generate(serial, prompt, cfg), generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.log_probs, want.log_probs), (got.log_probs - want.log_probs).abs().max()
    stats = decoder.stats
    assert stats.speculated > 0 and stats.verified > 0
    if spec != "adaptive":  # a fixed stride guesses on every window: both paths run
        assert 0 < stats.accepted < stats.verified and stats.rollbacks > 0
        if not SPECS[spec].asynchronous:  # an asynchronous window settles as soon as its answer is back, so
            # how many steps it covers, and so the count of requests, depends on timing
            assert stats.retrieval_calls < serial.stats.retrieval_calls  # one request verifies several steps


@pytest.mark.parametrize("name", list(CONFIGS))
def test_serial_steps_between_guessing_windows_decode_the_tokens_of_serial_retrieval(lm, retriever, name,
                                                                                     monkeypatch):
    """Serial steps (the plan's 0) taken between windows of guesses, with rows rolled back, finished or
    at max_new_tokens: the tokens and log-probs of serial retrieval, one request per serial step."""
    cfg = CONFIGS[name]
    prompt = random_tokens((6, 5), seed=11)
    want = generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP), prompt, cfg)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SpeculationConfig(successors=2))
    plans = iter([0, 3, 0, 0, 2] * 64)
    monkeypatch.setattr(decoder.scheduler, "plan", lambda: next(plans))
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.log_probs, want.log_probs), (got.log_probs - want.log_probs).abs().max()
    strides = decoder.stats.strides
    assert strides.count(0) >= 2 * strides.count(3) - 1 and decoder.stats.rollbacks > 0
    assert decoder.stats.retrieval_calls == 1 + len(strides)  # the first step's, then one per window


@pytest.mark.parametrize("name", ["greedy-eos", "top-p", "beam"])
def test_decoding_up_to_the_models_max_len_takes_what_serial_retrieval_takes(lm, retriever, name):
    """prompt + max_new_tokens = max_len + 1: the last token is chosen, never fed, as in serial decoding;
    rows that hold all their tokens while others step are not fed past max_len."""
    cfg = {**CONFIGS, "beam": GenerateConfig(strategy="beam", num_beams=3)}[name]
    prompt = random_tokens((6, 100), seed=11)
    cfg = dataclasses.replace(cfg, max_new_tokens=lm.config.max_len + 1 - prompt.shape[1])
    want = generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP), prompt, cfg)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SpeculationConfig(stride=3))
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.log_probs, want.log_probs), (got.log_probs - want.log_probs).abs().max()
    assert decoder.stats.rollbacks > 0


SENDING = {  # (speculation, the plan's strides, decoding): serial steps only; guessing windows between serial
    # steps; windows of two of the LM's guesses; beam search's serial steps and windows
    "serial steps": (SpeculationConfig(successors=2), [0], CONFIGS["greedy"]),
    "windows": (SpeculationConfig(successors=2), [0, 3, 0, 0, 2], CONFIGS["greedy"]),
    "lm-guess": (SpeculationConfig(stride=2, guess="lm"), [2], CONFIGS["greedy"]),
    "beam": (SpeculationConfig(successors=2), [0, 2, 0, 3], GenerateConfig(strategy="beam", num_beams=3,
                                                                            max_new_tokens=12)),
}


@pytest.mark.parametrize("name", list(SENDING))
def test_each_request_leaves_from_within_the_model_step_that_completes_it(lm, retriever, name, monkeypatch):
    """A serial step's request, or the request of the window a step completes, is sent from within that
    step's forward once the keys exist: after the last block's attention, before its feed-forward block and
    the output head. Only a window cut short by the end of decoding leaves after a forward. The tokens
    are serial retrieval's. (Asynchronous, a window is completed while the last one is in flight, and
    leaves once that one is settled.)"""
    speculation, plan, cfg = SENDING[name]
    prompt = random_tokens((6, 5), seed=11)
    want = generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP, early=False), prompt, cfg)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=speculation)
    plans = iter(plan * 64)
    monkeypatch.setattr(decoder.scheduler, "plan", lambda: next(plans))
    events: list[str] = []
    send = decoder.send
    monkeypatch.setattr(decoder, "send", lambda *a, **kw: (events.append("sent"), send(*a, **kw))[1])
    hooks = [lm.blocks[-1].attn.register_forward_hook(lambda *_: events.append("attention")),
             lm.blocks[-1].ffn.register_forward_pre_hook(lambda *_: events.append("ffn"))]
    try:
        got = generate(decoder, prompt, cfg)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.scores, want.scores), (got.scores - want.scores).abs().max()
    sent = [i for i, event in enumerate(events) if event == "sent"]
    early = [i for i in sent if events[i - 1] == "attention" and events[i + 1] == "ffn"]
    assert len(sent) == decoder.stats.retrieval_calls > 1
    assert len(early) == len(sent) if name == "serial steps" else len(early) >= len(sent) - 1


def test_guesses_made_while_a_window_was_in_flight_are_verified_when_the_plan_turns_serial(lm, retriever,
                                                                                           monkeypatch):
    """Asynchronous: while a guessing window is verified, the rows guess on (the service answers slowly
    here); if the stride planned next is a serial step, those guesses are still verified as a window,
    and the tokens are serial retrieval's."""
    cfg = CONFIGS["greedy"]
    prompt = random_tokens((6, 5), seed=11)
    want = generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP), prompt, cfg)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP,
                            speculation=SpeculationConfig(asynchronous=True, successors=2))
    plans = iter([2, 0] * 64)
    monkeypatch.setattr(decoder.scheduler, "plan", lambda: next(plans))
    knn = retriever.knn

    def slow_knn(*args, **kwargs):
        time.sleep(0.05)  # longer than the steps the rows guess meanwhile
        return knn(*args, **kwargs)

    monkeypatch.setattr(retriever, "knn", slow_knn)
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.log_probs, want.log_probs), (got.log_probs - want.log_probs).abs().max()
    strides = decoder.stats.strides  # the plans alternate 2, 0: without the guesses in flight, half would be 0
    assert decoder.stats.verified > 0 and set(strides) <= {0, 1, 2} and strides.count(0) < len(strides) / 2


BEAMS = {
    "beam": GenerateConfig(strategy="beam", num_beams=3, max_new_tokens=10, eos_id=0),
    "beam-no-eos": GenerateConfig(strategy="beam", num_beams=2, max_new_tokens=12, length_penalty=0.0),
}


@pytest.mark.parametrize("spec", ["stride-3", "adaptive"])
@pytest.mark.parametrize("name", list(BEAMS))
def test_speculative_beam_search_gives_the_result_of_serial_retrieval(lm, retriever, name, spec):
    cfg = BEAMS[name]
    prompt = random_tokens((3, 5), seed=4)
    want = generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP), prompt, cfg)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SPECS[spec])
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.scores, want.scores), (got.scores - want.scores).abs().max()
    assert torch.equal(got.log_probs, want.log_probs), (got.log_probs - want.log_probs).abs().max()
    stats = decoder.stats
    assert stats.speculated > 0 and stats.verified > 0
    if spec == "stride-3":  # guessed on every window: selections held and prompts rolled back
        assert 0 < stats.accepted < stats.verified and stats.rollbacks > 0
        assert stats.retrieval_calls < want.tokens.shape[1]
    assert stats.verified == stats.accepted + stats.rollbacks  # checked up to a prompt's first failed guess


def test_only_the_rows_whose_guess_failed_roll_back(lm, retriever, monkeypatch):
    """In some verification some rows keep all their steps while others roll back, each alone (its own
    cache row truncated), and the tokens are still serial retrieval's."""
    truncated: list[list[int]] = []
    real_truncate = RaggedKVCache.truncate

    def truncate(self, rows, lengths):
        truncated.append(rows.tolist())
        real_truncate(self, rows, lengths)

    monkeypatch.setattr(RaggedKVCache, "truncate", truncate)
    prompt = random_tokens((6, 5), seed=11)
    cfg = CONFIGS["greedy"]
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SpeculationConfig(stride=4))
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP), prompt, cfg).tokens)
    windows = decoder.stats.windows
    assert len(windows) == decoder.stats.verifications
    assert any(0 < rolled < rows for rows, rolled in windows)
    assert sum(rolled for _, rolled in windows) == decoder.stats.rollbacks > 0
    assert sum(len(rows) == 1 for rows in truncated) >= decoder.stats.rollbacks  # each rollback: one row
    stats = decoder.stats  # a row's guesses are checked up to its first wrong one, the later ones dropped
    assert stats.verified == stats.accepted + stats.rollbacks and stats.wasted > 0


@pytest.mark.parametrize("spec", ["lm-guess-stride-3", "lm-guess-async-stride-1"])
def test_guesses_dropped_unchecked_past_a_rows_end_are_not_counted_as_verified(lm, retriever, spec):
    """λ = 0: kNN-LM is the LM, so every guess of the LM's token holds. A row speculates past its EOS
    before the EOS is verified; those steps are dropped unchecked, and the hit rate stays 1."""
    cfg = CONFIGS["top-p"]  # sampled, so rows end at EOS at different steps
    prompt = random_tokens((6, 5), seed=11)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=0.0, temperature=TEMP, speculation=SPECS[spec])
    got = generate(decoder, prompt, cfg)
    want = generate(KnnLMStepper(lm, retriever, lam=0.0, temperature=TEMP), prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and (got.lengths < cfg.max_new_tokens).any()
    stats = decoder.stats
    assert stats.verified == stats.accepted > 0 and stats.hit_rate == 1.0 and stats.rollbacks == 0


def test_ragged_cache_rows_match_a_cache_free_forward(lm):
    """Rows advanced and rewound to different lengths give each row's logits of a forward over its own
    prefix without any cache."""
    tokens = random_tokens((3, 14), seed=2)
    with torch.no_grad():
        full = lm(tokens)  # (3, 14, V)
        cache = RaggedKVCache(len(lm.blocks))
        lm(tokens[:, :4], cache=cache)
        for t in range(4, 9):
            lm(tokens[:, t:t + 1], cache=cache)
        cache.truncate(torch.tensor([0, 2]), torch.tensor([6, 5]))  # rows at 6, 9, 5 positions
        lengths = cache.lengths.clone()
        step = lm(tokens[torch.arange(3), lengths][:, None], cache=cache)  # (3, 1, V)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(step[row, 0], full[row, n], atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [n + 1 for n in lengths.tolist()]
    with pytest.raises(ValueError, match="only shorten"):
        cache.truncate(torch.tensor([1]), torch.tensor([20]))


def test_local_caches_search_their_own_rows_exactly():
    """Each sequence's top-k equals brute force (float64) over the rows it holds: duplicates kept once,
    the oldest rows overwritten past capacity, missing ids skipped, and nothing from another sequence."""
    rng = np.random.default_rng(0)
    d, capacity = 8, 20
    table = rng.standard_normal((100, d)).astype(np.float32)
    caches = LocalCaches(rows=2, capacity=capacity, dimension=d)
    added: list[list[int]] = [[], []]
    for _ in range(4):
        for row in range(2):
            ids = rng.integers(-1, 100, 9)
            ids[0] = ids[1]  # a duplicate within the batch
            caches.add(row, ids, table[np.maximum(ids, 0)], ids * 10)
            for i in ids.tolist():
                if i >= 0 and i not in added[row]:
                    added[row].append(i)
            added[row] = added[row][-capacity:]
    queries = rng.standard_normal((2, d)).astype(np.float32)
    distances, values = caches.search(queries, k=5)
    for row in range(2):
        assert caches.size(row) == len(added[row])
        held = np.array(added[row])
        exact = ((table[held].astype(np.float64) - queries[row]) ** 2).sum(axis=1)
        order = np.argsort(exact, kind="stable")[:5]
        np.testing.assert_allclose(distances[row], exact[order], rtol=1e-4, atol=1e-5)
        assert values[row].tolist() == (held[order] * 10).tolist()
    empty = LocalCaches(rows=1, capacity=4, dimension=d)
    distances, values = empty.search(queries[:1], k=3)
    assert np.isinf(distances).all() and (values == -1).all()


def test_local_caches_add_many_sequences_at_once_as_one_by_one():
    """`add_many` over interleaved sequences equals a list model of each sequence's cache: ids in the
    order given, repeats and held ids skipped, the oldest overwritten, more new ids than slots keeping
    the last; keys, values and norms go with their ids."""
    rng = np.random.default_rng(3)
    d, capacity, B = 4, 6, 3
    table = rng.standard_normal((40, d)).astype(np.float32)
    caches = LocalCaches(rows=B, capacity=capacity, dimension=d)
    model: list[list[int]] = [[] for _ in range(B)]
    for n in (5, 9, 2, 20, 7, 0, 11):
        rows, ids = rng.integers(0, B, n), rng.integers(-1, 40, n)
        caches.add_many(rows, ids, table[np.maximum(ids, 0)], ids + 100)
        for row in range(B):
            fresh: list[int] = []
            for i in ids[rows == row].tolist():
                if i >= 0 and i not in model[row] and i not in fresh:
                    fresh.append(i)
            for i in fresh[-capacity:]:
                model[row] = (model[row] + [i])[-capacity:]
        for row in range(B):
            assert caches.held(row).tolist() == model[row]
            slots = np.flatnonzero(caches.ids[row] >= 0)
            ids_here = caches.ids[row, slots]
            np.testing.assert_array_equal(caches.keys[row, slots], table[ids_here])
            np.testing.assert_array_equal(caches.values[row, slots], ids_here + 100)
            np.testing.assert_allclose(caches.norms[row, slots], (table[ids_here] ** 2).sum(axis=1), rtol=1e-6)


def test_a_row_pushed_out_and_found_again_is_kept_when_added_call_by_call():
    """add_many skips the rows held when it begins; one call per answer (as RETRO's prompt, chunk by
    chunk) keeps a row that an earlier answer pushed out and a later one found."""
    keys = np.eye(8, dtype=np.float32)
    one, two = LocalCaches(rows=1, capacity=4, dimension=8), LocalCaches(rows=1, capacity=4, dimension=8)
    for caches in (one, two):
        caches.add(0, np.arange(1, 5), keys[1:5], np.arange(1, 5))
    one.add_many(np.zeros(2, np.int64), np.array([5, 1]), keys[[5, 1]], np.array([5, 1]))
    two.add(0, np.array([5]), keys[[5]], np.array([5]))
    two.add(0, np.array([1]), keys[[1]], np.array([1]))
    assert one.held(0).tolist() == [2, 3, 4, 5] and two.held(0).tolist() == [3, 4, 5, 1]


def test_local_caches_take_neighbours_with_their_successors():
    found = KnnNeighbours(distances=np.zeros((1, 2), np.float32), values=np.array([[7, 8]]), ids=np.array([[3, 9]]),
                          next_values=np.array([[[1], [2]]]), next_ids=np.array([[[4], [-1]]]),
                          keys=np.ones((1, 2, 4), np.float32), next_keys=np.zeros((1, 2, 1, 4), np.float32))
    caches = LocalCaches(rows=1, capacity=8, dimension=4)
    caches.add_neighbours(0, found, 0)
    assert sorted(caches.held(0).tolist()) == [3, 4, 9]  # row 9 has no successor (past its shard)
    with pytest.raises(ValueError, match="return_keys"):
        caches.add_neighbours(0, KnnNeighbours(found.distances, found.values, found.ids), 0)


def test_the_stride_follows_the_acceptance_rate_and_costs():
    scheduler = StrideScheduler(SpeculationConfig(max_stride=8))
    assert [scheduler.plan() for _ in range(4)] == [0, 0, 0, 1]  # nothing measured: serial steps, a first probe
    assert scheduler.primes is False and scheduler.probed
    scheduler.observe(0, work_s=0.004, verify_s=0.010)  # serial: 4 ms of model, 10 ms of retrieval
    scheduler.observe(2, work_s=0.008, verify_s=0.012, accepted=19, verified=20)  # guesses hold
    assert scheduler.plan() > 2  # retrieval dominates and guesses hold: verify rarely
    bad = StrideScheduler(SpeculationConfig(max_stride=8))
    bad.observe(0, work_s=0.004, verify_s=0.010)
    bad.observe(2, work_s=0.010, verify_s=0.016, accepted=2, verified=20)
    plans, primes = [], []
    for _ in range(40):
        plans.append(bad.plan())
        primes.append(bad.primes)
    # serial, probing after 4 windows, then after 8 and 16: probes that leave the plan serial grow rarer
    assert [i for i, p in enumerate(plans) if p] == [3, 11, 27] and set(plans) == {0, 1}
    assert [i for i, p in enumerate(primes) if p] == [2, 10, 26]  # the window before a probe fills the caches
    bad.observe(2, work_s=0.008, verify_s=0.012, accepted=200, verified=200)  # a probe whose guesses held
    assert bad.plan() > 2
    bad.observe(2, work_s=0.010, verify_s=0.016, accepted=0, verified=400)  # and then failed: probes start afresh
    assert [bad.plan() for _ in range(4)] == [0, 0, 0, 1]
    assert StrideScheduler(SpeculationConfig(stride=5)).plan() == 5


def test_a_close_call_keeps_probing_and_a_clear_one_probes_less_and_less(monkeypatch):
    def probes(rates: tuple[float, np.ndarray]) -> list[int]:
        scheduler = StrideScheduler(SpeculationConfig(max_stride=3))
        scheduler.observe(0, work_s=0.004, verify_s=0.010)
        scheduler.observe(1, work_s=0.004, verify_s=0.011, accepted=1, verified=2, settle_s=0.001)
        monkeypatch.setattr(scheduler, "rates", lambda: rates)
        return [i for i in range(40) if scheduler.plan()]

    assert probes((1.0, np.array([0.5, 0.97, 0.9]))) == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39]  # within 5%
    assert probes((1.0, np.array([0.5, 0.8, 0.7]))) == [3, 11, 27]
    assert probes((1.0, np.array([0.5, 1.2, 0.9])))[:3] == [0, 1, 2]  # guessing wins: every window guesses


def test_a_close_call_is_judged_on_the_strides_a_plan_can_choose():
    """Every guess failed. A one-step window costs what a serial step does (5 ms of model, 1 ms of
    retrieval, nothing to settle), so its rate equals serial's; but the plan only chooses strides of 2
    and more, and those lose clearly (0.6 of serial's rate), so probes back off."""
    scheduler = StrideScheduler(SpeculationConfig(max_stride=8))
    scheduler.rows = 8
    scheduler.observe(0, work_s=0.005, verify_s=0.001)
    scheduler.observe(1, work_s=0.005, verify_s=0.001, accepted=0, verified=8, settle_s=0.0)
    serial, guessing = scheduler.rates()
    assert guessing[0] == pytest.approx(serial) and guessing[1:].max() < 0.7 * serial
    assert [i for i in range(40) if scheduler.plan()] == [3, 11, 27]


def test_where_stride_one_is_best_but_no_plan_the_best_longer_stride_that_beats_serial_is_chosen(monkeypatch):
    """Synchronously a stride of 1 is no plan; when it has the best rate, a longer stride that still beats
    serial is the plan (the best of them), not a serial step; one that does not beat serial is not."""
    scheduler = StrideScheduler(SpeculationConfig(max_stride=4))
    scheduler.observe(0, work_s=0.004, verify_s=0.010)
    scheduler.observe(1, work_s=0.004, verify_s=0.011, accepted=1, verified=2, settle_s=0.001)
    monkeypatch.setattr(scheduler, "rates", lambda: (1.0, np.array([1.5, 1.03, 1.1, 0.9])))
    assert scheduler.plan() == 3
    monkeypatch.setattr(scheduler, "rates", lambda: (1.0, np.array([1.5, 0.99, 0.98, 0.9])))
    assert scheduler.plan() == 0


def test_a_probe_of_a_small_batch_lasts_until_it_has_made_enough_guesses(monkeypatch):
    scheduler = StrideScheduler(SpeculationConfig(max_stride=3))
    scheduler.rows = 1  # one row: a probe of four one-step windows
    scheduler.observe(0, work_s=0.004, verify_s=0.010)
    scheduler.observe(1, work_s=0.004, verify_s=0.011, accepted=1, verified=2, settle_s=0.001)
    monkeypatch.setattr(scheduler, "rates", lambda: (1.0, np.array([0.5, 0.8, 0.7])))  # clearly serial
    plans = [scheduler.plan() for _ in range(40)]
    assert [i for i, p in enumerate(plans) if p] == [3, 4, 5, 6, 14, 15, 16, 17, 33, 34, 35, 36]
    assert set(plans) == {0, 1}
    scheduler = StrideScheduler(SpeculationConfig(max_stride=3))
    scheduler.rows = 2  # two rows: two windows
    assert [i for i in range(12) if scheduler.plan()] == [3, 4, 8, 9]  # nothing measured: no backoff


def test_the_acceptance_rate_counts_guesses_and_the_extra_verification_waits_for_a_plain_one():
    scheduler = StrideScheduler(SpeculationConfig())
    assert scheduler.gamma is None
    scheduler.observe(2, work_s=0.004, verify_s=0.012, accepted=2, verified=2)  # before any serial window
    assert scheduler.gamma == pytest.approx(3 / 4)  # two held guesses, with one held and one failed assumed
    assert scheduler.verify_per_step_s is None  # no plain verification to compare with yet
    scheduler.observe(0, work_s=0.002, verify_s=0.010)
    assert scheduler.verify_per_step_s == pytest.approx((0.012 - 0.010) / 2)
    scheduler.observe(2, work_s=0.004, verify_s=0.010, accepted=0, verified=8)
    older = (1 - 1 / 32) ** 8  # each guess weighs 1 - 1/32 less with every guess verified after it
    assert scheduler.gamma == pytest.approx((older * 2 + 1) / (older * 2 + 8 + 2))


def test_bad_settings_and_datastores_fail_clearly(lm, retriever, aio, tmp_path):
    with pytest.raises(ValueError, match="successors"):
        SpeculationConfig(successors=17)
    with pytest.raises(ValueError, match="guess must be one of cache, lm"):
        SpeculationConfig(guess="model")
    for name, value in (("stride", 1.5), ("stride", True), ("max_stride", 2.5), ("cache_rows", 64.5)):
        with pytest.raises(ValueError, match=f"^{name} must be an integer, got {value!r}$"):
            SpeculationConfig(**{name: value})  # strides of 1.5 were decoded; 64.5 rows a bare TypeError later
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP)
    with pytest.raises(ValueError, match="prompt length 100 \\+ max_new_tokens 30 - 1 exceeds the model's max_len 128"):
        generate(decoder, random_tokens((2, 100), seed=1), GenerateConfig(max_new_tokens=30))
    lm_guess = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SpeculationConfig(guess="lm"))
    with pytest.raises(ValueError, match="beam search guesses from the local caches"):
        generate(lm_guess, random_tokens((2, 5), seed=1), BEAMS["beam"])
    with torch.no_grad():
        keys, values = knn_datastore(lm, n_seq=2, length=20)
    plain = build(tmp_path, keys, "plain", shards=1, factory="IVF4,Flat", payload_arrays={"values": values})
    with serve(aio, plain, 1) as served, ServiceRetriever(served.address, RetrievalConfig(k=4)) as no_keys:
        with pytest.raises(RetrieverError, match="keep-keys"):
            generate(RaLMSpecKnnLM(lm, no_keys), random_tokens((2, 5), seed=1), GenerateConfig(max_new_tokens=4))


def test_guessing_the_lms_token_needs_no_keys_and_asks_for_none(lm, aio, tmp_path, monkeypatch):
    """guess="lm": every request is a plain one (no successors, no keys), so a datastore without keys
    serves it, and the tokens are serial retrieval's."""
    with torch.no_grad():
        keys, values = knn_datastore(lm, n_seq=2, length=20)
    plain = build(tmp_path, keys, "plain", shards=1, factory="IVF4,Flat", payload_arrays={"values": values})
    cfg, prompt = CONFIGS["top-p"], random_tokens((4, 5), seed=2)
    with serve(aio, plain, 1) as served, ServiceRetriever(served.address, RetrievalConfig(k=4)) as no_keys:
        want = generate(KnnLMStepper(lm, no_keys, lam=LAM, temperature=TEMP), prompt, cfg)
        asked = []
        knn = no_keys.knn
        monkeypatch.setattr(no_keys, "knn", lambda *args: asked.append(args[2:]) or knn(*args))
        decoder = RaLMSpecKnnLM(lm, no_keys, lam=LAM, temperature=TEMP,
                                speculation=SpeculationConfig(stride=1, asynchronous=True, guess="lm"))
        got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.log_probs, want.log_probs), (got.log_probs - want.log_probs).abs().max()
    assert decoder.stats.verified > 0 and set(asked) == {(0, False)}  # (successors, return_keys) of every call


def test_asynchronously_a_stride_of_one_is_a_plan():
    """A one-step window overlaps the last one's verification only asynchronously: where guessing one
    step at a time wins there, the plan is 1; verified synchronously, the same estimates plan serial
    steps (with a probe now and then)."""
    plans = {}
    for asynchronous in (False, True):
        scheduler = StrideScheduler(SpeculationConfig(max_stride=4, asynchronous=asynchronous))
        scheduler.observe(0, work_s=0.006, verify_s=0.007)  # a serial step: 6 ms of model, 7 of waiting
        scheduler.observe(1, work_s=0.007, verify_s=0.007, accepted=20, verified=40)  # half the guesses held
        plans[asynchronous] = [scheduler.plan() for _ in range(3)]
    assert plans == {False: [0, 0, 0], True: [1, 1, 1]}
