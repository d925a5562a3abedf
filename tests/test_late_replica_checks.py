"""A replica that joins after the shards were checked (down at start, or sent by `replace_replica`) is
checked as the ones checked at start were: one whose limits are under those the router or the fan-out
client reports, or whose payloads or key width are not the datastore's, stays out of rotation, the reason
logged; the limits reported stay true. A fan-out client reports the request size its shards take once it
has added the datastore's version to the request. MAX_DIMS is the installed numpy's own bound. Fake shard
servers (`test_shard_answer_checks`), a real router and a real client."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from test_failover import wait_until
from test_serving_fixes import free_port
from test_shard_answer_checks import DIM, NQ, K, answer_of, fake_shard, queries, router, shard_info

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.serving import fanout
from retriever_server.serving.client import RetrieverClient, RetrieverError, make_request
from retriever_server.serving.router import RouterConfig, start_router
from retriever_server.wire.search_args import Exclude
from retriever_server.wire.tensors import MAX_DIMS, numpy_max_dims


def other_payloads() -> pb.InfoResponse:
    info = shard_info(1)
    info.payloads[1].row_shape[:] = [4]  # tokens 4 wide, not 3
    return info


def wider_keys() -> pb.InfoResponse:
    info = shard_info(1)
    info.dimension += 1
    return info


LATE = {  # what a late replica of shard 1 reports: the words its refusal logs
    "max_batch": (lambda: shard_info(1, max_batch=4), "max_batch up to 4"),
    "max_k": (lambda: shard_info(1, max_k=2), "max_k up to 2"),
    "max_request_bytes": (lambda: shard_info(1, max_request_bytes=1 << 20), f"max_request_bytes up to {1 << 20}"),
    "payloads": (other_payloads, "payload 'tokens' as DTYPE_INT32 rows of shape [4], not as the datastore's "
                                 "DTYPE_INT32 rows of shape [3]"),
    "dimension": (wider_keys, f"keys of dimension {DIM + 1}, not the datastore's {DIM}"),
}


WINDOW_S = 10.0  # how long a test waits for the late replica's check: ample, as checks come every 0.2 s


def often(monkeypatch) -> None:
    """Late replicas asked for their GetInfo 0.05 s after the start, then every 0.2 s at most: a replica that
    comes up late on loaded cores is asked within WINDOW_S, not at a back-off of seconds."""
    monkeypatch.setattr(fanout, "RECHECK_FIRST_S", 0.05)
    monkeypatch.setattr(fanout, "RECHECK_MOST_S", 0.2)


@contextlib.contextmanager
def searched(aio, via: str, shards: tuple[tuple[str, ...], ...]) -> Iterator[RetrieverClient]:
    """A client over `shards`, through a router or fanning out itself, its shards checked (one search)."""
    with contextlib.ExitStack() as stack:
        target = stack.enter_context(router(aio, shards)) if via == "router" else [list(s) for s in shards]
        client = stack.enter_context(RetrieverClient(target, timeout=10))
        client.search(queries(), k=K)
        yield client


@pytest.mark.parametrize("via", ["router", "fan-out client"])
@pytest.mark.parametrize("fault", sorted(LATE))
def test_a_late_replica_under_the_reported_limits_or_of_another_datastore_stays_out(aio, monkeypatch, caplog, via,
                                                                                   fault):
    """Shard 1's second replica is down at start, then answers with a max_batch of 4 (say): it joined, the
    router still reported 16384, and every other call failed RESOURCE_EXHAUSTED 'batch over 4'."""
    often(monkeypatch)
    caplog.set_level(logging.WARNING)
    info, words = LATE[fault]
    late = f"127.0.0.1:{free_port()}"
    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1), answer_of(1)) as (one, _), \
            searched(aio, via, ((zero,), (one, late))) as client:
        before = client.info()
        with fake_shard(aio, info(), answer_of(1), port=int(late.rsplit(":", 1)[1])) as (_, late_calls):
            refused = wait_until(lambda: f"replica {late} stays out of rotation" in caplog.text, WINDOW_S)
            for _ in range(4):
                client.search(queries(), k=K, payloads=["tokens"], return_keys=True)
            after = client.info()
    assert refused, caplog.text
    assert words in caplog.text
    assert not late_calls
    assert [after.max_k, after.max_batch, after.max_request_bytes] == \
        [before.max_k, before.max_batch, before.max_request_bytes]


@pytest.mark.parametrize("via", ["router", "fan-out client"])
def test_a_late_replica_with_larger_limits_joins(aio, monkeypatch, caplog, via):
    often(monkeypatch)
    caplog.set_level(logging.INFO)
    late = f"127.0.0.1:{free_port()}"
    larger = shard_info(1, max_batch=1 << 20, max_k=0, max_request_bytes=1 << 30)
    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1), answer_of(1)) as (one, _), \
            searched(aio, via, ((zero,), (one, late))) as client:
        with fake_shard(aio, larger, answer_of(1), port=int(late.rsplit(":", 1)[1])) as (_, late_calls):
            assert wait_until(lambda: f"replica {late}, down at start, answers as that shard" in caplog.text, WINDOW_S)
            for _ in range(4):
                client.search(queries(), k=K)
    assert late_calls


@pytest.mark.parametrize("fault", sorted(LATE))
def test_a_replacement_replica_under_the_routers_limits_or_of_another_datastore_is_refused(aio, fault):
    info, words = LATE[fault]
    with fake_shard(aio, shard_info(0), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1), answer_of(1)) as (one, _), \
            fake_shard(aio, info(), answer_of(1)) as (bad, bad_calls), \
            fake_shard(aio, shard_info(1, max_batch=1 << 20), answer_of(1)) as (good, _):
        running = aio.run(start_router(RouterConfig(((zero,), (one,)), metrics_port=None)))
        try:
            service = running.service
            with pytest.raises(ValueError) as caught:
                aio.run(service.replace_replica(1, 0, bad))
            assert service.sets[1].addresses == [one]
            assert aio.run(service.replace_replica(1, 0, good)) == one
        finally:
            aio.run(running.drain(grace=0))
    assert words in str(caught.value) and bad in str(caught.value)
    assert not bad_calls


# --- a fan-out client's request size ---

def sized(target: int) -> dict:
    """search() arguments whose request is `target` bytes, as `make_request` writes it (padded with
    excluded ids of one byte each, one of two bytes where the lengths' varints grow)."""
    def arguments(n: int, wide: int = 0) -> dict:
        return dict(queries=queries(), k=K, exclude=Exclude(ids=[200] * wide + [1] * (n - wide)))

    def size(n: int, wide: int = 0) -> int:
        return make_request(**arguments(n, wide)).ByteSize()

    n = target - size(0)
    while size(n) > target:
        n -= 1
    wide = int(size(n) < target)
    assert size(n, wide) == target, f"no request of {target} bytes"
    return arguments(n, wide)


@pytest.mark.parametrize("limit", [4096, 3000])
def test_a_request_of_the_size_a_fan_out_client_reports_is_taken_by_its_shards(aio, limit):
    """The client reported its shards' least max_request_bytes, then added the datastore's version to each
    request: a request of that size was refused RESOURCE_EXHAUSTED by the shards."""
    with fake_shard(aio, shard_info(0, max_request_bytes=limit), answer_of(0)) as (zero, _), \
            fake_shard(aio, shard_info(1, max_request_bytes=8192), answer_of(1)) as (one, _), \
            RetrieverClient([zero, one], timeout=10) as client:
        reported = client.info().max_request_bytes
        added = len(pb.SearchRequest(expected_datastore_version="v1").SerializeToString())
        assert reported == limit - added
        result = client.search(**sized(reported))
        assert result.ids.shape == (NQ, K)
        with pytest.raises(RetrieverError) as caught:
            client.search(**sized(limit))  # over what it reports: the shards refuse it
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- numpy's bound on an array's dimensions ---

def test_max_dims_is_the_installed_numpys_own_bound():
    """numpy 2 makes arrays of up to 64 dimensions, numpy 1 (which the project allows) of up to 32."""
    assert np.empty((1,) * MAX_DIMS).ndim == MAX_DIMS == numpy_max_dims()
    with pytest.raises(ValueError):
        np.empty((1,) * (MAX_DIMS + 1))

    def numpy_1(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) > 32:
            raise ValueError(f"maximum supported dimension for an ndarray is 32, found {len(shape)}")
        return np.empty(shape)

    assert numpy_max_dims(numpy_1) == 32
