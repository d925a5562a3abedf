"""Steppers: kNN-LM and RETRO decoding against cache-free references with the same neighbours,
overlapped retrieval (kNN-LM: two prompt groups pipelined across steps; RETRO: prefetch) against serial
retrieval, and real datastores served by the retrieval service."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import Recorder, build, serve

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.knnlm_stepper import KnnLMStepper
from lm_worker.decoding.lm_stepper import LMStepper
from lm_worker.decoding.pipelined import split_groups
from lm_worker.decoding.retro_stepper import RetroStepper
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import KnnNeighbours, RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.retrieval.service import ServiceRetriever

V, L, K, D_ENC = 16, 4, 2, 8
LAM, TEMP = 0.4, 8.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


def sharpened(model: torch.nn.Module, factor: float = 3.0) -> torch.nn.Module:
    with torch.no_grad():
        model.tok_emb.weight.mul_(factor)
    return model.eval()


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    torch.manual_seed(0)
    return sharpened(TransformerLM(LMConfig.tiny(vocab_size=V)))


@pytest.fixture(scope="module")
def retro() -> Retro:
    torch.manual_seed(1)
    return sharpened(Retro(RetroConfig.tiny(vocab_size=V, chunk_len=L, n_neighbours=K)))


def random_tokens(shape, seed: int) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


class FakeEncoder:
    """Deterministic query embeddings: the normalised mean of fixed random token vectors."""

    def __init__(self, seed: int = 0):
        self.table = np.random.default_rng(seed).standard_normal((V, D_ENC))

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        e = self.table[np.asarray(chunks)].mean(axis=1)
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


class FakeRetriever:
    """Brute-force search in numpy over a small datastore, row by row (so a row's answer does not depend
    on its batch), with an optional delay per call; counts calls and their sizes."""

    def __init__(self, keys: np.ndarray, payload: np.ndarray, k: int, delay_s: float = 0.0, events: list | None = None):
        self.keys, self.payload, self.k, self.delay_s = keys.astype(np.float64), payload, k, delay_s
        self.events = events if events is not None else []  # "search-start" / "search-end", in order
        self.calls: list[int] = []  # queries per call
        self.threads: list[str] = []  # the thread of each call
        self.submitted = 0
        self._pool = ThreadPoolExecutor(2)
        self._lock = threading.Lock()

    def _search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self.calls.append(len(queries))
            self.threads.append(threading.current_thread().name)
        time.sleep(self.delay_s)
        d = ((np.asarray(queries, np.float64)[:, None, :] - self.keys[None]) ** 2).sum(-1)  # (n, M)
        ids = np.argsort(d, axis=1, kind="stable")[:, :self.k]
        with self._lock:
            self.events.append("search-end")
        return np.take_along_axis(d, ids, 1).astype(np.float32), ids

    def _sent(self) -> None:
        with self._lock:
            self.events.append("search-start")

    def _found(self, keys: np.ndarray) -> KnnNeighbours:
        distances, ids = self._search(keys)
        return KnnNeighbours(distances, self.payload[ids].astype(np.int64), ids)

    def knn(self, keys: np.ndarray, exclude=None) -> KnnNeighbours:
        self._sent()
        return self._found(keys)

    def chunks(self, embeddings: np.ndarray, exclude=None) -> np.ndarray:
        self._sent()
        return self.payload[self._search(embeddings)[1]].astype(np.int64)

    def submit_knn(self, keys, exclude=None):
        self.submitted += 1
        self._sent()  # in flight from now, whenever the pool's thread starts on it
        return self._pool.submit(self._found, np.array(keys))

    def drain(self) -> None:
        """Waits for every submitted search to have run (a dropped one too), so `calls` counts them all."""
        self._pool.shutdown(wait=True)
        self._pool = ThreadPoolExecutor(2)



@torch.no_grad()
def knn_datastore(lm: TransformerLM, n_seq: int = 4, length: int = 50, seed: int = 3):
    """Keys of the LM over random token sequences, and the next token of each position as value."""
    tokens = random_tokens((n_seq, length + 1), seed)
    _, keys = lm(tokens[:, :-1], return_keys=True)  # (n, length, d)
    return keys.reshape(-1, keys.shape[-1]).numpy(), tokens[:, 1:].reshape(-1).numpy().astype(np.int32)


@pytest.fixture
def fake_knn(lm) -> FakeRetriever:
    keys, values = knn_datastore(lm)
    return FakeRetriever(keys, values, k=6, delay_s=0.005)


@pytest.fixture
def fake_chunks() -> FakeRetriever:
    payload = random_tokens((40, 2 * L), seed=4).numpy()
    return FakeRetriever(FakeEncoder().embed(payload[:, :L]), payload, k=3, delay_s=0.005)


@torch.no_grad()
def reference_knn_lm(lm, seq: torch.Tensor, retriever) -> torch.Tensor:
    """log(λ p_kNN + (1-λ) p_LM) at the last position, cache-free, in float64, p_kNN summed by hand."""
    logits, keys = lm(seq, return_keys=True)
    p_lm = torch.softmax(logits[:, -1].double(), -1)  # (B, V)
    found = retriever.knn(keys[:, -1].numpy())
    w = torch.softmax(-torch.from_numpy(found.distances).double() / TEMP, -1)  # (B, k)
    p_knn = torch.zeros_like(p_lm)
    for b in range(len(seq)):
        for j, value in enumerate(found.values[b]):
            p_knn[b, value] += w[b, j]
    return (LAM * p_knn + (1 - LAM) * p_lm).log()


def assert_steps_match(outputs: list[torch.Tensor], references: list[torch.Tensor], atol: float = 1e-5):
    assert len(outputs) == len(references)
    for t, (got, ref) in enumerate(zip(outputs, references)):
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=0, msg=lambda m, t=t: f"step {t}: {m}")


# ---------------------------------------------------------------------------------------------
# kNN-LM
# ---------------------------------------------------------------------------------------------

def test_knn_lm_matches_reference_from_logits_and_neighbours(lm, fake_knn):
    prompt = random_tokens((3, 5), seed=5)
    rec = Recorder(KnnLMStepper(lm, fake_knn, lam=LAM, temperature=TEMP))
    out = generate(rec, prompt, GenerateConfig(max_new_tokens=6))
    refs = [reference_knn_lm(lm, torch.cat([prompt, out.tokens[:, :t]], 1), fake_knn) for t in range(6)]
    assert_steps_match(rec.outputs, refs)
    assert fake_knn.calls[:6] == [3] * 6  # one call per step for every row
    assert rec.inner.stats.retrieval_calls == 6 and rec.inner.stats.queries == 18


def test_knn_lm_with_lambda_zero_is_the_lm(lm, fake_knn):
    prompt = random_tokens((3, 5), seed=6)
    plain, knn = Recorder(LMStepper(lm)), Recorder(KnnLMStepper(lm, fake_knn, lam=0.0, temperature=TEMP))
    a = generate(plain, prompt, GenerateConfig(max_new_tokens=5))
    b = generate(knn, prompt, GenerateConfig(max_new_tokens=5))
    assert torch.equal(a.tokens, b.tokens)
    assert all(torch.equal(x, y) for x, y in zip(plain.outputs, knn.outputs))


class RecordingKnn(KnnLMStepper):
    """A KnnLMStepper that records what its forks do: each fork's finished log-probs and reorders; shared by
    all, the order of submits and finishes, and at each model step how many other forks' requests were still
    in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name, self.forks, self.events, self.in_flight = "root", [], [], []
        self.outputs, self.reorders, self.last = [], [], None

    def fork(self):
        twin = super().fork()
        twin.name, twin.outputs, twin.reorders, twin.last = len(self.forks), [], [], None
        self.forks.append(twin)
        return twin

    def _submit(self, tokens):
        others = [f.last for f in self.forks if f is not self and f.last is not None]
        self.in_flight.append(sum(not step.found.future.done() for step in others))
        self.events.append((self.name, "submit"))
        self.last = super()._submit(tokens)
        return self.last

    def finish(self, step):
        self.events.append((self.name, "finish"))
        self.last = None
        self.outputs.append(super().finish(step))
        return self.outputs[-1]

    def reorder(self, indices):
        self.reorders.append(indices.clone())
        super().reorder(indices)


