"""Perplexity evaluation against float64 references computed window by window: the base LM, kNN-LM per λ
from brute-force neighbours over the same exactly searched datastore, RETRO with and without neighbours; own-document
exclusion checked on the ids the retriever returns; the service equals the in-process search; the report."""

from __future__ import annotations

import copy
import json
import math
import sysconfig
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import serve

from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.data.tokenizer import train_tokenizer
from lm_worker.data.windows import Window, iter_windows
from lm_worker.decoding.retro_stepper import RetroStepper
from lm_worker.evaluation.config import EvalConfig, scored_positions
from lm_worker.evaluation.knnlm_eval import at_lambdas, best_lambdas, evaluate_knnlm, evaluate_lm
from lm_worker.evaluation.pointers import follow_pointers
from lm_worker.evaluation.report import report_table, write_report
from lm_worker.evaluation.retro_eval import evaluate_retro
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.retrieval.service import ServiceRetriever
from lm_worker.sources.build import build_source
from lm_worker.sources.knnlm import encode_knnlm, knn_windows
from lm_worker.sources.retro import encode_retro
from retriever_server.wire.request import Limits

CONTEXT, STRIDE, L = 32, 16, 4
LAMBDAS = (0.0, 0.25, 0.5, 0.9, 1.0)
EXACT = dict(nprobe=4)  # IVF4,Flat datastores probed in every list: exact search, as the references
KNN = EvalConfig(context_len=CONTEXT, stride=STRIDE, batch_size=4, lambdas=LAMBDAS,
                 retrieval=RetrievalConfig(k=16, **EXACT))
RETRO = EvalConfig(context_len=CONTEXT, stride=STRIDE, batch_size=3, retrieval=RetrievalConfig(k=2, **EXACT))

pytestmark = pytest.mark.ray


# ---------------------------------------------------------------------------------------------
# Fixtures: a tokenizer, random-token stores, tiny models, exact (IVF4,Flat) datastores built by the real jobs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return train_tokenizer([(stdlib / name).read_text() for name in ("bisect.py", "heapq.py")], vocab_size=300)


def random_docs(rng: np.random.Generator, lengths: list[int], vocab: int, eos: int) -> list[tuple[str, list[int]]]:
    docs = []
    for i, n in enumerate(lengths):
        ids = rng.integers(0, vocab - 1, n)
        docs.append((f"doc{i}", [int(t) + (t >= eos) for t in ids]))  # never EOS inside a document
    return docs


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer) -> tuple[TokenStore, TokenStore]:
    tmp = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    V, eos, fp = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.fingerprint
    train = write_token_store(tmp / "train", random_docs(rng, [90, 131, 70, 150, 111], V, eos), eos, fp)
    heldout = write_token_store(tmp / "heldout", random_docs(rng, [100, 77], V, eos), eos, fp)
    return train, heldout


@pytest.fixture(scope="module")
def lm(tokenizer) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(LMConfig.tiny(vocab_size=tokenizer.vocab_size, max_len=64)).eval()


@pytest.fixture(scope="module")
def knn_datastore(ray_cluster, tmp_path_factory, lm, stores) -> tuple[Path, np.ndarray, np.ndarray]:
    """The kNN-LM datastore of the train store (IVF4,Flat, 2 shards), its keys and values."""
    tmp = tmp_path_factory.mktemp("knn")
    encode_knnlm(lm, stores[0], tmp / "src", context_len=CONTEXT, stride=STRIDE, progress=False)
    out = build_source(tmp / "src", tmp / "ds", shards=2, factory="IVF4,Flat", progress=False)
    return out, np.load(tmp / "src" / "keys.npy"), np.load(tmp / "src" / "values.npy")


class FakeEncoder:
    """`ChunkEncoder`'s interface without MiniLM: a fixed position-weighted projection of the chunk's tokens,
    unit norm, computed row by row in float64, so distinct chunks never tie and batching changes nothing."""

    dimension = 24
    fingerprint = "fake:proj24"

    def __init__(self, vocab_size: int):
        self.table = np.random.default_rng(7).standard_normal((L, vocab_size, self.dimension))

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        out = np.stack([sum(self.table[j, row[j]] for j in range(L)) for row in chunks])  # (n, dim)
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder(tokenizer) -> FakeEncoder:
    return FakeEncoder(tokenizer.vocab_size)


@pytest.fixture(scope="module")
def retro_model(tokenizer) -> Retro:
    torch.manual_seed(1)
    return Retro(RetroConfig.tiny(vocab_size=tokenizer.vocab_size, chunk_len=L, n_neighbours=2)).eval()


@pytest.fixture(scope="module")
def retro_datastore(ray_cluster, tmp_path_factory, encoder, stores) -> tuple[Path, np.ndarray, np.ndarray]:
    """The RETRO datastore of the train store (IVF4,Flat, 2 shards), its keys and payloads."""
    tmp = tmp_path_factory.mktemp("retro")
    encode_retro(stores[0], encoder, L, tmp / "src", progress=False)
    out = build_source(tmp / "src", tmp / "ds", shards=2, factory="IVF4,Flat", progress=False)
    return out, np.load(tmp / "src" / "keys.npy"), np.load(tmp / "src" / "tokens.npy")


