"""A shard whose Search answer does not read (a tensor shorter than its shape, bytes cut short) or is not
what its request asks for (k - 1 neighbours a query, float64 distances, uint8 keys, partial unasked) fails
that attempt with INTERNAL, on blocking and on asyncio channels alike: the router moves on to the next
replica, or names the shard; the fan-out client raises RetrieverError. Never an answer silently short
of a shard's neighbours. Fake shard servers (the fault), a real router and a real client."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.serving.client import RetrieverClient, RetrieverError
from retriever_server.serving.router import RouterConfig, start_router
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.response_reader import IN_PLACE_BYTES
from retriever_server.wire.result import AnswerShape, SearchResult
from retriever_server.wire.tensors import TensorError, fill_tensor

ROWS, DIM, NQ, K = 1000, 8, 64, 64  # an answer of 64 x 64 neighbours: read in place
FAULTS = ["short tensor", "cut short", "short k", "float64 distances", "uint8 keys", "forged partial"]


def info(shard: int) -> pb.InfoResponse:
    name = f"shard-{shard:05d}"
    half = ROWS // 2
    return pb.InfoResponse(dimension=DIM, metric="l2", ntotal=half, shard=name, datastore_version="v1", role="shard",
                           num_shards=2, datastore_ntotal=ROWS, nlist=8, default_nprobe=4, max_k=2048,
                           max_batch=16384, max_request_bytes=(256 << 20) + (1 << 20),
                           shards=[pb.ShardInfo(name=name, id_start=shard * half, id_end=(shard + 1) * half)])


def good_answer(shard: int, nq: int, k: int) -> bytes:
    ids = shard * (ROWS // 2) + np.tile(np.arange(k, dtype=np.int64), (nq, 1))  # (nq, k)
    distances = np.tile(np.arange(k, dtype=np.float32), (nq, 1)) + 0.5 * shard  # (nq, k), ranked
    return encode_search_response(SearchResult(ids, distances, datastore_version="v1"))


def bad_answer(fault: str, nq: int, k: int) -> bytes:
    if fault == "short tensor":
        return pb.SearchResponse(ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[nq, k], data=bytes(8 * nq * k - 8)),
                                 distances=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[nq, k], data=bytes(4 * nq * k)),
                                 datastore_version="v1").SerializeToString()
    if fault == "forged partial":  # a whole answer that says a shard failed, in words of its own
        answer = pb.SearchResponse.FromString(good_answer(1, nq, k))
        answer.partial = True
        answer.failed_shards.add(shard="shard-00000\x1b[2J", reason="down\nFORGED")
        return answer.SerializeToString()
    if fault == "short k":  # arrays that agree, one neighbour short of the k asked for
        return good_answer(1, nq, k - 1)
    answer = pb.SearchResponse.FromString(good_answer(1, nq, k))
    if fault == "float64 distances":
        fill_tensor(answer.distances, np.zeros((nq, k), dtype=np.float64))
    elif fault == "uint8 keys":  # never asked for, and 4x their bytes once widened to float32
        fill_tensor(answer.keys, np.zeros((nq, k, DIM), dtype=np.uint8))
    else:
        return good_answer(1, nq, k)[:-3]  # bytes that do not parse
    return answer.SerializeToString()


@contextlib.contextmanager
def fake_shard(aio, shard: int, fault: str | None) -> Iterator[tuple[str, list[int]]]:
    """A shard server answering GetInfo as shard `shard` and Search well, or with `fault`; yields its
    address and the list its Search calls are counted in."""
    calls: list[int] = []

    async def search(raw: bytes, context) -> bytes:
        request = pb.SearchRequest.FromString(raw)
        calls.append(request.k)
        nq = request.queries.shape[0]
        return bad_answer(fault, nq, request.k) if fault else good_answer(shard, nq, request.k)

    async def get_info(raw: bytes, context) -> bytes:
        return info(shard).SerializeToString()

    async def start():
        server = grpc.aio.server()
        handlers = {"Search": grpc.unary_unary_rpc_method_handler(search),
                    "GetInfo": grpc.unary_unary_rpc_method_handler(get_info)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("retrieval.v1.Retriever", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = aio.run(start())
    try:
        yield f"127.0.0.1:{port}", calls
    finally:
        aio.run(server.stop(0))


@contextlib.contextmanager
def router(aio, shards: tuple[tuple[str, ...], ...]) -> Iterator[str]:
    running = aio.run(start_router(RouterConfig(shards=shards, metrics_port=None)))
    try:
        yield running.address
    finally:
        aio.run(running.drain(grace=0))


def queries() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((NQ, DIM)).astype(np.float32)  # (NQ, DIM)


def test_the_answers_are_read_in_place():
    assert all(len(bad_answer(fault, NQ, K)) >= IN_PLACE_BYTES for fault in FAULTS)
    assert len(good_answer(0, NQ, K)) >= IN_PLACE_BYTES


def test_an_answer_holds_what_its_request_asks_for_and_nothing_else():
    """AnswerShape.of a request checks payloads, keys and successors too, naming the field."""
    nq, k, n, d = 3, 4, 2, 5
    request = pb.SearchRequest(k=k, payloads=["values", "values"], return_keys=True, successors=n)
    fill_tensor(request.queries, np.zeros((nq, d), dtype=np.float32))
    expect = AnswerShape.of(request)
    assert expect == AnswerShape(nq, k, ("values",), True, n, partial=False)

    def answer(**changed) -> SearchResult:
        parts = dict(ids=np.zeros((nq, k), np.int64), distances=np.zeros((nq, k), np.float32),
                     payloads={"values": np.zeros((nq, k), np.int32)}, keys=np.zeros((nq, k, d), np.float32),
                     successor_ids=np.zeros((nq, k, n), np.int64),
                     successor_payloads={"values": np.zeros((nq, k, n), np.int32)},
                     successor_keys=np.zeros((nq, k, n, d), np.float32))
        return SearchResult(**{**parts, **changed})

    good = answer()
    assert expect.check(good) is good
    faults = {
        "ids.shape is [3, 3], expected [3, 4] alone": answer(ids=np.zeros((nq, k - 1), np.int64)),
        "ids.dtype is int32, expected int64": answer(ids=np.zeros((nq, k), np.int32)),
        "payloads holds 0 not asked for and lacks ['values']": answer(payloads={}),
        "payloads holds 1 not asked for": answer(payloads={"values": np.zeros((nq, k), np.int32),
                                                           "tokens": np.zeros((nq, k, 8), np.int32)}),
        "payloads[values].shape is [4, 3], expected [3, 4]": answer(payloads={"values": np.zeros((k, nq), np.int32)}),
        "keys are missing": answer(keys=None, successor_keys=None),
        "keys.shape is [3, 4], expected [3, 4] and 1 more": answer(keys=np.zeros((nq, k), np.float32)),
        "successor_ids are missing": answer(successor_ids=None),
        "successor_ids.shape is [3, 4, 3], expected [3, 4, 2] alone": answer(successor_ids=np.zeros((nq, k, 3),
                                                                                                    np.int64)),
        "the answer is partial, but its request did not allow one (allow_partial)": answer(partial=True),
        "successor_keys.shape [3, 4, 2, 6] is not as wide as keys.shape [3, 4, 5]":
            answer(successor_keys=np.zeros((nq, k, n, d + 1), np.float32)),
    }
    for words, result in faults.items():
        with pytest.raises(TensorError) as caught:
            expect.check(result)
        assert str(caught.value) == words
    bare = AnswerShape(nq, k)
    with pytest.raises(TensorError, match="keys were not asked for"):
        bare.check(answer(payloads={}, successor_ids=None, successor_payloads={}, successor_keys=None))
    with pytest.raises(TensorError, match="successor_ids were not asked for"):
        bare.check(answer(payloads={}, keys=None, successor_payloads={}, successor_keys=None))


@pytest.mark.parametrize("fault", FAULTS)
def test_the_router_moves_on_from_a_replica_whose_answer_does_not_read(aio, fault):
    with fake_shard(aio, 0, None) as (zero, _), fake_shard(aio, 1, fault) as (bad, bad_calls), \
            fake_shard(aio, 1, None) as (good, _), router(aio, ((zero,), (bad, good))) as address, \
            RetrieverClient(address, timeout=10) as client:
        for _ in range(4):
            result = client.search(queries(), k=K)
            assert not result.partial and set(np.unique(result.ids // (ROWS // 2))) == {0, 1}  # both shards
            expected = np.sort(np.concatenate([np.arange(K), np.arange(K) + 0.5]))[:K]
            assert np.array_equal(result.distances, np.tile(expected.astype(np.float32), (NQ, 1)))
    assert bad_calls, "the replica with the unreadable answer was never tried"


@pytest.mark.parametrize("fault", FAULTS)
def test_the_router_names_a_shard_whose_only_answer_does_not_read(aio, fault):
    with fake_shard(aio, 0, None) as (zero, _), fake_shard(aio, 1, fault) as (bad, _), \
            router(aio, ((zero,), (bad,))) as address, RetrieverClient(address, timeout=10) as client:
        with pytest.raises(RetrieverError) as caught:
            client.search(queries(), k=K)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shard-00001" in caught.value.message and "does not read" in caught.value.message
        result = client.search(queries(), k=K, allow_partial=True)
        assert result.partial and list(result.failed_shards) == ["shard-00001"]
        assert set(np.unique(result.ids // (ROWS // 2))) == {0}


@pytest.mark.parametrize("fault", FAULTS)
def test_the_fan_out_client_fails_on_a_shard_whose_answer_does_not_read(aio, fault):
    with fake_shard(aio, 0, None) as (zero, _), fake_shard(aio, 1, fault) as (bad, bad_calls), \
            RetrieverClient([zero, bad], timeout=10) as client:
        with pytest.raises(RetrieverError) as caught:
            client.search(queries(), k=K)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "does not read" in caught.value.message
        assert bad_calls


@pytest.mark.parametrize("fault", FAULTS)
def test_a_client_of_one_address_gets_internal(aio, fault):
    with fake_shard(aio, 1, fault) as (bad, _), RetrieverClient(bad, timeout=10) as client:
        with pytest.raises(RetrieverError) as caught:
            client.search(queries(), k=K)
        assert caught.value.code == grpc.StatusCode.INTERNAL and "does not read" in caught.value.message


@pytest.mark.parametrize("field, value, words", [
    ("shard", "shard-00000\n2026-12-07 INFO FORGED\x1b[2K",
     "names its shard 'shard-00000\\n2026-12-07 INFO FORGED\\x1b[2K'"),
    ("role", "router\nFORGED", "answers as a 'router\\nFORGED', not a shard server"),
    ("datastore_version", "v1\x1b[31m", "reports datastore version 'v1\\x1b[31m'"),
])
def test_what_a_shard_says_of_itself_reaches_the_routers_refusal_escaped(field, value, words):
    """A shard's name, role and version (from its GetInfo answer) go into the router's refusal, which is
    logged and sent to callers: each escaped, on one line; a name other than a shard's own form refused."""
    from retriever_server.serving.fanout import check_shards

    first = info(0)
    setattr(first, field, value)
    if field == "shard":
        first.shards[0].name = value
    problem = check_shards([[first], [info(1)]])
    assert problem is not None and words in problem, problem
    assert "\n" not in problem and "\x1b" not in problem
    assert check_shards([[info(0)], [info(1)]]) is None


def test_search_shows_what_a_server_says_of_its_failed_shards_escaped(aio, tmp_path):
    """`search` printed a failed shard's name as the server gave it: terminal escapes reached the screen."""
    import subprocess
    import sys

    np.save(tmp_path / "q.npy", queries()[:2])
    with fake_shard(aio, 1, "forged partial") as (address, _):
        done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "search", address, "--queries",
                               str(tmp_path / "q.npy"), "-k", "4", "--allow-partial"], capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 0, done.stderr
    assert "partial answer: no neighbours from shard-00000\\x1b[2J (down\\nFORGED)" in done.stderr, done.stderr
    assert "\x1b" not in done.stderr
