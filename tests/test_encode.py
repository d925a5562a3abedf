"""Datastore sources: kNN-LM keys against cache-free forwards, RETRO payloads and keys against their
definition, exclusions against brute force, the build, and precomputed neighbours against Flat search."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
from conftest import serve

from lm_worker.data.token_store import write_token_store
from lm_worker.models.fingerprint import model_fingerprint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.retrieval.service import ServiceRetriever
from lm_worker.sources.build import build_source
from lm_worker.sources.exclusions import chunk_exclusions, knn_exclusions
from lm_worker.sources.knnlm import encode_knnlm, knn_windows
from lm_worker.sources.neighbours import precompute_neighbours
from lm_worker.sources.retro import embed_chunks, encode_retro, keys_made_from, keys_record
from lm_worker.sources.source import read_source
from retriever_server.datastore.manifest import read_manifest

EOS, L, K = 0, 4, 4
DOC_VOCAB = 20  # document d uses tokens 1 + 20 d ... 20 + 20 d only


class FakeEncoder:
    """A deterministic position-weighted projection of chunk tokens, unit norm: ChunkEncoder's interface, fast."""

    dimension = 16
    fingerprint = "fake:proj16"

    def __init__(self, vocab: int = 256):
        self.table = np.random.default_rng(0).standard_normal((vocab, self.dimension)).astype(np.float32)

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        weights = 1 + 0.25 * np.arange(chunks.shape[1], dtype=np.float32)  # (L,)
        x = (self.table[chunks] * weights[None, :, None]).sum(1)  # (n, dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(LMConfig.tiny(vocab_size=64, max_len=64)).eval()


