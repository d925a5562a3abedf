"""Shard server and router behaviour: bad input over gRPC, health, drain, reflection, deadlines,
limits, metrics, version mismatch, and failures of replicas and shards in real processes."""

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import build, serve, synthetic
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.v1 import retriever_pb2 as pb
from retrieval.v1 import retriever_pb2_grpc as pb_grpc
from retriever_server.cluster.launcher import NO_DRAIN, LocalDeployment
from retriever_server.security.config import ServerSecurity
from retriever_server.serving import grpc_setup
from retriever_server.serving import router as router_module
from retriever_server.serving import service as service_module
from retriever_server.serving import shard as shard_module
from retriever_server.serving.client import RetrieverClient, RetrieverError, make_request
from retriever_server.serving.failover import is_busy
from retriever_server.serving.grpc_setup import MAX_WATCHES, SERVICE_NAME, health_status
from retriever_server.serving.metrics import ServerMetrics
from retriever_server.serving.router import RouterConfig, start_router
from retriever_server.serving.shard_server import ShardServerConfig, ShardService, start_shard_server
from retriever_server.wire.request import Limits

pytestmark = [pytest.mark.ray]
N, D = 4000, 16


@pytest.fixture(scope="module")
def keys():
    return synthetic(N, D, seed=11)


@pytest.fixture(scope="module")
def datastore(ray_cluster, keys, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    return build(tmp, keys, "ds", shards=2, factory="IVF16,PQ4", keep_keys=True,
                 payload_arrays={"values": np.arange(N, dtype=np.int32)})


@pytest.fixture(scope="module")
def other_datastore(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("other")
    return build(tmp, synthetic(1000, D, seed=12), "other", shards=2, factory="IVF8,Flat")


def raw_search(address: str, request: pb.SearchRequest, timeout: float = 10) -> pb.SearchResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.RetrieverStub(channel).Search(request, timeout=timeout)


def good_request(keys) -> pb.SearchRequest:
    return make_request(keys[:4], k=5, nprobe=4)


def batch_request(keys) -> pb.SearchRequest:
    """Enough queries that the shard searches them in its thread pool (a small search runs on its loop)."""
    return make_request(keys[:16], k=5, nprobe=4)


OVER_RANGE = "queries contains NaN, Inf or a component over 1e+15 in absolute value"


def bad_requests(keys):
    """(request, expected code, words in the message) for each way a request can be wrong."""
    def req(**kw):
        r = good_request(keys)
        for name, value in kw.items():
            setattr(r, name, value)
        return r

    short = good_request(keys)
    short.queries.data = short.queries.data[:-1]
    unknown = good_request(keys)
    unknown.queries.dtype = 77
    bad_range = good_request(keys)
    bad_range.exclude.ranges.append(pb.IdRange(start=9, end=3))
    per_query = good_request(keys)
    per_query.exclude_per_query.append(pb.Exclusion(ids=[1]))
    nan = keys[:2].copy()
    nan[1, 0] = np.nan
    huge = keys[:3].copy()  # finite, but its squared distances overflow float32
    huge[2, 1] = 1e20
    many_dims = good_request(keys)  # 20,000 dimensions: shown whole, the status would outgrow gRPC's limit
    many_dims.queries.shape.extend([7] * 19998)
    return [
        (make_request(keys[:2, :8], k=5), "INVALID_ARGUMENT", "dimension 8"),
        (short, "INVALID_ARGUMENT", "bytes but shape"),
        (many_dims, "INVALID_ARGUMENT", "got [4, 16, 7, 7, 7, 7, 7, 7, ...] (20000 dimensions)"),
        (unknown, "INVALID_ARGUMENT", "queries.dtype"),
        (make_request(nan, k=5), "INVALID_ARGUMENT", f"{OVER_RANGE} (first in row 1)"),
        (make_request(huge, k=5), "INVALID_ARGUMENT", f"{OVER_RANGE} (first in row 2)"),
        (req(k=0), "INVALID_ARGUMENT", "k must be"),
        (req(k=5000), "INVALID_ARGUMENT", "k must be"),
        (req(nprobe=17), "INVALID_ARGUMENT", "nprobe must be in [1, 16]"),
        (make_request(np.zeros((0, D), np.float32), k=5), "INVALID_ARGUMENT", "empty batch"),
        (make_request(np.zeros((20000, D), np.float32), k=5), "RESOURCE_EXHAUSTED", "batch limit"),
        (bad_range, "INVALID_ARGUMENT", "exclude.ranges[0]"),
        (per_query, "INVALID_ARGUMENT", "exclude_per_query has 1 entries but there are 4 queries"),
        (req(expected_datastore_version="0123"), "FAILED_PRECONDITION", "expected_datastore_version"),
        (req(successors=17), "INVALID_ARGUMENT", "successors must be in [0, 16]"),
        (req(successors=-1), "INVALID_ARGUMENT", "successors must be in [0, 16]"),
    ]


def test_bad_input_gets_a_named_status_and_the_servers_keep_serving(aio, keys, datastore):
    with serve(aio, datastore, 2) as served:
        expected = raw_search(served.address, good_request(keys))
        for address in (served.address, served.shards[0][0].address):
            for request, code, words in bad_requests(keys):
                with pytest.raises(grpc.RpcError) as caught:
                    raw_search(address, request)
                assert caught.value.code() == getattr(grpc.StatusCode, code), (words, caught.value.details())
                assert words in caught.value.details() and not is_busy(caught.value)  # the request's fault
        assert raw_search(served.address, good_request(keys)) == expected


def test_request_over_the_size_limit_is_refused(aio, keys, datastore):
    limits = Limits(max_request_bytes=64 * 1024)
    with serve(aio, datastore, 2, limits=limits) as served:
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(served.address, make_request(np.zeros((2000, D), np.float32), k=5))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        raw_search(served.address, good_request(keys))


def test_health_not_serving_until_loaded_then_serving_then_not_serving_on_drain(aio, keys, datastore,
                                                                                monkeypatch):
    release, searching, finish = threading.Event(), threading.Event(), threading.Event()
    original = shard_module.Shard.open

    def slow_open(*args, **kwargs):  # fault injection: hold the load until the test has looked
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(shard_module.Shard, "open", slow_open)
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None), wait_loaded=False))
    try:
        assert health_status(running.address) == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(running.address, good_request(keys))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in caught.value.details()
        release.set()
        deadline = time.monotonic() + 30
        while health_status(running.address) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(running.address) == "SERVING"
        raw_search(running.address, good_request(keys))
        expected = raw_search(running.address, batch_request(keys))
        in_flight = {}

        def held_search(self, spec, stop=None):  # fault injection: a search still running when the drain starts
            searching.set()
            finish.wait(10)
            return original_search(self, spec, stop)

        original_search = shard_module.Shard.search
        monkeypatch.setattr(shard_module.Shard, "search", held_search)
        worker = threading.Thread(target=lambda: in_flight.update(answer=raw_search(running.address,
                                                                                     batch_request(keys))))
        worker.start()
        assert searching.wait(10), "the request never reached the shard"
        drained = asyncio.run_coroutine_threadsafe(running.drain(grace=5, delay=3), aio.loop)
        deadline = time.monotonic() + 2
        while health_status(running.address) != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.02)  # polling, with a deadline
        assert health_status(running.address) == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(running.address, good_request(keys))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in caught.value.details()
        finish.set()
        worker.join(10)
        assert in_flight.get("answer") == expected, "the request in flight when draining began was lost"
        drained.result(10)
        assert health_status(running.address) == "UNAVAILABLE"
    finally:
        release.set()
        finish.set()
        if not running.service.draining:
            aio.run(running.drain(grace=0))


