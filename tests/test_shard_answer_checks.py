"""What a shard says is checked before it is trusted, at bounded cost: a tensor's shape (no more dimensions
than an array has, none past what numpy can make) is refused as a TensorError at once, whatever its length;
an answer's payload dtypes and row shapes and its keys' width are those its shards' GetInfo describes, so a
replica that answers otherwise fails over rather than being merged (cast, or crashing the merge); the
limits a router or a fan-out client reports are the least of its shards'; an `Exclude` id that no int64 holds
is refused naming the field. Fake shard servers, a real router and a real client."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.serving.client import RetrieverClient, RetrieverError
from retriever_server.serving.fanout import check_shards, combined_info, replica_sets, view_of
from retriever_server.serving.router import RouterConfig, forwarded_overrides, start_router
from retriever_server.wire.request import Limits
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.response_reader import IN_PLACE_BYTES, decode_search_response
from retriever_server.wire.result import AnswerShape, SearchResult
from retriever_server.wire.search_args import Exclude
from retriever_server.wire.tensors import MAX_DIMS, TensorError, checked_dtype, from_tensor, nbytes

ROWS, DIM, NQ, K = 1000, 4, 8, 4
HALF = ROWS // 2
VALUES = pb.PayloadInfo(name="values", dtype=pb.DTYPE_INT32)
TOKENS = pb.PayloadInfo(name="tokens", dtype=pb.DTYPE_INT32, row_shape=[3])
VERSION_BYTES = len(pb.SearchRequest(expected_datastore_version="v1").SerializeToString())  # a fan-out client adds


# --- tensors: bounded work, TensorError alone ---

def test_a_shape_of_thousands_of_dimensions_is_refused_at_once_as_a_tensor_error():
    """5000 dimensions of 2**62: the product took CPU quadratic in their number (3.4 s for 40000), then
    its digits passed Python's limit for a string (ValueError, not TensorError)."""
    raw = pb.SearchResponse(ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2 ** 62] * 5000)).SerializeToString()
    assert len(raw) >= IN_PLACE_BYTES  # the in-place reader refuses it, then the parser's path reads it
    with pytest.raises(TensorError) as caught:
        decode_search_response(raw)
    assert str(caught.value) == f"ids.shape has 5000 dimensions, over the {MAX_DIMS} an array may have"


def test_one_dimension_past_numpys_bound_is_refused_before_any_product():
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * (MAX_DIMS + 1), data=bytes(4))
    with pytest.raises(TensorError) as caught:
        from_tensor(tensor, "distances")
    assert str(caught.value) == f"distances.shape has {MAX_DIMS + 1} dimensions, over the {MAX_DIMS} an array may have"
    assert from_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * MAX_DIMS, data=bytes(4)), "d").ndim == MAX_DIMS


@pytest.mark.parametrize("shape, dtype, words", [
    ([0, 2 ** 62], pb.DTYPE_INT16, "ids.shape [0, 4611686018427387904] is too large for an array of int16"),
    ([0, 2 ** 63 - 1, 2], pb.DTYPE_INT8, "ids.shape [0, 9223372036854775807, 2] is too large for an array of int8"),
    ([2 ** 63 - 1] * MAX_DIMS, pb.DTYPE_INT64, "ids.shape [9223372036854775807, 9223372036854775807, "
     "9223372036854775807, 9223372036854775807, 9223372036854775807, 9223372036854775807, 9223372036854775807, "
     f"9223372036854775807, ...] ({MAX_DIMS} dimensions) is too large for an array of int64"),
    ([2, -1], pb.DTYPE_INT64, "ids.shape [2, -1] has a negative dimension"),
])
def test_a_shape_no_array_has_is_a_tensor_error_on_both_readers(shape, dtype, words):
    """numpy refused [0, 2**62] of int16 with its own ValueError ("array is too big"), after the size matched."""
    message = pb.SearchResponse(ids=pb.Tensor(dtype=dtype, shape=shape),
                                distances=pb.Tensor(dtype=pb.DTYPE_FLOAT32, data=bytes(IN_PLACE_BYTES)))
    for raw in (message.SerializeToString(), pb.SearchResponse(ids=message.ids).SerializeToString()):
        with pytest.raises(TensorError) as caught:
            decode_search_response(raw)
        assert str(caught.value) == words


def test_a_dimension_past_int64_is_a_tensor_error():
    with pytest.raises(TensorError, match="too large for an array of int8"):
        checked_dtype(pb.DTYPE_INT8, [0, 2 ** 64], 0, "x")
    with pytest.raises(TensorError, match="too large"):
        nbytes(np.int8, [2 ** 64])
    assert nbytes(np.int32, [0, 5]) == 0 and nbytes(np.int32, [2, 3]) == 24