def random_store(directory, lengths, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    docs = [(f"doc{i}", rng.integers(1, vocab, n).tolist()) for i, n in enumerate(lengths)]
    return write_token_store(directory, docs, EOS, "test:tokenizer")


@pytest.fixture(scope="module")
def retro_store(tmp_path_factory):
    """Documents with disjoint vocabularies whose text repeats inside them; one is shorter than a chunk,
    so a chunk spans three documents; the stream does not end on a chunk boundary."""
    rng = np.random.default_rng(1)
    docs = []
    for d, (pattern, repeats) in enumerate([(5, 2), (13, 1), (1, 1), (6, 3), (9, 2), (5, 3)]):
        text = rng.integers(1 + DOC_VOCAB * d, 1 + DOC_VOCAB * (d + 1), pattern).tolist() * repeats
        docs.append((f"doc{d}", text))
    store = write_token_store(tmp_path_factory.mktemp("retro-store"), docs, EOS, "test:tokenizer")
    assert len(store) % L
    return store


# ------------------------------------------------------------------------------------------ kNN-LM


@pytest.mark.parametrize("n,context_len,stride", [(1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 3),
                                                   (50, 8, 8), (50, 8, 1), (33, 16, 5)])
def test_knn_windows_tile_the_stream_with_enough_context(n, context_len, stride):
    kept = []
    for start, lo, hi in knn_windows(n, context_len, stride):
        assert 0 <= start <= lo < hi <= n and hi - start == min(n, context_len)
        kept.extend(range(lo, hi))
        assert all(p - start >= min(p, context_len - stride) for p in range(lo, hi))
    assert kept == list(range(n))


def test_knnlm_keys_equal_cache_free_forwards(lm, tmp_path):
    store = random_store(tmp_path / "store", [60, 45, 50])  # 158 tokens, 157 rows
    W, S = 32, 8
    info = encode_knnlm(lm, store, tmp_path / "src", context_len=W, stride=S, batch_size=3, progress=False)
    keys, values = np.load(tmp_path / "src" / "keys.npy"), np.load(tmp_path / "src" / "values.npy")
    n = len(store) - 1
    assert keys.shape == (n, 32) and keys.dtype == np.float32 and values.dtype == np.int32 and info.rows == n
    np.testing.assert_array_equal(values, store.tokens[1:])
    window_of = {p: start for start, lo, hi in knn_windows(n, W, S) for p in range(lo, hi)}
    for p in [0, 1, W - 2, W - 1, W, W + S - 1, W + S, W + S + 1, 100, n - 2, n - 1]:
        start = window_of[p]
        assert p - start >= min(p, W - S)
        with torch.no_grad():
            _, ref = lm(torch.from_numpy(np.asarray(store.tokens[start:p + 1], dtype=np.int64))[None], return_keys=True)
        np.testing.assert_allclose(keys[p], ref[0, -1].numpy(), rtol=1e-5, atol=1e-5, err_msg=f"position {p}")


class KeysOnly(torch.nn.Module):
    """An adapter-like model: the forward interface only, no `.config`."""

    def __init__(self, inner: TransformerLM):
        super().__init__()
        self.inner = inner

    def forward(self, tokens, cache=None, return_keys=False):
        return self.inner(tokens, cache, return_keys)


def test_short_stream_is_one_forward_and_source_json(lm, tmp_path):
    store = random_store(tmp_path / "store", [20, 9])
    info = encode_knnlm(KeysOnly(lm), store, tmp_path / "src", context_len=64, stride=16, progress=False)
    with torch.no_grad():
        _, ref = lm(torch.from_numpy(np.asarray(store.tokens[:-1], dtype=np.int64))[None], return_keys=True)
    np.testing.assert_allclose(np.load(info.keys_path), ref[0].numpy(), rtol=1e-5, atol=1e-6)
    body = json.loads((tmp_path / "src" / "source.json").read_text())
    assert body["kind"] == "knnlm" and body["rows"] == len(store) - 1 and body["dimension"] == 32
    assert body["tokenizer_fingerprint"] == "test:tokenizer"
    assert body["details"]["context_len"] == 64 and body["details"]["stride"] == 16
    assert read_source(tmp_path / "src") == info
    assert info.encoder_fingerprint == model_fingerprint(KeysOnly(lm)) != model_fingerprint(lm)


def test_knnlm_rejects_bad_windows(lm, tmp_path):
    store = random_store(tmp_path / "store", [20])
    with pytest.raises(ValueError, match="max_len"):
        encode_knnlm(lm, store, tmp_path / "a", context_len=65, progress=False)
    with pytest.raises(ValueError, match="stride"):
        encode_knnlm(lm, store, tmp_path / "b", context_len=16, stride=0, progress=False)
    with pytest.raises(FileNotFoundError, match="no source.json"):
        read_source(tmp_path / "b")


def test_knn_exclusions_equal_brute_force(tmp_path):
    store = random_store(tmp_path / "store", [5, 1, 8, 3])
    n, doc = len(store) - 1, np.asarray(store.doc_ids)
    for p, (lo, hi) in enumerate(knn_exclusions(store)):
        # row j touches document d when its token or its value (the next token) is in d
        expect = {j for j in range(n) if doc[p] in (doc[j], doc[j + 1])}
        assert set(range(lo, hi)) == expect, f"position {p}"


# ------------------------------------------------------------------------------------------ RETRO


def test_retro_payload_is_chunk_and_continuation(retro_store, tmp_path):
    encoder = FakeEncoder()
    info = encode_retro(retro_store, encoder, L, tmp_path / "src", progress=False, batch=3)
    C = len(retro_store) // L
    keys, payload = np.load(tmp_path / "src" / "keys.npy"), np.load(tmp_path / "src" / "tokens.npy")
    assert info.rows == C and keys.shape == (C, 16) and payload.shape == (C, 2 * L) and payload.dtype == np.int32
    stream = np.asarray(retro_store.tokens)
    padded = np.concatenate([stream, np.full(2 * L, EOS)])
    for c in range(C):
        np.testing.assert_array_equal(payload[c], padded[c * L:c * L + 2 * L])
    tail = len(stream) - (C - 1) * L  # real tokens in the last row; the rest is EOS padding
    assert tail < 2 * L and (payload[-1, tail:] == EOS).all()
    chunks = stream[:C * L].reshape(C, L)
    np.testing.assert_array_equal(keys, encoder.embed(chunks))
    np.testing.assert_array_equal(embed_chunks(retro_store, encoder, L, progress=False), keys)
    assert (info.kind, info.chunk_len, info.encoder_fingerprint) == ("retro", L, "fake:proj16")


class Interrupted(FakeEncoder):
    """FakeEncoder that is stopped (Ctrl-C) after `batches` batches."""

    def __init__(self, batches: int):
        super().__init__()
        self.left = batches

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return super().embed(chunks)


def test_split_keys_are_written_whole_or_not_at_all_and_say_what_made_them(retro_store, tmp_path):
    """An interrupted embedding leaves no keys file (a rerun would take a zero-filled one as done); a
    whole one carries the record of its chunks and encoder, which other data or another encoder fails."""
    out, record = tmp_path / "heldout-keys.npy", keys_record(retro_store, L, FakeEncoder.fingerprint)
    with pytest.raises(KeyboardInterrupt):
        embed_chunks(retro_store, Interrupted(batches=2), L, out, batch=3, progress=False, record=record)
    assert not out.exists() and list(tmp_path.iterdir()) == [] and not keys_made_from(out, record)
    keys = embed_chunks(retro_store, FakeEncoder(), L, out, batch=3, progress=False, record=record)
    C = len(retro_store) // L
    np.testing.assert_array_equal(keys, FakeEncoder().embed(np.asarray(retro_store.tokens[:C * L]).reshape(C, L)))
    assert keys_made_from(out, record)
    assert not keys_made_from(out, keys_record(retro_store, L, "another:encoder"))
    assert not keys_made_from(out, keys_record(retro_store, 2 * L, FakeEncoder.fingerprint))
    other = random_store(tmp_path / "other", [len(retro_store)], seed=3)  # as many tokens, other ones
    assert not keys_made_from(out, keys_record(other, L, FakeEncoder.fingerprint))
    with pytest.raises(KeyboardInterrupt):  # a second run stopped: the first one's file and record stay
        embed_chunks(retro_store, Interrupted(batches=1), L, out, batch=3, progress=False, record=record)
    np.testing.assert_array_equal(np.load(out), keys)
    assert keys_made_from(out, record) and sorted(p.name for p in tmp_path.iterdir()) == [
        "heldout-keys.json", "heldout-keys.npy", "other"]


def test_retro_keys_with_the_real_chunk_encoder(tmp_path):
    from lm_worker.data.tokenizer import train_tokenizer
    from lm_worker.encoders.minilm_chunks import ChunkEncoder

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"
    tokenizer = train_tokenizer([text * 30], vocab_size=300)
    store = write_token_store(tmp_path / "store", [("a", tokenizer.encode(text * 6))], tokenizer.eos_id,
                              tokenizer.fingerprint)
    chunk_len = len(store) // 20
    encoder = ChunkEncoder(tokenizer)
    info = encode_retro(store, encoder, chunk_len, tmp_path / "src", progress=False, batch=7)
    keys = np.load(info.keys_path)
    chunks = np.asarray(store.tokens[:20 * chunk_len]).reshape(20, chunk_len)
    np.testing.assert_allclose(keys, encoder.embed(chunks), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1, atol=1e-5)
    assert info.encoder_fingerprint == encoder.fingerprint and info.tokenizer_fingerprint == tokenizer.fingerprint


@pytest.mark.parametrize("window", [L, 2 * L, 5 * L])
def test_chunk_exclusions_equal_brute_force(retro_store, window):
    """Chunk c's neighbours reach, through the self-attention after the chunked cross-attention, every
    later position of a window holding c: every document that such a window predicts is left out."""
    C, doc = len(retro_store) // L, np.asarray(retro_store.doc_ids)
    ranges = chunk_exclusions(retro_store, L, window)
    assert len(ranges) == C
    assert max(len(set(doc[c * L:(c + 1) * L])) for c in range(C)) == 3  # a chunk spans three documents
    reach = max(window, 2 * L - 1)  # at least chunk c + 1, which its neighbours predict in any window
    spans = [set(doc[c * L:c * L + reach + 1]) for c in range(C)]  # chunk c's tokens and those it helps predict
    if window == 5 * L:  # a window of five chunks reaches documents that chunk c + 1 does not hold
        assert any(spans[c] > set(doc[c * L:(c + 2) * L]) for c in range(C))
    for c, (lo, hi) in enumerate(ranges):
        # row r is excluded when its payload (chunk + continuation) holds a token of a document of those
        expect = {r for r in range(C) if spans[c] & set(doc[r * L:r * L + 2 * L])}
        assert set(range(lo, hi)) == expect, f"chunk {c}"


# ------------------------------------------------------------------------------------------ build + neighbours


@pytest.fixture(scope="module")
def retro_datastore(ray_cluster, retro_store, tmp_path_factory):
    src = tmp_path_factory.mktemp("retro-src")
    encode_retro(retro_store, FakeEncoder(), L, src, progress=False)
    return src, build_source(src, src.parent / "retro-ds", shards=2, factory="IVF1,Flat", progress=False)  # exact


@pytest.mark.ray
def test_build_source_manifests(retro_datastore, lm, tmp_path):
    src, ds = retro_datastore
    manifest = read_manifest(ds)
    assert manifest.ntotal == read_source(src).rows and len(manifest.shards) == 2 and manifest.has_keys
    assert [(p.name, p.row_shape) for p in manifest.payloads] == [("tokens", (2 * L,))]
    assert manifest.metadata == {"kind": "retro", "tokenizer": "test:tokenizer", "encoder": "fake:proj16",
                                 "chunk_len": str(L)}
    store = random_store(tmp_path / "store", [200, 150])
    info = encode_knnlm(lm, store, tmp_path / "knn-src", context_len=32, stride=16, progress=False)
    knn = read_manifest(build_source(tmp_path / "knn-src", tmp_path / "knn-ds", factory="IVF4,Flat", progress=False))
    assert knn.ntotal == len(store) - 1 and knn.factory == "IVF4,Flat" and knn.dimension == 32
    assert [(p.name, p.row_shape) for p in knn.payloads] == [("values", ())]
    assert knn.metadata == {"kind": "knnlm", "tokenizer": "test:tokenizer", "encoder": info.encoder_fingerprint,
                            "context_len": "32"}


def brute_force_distances(keys: np.ndarray, queries: np.ndarray, ranges) -> np.ndarray:
    """(n, K) squared L2 distances of each query's K nearest rows outside its excluded range, in float64."""
    d = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)  # (n, C)
    for q, r in enumerate(ranges or []):
        if r is not None:
            d[q, r[0]:r[1]] = np.inf
    return np.sort(d, axis=1)[:, :K]