def group_rows(output: torch.Tensor, t: int, lo: int, hi: int, beams: int) -> torch.Tensor:
    """Rows of a whole-batch step's log-probs that belong to prompts [lo, hi): beams per prompt after start."""
    return output[lo:hi] if t == 0 else output[lo * beams:hi * beams]


PIPELINE_CONFIGS = {  # (config, prompt seed): with EOS, seeds where one group finishes steps before the other
    "greedy": (GenerateConfig(max_new_tokens=7), 7),
    "sample": (GenerateConfig(strategy="sample", temperature=1.5, top_p=0.95, max_new_tokens=7, eos_id=2, seed=3), 7),
    "beam": (GenerateConfig(strategy="beam", num_beams=3, max_new_tokens=7, eos_id=0), 11),
}


@pytest.mark.parametrize("name", list(PIPELINE_CONFIGS))
def test_knn_lm_pipelined_groups_equal_serial(lm, fake_knn, name):
    cfg, seed = PIPELINE_CONFIGS[name]
    prompt = random_tokens((5, 4), seed=seed)
    serial = Recorder(KnnLMStepper(lm, fake_knn, lam=LAM, temperature=TEMP, overlap=False, early=False))
    piped = RecordingKnn(lm, fake_knn, lam=LAM, temperature=TEMP, overlap=True)
    a, b = generate(serial, prompt, cfg), generate(piped, prompt, cfg)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-5, rtol=0)
    bounds, W = split_groups(5), cfg.num_beams if cfg.strategy == "beam" else 1
    assert bounds == [(0, 2), (2, 5)] and len(piped.forks) == 2 and piped.cache is None
    for fork, (lo, hi) in zip(piped.forks, bounds):  # each group's steps are the serial steps of its rows
        assert 0 < len(fork.outputs) <= len(serial.outputs)
        expected = [group_rows(o, t, lo, hi, W).double() for t, o in enumerate(serial.outputs)]
        assert_steps_match(fork.outputs, expected[:len(fork.outputs)])
        for r in fork.reorders[1:] if W > 1 else []:  # beams stay with their prompt, inside the group
            assert r.shape == ((hi - lo) * W,) and torch.equal(r // W, torch.arange((hi - lo) * W) // W)
    if cfg.eos_id is not None:  # the group that finished first was padded to the other's length
        assert len(piped.forks[0].outputs) < len(piped.forks[1].outputs)
    steps = sum(len(f.outputs) for f in piped.forks)
    assert piped.stats.steps == steps and piped.stats.retrieval_calls == fake_knn.submitted == steps
    assert piped.stats.queries == sum(len(o) for f in piped.forks for o in f.outputs)


def test_knn_lm_pipeline_interleaves_the_groups(lm, fake_knn):
    """Each group's request stays in flight while the other group runs its model step: A sends, B computes
    and sends, A waits, chooses, computes and sends, B waits, ..."""
    piped = RecordingKnn(lm, fake_knn, lam=LAM, temperature=TEMP, overlap=True)
    generate(piped, random_tokens((4, 4), seed=16), GenerateConfig(max_new_tokens=5))
    round_ = [(0, "finish"), (0, "submit"), (1, "finish"), (1, "submit")]
    assert piped.events == [(0, "submit"), (1, "submit")] + round_ * 4 + [(0, "finish"), (1, "finish")]


class SlowLM(torch.nn.Module):
    """The LM behind a fixed sleep per forward: model compute of a known length, long enough that a
    request sent before it is still in flight when it starts; each forward's start goes into `events`."""

    def __init__(self, lm: TransformerLM, seconds: float, events: list | None = None):
        super().__init__()
        self.lm, self.seconds = lm, seconds
        self.events = events if events is not None else []

    def new_cache(self):
        return self.lm.new_cache()

    def forward(self, tokens, cache=None, return_keys=False):
        self.events.append("forward-start")
        time.sleep(self.seconds)
        return self.lm(tokens, cache=cache, return_keys=return_keys)


def during_a_search(events: list[str], kind: str = "forward-start") -> int:
    """How many events of `kind` (model forwards started, by default) came while some retrieval request
    was in flight."""
    in_flight = overlapping = 0
    for event in events:
        in_flight += {"search-start": 1, "search-end": -1}.get(event, 0)
        overlapping += event == kind and in_flight > 0
    return overlapping


def test_knn_lm_pipeline_overlaps_retrieval_with_the_other_groups_forward(lm):
    """Model steps of 60 ms against requests of 20 ms: in the pipeline, one group's model step starts
    while the other group's request is in flight (every step but the very first); serially no
    forward ever starts with a request in flight. Same tokens either way. (How much time this hides is
    measured in benchmarks/decoding.py.)"""
    keys, values = knn_datastore(lm)
    prompt, cfg = random_tokens((4, 4), seed=17), GenerateConfig(max_new_tokens=6)
    serial_events, piped_events = [], []
    serial = KnnLMStepper(SlowLM(lm, 0.06, serial_events), FakeRetriever(keys, values, k=6, delay_s=0.02,
                                                                          events=serial_events),
                          lam=LAM, temperature=TEMP)
    piped = RecordingKnn(SlowLM(lm, 0.06, piped_events), FakeRetriever(keys, values, k=6, delay_s=0.02,
                                                                        events=piped_events),
                         lam=LAM, temperature=TEMP, overlap=True)
    assert torch.equal(generate(serial, prompt, cfg).tokens, generate(piped, prompt, cfg).tokens)
    assert serial.stats.wait_s == serial.stats.retrieval_s
    assert during_a_search(serial_events) == 0
    assert piped.stats.retrieval_calls == 12 and piped_events.count("forward-start") == 12
    assert during_a_search(piped_events) == 11  # all but the very first
    assert sum(piped.in_flight) >= len(piped.in_flight) // 2  # the other group's request was out as this one computed


class HeadGatedRetriever(FakeRetriever):
    """A `FakeRetriever` whose searches end only once the LM's output head has started since the last
    one ended (`head_started`, set by a hook on the head): a request sent before the head is in flight
    while it runs, whatever the threads' timing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_started = threading.Event()

    def _search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.head_started.wait(timeout=10), "the output head never ran"
        self.head_started.clear()
        return super()._search(queries)


def test_knn_lm_sends_each_request_before_the_forward_finishes(lm):
    """By default (`early`) each step's request leaves as soon as the keys exist, so the service searches
    while the last feed-forward block and the output head run; `early=False` sends it after the forward,
    one blocking call. The same requests and the same log-probs, bit for bit."""
    keys, values = knn_datastore(lm)
    prompt, cfg = random_tokens((4, 4), seed=18), GenerateConfig(max_new_tokens=5)
    runs = {}
    for early in (True, False):
        events: list[str] = []
        retriever = HeadGatedRetriever(keys, values, k=6, events=events)

        def head_started(*_, events=events, retriever=retriever):
            events.append("head")
            retriever.head_started.set()

        hook = lm.head.register_forward_pre_hook(head_started)
        try:
            stepper = Recorder(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP, early=early))
            runs[early] = (generate(stepper, prompt, cfg), stepper.outputs, events, retriever)
        finally:
            hook.remove()
    (out, outputs, events, retriever), (want, want_outputs, serial_events, serial) = runs[True], runs[False]
    assert torch.equal(out.tokens, want.tokens) and len(outputs) == len(want_outputs) == 5
    assert all(torch.equal(a, b) for a, b in zip(outputs, want_outputs))
    assert retriever.submitted == 5 and retriever.calls == serial.calls == [4] * 5 and serial.submitted == 0
    assert during_a_search(events, "head") == 5 and during_a_search(serial_events, "head") == 0


def test_knn_lm_pipeline_with_a_single_prompt_is_serial(lm, fake_knn):
    prompt = random_tokens((1, 4), seed=8)
    a = generate(KnnLMStepper(lm, fake_knn, lam=LAM, temperature=TEMP), prompt, GenerateConfig(max_new_tokens=4))
    piped = RecordingKnn(lm, fake_knn, lam=LAM, temperature=TEMP, overlap=True)
    b = generate(piped, prompt, GenerateConfig(max_new_tokens=4))
    assert torch.equal(a.tokens, b.tokens)
    assert piped.forks == [] and len(piped.outputs) == 4 and piped.stats.retrieval_calls == 4


# ---------------------------------------------------------------------------------------------
# RETRO
# ---------------------------------------------------------------------------------------------

def query_windows(history: torch.Tensor, chunk: int, prefetch: int) -> np.ndarray:
    end = chunk * L + L - prefetch  # exclusive end of the window: s tokens before the chunk's end
    return history[:, max(0, end - L):end].numpy()


@torch.no_grad()
def check_retro_against_cache_free(retro, rec: Recorder, prompt_len: int, encoder, fake, prefetch: int) -> None:
    """Each step's log-probs equal the cache-free forward over the whole history with the neighbours the
    stepper used, and those neighbours are what the documented query window retrieves."""
    stepper = rec.inner
    history, neighbours = stepper.history, stepper.neighbours
    assert neighbours.shape[1] == history.shape[1] // L
    full = torch.log_softmax(retro(history, neighbours).double(), -1)  # (B, S, V)
    assert_steps_match(rec.outputs, [full[:, prompt_len - 1 + t] for t in range(len(rec.outputs))])
    for c in range(neighbours.shape[1]):
        expected = fake.chunks(encoder.embed(query_windows(history, c, prefetch)))[:, :K]
        assert torch.equal(neighbours[:, c], torch.from_numpy(expected)), f"chunk {c}"


def test_retro_exact_matches_cache_free_forward(retro, fake_chunks):
    prompt, encoder = random_tokens((3, 6), seed=9), FakeEncoder()
    rec = Recorder(RetroStepper(retro, fake_chunks, encoder, prefetch=0))
    generate(rec, prompt, GenerateConfig(max_new_tokens=11))  # feeds positions 6..15: chunks 1, 2, 3 complete
    n_calls = len(fake_chunks.calls)
    check_retro_against_cache_free(retro, rec, 6, encoder, fake_chunks, prefetch=0)
    assert fake_chunks.calls[:n_calls] == [3] * 4  # the prompt's chunk, then one call per boundary, all rows
    assert rec.inner.stats.retrieval_calls == 4 and set(fake_chunks.threads) == {"MainThread"}


@pytest.mark.parametrize("cfg", [GenerateConfig(max_new_tokens=13),
                                 GenerateConfig(strategy="beam", num_beams=3, max_new_tokens=13)],
                         ids=["greedy", "beam"])
def test_retro_prefetch_overlapped_equals_serial(retro, fake_chunks, cfg):
    prompt, encoder, s = random_tokens((2, 7), seed=10), FakeEncoder(), 2
    serial = Recorder(RetroStepper(retro, fake_chunks, encoder, prefetch=s, overlap=False))
    a = generate(serial, prompt, cfg)
    assert set(fake_chunks.threads) == {"MainThread"}
    fake_chunks.threads.clear()
    piped = Recorder(RetroStepper(retro, fake_chunks, encoder, prefetch=s, overlap=True))
    b = generate(piped, prompt, cfg)
    assert torch.equal(a.tokens, b.tokens)
    assert all(torch.equal(x, y) for x, y in zip(serial.outputs, piped.outputs))
    assert torch.equal(serial.inner.neighbours, piped.inner.neighbours)
    # 7 prompt tokens, 12 more fed (positions 7..18): chunk 0 in start(); chunk 1's query (position 5) is
    # known there too and is sent early, like those of chunks 2 and 3, each embedded and searched in the
    # prefetch thread; chunk 4 (positions 16..19) never completes, so its query (position 17) is not sent
    assert piped.inner.stats.retrieval_calls == 4
    assert [t.startswith("retro-prefetch") for t in fake_chunks.threads] == [False] + [True] * 3
    if cfg.strategy == "greedy":  # (beams reorder rows, so their steps do not line up with the final history)
        check_retro_against_cache_free(retro, piped, 7, encoder, fake_chunks, prefetch=s)


def test_retro_stepped_by_hand_prefetches_every_query_it_knows(retro, fake_chunks):
    """Without `generate` to say where decoding ends, the stepper prefetches the query of every chunk it
    knows, as a whole chunk after the last fed position may still come; what generate said holds for one
    decoding only."""
    prompt, stepper = random_tokens((2, 7), seed=10), RetroStepper(retro, fake_chunks, FakeEncoder(), prefetch=2,
                                                                   overlap=True)
    generate(stepper, prompt, GenerateConfig(max_new_tokens=13))
    assert stepper.stats.retrieval_calls == 4  # as above: chunk 4 never completes
    log_probs = stepper.start(prompt)
    for _ in range(12):  # the same positions as generate fed
        log_probs = stepper.step(log_probs.argmax(dim=-1))
    assert stepper.stats.retrieval_calls == 4 + 5  # chunk 4's query (position 17) too
    stepper.close()


def test_retro_rejects_prefetch_of_a_whole_chunk(retro, fake_chunks):
    with pytest.raises(ValueError, match="prefetch"):
        RetroStepper(retro, fake_chunks, FakeEncoder(), prefetch=L)


# ---------------------------------------------------------------------------------------------
# Real datastores, built by the build job
# ---------------------------------------------------------------------------------------------

class Counting:
    """Delegates to a real retriever and records the number of queries in every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in {"knn", "chunks", "submit_knn", "submit_chunks"}:
            def counted(queries, *args, **kwargs):
                self.calls.append((name, len(queries), threading.current_thread().name.split("_")[0]))
                return attr(queries, *args, **kwargs)
            return counted
        return attr


@pytest.mark.ray
def test_knn_lm_through_the_service(ray_cluster, aio, tmp_path, lm):
    keys, values = knn_datastore(lm, n_seq=20, length=50, seed=11)  # 1000 rows
    datastore = build(tmp_path, keys, "knn", payload_arrays={"values": values}, shards=2, factory="IVF16,Flat")
    exact = FakeRetriever(keys, values, k=8)  # brute force over the same rows
    prompt = random_tokens((4, 5), seed=12)
    with serve(aio, datastore, 2) as served, ServiceRetriever(served.address, RetrievalConfig(k=8, nprobe=16)) as svc:
        counting = Counting(svc)
        serial = Recorder(KnnLMStepper(lm, counting, lam=LAM, temperature=TEMP))
        out = generate(serial, prompt, GenerateConfig(max_new_tokens=5))
        refs = [reference_knn_lm(lm, torch.cat([prompt, out.tokens[:, :t]], 1), exact) for t in range(5)]
        assert_steps_match(serial.outputs, refs, atol=1e-4)
        assert counting.calls == [("submit_knn", 4, "MainThread")] * 5  # sent from within the forward

        counting.calls.clear()
        blocking = KnnLMStepper(lm, counting, lam=LAM, temperature=TEMP, early=False)
        assert torch.equal(generate(blocking, prompt, GenerateConfig(max_new_tokens=5)).tokens, out.tokens)
        assert counting.calls == [("knn", 4, "MainThread")] * 5

        counting.calls.clear()
        piped = RecordingKnn(lm, counting, lam=LAM, temperature=TEMP, overlap=True)
        assert torch.equal(generate(piped, prompt, GenerateConfig(max_new_tokens=5)).tokens, out.tokens)
        for fork, (lo, hi) in zip(piped.forks, [(0, 2), (2, 4)]):
            assert_steps_match(fork.outputs, [ref[lo:hi] for ref in refs], atol=1e-4)
        assert counting.calls == [("submit_knn", 2, "MainThread")] * 10  # two groups of 2 prompts, 5 steps each
        assert piped.stats.retrieval_calls == 10 and piped.stats.wait_s <= piped.stats.retrieval_s


@pytest.mark.ray
def test_retro_with_an_in_process_retriever(ray_cluster, tmp_path, retro):
    stream = random_tokens((801,), seed=13).numpy()
    chunks = stream[:800].reshape(-1, L)  # 200 chunks
    payload = np.stack([np.resize(stream[c * L:c * L + 2 * L], 2 * L) for c in range(len(chunks))]).astype(np.int32)
    encoder = FakeEncoder()
    datastore = build(tmp_path, encoder.embed(chunks), "retro", payload_arrays={"tokens": payload}, shards=2,
                      factory="IVF4,Flat")
    exact = FakeRetriever(encoder.embed(chunks), payload, k=K)
    prompt = random_tokens((3, 9), seed=14)
    with InProcessRetriever(datastore, RetrievalConfig(k=K, nprobe=4)) as real:
        counting = Counting(real)
        rec = Recorder(RetroStepper(retro, counting, encoder, prefetch=1, overlap=True))
        generate(rec, prompt, GenerateConfig(max_new_tokens=8))  # feeds positions 9..15
    for use in (lambda: real.chunks(encoder.embed(chunks[:2])), lambda: real.submit_chunks(encoder.embed(chunks[:2])),
                lambda: generate(RetroStepper(retro, real, encoder), prompt, GenerateConfig(max_new_tokens=2))):
        with pytest.raises(RuntimeError, match="the InProcessRetriever is closed: make a new one"):
            use()  # closed: it says so, and answers nothing
    check_retro_against_cache_free(retro, rec, 9, encoder, exact, prefetch=1)
    # start(): chunks 0-1 in one blocking call of 2 chunks x 3 rows; chunks 2 and 3 prefetched, 3 rows each
    assert counting.calls == [("chunks", 6, "MainThread"), ("chunks", 3, "retro-prefetch"),
                              ("chunks", 3, "retro-prefetch")]
    assert not math.isnan(rec.inner.stats.retrieval_s)


def test_a_model_and_a_datastore_that_do_not_belong_together_are_refused(lm, retro, fake_knn, fake_chunks):
    """What the manifest says (its kind, the fingerprint of the model that made its keys) is checked
    against the model: a mismatch scores plausible and wrong, or fails deep in a step."""
    from lm_worker.models.fingerprint import model_fingerprint

    fake_knn.metadata = {"kind": "knnlm", "encoder": model_fingerprint(lm)}
    KnnLMStepper(lm, fake_knn)  # the model that made the keys
    torch.manual_seed(99)
    other = TransformerLM(lm.config).eval()  # the same shapes, other weights
    with pytest.raises(ValueError, match=f"keys were made by the model '{model_fingerprint(lm)}', not by this one"):
        KnnLMStepper(other, fake_knn)
    fake_knn.metadata = {"encoder": "lm:forged\n2026-01-01 ERROR a forged line\x1b[31m" + "x" * 200}
    with pytest.raises(ValueError) as refused:  # the datastore's words, escaped: one line, no terminal codes
        KnnLMStepper(lm, fake_knn)
    message = str(refused.value)
    assert "\n" not in message and "\x1b" not in message and "x" * 100 not in message
    assert "'lm:forged\\n2026-01-01 ERROR a forged line\\x1b[31m" in message
    with pytest.raises(ValueError, match="got a Retro model: decode it with RetroStepper"):
        KnnLMStepper(retro, fake_knn)
    fake_knn.metadata = {"kind": "retro"}
    with pytest.raises(ValueError, match="the datastore is a 'retro' datastore .* not a kNN-LM one"):
        KnnLMStepper(lm, fake_knn)
    fake_knn.metadata, fake_knn.metric = {}, "ip"  # similarities taken as distances: the least similar would win
    with pytest.raises(ValueError, match="by their squared L2 distances; the datastore's metric is 'ip'"):
        KnnLMStepper(lm, fake_knn)
    del fake_knn.metric
    with pytest.raises(ValueError, match="RETRO takes a Retro model, got TransformerLM"):
        RetroStepper(lm, fake_chunks, FakeEncoder())
    fake_chunks.metadata = {"kind": "knnlm"}
    with pytest.raises(ValueError, match="the datastore is a 'knnlm' datastore .* not a RETRO one"):
        RetroStepper(retro, fake_chunks, FakeEncoder())


def test_settings_that_cannot_decode_are_refused_before_any_step(lm):
    """NaN or infinite mixing and sampling settings, and a decoding longer than the model's max_len, fail
    at once with the setting's name, not inside torch or after the steps that fit."""
    for lam, temperature, words in ((math.nan, 1.0, "lambda must lie in"), (0.25, math.nan, "temperature must be > 0"),
                                    (0.25, 0.0, "temperature must be > 0"), (0.25, math.inf, "and finite")):
        with pytest.raises(ValueError, match=words):
            KnnLMStepper(lm, None, lam=lam, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
        GenerateConfig(strategy="sample", temperature=math.nan)
    for alpha in (math.inf, math.nan, 10.5, -300.0):  # 11.5 ** 300 overflows a float; 11.5 ** -1000 is 0.0
        with pytest.raises(ValueError, match=r"length_penalty must be in \[-10, 10\]"):
            GenerateConfig(strategy="beam", length_penalty=alpha)
    stepper = LMStepper(lm)
    steps = []
    stepper.step = lambda tokens: steps.append(tokens)  # no step may run
    prompt = random_tokens((2, lm.config.max_len - 9), seed=1)
    with pytest.raises(ValueError, match=f"prompt length {lm.config.max_len - 9} \\+ max_new_tokens 11 - 1 exceeds "
                                         f"the model's max_len {lm.config.max_len}"):
        generate(stepper, prompt, GenerateConfig(max_new_tokens=11))
    assert steps == [] and stepper.cache is None
    fits = generate(LMStepper(lm), prompt, GenerateConfig(max_new_tokens=10))  # the last token is never fed
    assert fits.tokens.shape == (2, 10)


def test_rows_decoded_in_parts_sample_as_in_the_whole_batch(lm):
    """`first_row` places a part of a batch in the whole: its rows sample with the whole batch's samplers."""
    prompt = random_tokens((4, 6), seed=2)
    cfg = GenerateConfig(strategy="sample", temperature=1.5, max_new_tokens=8, seed=9)
    whole = generate(LMStepper(lm), prompt, cfg)
    part = generate(LMStepper(lm), prompt[2:], dataclasses.replace(cfg, first_row=2))
    assert torch.equal(part.tokens, whole.tokens[2:])
    assert not torch.equal(generate(LMStepper(lm), prompt[2:], cfg).tokens, whole.tokens[2:])
    with pytest.raises(ValueError, match="first_row must be >= 0, got -1"):
        dataclasses.replace(cfg, first_row=-1)
    scattered = generate(LMStepper(lm), prompt[[3, 0]], dataclasses.replace(cfg, rows=(3, 0)))  # rows anywhere
    assert torch.equal(scattered.tokens, whole.tokens[[3, 0]])
    with pytest.raises(ValueError, match="config.rows names 1 rows but the prompt has 2"):
        generate(LMStepper(lm), prompt[:2], dataclasses.replace(cfg, rows=(1,)))
    with pytest.raises(ValueError, match="rows must be distinct row indices >= 0"):
        dataclasses.replace(cfg, rows=(1, 1))
