"""RaLMSpec within the service's limits and its own bookkeeping: requests whose answers (successors and
stored keys included) would pass a response limit are split and still decode serial retrieval's tokens;
a local cache that cannot take a whole answer keeps its nearest rows; RETRO's speculative decoder checks
its model and datastore as `RetroStepper` does; the counters say what `SpeculationStats` documents; beam
search's pending steps hold a bounded copy of the key/value cache."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from conftest import build
from test_ralmspec import knn_store as store_of
from test_ralmspec_retro import chunk_store
from test_steppers import FakeEncoder, K, L, V, random_tokens, sharpened

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.knnlm_stepper import KnnLMStepper
from lm_worker.decoding.ralmspec import beam
from lm_worker.decoding.ralmspec.chunk_caches import ChunkCaches
from lm_worker.decoding.ralmspec.config import SpeculationConfig
from lm_worker.decoding.ralmspec.decoder import RaLMSpecKnnLM
from lm_worker.decoding.ralmspec.retro import RaLMSpecRetro
from lm_worker.decoding.retro_stepper import RetroStepper
from lm_worker.models.ragged_cache import RaggedKVCache
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import ChunkNeighbours, KnnNeighbours, RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.retrieval.local_cache import LocalCaches
from retriever_server.wire.request import Limits

LAM, TEMP, KNN_K = 0.5, 4.0, 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    torch.manual_seed(0)
    return sharpened(TransformerLM(LMConfig.tiny(vocab_size=V)))


@pytest.fixture(scope="module")
def knn_store(lm, tmp_path_factory):
    return store_of(lm, tmp_path_factory.mktemp("ralmspec-limits"))


@pytest.fixture(scope="module")
def retro() -> Retro:
    torch.manual_seed(1)
    return sharpened(Retro(RetroConfig.tiny(vocab_size=V, chunk_len=L, n_neighbours=K)))


@pytest.fixture(scope="module")
def retro_store(tmp_path_factory):
    chunks, payload = chunk_store(seed=21, n_chunks=48)
    return build(tmp_path_factory.mktemp("retro-limits"), FakeEncoder().embed(chunks), "ds", shards=2,
                 factory="IVF4,Flat", keep_keys=True, payload_arrays={"tokens": payload})


def answer_bytes(k: int, d: int, successors: int, payload_bytes: int) -> int:
    """One query's answer with successors and keys, as a server counts it (a payload of 8-byte ints at most)."""
    per_row = payload_bytes + 4 * d
    return k * (12 + per_row + successors * (8 + per_row))


def same(got, want) -> bool:
    return bool(torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
                and torch.equal(got.log_probs, want.log_probs))


SPLIT = {
    "greedy-stride-3": (GenerateConfig(max_new_tokens=12), SpeculationConfig(stride=3)),
    "async-stride-2": (GenerateConfig(strategy="sample", top_k=4, max_new_tokens=10, seed=5),
                       SpeculationConfig(stride=2, asynchronous=True)),
    "beam-stride-3": (GenerateConfig(strategy="beam", num_beams=3, max_new_tokens=8), SpeculationConfig(stride=3)),
}


@pytest.mark.parametrize("name", list(SPLIT))
def test_a_request_past_the_response_limit_is_split_and_decodes_as_serial_retrieval(lm, knn_store, name):
    """Each query's answer fits the limit, the 4 rows' first request (and every window's) does not:
    split, its answers joined in order, the tokens and log-probs are serial retrieval's."""
    cfg, spec = SPLIT[name]
    retriever = InProcessRetriever(knn_store, RetrievalConfig(k=KNN_K, nprobe=8))
    per_query = answer_bytes(KNN_K, retriever.dimension, spec.successors, payload_bytes=8)
    retriever.limits = Limits(max_response_bytes=3 * per_query)
    prompt = random_tokens((4, 5), seed=11)
    want = generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP), prompt, cfg)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=spec)
    assert same(generate(decoder, prompt, cfg), want)
    assert decoder.stats.retrieval_calls > decoder.stats.verifications + 1  # requests went out in pieces