def test_reflection_is_off_unless_asked_for(aio, datastore):
    """Without --reflection a generic client built from reflection alone finds nothing to call."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with serve(aio, datastore, 2) as served:
        for address in (served.address, served.shards[1][0].address):
            with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_lists_the_service_to_a_generic_client(aio, datastore):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with serve(aio, datastore, 2, security=ServerSecurity(reflection=True)) as served:
        for address in (served.address, served.shards[1][0].address):
            with grpc.insecure_channel(address) as channel:
                database = ProtoReflectionDescriptorDatabase(channel)
                assert SERVICE_NAME in database.get_services()
                assert "grpc.health.v1.Health" in database.get_services()
                service = DescriptorPool(database).FindServiceByName(SERVICE_NAME)
                assert {m.name for m in service.methods} == {"Search", "GetInfo"}
                assert service.FindMethodByName("Search").input_type.fields_by_name["queries"]


def test_caller_deadline_is_honoured_through_the_router(aio, keys, datastore, monkeypatch):
    """The shards see the caller's deadline (less what has passed), not an open-ended call."""
    seen = []
    original = ShardService.handle_search

    async def recording(self, request, context):  # fault injection: record, then stall 3 s
        seen.append(context.time_remaining())
        await asyncio.sleep(3)
        return await original(self, request, context)

    with serve(aio, datastore, 2) as served, RetrieverClient(served.address) as client:
        monkeypatch.setattr(ShardService, "handle_search", recording)
        with pytest.raises(RetrieverError) as caught:
            client.search(keys[:3], k=5, timeout=0.5)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(seen) == 2 and all(r is not None and 0 < r <= 0.51 for r in seen), seen  # gRPC rounds deadlines


def test_in_flight_limit_refuses_extra_work(aio, keys, datastore, monkeypatch):
    original = shard_module.Shard.search
    entered, release = threading.Event(), threading.Event()

    def slow_search(self, spec, stop=None):  # fault injection: hold the first request inside the shard until released
        entered.set()
        release.wait(10)
        return original(self, spec, stop)

    with serve(aio, datastore, 2, limits=Limits(max_inflight=1)) as served:
        monkeypatch.setattr(shard_module.Shard, "search", slow_search)
        shard = served.shards[0][0].address
        first = threading.Thread(target=raw_search, args=(shard, batch_request(keys)))
        first.start()
        assert entered.wait(10)
        metrics = served.shards[0][0].service.metrics.registry
        try:
            assert metrics.get_sample_value("retriever_inflight_requests") == 1.0
            with pytest.raises(grpc.RpcError) as caught:
                raw_search(shard, good_request(keys))
        finally:
            release.set()
        first.join()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "in flight" in caught.value.details() and is_busy(caught.value)  # another replica may take it
        assert metrics.get_sample_value("retriever_inflight_requests") == 0.0


def test_prometheus_metrics_count_requests_by_status(aio, keys, datastore, capfd):
    """/metrics counts requests by status; a scrape writes nothing to stderr; a drain closes the port and ends
    the thread serving it."""
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=0)))
    try:
        raw_search(running.address, good_request(keys))
        with pytest.raises(grpc.RpcError):
            raw_search(running.address, make_request(keys[:1], k=0))
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
        assert 'retriever_requests_total{method="Search",status="OK"} 1.0' in text
        assert 'retriever_requests_total{method="Search",status="INVALID_ARGUMENT"} 1.0' in text
        assert 'retriever_request_seconds_count{method="Search"} 2.0' in text
        assert "GET /metrics" not in capfd.readouterr().err
    finally:
        aio.run(running.drain(grace=0))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5)
    assert "metrics" not in [t.name for t in threading.enumerate()]


def test_metrics_serve_on_an_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    metrics = ServerMetrics("shard")
    try:
        port = metrics.serve("::1", 0)
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert "retriever_requests" in urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.stop()


