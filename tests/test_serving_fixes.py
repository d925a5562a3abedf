"""Serving fixes, each against fake shard servers on 127.0.0.1 (GetInfo and Search alone) or a policy alone:
health stays NOT_SERVING once a drain began; a shard call cancelled on this side (its channel closed) is a
shard failure, never a silently missing shard; the fan-out client's info() refuses shards of different
datastores; the hedge-delay gauge is labelled by the shard's own name; a replica down at discovery joins
only once its GetInfo shows the shard expected; a replica failing again and again backs off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_failover import wait_until

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.serving import fanout
from retriever_server.serving import shard_server as shard_server_module
from retriever_server.serving.client import RetrieverClient, RetrieverError
from retriever_server.serving.failover import FailoverPolicy, ReplicaSet
from retriever_server.serving.grpc_setup import health_status
from retriever_server.serving.router import RouterConfig, start_router
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.result import SearchResult

ROWS, DIM = 1000, 8


class FakeShard:
    """A shard server on 127.0.0.1 answering as shard `shard` of a 2-shard datastore of `version`, each
    Search after `delay` seconds; `calls` counts the Search calls it took."""

    def __init__(self, aio, shard: int, delay: float = 0.0, version: str = "v1", port: int = 0):
        self.shard, self.delay, self.version, self.calls = shard, delay, version, 0
        handlers = {"Search": grpc.unary_unary_rpc_method_handler(self.search),
                    "GetInfo": grpc.unary_unary_rpc_method_handler(self.get_info)}

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("retrieval.v1.Retriever",
                                                                                  handlers),))
            bound = server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            return server, bound

        self.aio = aio
        self.server, bound = aio.run(start())
        self.address = f"127.0.0.1:{bound}"

    def info(self) -> pb.InfoResponse:
        name, half = f"shard-{self.shard:05d}", ROWS // 2
        return pb.InfoResponse(dimension=DIM, metric="l2", ntotal=half, shard=name, datastore_version=self.version,
                               role="shard", num_shards=2, datastore_ntotal=ROWS, nlist=8, default_nprobe=4,
                               max_k=2048, max_batch=16384, max_request_bytes=(256 << 20) + (1 << 20),
                               shards=[pb.ShardInfo(name=name, id_start=self.shard * half,
                                                    id_end=(self.shard + 1) * half)])

    async def get_info(self, raw: bytes, context) -> bytes:
        return self.info().SerializeToString()

    async def search(self, raw: bytes, context) -> bytes:
        self.calls += 1
        request = pb.SearchRequest.FromString(raw)
        await asyncio.sleep(self.delay)
        nq, k = request.queries.shape[0], request.k
        ids = self.shard * (ROWS // 2) + np.tile(np.arange(k, dtype=np.int64), (nq, 1))  # (nq, k)
        distances = np.tile(np.arange(k, dtype=np.float32), (nq, 1)) + 0.5 * self.shard  # (nq, k), ranked
        return encode_search_response(SearchResult(ids, distances, datastore_version=self.version))

    def stop(self) -> None:
        self.aio.run(self.server.stop(0))


@contextlib.contextmanager
def fakes(aio, *specs: dict) -> Iterator[list[FakeShard]]:
    """Fake shards, one per spec (FakeShard's keyword arguments), stopped on the way out."""
    started: list[FakeShard] = []
    try:
        for spec in specs:
            started.append(FakeShard(aio, **spec))
        yield started
    finally:
        for fake in started:
            fake.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def queries(nq: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((nq, DIM)).astype(np.float32)  # (nq, DIM)


def in_background(call: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """Runs `call` in a thread; the dict gets its "result" or its "error"."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = call()
        except BaseException as err:  # noqa: BLE001 - the test looks at what it was
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def never_serving(address: str, seconds: float) -> bool:
    """Whether health at `address` stays off SERVING for `seconds`."""
    return not wait_until(lambda: health_status(address, timeout=0.5) == "SERVING", seconds, poll_s=0.1)


# 1. Health stays NOT_SERVING once a drain began, whatever finishes loading after.

def test_a_router_draining_while_it_waits_for_its_shards_never_turns_serving(aio):
    ports = free_port(), free_port()
    running = aio.run(start_router(RouterConfig(tuple((f"127.0.0.1:{p}",) for p in ports), metrics_port=None),
                                   wait_ready=False))
    drain = asyncio.run_coroutine_threadsafe(running.drain(grace=0, delay=2.0), aio.loop)  # SIGTERM while waiting
    try:
        assert wait_until(lambda: running.service.draining, 2)
        with fakes(aio, {"shard": 0, "port": ports[0]}, {"shard": 1, "port": ports[1]}):  # the shards come up
            assert never_serving(running.address, 1.5)
            assert running.ready.done()
            aio.run(running.mark_ready())  # what the discovery would do once done: ignored while draining
            assert health_status(running.address) == "NOT_SERVING"
    finally:
        drain.result(10)


def test_a_shard_server_draining_while_it_loads_never_turns_serving(aio, monkeypatch):
    def slow_load(self):  # a shard that takes a while to open (its sha256, its mmap)
        time.sleep(0.4)
        self.shard = object()
        return self.shard

    monkeypatch.setattr(shard_server_module.ShardService, "load", slow_load)
    config = shard_server_module.ShardServerConfig(Path("/nonexistent"), 0, metrics_port=None)
    running = aio.run(shard_server_module.start_shard_server(config, wait_loaded=False))
    drain = asyncio.run_coroutine_threadsafe(running.drain(grace=0, delay=1.5), aio.loop)  # SIGTERM while loading
    try:
        assert never_serving(running.address, 1.0)
    finally:
        drain.result(10)


# 2. A shard call cancelled on this side is a shard failure, never a shard silently left out.

@pytest.mark.parametrize("delays", [(0.0, 5.0), (5.0, 5.0)], ids=["one shard answered", "none answered"])
def test_a_fan_out_search_during_close_fails_as_cancelled(aio, delays):
    with fakes(aio, {"shard": 0, "delay": delays[0]}, {"shard": 1, "delay": delays[1]}) as (zero, one):
        client = RetrieverClient([zero.address, one.address], timeout=10)
        client.info()
        thread, out = in_background(lambda: client.search(queries(), k=3))
        assert wait_until(lambda: one.calls and zero.calls, 5)
        time.sleep(0.1)  # the fast shard's answer is in
        client.close()
        thread.join(10)
    assert not thread.is_alive()
    assert isinstance(out.get("error"), RetrieverError), out
    assert out["error"].code == grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("allow_partial", [True, False])
def test_a_router_call_whose_channel_closes_under_it_names_the_shard(aio, allow_partial):
    with fakes(aio, {"shard": 0}, {"shard": 1, "delay": 5.0}) as (zero, one):
        running = aio.run(start_router(RouterConfig(((zero.address,), (one.address,)), metrics_port=None)))
        try:
            with RetrieverClient(running.address, timeout=10) as client:
                thread, out = in_background(lambda: client.search(queries(), k=3, allow_partial=allow_partial))
                assert wait_until(lambda: one.calls, 5)
                aio.run(running.service.channels[one.address].close())  # as a retired channel is closed
                thread.join(10)
        finally:
            aio.run(running.drain(grace=0))
    if allow_partial:
        answer = out.get("result")
        assert answer is not None and answer.partial, out
        assert set(answer.failed_shards) == {"shard-00001"} and "CANCELLED" in answer.failed_shards["shard-00001"]
        assert (answer.ids < ROWS // 2).all()
    else:
        assert isinstance(out.get("error"), RetrieverError), out
        assert out["error"].code == grpc.StatusCode.UNAVAILABLE and "shard-00001" in out["error"].message


def test_a_router_attempt_whose_channel_closes_under_it_fails_over_to_the_next_replica(aio):
    with fakes(aio, {"shard": 0}, {"shard": 1, "delay": 5.0}, {"shard": 1, "delay": 5.0}) as (zero, a, b):
        config = RouterConfig(((zero.address,), (a.address, b.address)), metrics_port=None,
                              failover=FailoverPolicy(hedge=False))
        running = aio.run(start_router(config))
        try:
            with RetrieverClient(running.address, timeout=10) as client:
                thread, out = in_background(lambda: client.search(queries(), k=3))
                assert wait_until(lambda: a.calls or b.calls, 5)
                first, other = (a, b) if a.calls else (b, a)
                other.delay = 0.0
                aio.run(running.service.channels[first.address].close())
                thread.join(10)
        finally:
            aio.run(running.drain(grace=0))
    answer = out.get("result")
    assert answer is not None and not answer.partial, out
    assert sorted(answer.ids[0].tolist()) == [0, 1, 500]  # shard 1's rows too, from its other replica


# 3. The fan-out client's info() checks its shards as search does.

def test_fan_out_info_refuses_shards_of_different_datastores(aio):
    with fakes(aio, {"shard": 0}, {"shard": 1, "version": "v2-other-build"}) as (zero, one), \
            RetrieverClient([zero.address, one.address], timeout=5) as client:
        with pytest.raises(RetrieverError) as refused:
            client.info()
        with pytest.raises(RetrieverError) as refused_search:
            client.search(queries(), k=3)
    assert refused.value.code == refused_search.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "different datastores" in refused.value.message


# 4. The hedge delay gauge names each shard as it names itself.

def test_the_hedge_delay_gauge_is_labelled_by_shard_name_whatever_the_order_given(aio):
    with fakes(aio, {"shard": 1}, {"shard": 0}) as (one, zero):
        running = aio.run(start_router(RouterConfig(((one.address,), (zero.address,)), metrics_port=None)))
        try:
            for replicas in running.service.sets:  # shard-00001 answers in 0.5 s, shard-00000 at once
                for _ in range(20):
                    replicas.succeeded(replicas.addresses[0], 0.5 if replicas.name == "shard-00001" else 0.001)
            samples = {s.labels["shard"]: s.value for m in running.service.metrics.registry.collect()
                       if m.name == "retriever_hedge_delay_seconds" for s in m.samples}
        finally:
            aio.run(running.drain(grace=0))
    assert samples == {"shard-00001": 0.5, "shard-00000": 0.02}


# 5. A replica down at discovery is kept out of rotation until its GetInfo shows the shard expected.

@contextlib.contextmanager
def searched_through(aio, shards: tuple[tuple[str, ...], ...], via: str) -> Iterator[str | list]:
    """What a client is given to search `shards`: a router over them (started, then drained), or the list."""
    if via == "fan-out client":
        yield [list(replicas) for replicas in shards]
        return
    running = aio.run(start_router(RouterConfig(shards, metrics_port=None)))
    try:
        yield running.address
    finally:
        aio.run(running.drain(grace=0))


@pytest.mark.parametrize("via", ["router", "fan-out client"])
def test_a_replica_down_at_start_joins_only_as_the_shard_it_was_given_as(aio, monkeypatch, caplog, via):
    monkeypatch.setattr(fanout, "RECHECK_FIRST_S", 0.1, raising=False)
    caplog.set_level(logging.WARNING)
    wrong_port, right_port = free_port(), free_port()
    with fakes(aio, {"shard": 0}, {"shard": 1}) as (zero, one):
        shards = ((zero.address, f"127.0.0.1:{wrong_port}", f"127.0.0.1:{right_port}"), (one.address,))
        with searched_through(aio, shards, via) as target, RetrieverClient(target, timeout=5) as client:
            answers = [client.search(queries(1), k=4)]  # the shards are checked by now, two replicas down
            with fakes(aio, {"shard": 1, "port": wrong_port}, {"shard": 0, "port": right_port}) as (wrong, right):
                joined = wait_until(lambda: answers.append(client.search(queries(1), k=4)) or right.calls > 0, 8)
                assert wait_until(lambda: f"127.0.0.1:{wrong_port}" in caplog.text, 8)
                answers += [client.search(queries(1), k=4) for _ in range(6)]
    assert joined and wrong.calls == 0
    assert all(not a.partial and sorted(a.ids[0].tolist()) == [0, 1, 500, 501] for a in answers)
    assert "shard-00001" in caplog.text  # what it serves instead, named


# 6. A replica that fails again and again is tried last for longer each time, up to a cap.

def test_a_replica_failing_in_a_row_backs_off_and_a_success_resets_it():
    now = [0.0]
    replicas = ReplicaSet("shard-00000", ["a", "b"], clock=lambda: now[0])

    def tried_first() -> bool:  # round-robin: "a" comes first every other call unless it is cooling down
        return "a" in (replicas.order()[0], replicas.order()[0])

    cooldowns = []
    for _ in range(6):
        replicas.failed("a")
        start = now[0]
        while not tried_first():
            now[0] += 0.5
        cooldowns.append(now[0] - start)
    assert cooldowns == [2.5, 4.5, 8.5, 16.5, 30.5, 30.5]  # 2 s doubled, to 30 s
    replicas.succeeded("a", 0.01)
    replicas.failed("a")
    start = now[0]
    while not tried_first():
        now[0] += 0.5
    assert now[0] - start == 2.5


def test_a_replica_that_loses_hedges_is_tried_last_for_the_first_cooldown_alone():
    """A replica a hedge beat may be healthy, only slower: each loss puts it last for 2 s, never longer
    (a run of lost hedges doubled it to 30 s, every first attempt going to the other replica)."""
    now = [0.0]
    replicas = ReplicaSet("shard-00000", ["a", "b"], clock=lambda: now[0])
    for _ in range(5):
        replicas.failed("a", slower=True)
    now[0] += 2.5
    assert "a" in (replicas.order()[0], replicas.order()[0])


def test_an_error_asking_one_late_replica_does_not_end_the_checks_of_the_others(monkeypatch):
    """A late replica whose stub cannot be had (its channel closed by a TLS refresh) is asked again later;
    the others still join (the error ended the whole re-probe task, and they never joined)."""
    monkeypatch.setattr(fanout, "RECHECK_FIRST_S", 0.01)
    expected = pb.InfoResponse(role="shard", shard="shard-00000", datastore_version="v1")
    tries = {"bad": 0}

    class Stub:
        async def GetInfo(self, request, timeout, metadata):  # noqa: N802 - gRPC's name
            return expected

    def stub_of(address: str):
        if address == "bad" and tries["bad"] < 2:
            tries["bad"] += 1
            raise ValueError("channel closed")
        return Stub()

    replicas = ReplicaSet("shard-00000", ["good", "bad", "late"], unchecked={"bad", "late"})
    asyncio.run(asyncio.wait_for(fanout.check_late_replicas([replicas], [expected], stub_of, 1.0, lambda: ()), 10))
    assert replicas.unchecked == set() and tries["bad"] == 2