def test_a_retro_request_past_the_response_limit_is_split_and_decodes_as_serial_retrieval(retro, retro_store):
    retriever = InProcessRetriever(retro_store, RetrievalConfig(k=K, nprobe=4))
    retriever.limits = Limits(max_response_bytes=answer_bytes(K, retriever.dimension, 2, payload_bytes=16 * L))
    prompt, cfg = random_tokens((3, 6), seed=8), GenerateConfig(max_new_tokens=20)
    want = generate(RetroStepper(retro, retriever, FakeEncoder()), prompt, cfg)
    assert same(generate(RaLMSpecRetro(retro, retriever, FakeEncoder(), adaptive=False), prompt, cfg), want)


def test_a_local_cache_too_small_for_an_answer_keeps_its_nearest_rows():
    """k (1 + s) = 8 rows for 4 slots: the service's nearest neighbour (id 10) stays, the farthest goes."""
    k, d = 4, 4  # one successor each
    ids = np.array([[10, 20, 30, 40]])  # ranked nearest first; each one's successor is id + 1
    keys = np.eye(d, dtype=np.float32)[None]  # (1, k, d)
    found = KnnNeighbours(np.zeros((1, k), np.float32), ids * 100, ids, (ids[..., None] + 1) * 100,
                          ids[..., None] + 1, keys, keys[:, :, None] + 0.5)
    caches = LocalCaches(rows=1, capacity=4, dimension=d)
    caches.add_neighbours(0, found, 0)
    held = caches.held(0).tolist()
    assert 10 in held and 40 not in held and len(held) == 4
    assert held[-1] == 10  # the nearest is the newest: the last overwritten by later answers
    chunks = ChunkCaches(1, capacity=4)  # RETRO's chunk caches alike
    tokens = np.arange(k * 2 * L).reshape(1, k, 2 * L)
    chunks.add(ChunkNeighbours(tokens, ids, ids[..., None] + 1, tokens[:, :, None], keys, keys[:, :, None] + 0.5), [0])
    assert 10 in chunks.local.held(0).tolist() and 40 not in chunks.local.held(0).tolist()


def test_speculative_retro_checks_its_model_and_datastore_as_retro_stepper_does(retro, retro_store):
    retriever = InProcessRetriever(retro_store, RetrievalConfig(k=K, nprobe=4))
    retriever.metadata = dict(retriever.metadata, encoder="minilm-v2:abc")
    encoder = FakeEncoder()
    encoder.fingerprint = "lm:other"
    with pytest.raises(ValueError, match="encoder") as serial:
        RetroStepper(retro, retriever, encoder)
    with pytest.raises(ValueError, match="encoder") as speculative:
        RaLMSpecRetro(retro, retriever, encoder)
    assert str(speculative.value) == str(serial.value)
    with pytest.raises(ValueError, match="Retro model"):
        RaLMSpecRetro(TransformerLM(LMConfig.tiny(vocab_size=V)), retriever, FakeEncoder())


def counting_forwards(decoder: RaLMSpecKnnLM) -> list[int]:
    """Counts the decoder's model forwards (one per `model_step`)."""
    calls, step = [0], decoder.model_step

    def counted(*args, **kwargs):
        calls[0] += 1
        return step(*args, **kwargs)

    decoder.model_step = counted
    return calls


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_steps_count_model_forwards_and_wasted_the_guessed_steps_a_rollback_dropped(lm, knn_store, strategy):
    """`steps` counts model steps (the prompt's included), as `StepperStats` says, not verifications;
    every guessed step (beam search: a prompt's) is either verified or dropped unchecked by a rollback."""
    retriever = InProcessRetriever(knn_store, RetrievalConfig(k=KNN_K, nprobe=8))
    cfg = GenerateConfig(strategy=strategy, num_beams=3 if strategy == "beam" else 1, max_new_tokens=10)
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SpeculationConfig(stride=3))
    forwards = counting_forwards(decoder)
    generate(decoder, random_tokens((3, 5), seed=4), cfg)
    stats = decoder.stats
    assert stats.steps == forwards[0] == stats.ticks + 1 > stats.verifications + 1
    assert stats.rollbacks > 0 and stats.wasted > 0
    assert stats.speculated == stats.verified + stats.wasted  # no row ended with guesses unchecked here