def test_a_shards_row_shape_of_too_many_dimensions_is_refused():
    info = shard_info(0)
    info.payloads.add(name="values", dtype=pb.DTYPE_INT32, row_shape=[1] * 40000)
    with pytest.raises(TensorError, match="40000 dimensions"):
        view_of(info)
    problem = check_shards([[info], [shard_info(1)]])
    assert problem is not None and "payload 'values'" in problem and "40000 dimensions" in problem, problem


def test_shards_that_describe_different_payloads_or_dimensions_are_not_one_datastore():
    """Their answers could not be merged: refused when the shards are checked, not at every search."""
    other = shard_info(1)
    other.payloads[0].dtype = pb.DTYPE_INT64
    wider = shard_info(1)
    wider.dimension = DIM + 1
    for second in (other, wider):
        assert check_shards([[shard_info(0)], [second]]) == ("the shards describe different dimensions or payloads: "
                                                             "the shards of one datastore all have the same")
    assert check_shards([[shard_info(0)], [shard_info(1)]]) is None


# --- answers: payload dtypes, row shapes and key width ---

def test_an_answer_has_the_payload_dtypes_row_shapes_and_key_width_of_the_datastore():
    nq, k, n, d = 3, 4, 2, 5
    rows = {"values": (np.dtype("<i4"), ()), "tokens": (np.dtype("<i4"), (8,))}
    expect = AnswerShape(nq, k, ("values", "tokens"), True, n, rows=rows, dimension=d)

    def answer(**changed) -> SearchResult:
        parts = dict(ids=np.zeros((nq, k), np.int64), distances=np.zeros((nq, k), np.float32),
                     payloads={"values": np.zeros((nq, k), np.int32), "tokens": np.zeros((nq, k, 8), np.int32)},
                     keys=np.zeros((nq, k, d), np.float32), successor_ids=np.zeros((nq, k, n), np.int64),
                     successor_payloads={"values": np.zeros((nq, k, n), np.int32),
                                         "tokens": np.zeros((nq, k, n, 8), np.int32)},
                     successor_keys=np.zeros((nq, k, n, d), np.float32))
        return SearchResult(**{**parts, **changed})

    good = answer()
    assert expect.check(good) is good
    payloads, after = good.payloads, good.successor_payloads
    faults = {
        "payloads[values].dtype is float64, expected int32": answer(payloads={**payloads, "values": np.zeros((nq, k))}),
        "payloads[tokens].shape is [3, 4, 7], expected [3, 4, 8] alone":
            answer(payloads={**payloads, "tokens": np.zeros((nq, k, 7), np.int32)}),
        "payloads[values].shape is [3, 4, 1], expected [3, 4] alone":
            answer(payloads={**payloads, "values": np.zeros((nq, k, 1), np.int32)}),
        "keys.shape is [3, 4, 6], expected [3, 4, 5] alone": answer(keys=np.zeros((nq, k, d + 1), np.float32),
                                                                     successor_keys=np.zeros((nq, k, n, d + 1),
                                                                                             np.float32)),
        "successor_payloads[tokens].dtype is int64, expected int32":
            answer(successor_payloads={**after, "tokens": np.zeros((nq, k, n, 8), np.int64)}),
        "successor_keys.shape is [3, 4, 2, 6], expected [3, 4, 2, 5] alone":
            answer(successor_keys=np.zeros((nq, k, n, d + 1), np.float32)),
    }
    for words, result in faults.items():
        with pytest.raises(TensorError) as caught:
            expect.check(result)
        assert str(caught.value) == words
    unknown = AnswerShape(nq, k, ("other",), rows=rows)
    with pytest.raises(TensorError) as caught:
        unknown.check(SearchResult(good.ids, good.distances, payloads={"other": np.zeros((nq, k), np.int32)}))
    assert str(caught.value) == "payloads[other] is not a payload of this datastore"


def test_an_answer_shape_from_a_request_and_its_datastores_info():
    request = pb.SearchRequest(k=K, payloads=["tokens"], return_keys=True)
    request.queries.dtype, request.queries.shape[:] = pb.DTYPE_FLOAT32, [NQ, DIM]
    info = shard_info(0)
    assert AnswerShape.of(request, info) == AnswerShape(NQ, K, ("tokens",), True, rows={
        "tokens": (np.dtype("<i4"), (3,))}, dimension=DIM)
    assert AnswerShape.of(request) == AnswerShape(NQ, K, ("tokens",), True)


# --- fake shards ---