def test_a_router_waiting_for_a_shard_says_which_and_why(aio, datastore, monkeypatch, caplog):
    """A shard address where nothing listens: the router keeps waiting (the shard may come up later),
    and says every DISCOVERY_REPORT_S seconds which shard has not answered, at which address, and why."""
    monkeypatch.setattr(router_module, "DISCOVERY_REPORT_S", 0.5)
    a = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None)))
    nobody = f"127.0.0.1:{free_port()}"
    router = aio.run(start_router(RouterConfig(((a.address,), (nobody,)), metrics_port=None), wait_ready=False))
    try:
        deadline = time.monotonic() + 20
        while "still waits" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)  # polling, with a deadline
        assert not router.ready.done()
    finally:
        for server in (router, a):
            aio.run(server.drain(grace=0))
    assert f"router still waits for 1 of 2 shards to answer: shard-00001 ({nobody}: UNAVAILABLE" in caplog.text


def test_router_refuses_shards_of_different_datastores(aio, keys, datastore, other_datastore):
    a = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None)))
    b = aio.run(start_shard_server(ShardServerConfig(other_datastore, 1, metrics_port=None)))
    router = aio.run(start_router(RouterConfig(((a.address,), (b.address,)), metrics_port=None), wait_ready=False))
    try:
        with pytest.raises(RuntimeError, match="different datastores"):
            aio.run(asyncio.wait_for(asyncio.shield(router.ready), 30))
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(router.address, good_request(keys))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        for server in (router, a, b):
            aio.run(server.drain(grace=0))


def test_a_closed_client_says_so(aio, keys, datastore):
    with serve(aio, datastore, 2) as served:
        for target in (served.address, served.shard_addresses()):  # one address; the fan-out over the shards
            client = RetrieverClient(target)
            assert client.search(keys[:2], k=3).ids.shape == (2, 3)
            client.close()
            client.close()  # twice: nothing more to do
            for call in (client.info, lambda c=client: c.search(keys[:2], k=3)):
                with pytest.raises(RetrieverError, match="the client is closed") as refused:
                    call()
                assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION



def test_a_fan_out_client_closed_during_a_call_fails_it_as_cancelled():
    """A shard that takes the call and never answers holds it; close() from another thread ends it
    with a RetrieverError (CANCELLED), not a bare CancelledError or a caller left waiting."""
    from concurrent.futures import ThreadPoolExecutor

    entered, release = threading.Event(), threading.Event()

    def never_answers(request: bytes, context) -> bytes:
        entered.set()
        release.wait(30)
        return b""

    hung = grpc.server(ThreadPoolExecutor(4))
    hung.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE_NAME, {"GetInfo": grpc.unary_unary_rpc_method_handler(never_answers)})])
    address = f"127.0.0.1:{hung.add_insecure_port('127.0.0.1:0')}"
    hung.start()
    try:
        client = RetrieverClient([address, address], timeout=60)
        outcome: list[BaseException] = []

        def search() -> None:
            try:
                client.search(np.zeros((1, 8), np.float32), k=1)
            except BaseException as err:  # noqa: BLE001 - the test looks at what it was
                outcome.append(err)

        caller = threading.Thread(target=search, daemon=True)
        caller.start()
        assert entered.wait(30)  # the call is in flight: the shard took it and never answers
        client.close()
        caller.join(10)
    finally:
        release.set()
        hung.stop(0)
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], RetrieverError), outcome
    assert outcome[0].code == grpc.StatusCode.CANCELLED and "closed during the call" in str(outcome[0])

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_request_over_a_shards_limit_is_refused_by_one_replica_not_retried_on_all(aio, keys, datastore,
                                                                                    monkeypatch):
    """Shards with a smaller batch limit than their router's: the first replica's RESOURCE_EXHAUSTED is
    the answer, naming the limit; the shard's other replica is not asked, and both stay in rotation."""
    asked: list[str] = []
    original = ShardService.handle_search

    async def counting(self, raw, context):
        asked.append(f"{self.config.shard}/{self.config.replica}")
        return await original(self, raw, context)

    monkeypatch.setattr(ShardService, "handle_search", counting)
    shards = [[aio.run(start_shard_server(ShardServerConfig(datastore, s, replica=r, metrics_port=None,
                                                            limits=Limits(max_batch=8)))) for r in range(2)]
              for s in range(2)]
    router = aio.run(start_router(RouterConfig(tuple(tuple(x.address for x in s) for s in shards), metrics_port=None)))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(router.address, make_request(keys[:16], k=5))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "batch limit of 8" in caught.value.details()
        shards_asked = [a.split("/")[0] for a in asked]  # one replica of a shard, once; the first refusal
        assert shards_asked and len(set(shards_asked)) == len(shards_asked)  # ends the call, the other cancelled
        asked.clear()
        raw_search(router.address, make_request(keys[:4], k=5))
        assert len(asked) == 2
    finally:
        for server in [router, *(x for s in shards for x in s)]:
            aio.run(server.drain(grace=0))


def test_a_router_that_cannot_serve_its_shards_leaves_nothing_listening(aio, datastore, other_datastore):
    a = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None)))
    b = aio.run(start_shard_server(ShardServerConfig(other_datastore, 1, metrics_port=None)))
    port = free_port()
    try:
        with pytest.raises(RuntimeError, match="different datastores"):
            aio.run(start_router(RouterConfig(((a.address,), (b.address,)), port=port, metrics_port=None)))
        assert port_is_free(port)
    finally:
        for server in (a, b):
            aio.run(server.drain(grace=0))


