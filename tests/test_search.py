"""Search through the router over real vectors: sharded equals unsharded, recall, re-ranking,
payloads, exclusions, and the client fanning out to shards itself."""

import faiss
import numpy as np
import pytest
from conftest import assert_same_neighbours, build, recall_at, serve, unsharded_reference

from retriever_server.datastore import index as ix
from retriever_server.serving.client import Exclude, RetrieverClient

pytestmark = [pytest.mark.ray, pytest.mark.real, pytest.mark.slow]  # real MiniLM keys: encoded once, ~80 s cold
N, Q = 3000, 200
FACTORY = "IVF64,PQ32"


@pytest.fixture(scope="module")
def real():
    from lm_worker.encoders.stdlib_vectors import stdlib_vectors

    return stdlib_vectors(N, Q)


@pytest.fixture(scope="module")
def datastores(ray_cluster, real, tmp_path_factory):
    """2- and 3-shard datastores, L2 and inner product, with keys and payloads."""
    tmp = tmp_path_factory.mktemp("search")
    payloads = {"tokens": np.asarray(real.tokens), "doc": np.asarray(real.doc_ids)}
    return {
        (metric, shards): build(tmp, np.asarray(real.keys), f"{metric}-{shards}", shards=shards, metric=metric,
                                factory=FACTORY, keep_keys=True, seed=1, payload_arrays=payloads)
        for metric in ("l2", "inner_product") for shards in (2, 3)
    }


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
@pytest.mark.parametrize("shards", [2, 3])
def test_router_equals_unsharded_index_with_the_same_codec(aio, real, datastores, metric, shards):
    datastore = datastores[(metric, shards)]
    reference = unsharded_reference(datastore, real.keys)
    queries = np.asarray(real.queries)
    with serve(aio, datastore, shards) as served, RetrieverClient(served.address) as client:
        for nprobe in (1, 8, 64):
            for k in (1, 10, 100):
                ref_d, ref_i = ix.search(reference, queries, k, nprobe)
                got = client.search(queries, k=k, nprobe=nprobe)
                assert got.ids.shape == (Q, k) and got.distances.dtype == np.float32
                assert_same_neighbours(got.ids, got.distances, ref_i, ref_d)
        if metric == "inner_product":
            assert np.all(np.diff(got.distances, axis=1) <= 0), "inner product must come largest first"
        else:
            assert np.all(np.diff(got.distances, axis=1) >= 0), "L2 must come smallest first"


def test_client_fan_out_equals_router(aio, real, datastores):
    queries = np.asarray(real.queries)
    with serve(aio, datastores[("l2", 3)], 3) as served:
        with RetrieverClient(served.address) as via_router, RetrieverClient(served.shard_addresses()) as fan_out:
            a = via_router.search(queries, k=20, nprobe=8, payloads=["doc"])
            b = fan_out.search(queries, k=20, nprobe=8, payloads=["doc"])
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.distances, b.distances)
            np.testing.assert_array_equal(a.payloads["doc"], b.payloads["doc"])
            assert fan_out.info().ntotal == N == via_router.info().ntotal


def test_recall_at_10_against_brute_force(aio, real, datastores):
    keys, queries = np.asarray(real.keys), np.asarray(real.queries)
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    _, truth = flat.search(queries, 10)
    recalls = {}
    with serve(aio, datastores[("l2", 2)], 2) as served, RetrieverClient(served.address) as client:
        for nprobe in (1, 4, 16, 64):
            plain = client.search(queries, k=10, nprobe=nprobe)
            reranked = client.search(queries, k=10, nprobe=nprobe, exact_rerank=True, rerank_candidates=100)
            recalls[nprobe] = (recall_at(plain.ids, truth, 10), recall_at(reranked.ids, truth, 10))
    print("recall@10 (plain, reranked) by nprobe:", recalls)
    plain_all, reranked_all = recalls[64]
    assert reranked_all >= 0.97, recalls  # every list probed: only re-ranking depth limits recall
    assert plain_all >= 0.5, recalls
    assert recalls[1][1] < recalls[16][1] <= recalls[64][1] + 1e-9
    assert all(r > p for p, r in recalls.values()), "exact re-ranking must raise recall"


def test_rerank_distances_and_keys_are_exact(aio, real, datastores):
    keys16 = np.asarray(real.keys).astype(np.float16)
    queries = np.asarray(real.queries)[:20]
    for metric in ("l2", "inner_product"):
        with serve(aio, datastores[(metric, 2)], 2) as served, RetrieverClient(served.address) as client:
            got = client.search(queries, k=10, nprobe=16, exact_rerank=True, rerank_candidates=50,
                                return_keys=True)
        stored = keys16[got.ids].astype(np.float64)  # (20, 10, d)
        q = queries.astype(np.float64)[:, None, :]
        exact = ((stored - q) ** 2).sum(-1) if metric == "l2" else (stored * q).sum(-1)
        np.testing.assert_allclose(got.distances, exact, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got.keys, keys16[got.ids].astype(np.float32))