def shard_info(shard: int, **limits: int) -> pb.InfoResponse:
    name = f"shard-{shard:05d}"
    return pb.InfoResponse(dimension=DIM, metric="l2", ntotal=HALF, shard=name, datastore_version="v1", role="shard",
                           num_shards=2, datastore_ntotal=ROWS, nlist=8, default_nprobe=4, has_keys=True,
                           payloads=[VALUES, TOKENS], shards=[pb.ShardInfo(name=name, id_start=shard * HALF,
                                                                           id_end=(shard + 1) * HALF), ],
                           **{"max_k": 2048, "max_batch": 16384, "max_request_bytes": 257 << 20, **limits})


def answer_of(shard: int, values: Callable[[np.ndarray], np.ndarray] = lambda ids: ids.astype(np.int32),
              key_width: int = DIM) -> Callable[[pb.SearchRequest], bytes]:
    """A shard's answer to a request: ids shard*HALF + j, distances j + shard/4 (the shards interleave),
    the payloads asked for (values: `values` of the ids, int32 ids as the datastore has them) and keys."""
    def answer(request: pb.SearchRequest) -> bytes:
        nq, k = request.queries.shape[0], request.k
        ids = shard * HALF + np.tile(np.arange(k, dtype=np.int64), (nq, 1))  # (nq, k)
        result = SearchResult(ids, np.tile(np.arange(k, dtype=np.float32), (nq, 1)) + 0.25 * shard,
                              datastore_version="v1")
        named = {"values": values(ids), "tokens": np.repeat(ids[..., None], 3, -1).astype(np.int32)}
        result.payloads = {name: named[name] for name in dict.fromkeys(request.payloads)}
        if request.return_keys:
            result.keys = np.repeat(ids[..., None], key_width, -1).astype(np.float32)  # (nq, k, key_width)
        return encode_search_response(result)
    return answer


@contextlib.contextmanager
def fake_shard(aio, info: pb.InfoResponse, answer: Callable[[pb.SearchRequest], bytes],
               port: int = 0) -> Iterator[tuple]:
    """A shard server on `port` (0: any) answering GetInfo with `info` and Search with `answer`, refusing a
    request over its max_request_bytes as a shard server does; yields its address and the list of its
    Search calls."""
    calls: list[int] = []

    async def search(raw: bytes, context) -> bytes:
        calls.append(1)
        return answer(pb.SearchRequest.FromString(raw))

    async def get_info(raw: bytes, context) -> bytes:
        return info.SerializeToString()

    async def start():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", info.max_request_bytes or -1)])
        handlers = {"Search": grpc.unary_unary_rpc_method_handler(search),
                    "GetInfo": grpc.unary_unary_rpc_method_handler(get_info)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("retrieval.v1.Retriever", handlers),))
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server, bound

    server, bound = aio.run(start())
    try:
        yield f"127.0.0.1:{bound}", calls
    finally:
        aio.run(server.stop(0))


@contextlib.contextmanager
def router(aio, shards: tuple[tuple[str, ...], ...], limits: Limits = Limits()) -> Iterator[str]:
    running = aio.run(start_router(RouterConfig(shards=shards, metrics_port=None, limits=limits)))
    try:
        yield running.address
    finally:
        aio.run(running.drain(grace=0))


def queries() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((NQ, DIM)).astype(np.float32)  # (NQ, DIM)


def expected_values() -> np.ndarray:
    """(NQ, K) the merged answer's values: the two shards interleaved, shard 0 first at each distance."""
    ids = np.stack([np.arange(K), HALF + np.arange(K)], 1).ravel()[:K]
    return np.tile(ids.astype(np.int32), (NQ, 1))


def test_the_router_fails_over_from_a_replica_whose_payload_dtype_is_not_the_datastores(aio):
    """One replica sends values as float64 (id / 4): merged with int32 parts, they were cast (truncated),
    the bad replica's answer taken as good."""
    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1), answer_of(1, values=lambda ids: ids / 4)) as (bad, bad_calls), \
            fake_shard(aio, shard_info(1), answer_of(1)) as (good, _), \
            router(aio, ((zero,), (bad, good))) as address, RetrieverClient(address, timeout=10) as client:
        for _ in range(4):
            result = client.search(queries(), k=K, payloads=["values"])
            assert result.payloads["values"].dtype == np.int32
            assert np.array_equal(result.payloads["values"], expected_values())
    assert bad_calls, "the replica with the float64 payload was never tried"


def test_the_router_names_a_shard_whose_keys_are_not_as_wide_as_the_datastores(aio):
    """Keys 5 wide from one shard, 4 from the other: the merge raised ValueError, the call INTERNAL."""
    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1), answer_of(1, key_width=DIM + 1)) as (bad, _), \
            router(aio, ((zero,), (bad,))) as address, RetrieverClient(address, timeout=10) as client:
        with pytest.raises(RetrieverError) as caught:
            client.search(queries(), k=K, return_keys=True)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.message.startswith("shard-00001 unavailable (")
    assert "does not read: TensorError: keys.shape is [8, 4, 5], expected [8, 4, 4] alone" in caught.value.message