def test_liveness_is_serving_while_the_server_is_not_on_purpose(aio, datastore, monkeypatch):
    """The "liveness" health service answers SERVING whenever the process answers at all: while the shard
    loads, while it serves, once it turns itself NOT_SERVING (files that failed verification, a drain). A
    liveness probe asking for it restarts a wedged process, never one out of rotation on purpose."""
    from retriever_server.serving.grpc_setup import LIVENESS, set_serving

    def status(address: str, service: str) -> str:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    release, original = threading.Event(), shard_module.Shard.open
    monkeypatch.setattr(shard_module.Shard, "open", lambda *a, **k: (release.wait(30), original(*a, **k))[1])
    config = ShardServerConfig(datastore, 0, metrics_port=None, health_port=0)  # the port probes ask, and the main one
    running = aio.run(start_shard_server(config, wait_loaded=False))
    ports = (running.address, f"127.0.0.1:{running.health_port}")
    try:
        assert [(status(a, ""), status(a, LIVENESS)) for a in ports] == [("NOT_SERVING", "SERVING")] * 2
        release.set()

        async def loaded() -> None:
            await running.ready

        aio.run(loaded())
        assert [(status(a, ""), status(a, LIVENESS)) for a in ports] == [("SERVING", "SERVING")] * 2
        aio.run(set_serving(running.health, False))  # as a shard whose files failed the background sha256
        assert [(status(a, SERVICE_NAME), status(a, LIVENESS)) for a in ports] == [("NOT_SERVING", "SERVING")] * 2
    finally:
        release.set()
        aio.run(running.drain(grace=0))


def test_a_health_port_already_taken_is_refused_and_nothing_is_left_listening(aio, datastore):
    first = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, health_port=0)))
    port = free_port()
    try:
        with pytest.raises(OSError, match=f"could not bind the health port 127.0.0.1:{first.health_port}"):
            aio.run(start_shard_server(ShardServerConfig(datastore, 0, port=port, metrics_port=None,
                                                         health_port=first.health_port)))
        assert port_is_free(port)
    finally:
        aio.run(first.drain(grace=0))


def test_a_server_that_cannot_bind_releases_what_its_service_holds(aio, datastore, monkeypatch):
    """A router or shard server whose port is taken raised, leaving its service's thread pool (and the
    router's channels to its shards) behind in a library caller's process; they are released now."""
    closed = []

    def recorded(close):
        async def recording(self):
            closed.append(type(self).__name__)
            await close(self)
        return recording

    monkeypatch.setattr(ShardService, "close", recorded(ShardService.close))
    monkeypatch.setattr(router_module.RouterService, "close", recorded(router_module.RouterService.close))
    first = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None)))
    taken = int(first.address.rsplit(":", 1)[1])
    try:
        with pytest.raises(OSError, match="could not bind"):
            aio.run(start_shard_server(ShardServerConfig(datastore, 0, port=taken, metrics_port=None)))
        with pytest.raises(OSError, match="could not bind"):
            aio.run(start_router(RouterConfig(((first.address,),), port=taken, metrics_port=None)))
    finally:
        aio.run(first.drain(grace=0))
    assert closed == ["ShardService", "RouterService", "ShardService"]  # the last: the first server's drain


def test_a_server_binds_an_ipv6_address_as_given(aio, datastore):
    """`--host ::1` or `--health-host ::1` (no brackets) made "::1:PORT", which gRPC cannot bind."""
    from retriever_server.serving.grpc_setup import health_status

    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, host="::1", metrics_port=None, health_port=0,
                                                           health_host="::1")))
    try:
        assert running.address.startswith("[::1]:")
        assert health_status(running.address) == health_status(f"[::1]:{running.health_port}") == "SERVING"
    finally:
        aio.run(running.drain(grace=0))


def test_health_answers_without_a_token_but_within_bounds(aio, datastore):
    """Health needs no token, so it holds nothing a caller sends: any service but the server's own is
    NOT_FOUND at once (a Watch of any name used to stay open, holding its request), at most MAX_WATCHES
    watches are open at once, and the health-only port reads requests of a few KiB at most."""
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, health_port=0)))
    watches = []
    try:
        with grpc.insecure_channel(running.address) as channel, \
                grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as health_channel:
            stub = health_pb2_grpc.HealthStub(channel)
            codes = []
            for call in (lambda: stub.Check(health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=5),
                         lambda: next(stub.Watch(health_pb2.HealthCheckRequest(service="other"), timeout=5)),
                         lambda: health_pb2_grpc.HealthStub(health_channel).Check(
                             health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=5)):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                codes.append(refused.value.code())
            for _ in range(MAX_WATCHES):
                watches.append(stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30))
                next(watches[-1])  # open: its first answer came
            with pytest.raises(grpc.RpcError) as crowded:
                next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5))
            for watch in watches:
                watch.cancel()
            assert health_status(running.address) == "SERVING"
    finally:
        aio.run(running.drain(grace=0))
    assert codes == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert crowded.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def _idle_health_checks(target: str, count: int, release: asyncio.Event) -> list[asyncio.Task]:
    """`count` health Checks at `target` whose request does not come until `release` is set."""
    async def never_sent():
        await release.wait()
        yield health_pb2.HealthCheckRequest()

    channel = grpc.aio.insecure_channel(target)
    check = channel.stream_unary("/grpc.health.v1.Health/Check",
                                 request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                 response_deserializer=health_pb2.HealthCheckResponse.FromString)

    async def one() -> grpc.StatusCode:
        try:
            await check(never_sent(), timeout=60)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    calls = [asyncio.ensure_future(one()) for _ in range(count)]
    asyncio.gather(*calls).add_done_callback(lambda _: asyncio.ensure_future(channel.close()))
    return calls