def test_payloads_follow_their_neighbours(aio, real, datastores):
    with serve(aio, datastores[("l2", 3)], 3) as served, RetrieverClient(served.address) as client:
        got = client.search(np.asarray(real.queries), k=8, nprobe=8, payloads=["tokens", "doc"])
    assert got.payloads["tokens"].shape == (Q, 8, 64)
    np.testing.assert_array_equal(got.payloads["tokens"], np.asarray(real.tokens)[got.ids])
    np.testing.assert_array_equal(got.payloads["doc"], np.asarray(real.doc_ids)[got.ids])


@pytest.mark.parametrize("bitmap_bytes", [None, 0], ids=["bitmaps", "own-selectors"])
def test_exclusions_remove_own_document_and_match_filtered_search(aio, real, datastores, monkeypatch, bitmap_bytes):
    """Each datastore row as a query, excluding its own document: it never comes back. The same with each
    query's own selector instead of the bitmaps (a shard whose bitmaps would span too many ids)."""
    from retriever_server.serving import shard as shard_module

    if bitmap_bytes is not None:
        monkeypatch.setattr(shard_module, "MAX_BITMAP_BYTES", bitmap_bytes)
    keys, doc_ids = np.asarray(real.keys), np.asarray(real.doc_ids)
    rows = np.arange(0, N, 37)
    spans = {d: (int(np.flatnonzero(doc_ids == d)[0]), int(np.flatnonzero(doc_ids == d)[-1]) + 1)
             for d in np.unique(doc_ids[rows])}
    per_query = [Exclude(ranges=[spans[doc_ids[r]]], ids=[5]) for r in rows]
    datastore = datastores[("l2", 2)]
    reference = unsharded_reference(datastore, keys)
    with serve(aio, datastore, 2) as served, RetrieverClient(served.address) as client:
        got = client.search(keys[rows], k=10, nprobe=16, payloads=["doc"], exclude_per_query=per_query)
        unfiltered = client.search(keys[rows], k=10, nprobe=16, payloads=["doc"])
    assert np.mean(unfiltered.payloads["doc"][:, 0] == doc_ids[rows]) > 0.9  # without: finds itself
    assert not np.any(got.payloads["doc"] == doc_ids[rows][:, None])
    assert not np.any(got.ids == 5)
    for j, r in enumerate(rows[:10]):
        selector = ix.id_selector((5,), (spans[doc_ids[r]],))
        ref_d, ref_i = ix.search(reference, keys[r:r + 1], 10, 16, selector)
        assert_same_neighbours(got.ids[j:j + 1], got.distances[j:j + 1], ref_i, ref_d)


def test_float16_queries_match_float32(aio, real, datastores):
    queries = np.asarray(real.queries)[:50].astype(np.float16)
    with serve(aio, datastores[("l2", 2)], 2) as served, RetrieverClient(served.address) as client:
        half = client.search(queries, k=10, nprobe=8)
        full = client.search(queries.astype(np.float32), k=10, nprobe=8)
    np.testing.assert_array_equal(half.ids, full.ids)


def test_info_describes_the_datastore(aio, real, datastores):
    with serve(aio, datastores[("inner_product", 3)], 3) as served, RetrieverClient(served.address) as client:
        info = client.info()
        shard_info = RetrieverClient(served.shard_addresses()[1][0]).info()
    assert info.role == "router" and info.metric == "inner_product" and info.factory == FACTORY
    assert info.ntotal == N and info.dimension == 384 and info.nlist == 64 and info.has_keys
    assert [s.name for s in info.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert {p.name for p in info.payloads} == {"tokens", "doc"}
    assert shard_info.role == "shard" and shard_info.shard == "shard-00001"
    assert shard_info.datastore_version == info.datastore_version and len(info.datastore_checksum) == 64


def test_exclusions_with_rerank_through_router_and_fan_out(aio, real, datastores):
    keys, doc_ids = np.asarray(real.keys), np.asarray(real.doc_ids)
    rows = np.arange(0, N, 101)
    per_query = [Exclude(ids=np.flatnonzero(doc_ids == doc_ids[r]).tolist()) for r in rows]
    with serve(aio, datastores[("inner_product", 3)], 3) as served:
        with RetrieverClient(served.address) as router, RetrieverClient(served.shard_addresses()) as fan_out:
            results = [c.search(keys[rows], k=10, nprobe=16, exact_rerank=True, rerank_candidates=40, payloads=["doc"],
                                exclude_per_query=per_query) for c in (router, fan_out)]
    for got in results:
        assert not np.any(got.payloads["doc"] == doc_ids[rows][:, None])
        assert np.all(np.diff(got.distances, axis=1) <= 0)
    np.testing.assert_array_equal(results[0].ids, results[1].ids)


def test_reranking_in_chunks_equals_reranking_at_once(aio, real, datastores, monkeypatch):
    from retriever_server.serving import shard as shard_module

    queries = np.asarray(real.queries)[:64]
    with serve(aio, datastores[("l2", 2)], 2) as served, RetrieverClient(served.address) as client:
        whole = client.search(queries, k=10, nprobe=8, exact_rerank=True, rerank_candidates=50)
        monkeypatch.setattr(shard_module, "RERANK_CHUNK_ELEMENTS", 384 * 50 * 3)  # 3 queries a chunk
        chunked = client.search(queries, k=10, nprobe=8, exact_rerank=True, rerank_candidates=50)
    np.testing.assert_array_equal(whole.ids, chunked.ids)
    np.testing.assert_array_equal(whole.distances, chunked.distances)
