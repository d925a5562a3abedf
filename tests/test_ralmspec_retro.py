"""Speculative retrieval for RETRO, per chunk, against a real datastore served by real shard servers: the
tokens and log-probs of serial retrieval (`RetroStepper`, prefetch 0) for greedy decoding and top-k and
top-p sampling, with guesses that hold and guesses that fail and roll their row back alone; the adaptive
rule; clear errors."""

from __future__ import annotations

import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from conftest import build, serve
from test_steppers import FakeEncoder, K, L, V, random_tokens, sharpened

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.ralmspec.retro import RaLMSpecRetro
from lm_worker.decoding.retro_stepper import RetroStepper
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.service import ServiceRetriever
from retriever_server.client import RetrieverError


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def retro() -> Retro:
    """test_steppers' tiny RETRO."""
    torch.manual_seed(1)
    return sharpened(Retro(RetroConfig.tiny(vocab_size=V, chunk_len=L, n_neighbours=K)))


def chunk_store(seed: int, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """A token stream cut into chunks: each chunk's tokens, and its payload (the chunk and the next, 2L)."""
    stream = random_tokens((n_chunks * L + L,), seed=seed).numpy()
    chunks = stream[:n_chunks * L].reshape(-1, L)
    payload = np.stack([stream[c * L:c * L + 2 * L] for c in range(n_chunks)]).astype(np.int32)
    return chunks, payload


@pytest.fixture(scope="module")
def datastore(tmp_path_factory):
    """48 chunks of random text embedded by `FakeEncoder`, in 2 shards that keep their keys."""
    chunks, payload = chunk_store(seed=21, n_chunks=48)
    return build(tmp_path_factory.mktemp("retro-spec"), FakeEncoder().embed(chunks), "ds", shards=2,
                 factory="IVF4,Flat", keep_keys=True, payload_arrays={"tokens": payload})


@pytest.fixture(scope="module")
def retriever(aio, datastore):
    with serve(aio, datastore, 2) as served, \
            ServiceRetriever(served.shard_addresses(), RetrievalConfig(k=K, nprobe=4)) as service:
        yield service


CONFIGS = {
    "greedy": GenerateConfig(max_new_tokens=30),
    "greedy-eos": GenerateConfig(max_new_tokens=30),  # EOS: a token greedy decoding emits (see the test)
    "top-k": GenerateConfig(strategy="sample", top_k=4, max_new_tokens=26, seed=5),
    "top-p": GenerateConfig(strategy="sample", temperature=1.3, top_p=0.9, max_new_tokens=26, eos_id=2, seed=3),
}


@pytest.mark.parametrize("rollback", ["batch", "row"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["every-guess", "adaptive"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_speculative_retro_decodes_the_tokens_of_serial_retrieval(retro, retriever, name, adaptive, rollback):
    cfg = CONFIGS[name]
    prompt = random_tokens((3, 6), seed=8)
    if name == "greedy-eos":  # a token row 1 emits mid-way, so that rows end at different steps
        eos = int(generate(RetroStepper(retro, retriever, FakeEncoder()), prompt, cfg).tokens[1, 9])
        cfg = GenerateConfig(max_new_tokens=30, eos_id=eos)
    serial = RetroStepper(retro, retriever, FakeEncoder())
    want = generate(serial, prompt, cfg)
    decoder = RaLMSpecRetro(retro, retriever, FakeEncoder(), adaptive=adaptive, rollback=rollback)
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.log_probs, want.log_probs)  # the same forwards on the same inputs: bit for bit
    if name == "greedy-eos":
        assert (want.lengths < cfg.max_new_tokens).any()
    # each row's chunk is asked for once (a rollback asks nothing again); a finished row asks nothing more
    assert decoder.stats.queries <= serial.stats.queries
    if cfg.eos_id is None:
        assert decoder.stats.queries == serial.stats.queries
    if rollback == "batch":  # the batch asks for each chunk of every row in one request
        assert decoder.stats.retrieval_calls == serial.stats.retrieval_calls
    if not adaptive:  # chunks the local caches can fill are decoded on their guess
        assert decoder.stats.verified > 0


class BatchEncoder(FakeEncoder):
    """Query embeddings that depend on the whole batch, as MiniLM's do (it pads a batch to its longest
    text), here on every token of it: each row's `FakeEncoder` embedding plus a token vector picked by the
    batch's token sum."""

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        e = self.table[chunks].mean(axis=1) + self.table[int(chunks.sum()) % V]
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


class _AnswerWhenAsked(Future):
    """A search that runs only when its result is asked for: until then `done()` is False."""

    def __init__(self, search, args):
        super().__init__()
        self.search, self.args = search, args

    def result(self, timeout=None):
        if not self.done():
            self.set_result(self.search(*self.args))
        return super().result(timeout)


class LateAnswers:
    """A retriever whose answers come only when a decoder waits for them, so every guess stays unchecked
    until the decoder must check it (its row's next chunk, a chunk's end, the end of decoding)."""

    def __init__(self, inner):
        self.inner = inner
        self.pool = self

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit(self, search, *args) -> Future:
        return _AnswerWhenAsked(search, args)


@pytest.mark.parametrize("late", [False, True], ids=["prompt", "late"])
@pytest.mark.parametrize("rollback", ["batch", "row"])
def test_rows_that_finished_early_leave_the_query_batch_as_serial_retrieval_forms_it(retro, retriever, rollback,
                                                                                     late):
    """With an encoder whose queries depend on the batch, each chunk's queries are embedded in serial
    retrieval's batch: a finished row's window as serial decoding holds it (EOS after its last token),
    every guess still unchecked at a chunk's end checked first (answers that come late leave rows that
    finished on a guess unchecked, and some of those guesses fail), so the neighbours, tokens and
    log-probs are serial's."""
    chunks, _ = chunk_store(seed=21, n_chunks=48)
    prompt = torch.from_numpy(np.stack([chunks[5 * r:5 * r + 3].reshape(-1) for r in range(6)])).long()  # (6, 12)
    cfg = GenerateConfig(strategy="sample", top_k=4, seed=18, max_new_tokens=40, eos_id=3)
    want = generate(RetroStepper(retro, retriever, BatchEncoder()), prompt, cfg)
    decoder = RaLMSpecRetro(retro, LateAnswers(retriever) if late else retriever, BatchEncoder(), successors=4,
                            adaptive=False, rollback=rollback)
    got = generate(decoder, prompt, cfg)
    assert (want.lengths < 2 * L).any() and (want.lengths > 4 * L).sum() >= 2  # rows end chunks apart
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.log_probs, want.log_probs) and decoder.stats.rollbacks > 0


class SlowEncoder(FakeEncoder):
    """`FakeEncoder` taking 20 ms a call."""

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return super().embed(chunks)


@pytest.mark.parametrize("adaptive", [False, True], ids=["every-guess", "adaptive"])
def test_embedding_the_queries_counts_as_retrieval_and_as_waiting_as_serial_counts_it(retro, retriever, adaptive):
    """`StepperStats`: RETRO's retrieval time includes embedding its queries (encode_s), which decoding
    waits for; the speculative decoder counts it as serial retrieval (`RetroStepper`) does."""
    prompt, cfg = random_tokens((2, 6), seed=8), GenerateConfig(max_new_tokens=12)
    for decoder in (RetroStepper(retro, retriever, SlowEncoder()),
                    RaLMSpecRetro(retro, retriever, SlowEncoder(), adaptive=adaptive)):
        generate(decoder, prompt, cfg)
        s = decoder.stats
        assert s.encode_s >= 0.02 * s.retrieval_calls > 0
        assert s.retrieval_s >= s.encode_s and s.wait_s >= s.encode_s


def test_guesses_hold_and_fail_and_a_failure_rolls_the_batch_back(retro, retriever):
    """A prompt cut from the datastore's own text: the caches hold the next chunks' neighbours, so some
    guesses hold; others fail, and the batch goes back to the step that first used them."""
    chunks, _ = chunk_store(seed=21, n_chunks=48)
    prompt = torch.from_numpy(np.stack([chunks[0:3].reshape(-1), chunks[10:13].reshape(-1)])).long()  # (2, 12)
    cfg = GenerateConfig(max_new_tokens=40)
    want = generate(RetroStepper(retro, retriever, FakeEncoder()), prompt, cfg)
    decoder = RaLMSpecRetro(retro, retriever, FakeEncoder(), successors=4, adaptive=False)
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.log_probs, want.log_probs)
    s = decoder.stats
    assert 0 < s.accepted < s.verified and s.rollbacks > 0  # guesses held and guesses failed
    assert s.ticks == cfg.max_new_tokens + s.wasted  # every discarded step is decoded again, by the batch


def test_guesses_hold_and_fail_and_a_failure_rolls_its_row_back_alone(retro, retriever):
    """Prompts cut from the datastore's own text: the caches hold the next chunks' neighbours, so most
    guesses hold; others fail, and only the row whose guess failed goes back to the step that first used
    it, while the other rows decode on. Each discarded row-step is replayed beside the other rows' steps,
    so the batch needs fewer forwards than serial decoding's plus one per discarded step (a batch rolled
    back together needs exactly that many)."""
    chunks, _ = chunk_store(seed=21, n_chunks=48)
    prompt = torch.from_numpy(np.stack([chunks[5 * r:5 * r + 3].reshape(-1) for r in range(8)])).long()  # (8, 12)
    cfg = GenerateConfig(max_new_tokens=40)
    want = generate(RetroStepper(retro, retriever, FakeEncoder()), prompt, cfg)
    decoder = RaLMSpecRetro(retro, retriever, FakeEncoder(), successors=4, adaptive=False, rollback="row")
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.log_probs, want.log_probs)
    s = decoder.stats
    assert 0 < s.accepted < s.verified and s.rollbacks == s.verified - s.accepted >= 2  # held, and failed
    assert s.ticks < cfg.max_new_tokens + s.wasted


