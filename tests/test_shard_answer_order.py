"""A shard's answer comes out of its search already in the order an answer takes (best first, ties by
id, missing neighbours last with an infinite distance), so the shard sends it without checking it
again: here every answer is checked against a full sort of itself, on keys that tie everywhere."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build

from retriever_server.serving.client import Exclude, make_request
from retriever_server.serving.merge import sort_neighbours
from retriever_server.serving.service import decode_search
from retriever_server.serving.shard import Shard, ShardOptions
from retriever_server.wire.request import Limits, parse_search

D = 8
CASES = [("IDMap,Flat", "ip"), ("IVF8,Flat", "l2"), ("IVF8,Flat", "ip"), ("IVF8,PQ4", "l2"), ("IVF8,PQ4x4fs", "l2"),
         ("IVF8,PQ4x4fs", "ip")]


def answers(shard: Shard, queries: np.ndarray, k: int, nprobe: int, exclude=None, exclude_per_query=None):
    request = make_request(queries, k, nprobe, exclude=exclude, exclude_per_query=exclude_per_query)
    limits = Limits()
    return shard.search(parse_search(decode_search(request.SerializeToString(), limits), shard.view(), limits))


def assert_in_answer_order(found, metric: str) -> None:
    order = sort_neighbours(found.ids, found.distances, metric)  # best first, ties by id, missing last
    np.testing.assert_array_equal(found.ids, np.take_along_axis(found.ids, order, axis=1))
    np.testing.assert_array_equal(found.distances, np.take_along_axis(found.distances, order, axis=1))
    missing = found.ids < 0
    assert (found.distances[missing] == (np.inf if metric == "l2" else -np.inf)).all()
    assert np.isfinite(found.distances[~missing]).all()


@pytest.mark.parametrize("factory,metric", CASES)
def test_every_answer_is_best_first_ties_by_id_missing_last(tmp_path, factory, metric):
    rng = np.random.default_rng(11)
    keys = np.repeat(rng.integers(-2, 3, (400, D)).astype(np.float32), 3, axis=0)  # every row three times
    datastore = build(tmp_path, keys, "ties", shards=2, factory=factory, metric=metric)
    queries = rng.integers(-2, 3, (40, D)).astype(np.float32)
    per_query = [Exclude(ids=[int(i)], ranges=[(3 * i, 3 * i + 2)]) for i in range(len(queries))]
    for number in (0, 1):
        shard = Shard.open(datastore, number, ShardOptions(verify=False))
        ntotal = shard.entry.ntotal
        for k, nprobe in ((1, 8), (7, 8), (40, 1), (ntotal + 5, 8)):  # nprobe 1 at k=40 and k past the shard:
            k, nprobe = min(k, 2048), min(nprobe, shard.manifest.nlist)  # some neighbours are missing
            cases = [{}, {"exclude": Exclude(ids=[3, 4, 700], ranges=[(10, 30)])}, {"exclude_per_query": per_query}]
            for exclusions in cases:
                found = answers(shard, queries, k, nprobe, **exclusions)
                assert found.ids.shape == (len(queries), k)
                assert_in_answer_order(found, metric)
        found = answers(shard, queries, ntotal + 5, min(8, shard.manifest.nlist))
        assert (found.ids < 0).any(axis=1).all()  # past the shard: the missing ones are there, and last


def test_a_flat_store_whose_rows_were_added_out_of_id_order_still_answers_ties_by_id(tmp_path):
    """A flat index orders a tie as its rows were added, by id only where they were added by id (as the build
    adds them): a shard's index written elsewhere, its rows added in another order, still answers by id."""
    import faiss

    rng = np.random.default_rng(12)
    keys = np.repeat(rng.integers(-2, 3, (200, D)).astype(np.float32), 3, axis=0)
    datastore = build(tmp_path, keys, "flat", shards=1, factory="IDMap,Flat")
    shuffled = rng.permutation(len(keys))
    index = faiss.IndexIDMap(faiss.IndexFlatL2(D))
    index.add_with_ids(keys[shuffled], shuffled.astype(np.int64))
    shard = Shard.open(datastore, 0, ShardOptions(verify=False))
    faiss.write_index(index, str(datastore / shard.entry.name / "index.faiss"))  # the same size: passes that check
    shard = Shard.open(datastore, 0, ShardOptions(verify=False))
    queries = rng.integers(-2, 3, (30, D)).astype(np.float32)
    found = answers(shard, queries, 10, 1)
    assert_in_answer_order(found, "l2")
    q64, k64 = queries.astype(np.float64), keys.astype(np.float64)
    truth = np.argsort(((q64[:, None, :] - k64[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found.ids, truth)