class Recording:
    """A retriever that records every query's exclusion and the neighbours returned (synchronous futures)."""

    def __init__(self, inner):
        self.inner = inner
        self.ids: list[np.ndarray] = []
        self.excludes: list = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def knn(self, keys, exclude=None):
        found = self.inner.knn(keys, exclude)
        self.ids.append(found.ids)
        self.excludes.extend(exclude if exclude is not None else [None] * len(keys))
        return found

    def submit_knn(self, keys, exclude=None) -> Future:
        future = Future()
        future.set_result(self.knn(keys, exclude))
        return future

    def chunks(self, embeddings, exclude=None):
        self.excludes.extend(exclude if exclude is not None else [None] * len(embeddings))
        return self.inner.chunks(embeddings, exclude)

    def submit_chunks(self, embeddings, exclude=None) -> Future:
        future = Future()
        future.set_result(self.chunks(embeddings, exclude))
        return future


# ---------------------------------------------------------------------------------------------
# References, written plainly: one window at a time, float64, brute force
# ---------------------------------------------------------------------------------------------

def windows_of(store: TokenStore, config: EvalConfig, align: int = 1) -> list[Window]:
    return list(iter_windows(scored_positions(store, config.max_tokens), config.context_len, config.stride, align))


def window_tensors(store: TokenStore, w: Window) -> tuple[torch.Tensor, np.ndarray, slice]:
    tokens = np.asarray(store.tokens[w.start:w.end + 1], dtype=np.int64)
    return torch.from_numpy(tokens[None, :-1]), tokens[1:], slice(w.score_from - w.start, w.end - w.start)


def target_probs(logits: torch.Tensor, targets: np.ndarray, scored: slice) -> np.ndarray:
    """float64 p(target) at the scored offsets of one window's logits (1, T, V)."""
    log_probs = F.log_softmax(logits[0, scored].double(), dim=-1)
    return log_probs[torch.arange(len(targets[scored])), torch.from_numpy(targets[scored])].exp().numpy()


@torch.no_grad()
def reference_lm(model, store: TokenStore, config: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """p_LM(target) (n,) and the keys (n, d) of every scored position, float64."""
    probs, keys = [], []
    for w in windows_of(store, config):
        inputs, targets, scored = window_tensors(store, w)
        logits, k = model(inputs, return_keys=True)
        probs.append(target_probs(logits, targets, scored))
        keys.append(k[0, scored].double().numpy())
    return np.concatenate(probs), np.concatenate(keys)


def own_rows(store: TokenStore, position: int) -> tuple[int, int]:
    """kNN-LM rows of a position's document: the rows whose value is one of its tokens, [start - 1, end)."""
    doc = store.documents[store.doc_ids[position]]
    return max(doc.start - 1, 0), min(doc.end, len(store) - 1)


def reference_knnlm(model, store: TokenStore, ds_keys: np.ndarray, ds_values: np.ndarray, config: EvalConfig,
                    exclude: bool) -> tuple[float, dict[float, float]]:
    """Base perplexity and kNN-LM perplexity per λ from exact top-k neighbours, in float64."""
    p_lm, keys = reference_lm(model, store, config)
    targets = np.asarray(store.tokens[1:len(p_lm) + 1], dtype=np.int64)
    keys64 = ds_keys.astype(np.float64)
    p_knn = np.zeros(len(p_lm))
    for i in range(len(p_lm)):
        d = ((keys64 - keys[i]) ** 2).sum(-1)  # (N,)
        if exclude:
            lo, hi = own_rows(store, i)
            d[lo:hi] = np.inf
        top = np.argsort(d, kind="stable")[:config.retrieval.k]
        top = top[np.isfinite(d[top])]
        logits = -d[top] / config.temperature
        weights = np.exp(logits - logits.max())
        p_knn[i] = weights[ds_values[top] == targets[i]].sum() / weights.sum()
    with np.errstate(divide="ignore"):
        ppl = {lam: float(np.exp(-np.log(lam * p_knn + (1 - lam) * p_lm).mean())) for lam in config.lambdas}
    return float(np.exp(-np.log(p_lm).mean())), ppl


def assert_perplexities(got: dict[float, float], want: dict[float, float]) -> None:
    assert got.keys() == want.keys()
    for lam in want:
        if math.isinf(want[lam]):
            assert math.isinf(got[lam]), lam
        else:
            assert got[lam] == pytest.approx(want[lam], rel=1e-4), lam


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, context, stride, align", [
    (1, 8, 4, 1), (8, 8, 4, 1), (9, 8, 4, 1), (100, 8, 3, 1), (100, 8, 8, 1), (101, 32, 16, 4), (103, 12, 4, 4),
    (7, 16, 8, 4), (0, 8, 4, 1),
])
def test_windows_score_every_position_once_with_context(n, context, stride, align):
    windows = list(iter_windows(n, context, stride, align))
    scored = np.concatenate([np.arange(w.score_from, w.end) for w in windows]) if windows else np.zeros(0)
    np.testing.assert_array_equal(scored, np.arange(n))  # each position once, in order
    for i, w in enumerate(windows):
        assert 0 <= w.start <= w.score_from < w.end <= n and w.end - w.start <= context
        assert w.start % align == 0
        if i > 0:  # every position scored after the first window sees >= context - stride earlier tokens
            assert w.score_from - w.start >= context - stride
            assert w.end - w.score_from <= stride
    if align == 1:  # the same windows as the kNN-LM datastore's keys
        assert [(w.start, w.score_from, w.end) for w in windows] == knn_windows(n, context, stride)