def test_the_adaptive_decoder_guesses_while_guesses_hold_and_rolls_back_exactly(retro, retriever):
    """Estimates that say guessing pays (as after a run of held guesses): the adaptive decoder decodes on
    its guesses, rolls back where they fail, and its hit rate falls; the tokens are serial retrieval's."""
    chunks, _ = chunk_store(seed=21, n_chunks=48)
    prompt = torch.from_numpy(np.stack([chunks[0:3].reshape(-1), chunks[10:13].reshape(-1)])).long()  # (2, 12)
    cfg = GenerateConfig(strategy="sample", top_k=3, max_new_tokens=40, seed=2)
    want = generate(RetroStepper(retro, retriever, FakeEncoder()), prompt, cfg)
    decoder = RaLMSpecRetro(retro, retriever, FakeEncoder(), successors=4)
    decoder.held.value, decoder.wait_s.value, decoder.step_s.value = 1.0, 0.004, 0.001
    got = generate(decoder, prompt, cfg)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.log_probs, want.log_probs)
    assert decoder.stats.verified > 0 and decoder.stats.rollbacks > 0 and decoder.held.value < 1.0


def test_the_adaptive_rule_guesses_only_where_holding_pays(retro, retriever):
    decoder = RaLMSpecRetro(retro, retriever, FakeEncoder())
    assert not decoder.worth_guessing()  # nothing measured yet
    decoder.wait_s.add(0.004)
    decoder.step_s.add(0.001)
    for _ in range(8):
        decoder.held.add(1.0)
    assert decoder.worth_guessing()  # guesses hold: decode on them
    for _ in range(8):
        decoder.held.add(0.0)
    assert not decoder.worth_guessing()  # they fail: wait for the service


def test_beam_search_and_datastores_without_keys_are_refused(retro, retriever, aio, tmp_path):
    prompt = random_tokens((2, 6), seed=1)
    with pytest.raises(ValueError, match="beam search"):
        generate(RaLMSpecRetro(retro, retriever, FakeEncoder()), prompt,
                 GenerateConfig(strategy="beam", num_beams=2, max_new_tokens=4))
    with pytest.raises(ValueError, match="successors must lie in 1..16"):
        RaLMSpecRetro(retro, retriever, FakeEncoder(), successors=0)
    chunks, payload = chunk_store(seed=2, n_chunks=12)
    keyless = build(tmp_path, FakeEncoder().embed(chunks), "keyless", shards=1, factory="IVF2,Flat",
                    payload_arrays={"tokens": payload})
    with serve(aio, keyless, 1) as served, \
            ServiceRetriever(served.shard_addresses(), RetrievalConfig(k=K)) as service:
        with pytest.raises(RetrieverError, match="keep-keys"):
            generate(RaLMSpecRetro(retro, service, FakeEncoder()), prompt, GenerateConfig(max_new_tokens=4))