async def _check(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_health_calls_that_send_no_request_are_refused_in_time(aio, datastore, monkeypatch):
    """An open health call whose request never comes is refused after HEALTH_READ_S, so that idle calls
    cannot hold a port's call slots (300 of them filled the health-only port's 256 slots for good, and
    the probes failed); a main port reads HEALTH_READS health requests at once (each may be as large as a
    search), the others waiting their turn unread."""
    monkeypatch.setattr(grpc_setup, "HEALTH_READ_S", 1.0)
    monkeypatch.setattr(service_module, "HEALTH_PORT_CALLS", 256)  # as it was: 300 idle calls crowd it
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, health_port=0)))
    health_port = f"127.0.0.1:{running.health_port}"

    async def scenario():
        release = asyncio.Event()
        idle = await _idle_health_checks(health_port, 300, release)
        await asyncio.sleep(0.5)
        crowded = await _check(health_port)  # every slot held for the moment
        idle_codes = await asyncio.wait_for(asyncio.gather(*idle), 20)
        after = await _check(health_port)
        main = await _idle_health_checks(running.address, grpc_setup.HEALTH_READS, release)
        await asyncio.sleep(0.5)
        fifth = asyncio.ensure_future(_check(running.address))  # waits, unread, for a turn to be read
        await asyncio.sleep(0.3)
        waited = not fifth.done()
        main_codes = await asyncio.wait_for(asyncio.gather(*main), 20)
        burst = await asyncio.gather(*(_check(running.address) for _ in range(3 * grpc_setup.HEALTH_READS)))
        release.set()
        return crowded, idle_codes, after, waited, await fifth, main_codes, burst

    try:
        crowded, idle_codes, after, waited, fifth, main_codes, burst = aio.run(scenario())
    finally:
        aio.run(running.drain(grace=0))
    refused = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert crowded == "RESOURCE_EXHAUSTED" and set(idle_codes) == refused, (crowded, set(idle_codes))
    assert idle_codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 200
    assert after == "SERVING" and set(main_codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert waited and fifth == "SERVING"  # read once the idle calls' turns ended
    assert set(burst) == {"SERVING"}  # probes at once, more than read at once: each waits its turn


def test_calls_that_never_send_do_not_crowd_out_probes_on_the_health_port(aio, datastore, monkeypatch):
    """The health-only port took 256 calls at once: 260 Checks that never sent their request, renewed every
    HEALTH_READ_S, refused the kubelet's probe (RESOURCE_EXHAUSTED). It takes HEALTH_PORT_CALLS."""
    monkeypatch.setattr(grpc_setup, "HEALTH_READ_S", 3.0)
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, health_port=0)))
    health_port = f"127.0.0.1:{running.health_port}"

    async def scenario():
        release = asyncio.Event()
        idle = [call for _ in range(20) for call in await _idle_health_checks(health_port, 16, release)]
        await asyncio.sleep(1.0)
        probe = await _check(health_port)
        release.set()
        await asyncio.wait_for(asyncio.gather(*idle), 20)
        return probe

    try:
        assert aio.run(scenario()) == "SERVING"  # 320 idle calls on 20 connections
    finally:
        aio.run(running.drain(grace=0))


def test_calls_without_a_token_cannot_take_the_slots_of_callers_with_one(aio, datastore, monkeypatch, tmp_path):
    """Health calls need no token and could wait HEALTH_READ_S unread: 270 of them held every call slot
    of a server of 4 searches in flight (260), and a caller with a token got RESOURCE_EXHAUSTED. A main
    port now holds HEALTH_WAITING of them unread, and refuses the next at once."""
    from retriever_server.security.certs import write_private
    from retriever_server.security.config import ClientSecurity

    monkeypatch.setattr(grpc_setup, "HEALTH_READ_S", 2.0)
    tokens = write_private(tmp_path / "tokens", b"the-token\n")
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None,
                                                           limits=Limits(max_inflight=4),
                                                           security=ServerSecurity(token_file=tokens))))

    async def scenario():
        release = asyncio.Event()
        idle = await _idle_health_checks(running.address, grpc_setup.most_calls(4) + 10, release)
        await asyncio.sleep(0.5)
        with RetrieverClient(running.address, security=ClientSecurity(token="the-token"), timeout=5) as client:
            info = await asyncio.get_running_loop().run_in_executor(None, client.info)
        codes = await asyncio.wait_for(asyncio.gather(*idle), 20)
        release.set()
        return info, codes

    try:
        info, codes = aio.run(scenario())
    finally:
        aio.run(running.drain(grace=0))
    assert info.role == "shard"
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(codes) - grpc_setup.HEALTH_WAITING
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == grpc_setup.HEALTH_WAITING