def tensor_bytes() -> int:
    """Bytes of every tensor storage alive but the parameters (each storage once)."""
    storages = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor:  # a parameter's type is a subclass
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_beam_search_pending_steps_hold_no_copy_of_the_cache_per_step(lm, knn_store, monkeypatch):
    """At a stride of 8 the steps awaiting verification keep what a rollback needs, not a key/value cache
    each: at every verification, the tensors made since decoding began, less the live cache, take at most
    about its size."""
    caches: list[RaggedKVCache] = []
    before = [0]  # the tensors alive before decoding (other tests' included)
    real_snapshot, real_wait = RaggedKVCache.snapshot, beam.wait_for
    ratios: list[float] = []

    def snapshot(self):
        caches.append(self)
        return real_snapshot(self)

    def wait_for(pending, stats):  # every pending step is held while its verification is awaited
        if not caches:  # the prompts' first step
            return real_wait(pending, stats)
        live = sum(t.untyped_storage().nbytes() for t in (*caches[-1].keys, *caches[-1].values) if t is not None)
        ratios.append((tensor_bytes() - before[0] - live) / live)
        return real_wait(pending, stats)

    monkeypatch.setattr(RaggedKVCache, "snapshot", snapshot)
    monkeypatch.setattr(beam, "wait_for", wait_for)
    retriever = InProcessRetriever(knn_store, RetrievalConfig(k=KNN_K, nprobe=8))
    decoder = RaLMSpecKnnLM(lm, retriever, lam=LAM, temperature=TEMP, speculation=SpeculationConfig(stride=8))
    prompt, cfg = random_tokens((4, 20), seed=4), GenerateConfig(strategy="beam", num_beams=4, max_new_tokens=30)
    want = generate(KnnLMStepper(lm, retriever, lam=LAM, temperature=TEMP), prompt, cfg)
    gc.collect()
    before[0] = tensor_bytes()
    assert same(generate(decoder, prompt, cfg), want)
    assert decoder.stats.rollbacks > 0 and len(ratios) > 1
    assert max(ratios) < 1.6, ratios  # before: about 8 (a cache per pending step)


def test_a_split_request_cancelled_drops_its_pieces_and_raises_nothing_later(caplog):
    """Cancelling the joined future of a split request cancels the pieces not yet started; a piece that
    ends after it leaves nothing to log (set_result on the cancelled future raised in the callback)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lm_worker.decoding.ralmspec.split import submit_split

    gate, ran = threading.Event(), []

    def search(part: np.ndarray) -> KnnNeighbours:
        gate.wait(5)
        ran.append(len(part))
        return KnnNeighbours(np.zeros((len(part), 1), np.float32), np.zeros((len(part), 1), np.int64),
                             np.zeros((len(part), 1), np.int64))

    with ThreadPoolExecutor(1) as pool:
        joined = submit_split(pool, search, np.zeros((6, 2), np.float32), 2)
        assert joined.cancel()
        gate.set()
    assert ran == [2] and "Traceback" not in caplog.text and "exception calling callback" not in caplog.text


def test_a_services_own_batch_limit_sizes_the_split(aio, lm, knn_store):
    """A service started with a lower --max-batch than the default: RaLMSpec's verification requests are
    split to fit it (its GetInfo says it) and decode as serial retrieval does (they were refused)."""
    from conftest import serve

    from lm_worker.retrieval.service import ServiceRetriever

    prompts, config = random_tokens((8, 6), seed=3), GenerateConfig(max_new_tokens=12)
    with serve(aio, knn_store, 2, limits=Limits(max_batch=8)) as served, \
            ServiceRetriever(served.address, RetrievalConfig(k=KNN_K, nprobe=8)) as service:
        serial = generate(KnnLMStepper(lm, service, lam=LAM, temperature=TEMP), prompts, config)  # 8 a step
        spec = RaLMSpecKnnLM(lm, service, lam=LAM, temperature=TEMP, speculation=SpeculationConfig(stride=3))
        assert same(generate(spec, prompts, config), serial)  # a window of 3 steps: 24 queries, in pieces