def check_neighbours(found: np.ndarray, src, store, exclude) -> None:
    """Found neighbours are real rows outside the exclusion, as near as brute-force Flat search finds."""
    keys, payload = np.load(src / "keys.npy"), np.load(src / "tokens.npy")
    C = len(keys)
    assert found.shape == (C, K, 2 * L) and found.dtype == np.int32
    encoder = FakeEncoder()
    got = ((encoder.embed(found[:, :, :L].reshape(-1, L)).reshape(C, K, -1).astype(np.float64)
            - keys[:, None].astype(np.float64)) ** 2).sum(-1)  # (C, K) distances of the found chunks
    np.testing.assert_allclose(np.sort(got, axis=1), brute_force_distances(keys, keys, exclude), atol=1e-5)
    for c in range(C):
        for row in found[c]:
            rows = set(np.flatnonzero((payload == row).all(axis=1)))
            allowed = rows - (set(range(*exclude[c])) if exclude else set())
            assert allowed, f"chunk {c}: neighbour {row} is no row outside the exclusion"


def own_document_tokens(store, c: int) -> set[int]:
    docs = set(np.asarray(store.doc_ids[c * L:(c + 1) * L]).tolist())
    return {t for d in docs for t in range(1 + DOC_VOCAB * d, 1 + DOC_VOCAB * (d + 1))}