def test_a_replacement_replica_that_does_not_answer_leaves_no_channel_open(aio, keys, datastore, monkeypatch):
    opened = []
    real_open = router_module.open_aio_channel

    def recording(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(router_module, "open_aio_channel", recording)
    with serve(aio, datastore, 2) as served:
        service = served.router.service
        with pytest.raises(grpc.aio.AioRpcError):
            aio.run(service.replace_replica(0, 0, f"127.0.0.1:{free_port()}", timeout_s=0.5))
        assert opened[-1].get_state() == grpc.ChannelConnectivity.SHUTDOWN
        raw_search(served.address, good_request(keys))  # the old replica still serves


@pytest.mark.slow
def test_replica_killed_mid_test_leaves_answers_unchanged(keys, datastore):
    with LocalDeployment(datastore, replicas=2, extra_args=NO_DRAIN, router_args=NO_DRAIN) as deployment, \
            RetrieverClient(deployment.router_address) as client:
        before = [client.search(keys[i:i + 50], k=10, nprobe=8, payloads=["values"]) for i in range(0, 500, 50)]
        deployment.kill(shard=0, replica=0)
        deployment.kill(shard=1, replica=1)
        for i, expected in zip(range(0, 500, 50), before):
            after = client.search(keys[i:i + 50], k=10, nprobe=8, payloads=["values"])
            np.testing.assert_array_equal(after.ids, expected.ids)
            np.testing.assert_array_equal(after.distances, expected.distances)
            np.testing.assert_array_equal(after.payloads["values"], expected.payloads["values"])
            assert not after.partial


@pytest.mark.slow
def test_shard_down_gives_partial_results_only_when_allowed(keys, datastore):
    with LocalDeployment(datastore, replicas=1, extra_args=NO_DRAIN, router_args=NO_DRAIN) as deployment:
        shards = deployment.shard_addresses
        with RetrieverClient(deployment.router_address) as client, RetrieverClient(shards[0][0]) as only_first:
            alone = only_first.search(keys[:20], k=10, nprobe=8)
            deployment.kill(shard=1)
            with pytest.raises(RetrieverError) as caught:
                client.search(keys[:20], k=10, nprobe=8)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "shard-00001" in caught.value.message
            partial = client.search(keys[:20], k=10, nprobe=8, allow_partial=True)
        assert partial.partial and list(partial.failed_shards) == ["shard-00001"]
        np.testing.assert_array_equal(partial.ids, alone.ids)
        with RetrieverClient(shards) as fan_out:
            with pytest.raises(RetrieverError, match="shard-00001"):
                fan_out.search(keys[:20], k=10, nprobe=8)
            assert fan_out.search(keys[:20], k=10, nprobe=8, allow_partial=True).partial


@pytest.mark.slow
def test_sigterm_drains_and_exits_cleanly(datastore):
    deployment = LocalDeployment(datastore, replicas=1).start()
    try:
        process = deployment.shards[0][0].popen
        process.terminate()
        assert process.wait(timeout=20) == 0
    finally:
        deployment.stop()
    assert all(p.popen.returncode == 0 for p in deployment.processes())


def test_exclusions_up_to_the_limits_are_served_and_past_them_refused(aio, keys, datastore):
    """Every even id excluded (as ranges, then as ids) leaks no excluded row; one range or id past a
    per-query or per-request limit is refused with RESOURCE_EXHAUSTED naming it, before any search."""
    limits = Limits(max_excluded_ranges_per_query=N // 2, max_excluded_per_query=N // 2, max_excluded_ranges=N,
                    max_excluded=N)
    with serve(aio, datastore, 2, limits=limits) as served:
        request = good_request(keys)
        request.k = 50
        request.exclude.ranges.extend(pb.IdRange(start=i, end=i + 1) for i in range(0, N, 2))  # every even id
        ids = np.frombuffer(raw_search(served.address, request).ids.data, dtype=np.int64)
        assert len(ids) and np.all(ids[ids >= 0] % 2 == 1)
        by_ids = good_request(keys)
        by_ids.k = 50
        by_ids.exclude.ids.extend(range(0, N, 2))
        ids = np.frombuffer(raw_search(served.address, by_ids).ids.data, dtype=np.int64)
        assert len(ids) and np.all(ids[ids >= 0] % 2 == 1)
        one_more_range, one_more_id = pb.SearchRequest(), pb.SearchRequest()
        one_more_range.CopyFrom(request)
        one_more_range.exclude.ranges.add(start=1, end=2)
        one_more_id.CopyFrom(by_ids)
        one_more_id.exclude.ids.append(1)
        for too_many, words in ((one_more_range, "a query excludes 2001 id ranges, over the limit of 2000 per query"),
                                (one_more_id, "a query excludes 2001 ids, over the limit of 2000 per query")):
            with pytest.raises(grpc.RpcError) as caught:
                raw_search(served.address, too_many)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and words in caught.value.details()
        raw_search(served.address, good_request(keys))


def test_answer_over_the_size_budget_is_refused(aio, keys, datastore):
    limits = Limits(max_response_bytes=1 << 20)
    with serve(aio, datastore, 2, limits=limits) as served:
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(served.address, make_request(keys[:1000], k=100, return_keys=True))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "split the batch" in caught.value.details()
        raw_search(served.address, make_request(keys[:10], k=100, return_keys=True))


def test_an_internal_error_is_a_status_and_is_counted(aio, keys, datastore, monkeypatch):
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=0)))
    try:
        def broken(self, spec, stop=None):  # fault injection: a bug inside the search
            raise ZeroDivisionError("boom")

        monkeypatch.setattr(shard_module.Shard, "search", broken)
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(running.address, good_request(keys))
        assert caught.value.code() == grpc.StatusCode.INTERNAL and "ZeroDivisionError: boom" in caught.value.details()
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
        assert 'retriever_requests_total{method="Search",status="INTERNAL"} 1.0' in text
        monkeypatch.undo()
        raw_search(running.address, good_request(keys))
    finally:
        aio.run(running.drain(grace=0))