def test_the_fan_out_client_fails_over_from_a_replica_whose_row_shape_is_not_the_datastores(aio):
    wide = answer_of(1)

    def tokens_of_four(request: pb.SearchRequest) -> bytes:
        result = decode_search_response(wide(request))
        result.payloads["tokens"] = np.zeros((NQ, K, 4), np.int32)
        return encode_search_response(result)

    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1), tokens_of_four) as (bad, bad_calls), \
            fake_shard(aio, shard_info(1), answer_of(1)) as (good, _), \
            RetrieverClient([[zero], [bad, good]], timeout=10) as client:
        for _ in range(4):
            result = client.search(queries(), k=K, payloads=["tokens", "values"])
            assert result.payloads["tokens"].shape == (NQ, K, 3)
            assert np.array_equal(result.payloads["values"], expected_values())
        assert bad_calls, "the replica with the wider tokens was never tried"
        with RetrieverClient([zero, bad], timeout=10) as only_bad, pytest.raises(RetrieverError) as caught:
            only_bad.search(queries(), k=K, payloads=["tokens"])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "payloads[tokens].shape is [8, 4, 4], expected [8, 4, 3] alone" in caught.value.message


# --- limits: the least of the shards' ---

def test_a_fan_out_clients_info_has_the_least_limits_of_its_shards():
    first, second = shard_info(0, max_batch=16384, max_k=0), shard_info(1, max_batch=8, max_k=64,
                                                                         max_request_bytes=1 << 20)
    for infos in ([first, second], [second, first]):  # the request size less the version the client adds
        combined = combined_info(replica_sets([["a:1"], ["b:1"]]), infos)
        assert (combined.max_k, combined.max_batch, combined.max_request_bytes) == (64, 8, (1 << 20) - VERSION_BYTES)
    unset = combined_info(replica_sets([["a:1"], ["b:1"]]), [shard_info(0, max_k=0), shard_info(1, max_k=0)])
    assert unset.max_k == 0  # none reported: none reported


def test_a_fan_out_client_over_shards_reports_the_lower_batch_limit(aio):
    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1, max_batch=8), answer_of(1)) as (one, _), \
            RetrieverClient([zero, one], timeout=10) as client:
        info = client.info()
    assert (info.max_k, info.max_batch, info.max_request_bytes) == (2048, 8, (257 << 20) - VERSION_BYTES)


def test_a_routers_info_has_the_least_of_its_own_and_its_shards_limits(aio):
    shard_bytes = 3 << 20
    with fake_shard(aio, shard_info(0, max_request_bytes=shard_bytes), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1, max_batch=8, max_k=0), answer_of(1)) as (one, _), \
            router(aio, ((zero,), (one,)), Limits(max_k=100, max_request_bytes=4 << 20)) as address, \
            RetrieverClient(address, timeout=10) as client:
        info = client.info()
    assert (info.max_k, info.max_batch) == (100, 8)
    assert info.max_request_bytes == shard_bytes - len(forwarded_overrides("v1"))
    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1), answer_of(1)) as (one, _), \
            router(aio, ((zero,), (one,)), Limits(max_batch=64)) as address, \
            RetrieverClient(address, timeout=10) as client:
        info = client.info()
    assert (info.max_k, info.max_batch, info.max_request_bytes) == (2048, 64, Limits().max_request_bytes)


# --- Exclude: ids an int64 holds ---

@pytest.mark.parametrize("exclude, words", [
    (Exclude(ids=[1, 2 ** 63]), "Exclude.ids[1] must fit in 64 bits (an int64), got 9223372036854775808"),
    (Exclude(ids=np.array([2 ** 64 - 1], dtype=np.uint64)),
     "Exclude.ids[0] must fit in 64 bits (an int64), got 18446744073709551615"),
    (Exclude(ranges=[(0, 1), (0, 2 ** 63)]), "Exclude.ranges[1] must fit in 64 bits (an int64), got (0, "
                                             "9223372036854775808)"),
    (Exclude(ranges=[(-2 ** 63 - 1, 0)]), "Exclude.ranges[0] must fit in 64 bits (an int64), got "
                                          "(-9223372036854775809, 0)"),
])
def test_an_excluded_id_past_int64_is_refused_naming_the_field(exclude, words):
    with pytest.raises(ValueError) as caught:
        exclude.to_proto()
    assert str(caught.value) == words
    assert list(Exclude(ids=[2 ** 63 - 1], ranges=[(-2 ** 63, 0)]).to_proto().ids) == [2 ** 63 - 1]