@pytest.mark.ray
@pytest.mark.parametrize("via", ["in-process", "service"])
def test_precompute_neighbours_exclude_own_document(retro_datastore, retro_store, aio, tmp_path, via):
    src, ds = retro_datastore
    queries = np.load(src / "keys.npy")
    exclude = chunk_exclusions(retro_store, L, 2 * L)
    config = RetrievalConfig(k=K)
    with contextlib.ExitStack() as stack:
        if via == "service":
            retriever = ServiceRetriever(stack.enter_context(serve(aio, ds, n_shards=2)).address, config)
        else:
            retriever = InProcessRetriever(ds, config)
        with retriever:
            path = precompute_neighbours(retriever, queries, exclude, tmp_path / "n.npy", batch=5, progress=False)
            found = np.load(path)
            check_neighbours(found, src, retro_store, exclude)
            for c in range(len(queries)):
                assert not own_document_tokens(retro_store, c) & set(found[c].ravel().tolist()), f"chunk {c}"
            free = np.load(precompute_neighbours(retriever, queries, None, tmp_path / "free.npy", progress=False))
            check_neighbours(free, src, retro_store, None)
            own = np.asarray(retro_store.tokens[:len(queries) * L]).reshape(-1, L)
            np.testing.assert_array_equal(free[:, 0, :L], own)  # without exclusions, a chunk finds itself first
            with pytest.raises(ValueError, match="fewer than k"):
                precompute_neighbours(retriever, queries, [(0, len(queries) - 2)] * len(queries),
                                      tmp_path / "x.npy", progress=False)
            fetch, calls = retriever.submit_chunks, []

            def stopped(*args):  # the second batch's request never answers: Ctrl-C
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return fetch(*args)

            retriever.submit_chunks = stopped
            with pytest.raises(KeyboardInterrupt):
                precompute_neighbours(retriever, queries, None, tmp_path / "free.npy", batch=5, progress=False)
            np.testing.assert_array_equal(np.load(tmp_path / "free.npy"), free)  # what was there, whole
            assert sorted(p.name for p in tmp_path.iterdir()) == ["free.npy", "n.npy"]


def test_a_models_fingerprint_is_remembered_until_its_weights_change():
    torch.manual_seed(0)
    model = TransformerLM(LMConfig.tiny(vocab_size=64))
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # in place, as an optimizer step
    changed = model_fingerprint(model)
    assert changed != first
    torch.manual_seed(0)
    model.load_state_dict(TransformerLM(LMConfig.tiny(vocab_size=64)).state_dict())  # the first weights again
    assert model_fingerprint(model) == first
    weight = next(model.parameters())
    weight.data = weight.data + 1.0  # a new tensor, its version counter at 0 again
    assigned = model_fingerprint(model)
    assert assigned != first
    model.double()  # a cast: the same values, other bytes
    assert model_fingerprint(model) not in (first, assigned)
    for _ in range(20):  # two new tensors between fingerprints: the second may take the first's freed memory
        weight.data = weight.data + 1.0
        weight.data = weight.data + 1.0
        assert model_fingerprint(model) == model_fingerprint(copy.deepcopy(model))  # the copy is hashed afresh
