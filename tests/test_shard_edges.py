"""Shard server edges over real gRPC on 127.0.0.1: a shard with no rows answers as one whose neighbours
are all missing (payloads, keys, successors and exact re-ranking included), and a draining server
refuses GetInfo as it refuses Search, so routers and clients count it as down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import faiss
import grpc
import numpy as np
import pytest
from conftest import serve

from retriever_server.datastore import index as ix
from retriever_server.datastore.manifest import (
    Manifest,
    PayloadSpec,
    ShardEntry,
    describe_files,
    shard_name,
    write_manifest,
)
from retriever_server.serving.client import RetrieverClient, RetrieverError
from retriever_server.serving.grpc_setup import health_status
from retriever_server.serving.shard_server import ShardServerConfig, start_shard_server

D = 4
ROWS = 3
BOUNDS = (0, 0, 1, 2, 3)  # 4 shards over 3 rows: shard 0 holds none, the others one each


def hand_built(out: Path, metric: str) -> tuple[Path, np.ndarray]:
    """A datastore written without the build job (which refuses more shards than rows): IDMap,Flat
    shards over BOUNDS, keys stored, and an int64 payload "values" of 10 x the row's id."""
    keys = np.random.default_rng(0).standard_normal((ROWS, D)).astype(np.float32)
    values = np.arange(ROWS, dtype=np.int64) * 10 + 7
    base = faiss.index_factory(D, "IDMap,Flat", ix.METRICS[metric])
    entries = []
    for s, (lo, hi) in enumerate(zip(BOUNDS, BOUNDS[1:])):
        directory = out / shard_name(s)
        directory.mkdir(parents=True)
        index = faiss.clone_index(base)
        index.add_with_ids(keys[lo:hi], np.arange(lo, hi, dtype=np.int64))
        faiss.write_index(index, str(directory / "index.faiss"))
        np.save(directory / "keys.npy", keys[lo:hi].astype(np.float16))
        np.save(directory / "payload.values.npy", values[lo:hi])
        entries.append(ShardEntry(shard_name(s), lo, hi, describe_files(directory)))
    write_manifest(out, Manifest(dimension=D, metric=metric, factory="IDMap,Flat", ntotal=ROWS, nlist=0,
                                 default_nprobe=1, has_keys=True, payloads=(PayloadSpec("values", "<i8", ()),),
                                 shards=tuple(entries)))
    return out, keys


def ask(address: str, queries: np.ndarray, **kwargs):
    with RetrieverClient(address, timeout=10) as client:
        return client.search(queries, k=2, payloads=["values"], return_keys=True, successors=1, **kwargs)


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
@pytest.mark.parametrize("rerank", [False, True], ids=["faiss", "exact_rerank"])
def test_a_shard_with_no_rows_answers_as_missing_neighbours(aio, tmp_path, metric, rerank):
    """A shard whose id_end equals its id_start (a datastore built elsewhere) answered INTERNAL (IndexError)
    when asked for payloads, keys or re-ranking: it read row 0 for every missing neighbour. Its answer is
    now what a shard with rows gives for a neighbour it lacks (k past its one row)."""
    datastore, keys = hand_built(tmp_path / "ds", metric)
    queries = keys[:2] + 0.01
    with serve(aio, datastore, len(BOUNDS) - 1) as served:
        empty = ask(served.shards[0][0].address, queries, exact_rerank=rerank)
        one_row = ask(served.shards[1][0].address, queries, exact_rerank=rerank)
        whole = ask(served.address, queries, exact_rerank=rerank)  # the router over every shard
    assert (one_row.ids[:, 0] == 0).all() and (one_row.ids[:, 1] == -1).all()
    missing = np.s_[:, [1, 1]]  # the one-row shard's missing neighbour, in both places
    np.testing.assert_array_equal(empty.ids, one_row.ids[missing])
    np.testing.assert_array_equal(empty.distances, one_row.distances[missing])
    assert (empty.distances == (np.inf if metric == "l2" else -np.inf)).all()
    np.testing.assert_array_equal(empty.payloads["values"], one_row.payloads["values"][missing])
    np.testing.assert_array_equal(empty.keys, one_row.keys[missing])
    np.testing.assert_array_equal(empty.successor_ids, one_row.successor_ids[missing])
    np.testing.assert_array_equal(empty.successor_payloads["values"], one_row.successor_payloads["values"][missing])
    np.testing.assert_array_equal(empty.successor_keys, one_row.successor_keys[missing])
    assert (whole.ids >= 0).all() and not whole.partial
    np.testing.assert_array_equal(whole.payloads["values"], whole.ids * 10 + 7)


def drained_meanwhile(aio, running, delay: float):
    """Starts `running`'s drain (refusing for `delay` s before its port closes); returns the future."""
    drain = asyncio.run_coroutine_threadsafe(running.drain(grace=0, delay=delay), aio.loop)
    deadline = time.monotonic() + 2
    while not running.service.draining and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.service.draining
    return drain


def refusal(call) -> RetrieverError:
    with pytest.raises(RetrieverError) as caught:
        call()
    return caught.value


def test_a_draining_server_refuses_getinfo_as_it_refuses_search(aio, tmp_path):
    """GetInfo answered OK during the drain delay while Search was refused UNAVAILABLE: a router's discovery
    counted the draining replica as up, and replace_replica took it. Both are refused now, the same way;
    health stays NOT_SERVING; a router refuses a draining replica as a replacement."""
    datastore, keys = hand_built(tmp_path / "ds", "l2")
    with serve(aio, datastore, len(BOUNDS) - 1) as served:
        leaving = aio.run(start_shard_server(ShardServerConfig(datastore, 1, replica=1, metrics_port=None)))
        drain = drained_meanwhile(aio, leaving, delay=2.0)
        try:
            with RetrieverClient(leaving.address, timeout=5) as client:
                searched = refusal(lambda: client.search(keys[:1], k=1))
                described = refusal(client.info)
            assert searched.code == described.code == grpc.StatusCode.UNAVAILABLE
            assert described.message == searched.message == "shard is draining (shutting down)"
            assert health_status(leaving.address) == "NOT_SERVING"
            router = served.router.service
            before = list(router.sets[1].addresses)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                aio.run(router.replace_replica(1, 0, leaving.address, timeout_s=2))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert router.sets[1].addresses == before
        finally:
            drain.result(10)
        drain = drained_meanwhile(aio, served.router, delay=1.0)
        try:
            with RetrieverClient(served.address, timeout=5) as client:
                described = refusal(client.info)
            assert (described.code, described.message) == (grpc.StatusCode.UNAVAILABLE,
                                                           "router is draining (shutting down)")
        finally:
            drain.result(10)