def test_a_search_past_its_deadline_is_counted_as_deadline_exceeded(aio, keys, datastore, monkeypatch):
    """A search answered after its deadline (the caller has its DEADLINE_EXCEEDED by then) is counted as
    DEADLINE_EXCEEDED, what the caller saw, not OK; nor, where gRPC cancels the handler, as CANCELLED."""
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=0)))
    search = shard_module.Shard.search
    try:
        monkeypatch.setattr(shard_module.Shard, "search", lambda *args, **kw: time.sleep(1.0) or search(*args, **kw))
        with pytest.raises(grpc.RpcError) as caught:
            raw_search(running.address, good_request(keys), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def counted() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode()
        deadline = time.monotonic() + 5
        while 'status="DEADLINE_EXCEEDED"' not in counted() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 'retriever_requests_total{method="Search",status="DEADLINE_EXCEEDED"} 1.0' in counted()
        assert 'status="CANCELLED"' not in counted() and 'status="OK"' not in counted()
    finally:
        aio.run(running.drain(grace=0))


def _router_error(aio, shards) -> str:
    router = aio.run(start_router(RouterConfig(shards, metrics_port=None), wait_ready=False))
    try:
        with pytest.raises(RuntimeError) as caught:
            aio.run(asyncio.wait_for(asyncio.shield(router.ready), 30))
        return str(caught.value)
    finally:
        aio.run(router.drain(grace=0))


def test_router_refuses_a_shard_set_that_is_not_one_whole_datastore(aio, datastore, other_datastore):
    servers = [aio.run(start_shard_server(ShardServerConfig(datastore, i, metrics_port=None))) for i in (0, 1)]
    other = aio.run(start_shard_server(ShardServerConfig(other_datastore, 1, metrics_port=None)))
    a, b, c = (s.address for s in (*servers, other))
    try:
        assert "given more than once" in _router_error(aio, ((a,), (a,)))
        assert "has 2 shards but 1 were given" in _router_error(aio, ((a,),))
        assert "different datastores" in _router_error(aio, ((a,), (b, c)))
        assert "serve different shards" in _router_error(aio, ((a, b),))
        with pytest.raises(RetrieverError, match="given more than once"):
            RetrieverClient([a, a]).search(np.zeros((1, D), np.float32), k=1)
        router = aio.run(start_router(RouterConfig(((a,), (b,)), metrics_port=None)))
        try:  # a router given as a shard: its answers hold every shard's ids, merged again they come twice
            not_a_shard = "the address given as shard 0 answers as a 'router', not a shard server"
            assert not_a_shard in _router_error(aio, ((router.address,), (b,)))
            assert "given as shard 1 answers as a 'router'" in _router_error(aio, ((a,), (b, router.address)))
            for shards in ([router.address, b], [[a, router.address], b]):  # a shard, or a shard's replica
                with pytest.raises(RetrieverError, match=not_a_shard):
                    RetrieverClient(shards).search(np.zeros((1, D), np.float32), k=1)
        finally:
            aio.run(router.drain(grace=0))
    finally:
        for server in (*servers, other):
            aio.run(server.drain(grace=0))


def test_a_small_search_answered_on_the_loop_equals_the_same_queries_in_a_batch(aio, keys, datastore, monkeypatch):
    """A search of a few queries runs on the shard's event loop, a batch in its thread pool: the same
    neighbours for the same queries, and the pool is used for the batch alone."""
    handed = []
    original = ShardService._answer

    def recording(self, spec, stop):
        handed.append((spec.nq, threading.current_thread().name.startswith("faiss")))
        return original(self, spec, stop)

    monkeypatch.setattr(ShardService, "_answer", recording)
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None)))
    try:
        small = raw_search(running.address, make_request(keys[:3], k=5, nprobe=4))
        batch = raw_search(running.address, make_request(keys[:16], k=5, nprobe=4))
        wide = raw_search(running.address, make_request(keys[:3], k=2000, nprobe=4, return_keys=True,
                                                        successors=4))  # 30,000 neighbours with their keys
    finally:
        aio.run(running.drain(grace=0))
    assert small.ids.data == batch.ids.data[:3 * 5 * 8] and small.distances.data == batch.distances.data[:3 * 5 * 4]
    assert wide.ids.data[:5 * 8] == small.ids.data[:5 * 8]
    assert handed == [(3, False), (16, True), (3, True)]  # (queries, in the FAISS pool): a large answer is work


def test_successors_are_the_rows_after_each_neighbour_within_its_shard(aio, keys, datastore):
    """Through the router and through the client's fan-out: each neighbour's next rows, their values
    and stored keys, -1 (and zeros) past the end of the neighbour's shard and for missing neighbours."""
    stored = keys.astype(np.float16).astype(np.float32)
    with serve(aio, datastore, 2) as served, RetrieverClient(served.address) as router, \
            RetrieverClient([s[0].address for s in served.shards]) as fan_out:
        ends = [shard.id_end for shard in router.info().shards]
        # the last rows of each shard, so that some successors fall past its end
        queries = np.concatenate([keys[end - 3:end] for end in ends])
        for client in (router, fan_out):
            found = client.search(queries, k=6, nprobe=16, payloads=["values"], return_keys=True, successors=4)
            plain = client.search(queries, k=6, nprobe=16, payloads=["values"], return_keys=True)
            assert np.array_equal(found.ids, plain.ids) and np.array_equal(found.payloads["values"],
                                                                          plain.payloads["values"])
            end_of = np.select([found.ids < e for e in ends], ends, 0)[..., None]  # (nq, k, 1) its shard's end
            expect = found.ids[..., None] + np.arange(1, 5)
            expect[(found.ids[..., None] < 0) | (expect >= end_of)] = -1
            assert found.successor_ids.shape == (len(queries), 6, 4) and (found.successor_ids < 0).any()
            assert np.array_equal(found.successor_ids, expect)
            valid = expect >= 0
            assert np.array_equal(found.successor_payloads["values"], np.where(valid, expect, 0))
            assert np.array_equal(found.successor_keys, np.where(valid[..., None], stored[np.maximum(expect, 0)], 0))
            assert plain.successor_ids is None and plain.successor_payloads == {}


def test_successors_a_request_excludes_do_not_reach_it(aio, keys, datastore):
    """A successor is a row the caller receives: one its request excludes (for all queries, or for its
    own query) comes back -1 with zero payloads, through the router and the fan-out, as a neighbour would."""
    from retriever_server.client import Exclude
    with serve(aio, datastore, 2) as served, RetrieverClient(served.address) as router, \
            RetrieverClient([s[0].address for s in served.shards]) as fan_out:
        queries = keys[[100, 300]]
        common = Exclude(ranges=[(101, 103)])  # the first query's own row's next two rows
        own = [Exclude(), Exclude(ids=[302])]  # the second query's row's second successor, for it alone
        for client in (router, fan_out):
            found = client.search(queries, k=4, nprobe=16, payloads=["values"], successors=4,
                                  exclude=common, exclude_per_query=own)
            assert found.ids[0, 0] == 100 and found.ids[1, 0] == 300  # each query's own row, nearest
            assert found.successor_ids[0, 0].tolist() == [-1, -1, 103, 104]
            assert found.successor_ids[1, 0].tolist() == [301, -1, 303, 304]
            assert found.successor_payloads["values"][0, 0].tolist() == [0, 0, 103, 104]
            after = found.successor_ids[found.successor_ids >= 0]
            assert not np.isin(after, [101, 102]).any()