def test_bad_windows_raise():
    with pytest.raises(ValueError, match="multiples of 4"):
        list(iter_windows(100, 30, 16, align=4))
    for stride in (0, -1, 31):  # 0 never ended; past context_len, windows started after what they scored
        with pytest.raises(ValueError, match=r"stride must be in \[1, context_len=30\]"):
            list(iter_windows(100, 30, stride))
    for bad in (dict(stride=0), dict(stride=40, context_len=32), dict(lambdas=(0.5, 1.2)), dict(lambdas=()),
                dict(temperature=0.0), dict(batch_size=0), dict(max_tokens=-1)):
        with pytest.raises(ValueError):
            EvalConfig(**bad)
    for name, value in (("stride", 8.0), ("batch_size", 2.5), ("pointer_steps", 2.0), ("context_len", True)):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer, got {value!r}$"):
            EvalConfig(**{name: value})  # 8.0 failed mid-evaluation in a slice, 2.5 ran batches of 3
    assert EvalConfig(stride=np.int64(8), context_len=np.int32(16)).stride == 8  # numpy's integers are integers


# ---------------------------------------------------------------------------------------------
# The base LM and kNN-LM
# ---------------------------------------------------------------------------------------------

def test_lm_perplexity_matches_window_by_window_reference(lm, stores):
    heldout = stores[1]
    ppl, tokens = evaluate_lm(lm, heldout, KNN, progress=False)
    p_lm, _ = reference_lm(lm, heldout, KNN)
    assert tokens == len(heldout) - 1 == len(p_lm)
    assert ppl == pytest.approx(float(np.exp(-np.log(p_lm).mean())), rel=1e-5)
    capped = EvalConfig(context_len=CONTEXT, stride=STRIDE, max_tokens=50)
    ppl50, tokens50 = evaluate_lm(lm, heldout, capped, progress=False)
    assert tokens50 == 50
    p50, _ = reference_lm(lm, heldout, capped)  # the windows end at position 50: other contexts
    assert ppl50 == pytest.approx(float(np.exp(-np.log(p50).mean())), rel=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        evaluate_lm(lm, heldout, EvalConfig(context_len=128, stride=64), progress=False)


def test_a_model_whose_log_probabilities_hold_nan_is_an_error_not_a_perplexity_of_inf(lm, stores):
    broken = copy.deepcopy(lm)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="tokens is NaN: the model's log-probabilities hold NaN"):
        evaluate_lm(broken, stores[1], KNN, progress=False)


@pytest.mark.parametrize("exclude, temperature", [(False, 1.0), (True, 1.0), (True, 3.0)],
                         ids=["all-rows", "exclude-own-document", "exclude-own-document-T3"])
def test_knnlm_matches_brute_force_reference(lm, stores, knn_datastore, exclude, temperature):
    train = stores[0]
    datastore, ds_keys, ds_values = knn_datastore
    config = EvalConfig(**{**KNN.__dict__, "exclude_own_document": exclude, "temperature": temperature})
    with InProcessRetriever(datastore, config.retrieval) as retriever:
        result = evaluate_knnlm(lm, train, retriever, config, progress=False)
    base, want = reference_knnlm(lm, train, ds_keys, ds_values, config, exclude)
    assert result.tokens == len(train) - 1
    assert result.base_perplexity == pytest.approx(base, rel=1e-5)
    assert_perplexities(result.perplexity, want)
    finite = {lam: p for lam, p in result.perplexity.items() if math.isfinite(p)}
    assert result.best_lambda == min(finite, key=finite.get)
    assert result.best_perplexity == result.perplexity[result.best_lambda]
    assert result.relative_reduction == pytest.approx(1 - result.best_perplexity / result.base_perplexity)


def test_knnlm_lambda_zero_equals_lm_exactly(lm, stores, knn_datastore):
    heldout = stores[1]
    with InProcessRetriever(knn_datastore[0], KNN.retrieval) as retriever:
        result = evaluate_knnlm(lm, heldout, retriever, KNN, progress=False)
        in_step = evaluate_knnlm(lm, heldout, retriever, EvalConfig(**{**KNN.__dict__, "overlap": False}),
                                 progress=False)
    ppl, tokens = evaluate_lm(lm, heldout, KNN, progress=False)
    assert result.tokens == tokens
    assert result.perplexity[0.0] == ppl
    assert result.base_perplexity == ppl
    assert in_step.perplexity == result.perplexity  # overlapping retrieval with the model changes nothing


def test_a_knnlm_result_reports_the_k_its_retriever_searched(lm, stores, knn_datastore):
    """The retriever's config sets k: the result (and the report's table) said the EvalConfig's instead."""
    with InProcessRetriever(knn_datastore[0], RetrievalConfig(k=4, **EXACT)) as retriever:
        result = evaluate_knnlm(lm, stores[1], retriever, KNN, progress=False)  # KNN.retrieval.k is 16
    assert result.k == 4


def test_knnlm_on_its_own_text_is_far_better(lm, stores, knn_datastore):
    """Every query finds itself at distance ~0: p_kNN of the true next token is ~1."""
    train = stores[0]
    config = EvalConfig(**{**KNN.__dict__, "lambdas": (0.0, 0.5, 0.9)})
    with InProcessRetriever(knn_datastore[0], config.retrieval) as retriever:
        own = evaluate_knnlm(lm, train, retriever, config, progress=False)
        excluded = evaluate_knnlm(lm, train, retriever, EvalConfig(**{**config.__dict__, "exclude_own_document": True}),
                                  progress=False)
    assert own.perplexity[0.9] < own.base_perplexity / 5
    assert own.best_lambda == 0.9
    assert excluded.perplexity[0.9] > 3 * own.perplexity[0.9]  # random documents do not predict each other


def test_own_document_is_excluded_from_every_query(lm, stores, knn_datastore):
    train = stores[0]
    doc_ids = np.asarray(train.doc_ids)
    own_hits = {}
    for exclude in (False, True):
        config = EvalConfig(**{**KNN.__dict__, "exclude_own_document": exclude})
        with InProcessRetriever(knn_datastore[0], config.retrieval) as inner:
            recorder = Recording(inner)
            evaluate_knnlm(lm, train, recorder, config, progress=False)
        windows = windows_of(train, config)
        assert len(recorder.ids) == math.ceil(len(windows) / config.batch_size)  # one request per batch
        ids = np.concatenate(recorder.ids)  # (n, k), query i is position i
        assert ids.shape == (len(train) - 1, KNN.retrieval.k)
        found = ids >= 0
        same = found & (doc_ids[np.where(found, ids, 0)] == doc_ids[:len(ids), None])
        own_hits[exclude] = int(same.sum())
        if exclude:
            assert recorder.excludes == [own_rows(train, i) for i in range(len(ids))]
    assert own_hits[True] == 0
    assert own_hits[False] > len(train) // 2  # each position finds at least itself


def test_exclusion_needs_the_datastore_of_the_store(lm, stores, knn_datastore):
    config = EvalConfig(**{**KNN.__dict__, "exclude_own_document": True})
    with InProcessRetriever(knn_datastore[0], config.retrieval) as retriever:
        with pytest.raises(ValueError, match="built from this store"):
            evaluate_knnlm(lm, stores[1], retriever, config, progress=False)