def test_a_client_of_one_address_calls_from_the_callers_thread_and_gives_the_fan_out_answer(aio, keys, datastore):
    """No event loop thread for one address (a hop that cost a call ~0.3 ms of CPU); a shard list gets one.
    Both give the same neighbours, and a refusal keeps its status and message."""
    def started_since(before: set[threading.Thread]) -> list[str]:
        return [t.name for t in threading.enumerate() if t not in before]

    with serve(aio, datastore, 2) as served:
        shards = [[s.address for s in replicas] for replicas in served.shards]
        before = set(threading.enumerate())
        with RetrieverClient(served.address) as one:
            via_router = one.search(keys[:6], k=7, nprobe=8)
            assert "retriever-client" not in started_since(before)
            with pytest.raises(RetrieverError) as caught:
                one.search(keys[:2], k=0)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "k must be in" in caught.value.message
        with RetrieverClient(shards) as fan_out:
            direct = fan_out.search(keys[:6], k=7, nprobe=8)
            assert "retriever-client" in started_since(before)
    np.testing.assert_array_equal(via_router.ids, direct.ids)
    np.testing.assert_array_equal(via_router.distances, direct.distances)
    assert "retriever-client" not in started_since(before)  # closed: its thread ended


def test_an_exact_idmap_flat_datastore_answers_the_brute_force_neighbours(aio, keys, tmp_path):
    """"IDMap,Flat", the exact index the build suggests for "Flat": through the router, with excluded
    rows, the top-k of a float64 brute-force search."""
    from retriever_server.client import Exclude

    datastore = build(tmp_path, keys[:1000], "exact", shards=2, factory="IDMap,Flat")
    queries = keys[:6] + np.float32(0.01)
    with serve(aio, datastore, 2) as served, RetrieverClient(served.address, timeout=10) as client:
        found = client.search(queries, k=5, exclude=Exclude(ids=[0, 1], ranges=[(500, 520)]))
    distances = ((queries[:, None, :].astype(np.float64) - keys[None, :1000]) ** 2).sum(-1)  # (6, 1000)
    distances[:, [0, 1, *range(500, 520)]] = np.inf
    assert np.array_equal(found.ids, np.argsort(distances, axis=1, kind="stable")[:, :5])


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivf_ties_at_the_kth_place_keep_the_smallest_ids(aio, tmp_path, metric):
    """Small integer keys tie often. An IVF scan keeps a tied candidate only when it is strictly better than
    its worst, so which ones of a tie straddling the k-th place it keeps depends on its scan order: the
    shards must still answer a float64 brute-force search with ties by id, probing every list."""
    rng = np.random.default_rng(5)
    keys = rng.integers(-2, 3, (1500, D)).astype(np.float32)
    datastore = build(tmp_path, keys, f"ties-{metric}", shards=2, factory="IVF8,Flat", metric=metric)
    queries = rng.integers(-2, 3, (100, D)).astype(np.float32)
    q64, k64 = queries.astype(np.float64), keys.astype(np.float64)
    scores = ((q64[:, None, :] - k64[None]) ** 2).sum(-1) if metric == "l2" else -(q64 @ k64.T)  # smaller: better
    truth = np.argsort(scores, axis=1, kind="stable")  # ties by id
    with serve(aio, datastore, 2) as served, RetrieverClient(served.address, timeout=10) as router:
        for k in (3, 10):
            np.testing.assert_array_equal(router.search(queries, k=k, nprobe=8).ids, truth[:, :k], err_msg=f"k={k}")


def test_fastscan_ties_come_back_by_id_and_a_smaller_k_is_a_prefix(aio, tmp_path):
    """FastScan (`x4fs`) orders the neighbours of an L2 tie as its blocks meet them, past k = 20: every answer
    must still hold each tie by id, so that an answer at a smaller k is the first k of a larger one."""
    keys = np.repeat(np.random.default_rng(6).integers(-2, 3, (300, D)).astype(np.float32), 5, axis=0)
    datastore = build(tmp_path, keys, "fastscan", shards=2, factory="IVF8,PQ4x4fs")
    queries = keys[::37] + 0.25
    with serve(aio, datastore, 2) as served, RetrieverClient(served.address, timeout=10) as router:
        wide = router.search(queries, k=60, nprobe=8)
        order = np.lexsort((wide.ids, wide.distances), axis=1)  # distance, then id
        np.testing.assert_array_equal(wide.ids, np.take_along_axis(wide.ids, order, axis=1))
        for k in (3, 21, 25):
            np.testing.assert_array_equal(router.search(queries, k=k, nprobe=8).ids, wide.ids[:, :k], err_msg=f"k={k}")


def test_inner_product_ties_at_the_kth_place_keep_the_smallest_ids(aio, tmp_path):
    """Rows stored three times each, inner product, three shards: at every k, with and without
    exclusions, through the router and the fan-out client, the neighbours are a float64 brute-force
    search's with ties by id, though FAISS's inner-product heap keeps a straddling tie's largest ids."""
    from retriever_server.client import Exclude

    keys = np.repeat(synthetic(20, D, seed=3), 3, axis=0)  # rows 3i, 3i + 1, 3i + 2 are equal
    datastore = build(tmp_path, keys, "tied", shards=3, factory="IDMap,Flat", metric="ip")
    queries = keys[[5, 17, 40, 58]]
    scores = -(queries.astype(np.float64) @ keys.T.astype(np.float64))  # (4, 60): smaller is better
    cases = [(None, None), (Exclude(ids=[0, 31], ranges=[(45, 47)]), None),
             (None, [Exclude(ids=[int(q)], ranges=[(3 * i, 3 * i + 1)]) for i, q in enumerate((3, 50, 41, 1))])]
    with serve(aio, datastore, 3) as served, RetrieverClient(served.address, timeout=10) as router, \
            RetrieverClient(served.shard_addresses(), timeout=10) as fan_out:
        for common, per_query in cases:
            masked = scores.copy()
            for i in range(len(queries)):
                for ex in [e for e in (common, per_query[i] if per_query else None) if e is not None]:
                    masked[i, list(ex.ids)] = np.inf
                    for start, end in ex.ranges:
                        masked[i, start:end] = np.inf
            truth = np.argsort(masked, axis=1, kind="stable")  # ties by id
            for k in (1, 2, 4, 5, 7):
                for client in (router, fan_out):
                    found = client.search(queries, k=k, exclude=common, exclude_per_query=per_query)
                    np.testing.assert_array_equal(found.ids, truth[:, :k], err_msg=f"k={k}")