def test_service_retriever_matches_in_process(aio, lm, stores, knn_datastore):
    heldout, datastore = stores[1], knn_datastore[0]
    with InProcessRetriever(datastore, KNN.retrieval) as retriever:
        want = evaluate_knnlm(lm, heldout, retriever, KNN, progress=False)
    with serve(aio, datastore, n_shards=2) as served:
        for target in (served.address, served.shard_addresses()):  # router, then client fan-out
            with ServiceRetriever(target, KNN.retrieval) as retriever:
                assert retriever.metric == "l2"  # from GetInfo: the kNN-LM check reads it
                got = evaluate_knnlm(lm, heldout, retriever, KNN, progress=False)
            assert got.tokens == want.tokens
            assert got.perplexity == pytest.approx(want.perplexity, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# RETRO
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_retro(model: Retro, store: TokenStore, encoder, ds_keys: np.ndarray, ds_tokens: np.ndarray,
                    config: EvalConfig, exclude: bool) -> tuple[float, float]:
    """Perplexity with brute-force neighbours of each window's chunks, and with none, window by window."""
    K = model.config.n_neighbours
    p_with, p_without = [], []
    for w in windows_of(store, config, align=L):
        inputs, targets, scored = window_tensors(store, w)
        chunks = inputs[0, :(w.end - w.start) // L * L].view(-1, L).numpy()  # (C, L)
        emb = encoder.embed(chunks).astype(np.float64) if len(chunks) else np.zeros((0, 1))  # (C, d)
        rows = []
        for c, e in enumerate(emb):
            d = ((ds_keys.astype(np.float64) - e) ** 2).sum(-1)
            if exclude:
                chunk = w.start // L + c  # rows whose chunk or continuation holds a token of its document(s)
                first = store.documents[store.doc_ids[chunk * L]]
                last = store.documents[store.doc_ids[min(chunk * L + 2 * L - 1, len(store) - 1)]]  # chunk + 1's
                d[max(first.start // L - 1, 0):math.ceil(last.end / L)] = np.inf
            rows.append(ds_tokens[np.argsort(d, kind="stable")[:K]])
        neighbours = torch.from_numpy(np.stack(rows)[None].astype(np.int64)) if rows else \
            torch.zeros((1, 0, K, 2 * L), dtype=torch.long)  # (1, C, K, 2L); C = 0 in a window under a chunk
        p_with.append(target_probs(model(inputs, neighbours), targets, scored))
        p_without.append(target_probs(model(inputs, None), targets, scored))
    return (float(np.exp(-np.log(np.concatenate(p_with)).mean())),
            float(np.exp(-np.log(np.concatenate(p_without)).mean())))


@pytest.mark.parametrize("split, exclude", [(1, False), (0, True)], ids=["heldout", "train-exclude-own-document"])
def test_retro_with_and_without_neighbours_match_reference(retro_model, stores, encoder, retro_datastore,
                                                           split, exclude):
    store = stores[split]
    datastore, ds_keys, ds_tokens = retro_datastore
    config = EvalConfig(**{**RETRO.__dict__, "exclude_own_document": exclude})
    with InProcessRetriever(datastore, config.retrieval) as inner:
        recorder = Recording(inner)
        result = evaluate_retro(retro_model, store, recorder, encoder, config, progress=False)
    want_with, want_without = reference_retro(retro_model, store, encoder, ds_keys, ds_tokens, config, exclude)
    assert result.tokens == len(store) - 1
    assert result.perplexity_without == pytest.approx(want_without, rel=1e-5)
    assert result.perplexity == pytest.approx(want_with, rel=1e-4)
    assert result.perplexity != pytest.approx(result.perplexity_without, rel=1e-3)  # neighbours do matter
    assert len(recorder.excludes) == scored_positions(store) // L  # each chunk embedded and retrieved once
    assert all((e is not None) == exclude for e in recorder.excludes)


def test_retro_windows_of_one_chunk_score_the_last_short_one(retro_model, stores, encoder, retro_datastore):
    """context = stride = one chunk: the last window, shorter than a chunk, holds no chunk to retrieve for
    (it raised ValueError: neighbours (B, 0)). Both perplexities match the window-by-window reference."""
    store = stores[1]
    config = EvalConfig(context_len=L, stride=L, batch_size=3, retrieval=RETRO.retrieval)
    assert scored_positions(store) % L, "the store ends on a chunk boundary: no short last window"
    with InProcessRetriever(retro_datastore[0], config.retrieval) as retriever:
        result = evaluate_retro(retro_model, store, retriever, encoder, config, progress=False)
    want_with, want_without = reference_retro(retro_model, store, encoder, *retro_datastore[1:], config, False)
    assert result.tokens == len(store) - 1
    assert result.perplexity_without == pytest.approx(want_without, rel=1e-5)
    assert result.perplexity == pytest.approx(want_with, rel=1e-5)


def test_retro_checks_k_and_alignment(retro_model, stores, encoder, retro_datastore):
    with InProcessRetriever(retro_datastore[0], RetrievalConfig(k=1, **EXACT)) as retriever:
        with pytest.raises(ValueError, match="k=1 neighbours, the model takes 2"):
            evaluate_retro(retro_model, stores[1], retriever, encoder, RETRO, progress=False)
    results = []
    for k in (2, 3):  # more than the model takes: the nearest 2 are used, as RetroStepper does
        with InProcessRetriever(retro_datastore[0], RetrievalConfig(k=k, **EXACT)) as retriever:
            results.append(evaluate_retro(retro_model, stores[1], retriever, encoder, RETRO, progress=False))
    assert results[0].perplexity == results[1].perplexity
    with InProcessRetriever(retro_datastore[0], RETRO.retrieval) as retriever:
        with pytest.raises(ValueError, match="multiples of 4"):
            evaluate_retro(retro_model, stores[1], retriever, encoder, EvalConfig(context_len=30, stride=16),
                           progress=False)


def test_retro_refuses_an_encoder_other_than_the_datastores(retro_model, stores, encoder, retro_datastore):
    """The datastore's manifest names the encoder that made its keys: another one (here a copy under another
    fingerprint) is refused by the evaluation and the decoder, before any search."""
    other = FakeEncoder(retro_model.config.vocab_size)
    other.fingerprint = "fake:another"
    with InProcessRetriever(retro_datastore[0], RETRO.retrieval) as retriever:
        assert retriever.metadata["encoder"] == encoder.fingerprint
        for use in (lambda: evaluate_retro(retro_model, stores[1], retriever, other, RETRO, progress=False),
                    lambda: RetroStepper(retro_model, retriever, other)):
            with pytest.raises(ValueError, match="made by the encoder 'fake:proj24', not by this one .'fake:another'"):
                use()


@pytest.mark.parametrize("docs", [[], [("doc", [])], [("doc", [7])]], ids=["0-tokens", "1-token", "2-tokens"])
def test_a_store_too_short_to_score_is_refused_not_a_perplexity_of_one(tmp_path, tokenizer, lm, retro_model, encoder,
                                                                      knn_datastore, retro_datastore, docs):
    """A store of fewer than 2 tokens has no position to score, and RETRO needs a chunk of 4 and the token
    after it: each evaluation raises, where it used to report perplexity 1.000 over 0 tokens."""
    store = write_token_store(tmp_path / "short", docs, tokenizer.eos_id, tokenizer.fingerprint)
    assert len(store) == len(docs) + sum(len(ids) for _, ids in docs)
    with InProcessRetriever(retro_datastore[0], RETRO.retrieval) as retriever:
        with pytest.raises(ValueError, match="nothing to evaluate: the store holds .* one chunk of 4 tokens"):
            evaluate_retro(retro_model, store, retriever, encoder, RETRO, progress=False)
    if len(store) >= 2:  # the LM and kNN-LM score its one position
        assert evaluate_lm(lm, store, KNN, progress=False)[1] == 1
        return
    with pytest.raises(ValueError, match=f"nothing to evaluate: the store holds {len(store)} tokens"):
        evaluate_lm(lm, store, KNN, progress=False)
    with InProcessRetriever(knn_datastore[0], KNN.retrieval) as retriever:
        with pytest.raises(ValueError, match="nothing to evaluate"):
            evaluate_knnlm(lm, store, retriever, KNN, progress=False)


def test_a_figure_at_lambdas_chosen_elsewhere_is_this_texts_perplexity_at_them(lm, stores, knn_datastore):
    """`at_lambdas` reports the evaluated text at a λ chosen on other text, however much better another λ of
    its own sweep would do; the table says where the λ came from."""
    train = stores[0]
    with InProcessRetriever(knn_datastore[0], KNN.retrieval) as retriever:
        knn = evaluate_knnlm(lm, train, retriever, KNN, progress=False)  # its own text: the best λ is not 0
    assert knn.best_lambda > 0 and knn.lambdas_from == ""
    chosen = at_lambdas(knn, 0.0, 0.0, "valid")
    assert chosen.best_perplexity == knn.perplexity[0.0] == pytest.approx(knn.base_perplexity, rel=1e-6)
    assert chosen.relative_reduction == pytest.approx(0.0, abs=1e-6) and chosen.perplexity == knn.perplexity
    assert "| kNN-LM (λ=0 chosen on valid, k=16, T=1) |" in report_table(chosen, None)
    with pytest.raises(ValueError, match=r"lam=0.33 is not among the evaluated λs"):
        at_lambdas(knn, 0.33, 0.33, "valid")


def test_the_best_lambda_pair_is_the_same_whatever_the_order_of_the_lambdas():
    """With pointers, λ=1 makes the searched and the followed positions' sums both infinite; their difference
    (nan) is no best: the pair is (0.25, 0.25) whichever λ comes first."""
    nll = {1.0: math.inf, 0.25: 90.0}
    followed = {1.0: math.inf, 0.25: 40.0}
    for order in (list(nll), list(reversed(nll))):
        got = best_lambdas({lam: nll[lam] for lam in order}, {lam: followed[lam] for lam in order}, 10, 4)
        assert got == (0.25, 0.25, pytest.approx(math.exp(9.0)))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def test_write_report(tmp_path, lm, retro_model, stores, encoder, knn_datastore, retro_datastore):
    train, heldout = stores
    with InProcessRetriever(knn_datastore[0], KNN.retrieval) as retriever:
        knn = evaluate_knnlm(lm, train, retriever, KNN, progress=False)  # its own text: the best λ is not 0
    assert knn.best_lambda > 0
    with InProcessRetriever(retro_datastore[0], RETRO.retrieval) as retriever:
        retro = evaluate_retro(retro_model, heldout, retriever, encoder, RETRO, progress=False)
    table = write_report(tmp_path / "eval", knn, retro, {"run": "test"})
    assert (tmp_path / "eval" / "table.md").read_text() == table
    assert (tmp_path / "eval" / "ppl_vs_lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    body = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert body["meta"] == {"run": "test"}
    assert body["knnlm"]["base_perplexity"] == knn.base_perplexity
    assert body["knnlm"]["perplexity"]["0.25"] == knn.perplexity[0.25]
    assert body["retro"]["perplexity_without"] == retro.perplexity_without
    lines = table.strip().splitlines()
    assert lines[0] == "| model | tokens | perplexity | vs base |" and len(lines) == 6
    assert lines[2] == f"| base LM | {knn.tokens} | {knn.base_perplexity:.3f} | base |"
    change = 100 * (knn.best_perplexity / knn.base_perplexity - 1)
    assert lines[3].startswith(f"| kNN-LM (λ={knn.best_lambda:g}, best of {len(KNN.lambdas)} on these tokens, k=16, "
                               f"T=1) | {knn.tokens} | {knn.best_perplexity:.3f} | {change:+.1f}% |")
    assert lines[4] == f"| RETRO, neighbours withheld | {retro.tokens} | {retro.perplexity_without:.3f} | base |"
    assert lines[5].startswith(f"| RETRO (K=2) | {retro.tokens} | {retro.perplexity:.3f} | ")
    write_report(tmp_path / "eval", None, retro, {"run": "retro alone"})  # the same folder, RETRO alone
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["eval.json", "table.md"]  # no stale plot
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["knnlm"] is None


def test_following_pointers_searches_less_and_equals_full_retrieval_when_no_chain_holds(lm, stores, knn_datastore):
    """On the datastore's own text every neighbour chain continues the text, so most positions follow
    pointers instead of searching, and p_kNN of the true token stays near 1. With more pointers required
    than there are neighbours no chain ever holds: every position is searched, and the perplexities are
    full retrieval's."""
    train = stores[0]
    config = EvalConfig(**{**KNN.__dict__, "lambdas": (0.0, 0.5, 0.9)})
    with InProcessRetriever(knn_datastore[0], config.retrieval) as retriever:
        full = evaluate_knnlm(lm, train, retriever, config, progress=False)
        followed = evaluate_knnlm(lm, train, retriever, EvalConfig(**{**config.__dict__, "pointer_steps": 8}),
                                  progress=False)
        never = evaluate_knnlm(lm, train, retriever, EvalConfig(**{**config.__dict__, "pointer_steps": 8,
                                                                   "min_pointers": 17}), progress=False)
        agreeing = evaluate_knnlm(lm, train, retriever, EvalConfig(**{**config.__dict__, "pointer_steps": 8,
                                                                      "pointer_agreement": 1.0}), progress=False)
        crowded = evaluate_knnlm(lm, train, retriever, EvalConfig(**{**config.__dict__, "pointer_steps": 8,
                                                                     "pointer_agreement": 1.0, "pointer_crowd": 2}),
                                 progress=False)
    assert full.searched == full.tokens == followed.tokens
    assert followed.searched < full.tokens / 3
    assert followed.searched <= agreeing.searched < full.tokens  # unanimous chains still follow the own text
    assert followed.searched <= crowded.searched < agreeing.searched  # a pair of chains skips the agreement check
    assert followed.perplexity[0.9] < full.base_perplexity / 5
    assert never.searched == never.tokens
    for lam in config.lambdas:
        assert never.perplexity[lam] == pytest.approx(full.perplexity[lam], rel=1e-6)


def test_followed_positions_take_their_own_lambda_and_temperature(lm, stores, knn_datastore, monkeypatch):
    """With pointers, the followed positions score at `pointer_temperature_scale` x T and the best λ pair
    (one for searched positions, one for followed ones) gives `best_perplexity`: recomputed here in
    float64 from the LM's reference probabilities and the neighbours each position was given."""
    import lm_worker.evaluation.knnlm_eval as knnlm_eval

    train = stores[0]
    given = []  # per batch: positions, targets, neighbours, followed

    def recording(keys, targets, positions, search, steps, min_pointers, **options):
        found, followed = follow_pointers(keys, targets, positions, search, steps, min_pointers, **options)
        given.append((positions.copy(), targets.copy(), found, followed.copy()))
        return found, followed

    monkeypatch.setattr(knnlm_eval, "follow_pointers", recording)
    config = EvalConfig(**{**KNN.__dict__, "lambdas": (0.0, 0.1, 0.5, 0.9), "temperature": 2.0,
                           "pointer_steps": 4, "pointer_temperature_scale": 3.0})
    with InProcessRetriever(knn_datastore[0], config.retrieval) as retriever:
        result = evaluate_knnlm(lm, train, retriever, config, progress=False)
    p_lm, _ = reference_lm(lm, train, config)
    positions = np.concatenate([g[0] for g in given])
    followed = np.concatenate([g[3] for g in given])
    p_knn = np.concatenate([knn_probs(g[2], g[1], np.where(g[3], 6.0, 2.0)) for g in given])
    lm_probs = p_lm[positions]
    assert 0 < followed.sum() < len(followed) and result.searched == (~followed).sum()
    nll = {lam: -np.log(lam * p_knn + (1 - lam) * lm_probs) for lam in config.lambdas}  # (n,) each
    for lam in config.lambdas:
        assert result.perplexity[lam] == pytest.approx(np.exp(nll[lam].mean()), rel=1e-4)
        assert result.followed_nll[lam] == pytest.approx(nll[lam][followed].sum(), rel=1e-4)
    lam_s = min(config.lambdas, key=lambda lam: nll[lam][~followed].sum())
    lam_f = min(config.lambdas, key=lambda lam: nll[lam][followed].sum())
    assert (result.best_lambda, result.followed_lambda, result.followed_temperature) == (lam_s, lam_f, 6.0)
    pair = (nll[lam_s][~followed].sum() + nll[lam_f][followed].sum()) / len(followed)
    assert result.best_perplexity == pytest.approx(np.exp(pair), rel=1e-4)
    assert result.best_perplexity <= min(result.perplexity.values()) * (1 + 1e-9)
    row = report_table(result, None, {"pointer_steps": 4, "pointer_agreement": 0.0, "pointer_crowd": 0}).splitlines()[3]
    assert f"{result.searched} positions searched; pointers N=4 followed {100 * followed.mean():.1f}%: " in row
    assert f"λ={lam_f:g}, T=6" in row and "θ" not in row  # no agreement check: no θ named
    chosen = at_lambdas(result, 0.1, 0.9, "valid")  # λs chosen on other text: this text's figure at them
    pair = (nll[0.1][~followed].sum() + nll[0.9][followed].sum()) / len(followed)
    assert chosen.best_perplexity == pytest.approx(np.exp(pair), rel=1e-4)
    assert (chosen.best_lambda, chosen.followed_lambda, chosen.lambdas_from) == (0.1, 0.9, "valid")


def knn_probs(found, targets: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """float64 p_kNN(target) per position from its neighbours (missing ones weigh nothing), at a
    temperature per position."""
    d = np.asarray(found.distances, dtype=np.float64)  # (n, k)
    valid = (found.values >= 0) & np.isfinite(d)
    nearest = np.where(valid, d, np.inf).min(axis=1, keepdims=True)  # (n, 1), inf where none is valid
    weights = np.where(valid, np.exp(-(d - np.where(np.isfinite(nearest), nearest, 0.0)) / temperature[:, None]), 0.0)
    hit = weights * (found.values == targets[:, None])
    total = weights.sum(axis=1)
    return np.where(total > 0, hit.sum(axis=1) / np.where(total > 0, total, 1.0), 0.0)


def test_with_pointers_the_batch_size_changes_the_requests_not_the_result(lm, stores, knn_datastore):
    """Each window's positions are a run of their own, so batching 1 or 8 windows searches the same
    positions and scores the same perplexities; a larger batch only sends fewer, larger requests."""
    train = stores[0]
    results, requests = {}, {}
    for batch_size in (1, 8):
        config = EvalConfig(**{**KNN.__dict__, "lambdas": (0.0, 0.5), "pointer_steps": 4, "batch_size": batch_size,
                               "pointer_agreement": 0.9, "pointer_crowd": 3})
        with InProcessRetriever(knn_datastore[0], config.retrieval) as retriever:
            calls = []
            retriever.knn = lambda keys, *rest, calls=calls, search=retriever.knn: (calls.append(len(keys))
                                                                                    or search(keys, *rest))
            results[batch_size] = evaluate_knnlm(lm, train, retriever, config, progress=False)
            requests[batch_size] = calls
    one, eight = results[1], results[8]
    assert 0 < one.searched == eight.searched == sum(requests[1]) == sum(requests[8]) < one.tokens
    assert len(requests[8]) < len(requests[1]) / 2
    assert one.followed_nll == pytest.approx(eight.followed_nll, rel=1e-9)
    assert one.perplexity == pytest.approx(eight.perplexity, rel=1e-9)


def test_results_over_batch_ranges_combine_into_the_whole_with_pointers(lm, stores, knn_datastore):
    """Two halves of an evaluation with pointers, combined (as a distributed evaluation's shares are),
    give the whole evaluation's λ pair, followed share and positions searched."""
    from lm_worker.evaluation.batches import count_batches
    from lm_worker.evaluation.combine import combine_knn, knn_result

    train = stores[0]
    config = EvalConfig(**{**KNN.__dict__, "lambdas": (0.0, 0.1, 0.5, 0.9), "pointer_steps": 4})
    n = count_batches(train, config)
    with InProcessRetriever(knn_datastore[0], config.retrieval) as retriever:
        whole = evaluate_knnlm(lm, train, retriever, config, progress=False)
        halves = [evaluate_knnlm(lm, train, retriever, config, progress=False, batches=r)
                  for r in (range(0, n // 2), range(n // 2, n))]
    combined = combine_knn([knn_result(json.loads(json.dumps(h.to_dict()))) for h in halves], seconds=1.0)
    assert 0 < combined.searched == whole.searched < whole.tokens == combined.tokens
    assert (combined.best_lambda, combined.followed_lambda) == (whole.best_lambda, whole.followed_lambda)
    assert combined.best_perplexity == pytest.approx(whole.best_perplexity, rel=1e-9)
    for lam in config.lambdas:
        assert combined.followed_nll[lam] == pytest.approx(whole.followed_nll[lam], rel=1e-9)


def test_the_in_process_reference_searches_past_the_servers_limits(knn_datastore):
    """The in-process reference searches for its own process: a batch of nq x k over the servers' limit
    (4,194,304 neighbours) is searched whole, as its two halves are, and a value no search can take is a
    ValueError naming the field (it was a RequestError, which no caller catches)."""
    datastore, keys, _ = knn_datastore
    k = min(1024, len(keys))
    queries = keys[np.random.default_rng(3).integers(0, len(keys), Limits().max_neighbours // k + 1)]
    with InProcessRetriever(datastore, RetrievalConfig(k=k, nprobe=4)) as retriever:
        whole = retriever.knn(queries)
        halves = [retriever.knn(part) for part in np.array_split(queries, 2)]
        bad = queries[:2].copy()
        bad[1, 0] = np.nan
        with pytest.raises(ValueError, match="in-process search: queries contains NaN"):
            retriever.knn(bad)
    np.testing.assert_array_equal(whole.ids, np.concatenate([h.ids for h in halves]))
    np.testing.assert_array_equal(whole.distances, np.concatenate([h.distances for h in halves]))
