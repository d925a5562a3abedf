"""Replicas that are busy, hung, of another datastore version, or moved, as the router and the client's
own fan-out meet them (in-process servers on loopback, 2 shards x 2 replicas): both answer alike, in
time, and leave no connection open behind them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import build, damaged_copy, serve, synthetic

from retriever_server.datastore.manifest import DatastoreError
from retriever_server.serving.client import RetrieverClient, RetrieverError
from retriever_server.serving.router import RouterConfig, start_router
from retriever_server.serving.shard_server import ShardServerConfig, start_shard_server
from retriever_server.wire.request import Limits

pytestmark = [pytest.mark.ray]
N, D = 3000, 16


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return synthetic(N, D, seed=11)


@pytest.fixture(scope="module")
def datastore(ray_cluster, keys, tmp_path_factory):
    return build(tmp_path_factory.mktemp("replica-faults"), keys, "ds", shards=2, factory="IVF8,Flat")


async def hang(*_args, **_kwargs):
    await asyncio.sleep(3600)


def outcome(search) -> str:
    """'OK', 'partial: <failed shards>' or the status code's name of `search()`."""
    try:
        found = search()
    except RetrieverError as err:
        return err.code.name
    return f"partial: {','.join(sorted(found.failed_shards))}" if found.partial else "OK"


def test_a_shard_whose_replicas_are_all_busy_is_unavailable_or_left_out_for_the_fan_out_as_for_the_router(
        aio, datastore, keys):
    """Every replica of shard 1 at its limit of requests in flight: the fan-out client, as the router,
    answers UNAVAILABLE naming the shard, or a partial answer where allowed (it used to fail the whole call
    with one replica's RESOURCE_EXHAUSTED)."""
    with serve(aio, datastore, 2, replicas=2, limits=Limits(max_inflight=1)) as served, \
            RetrieverClient(served.address, timeout=5) as router, \
            RetrieverClient(served.shard_addresses(), timeout=5) as fan_out:
        fan_out.search(keys[:2], k=5)  # the shards' infos, known before the replicas are busy
        for replica in served.shards[1]:
            replica.service.handle_search = lambda raw, context: asyncio.sleep(2.0, (b"", 0))
        holders = [RetrieverClient(address, timeout=5) for address in served.shard_addresses()[1]]
        threads = [threading.Thread(target=outcome, args=(lambda c=c: c.search(keys[:1], k=1),)) for c in holders]
        try:
            for thread in threads:
                thread.start()
            time.sleep(0.4)  # each replica of shard 1 holds one request now, its limit
            seen = {name: (outcome(lambda c=client: c.search(keys[:2], k=5)),
                           outcome(lambda c=client: c.search(keys[:2], k=5, allow_partial=True)))
                    for name, client in (("router", router), ("fan-out", fan_out))}
        finally:
            for thread in threads:
                thread.join()
            for holder in holders:
                holder.close()
    assert seen == {name: ("UNAVAILABLE", "partial: shard-00001") for name in ("router", "fan-out")}


def test_a_fresh_fan_out_client_answers_in_time_past_a_hung_replica_or_a_hung_shard(aio, datastore, keys):
    """A new client's first search asks every shard and replica for its GetInfo: a replica that hangs
    (the other answering) costs it at most a quarter of its 2 s deadline, and a whole shard that hangs
    leaves the time for a partial answer (it used to wait 5 s for the replica, and to fail whole on the shard)."""
    with serve(aio, datastore, 2, replicas=2) as served:
        hung = served.shards[0][0].service
        hung.handle_search = hung.handle_info = hang
        began = time.monotonic()
        with RetrieverClient(served.shard_addresses(), timeout=2.0) as client:
            first = outcome(lambda: client.search(keys[:4], k=5))
        past_replica = time.monotonic() - began
        for replica in served.shards[1]:
            replica.service.handle_search = replica.service.handle_info = hang
        with RetrieverClient(served.shard_addresses(), timeout=2.0) as client:
            partial = outcome(lambda: client.search(keys[:4], k=5, allow_partial=True))
    assert first == "OK" and past_replica < 1.5
    assert partial == "partial: shard-00001"


def test_a_lost_shard_fails_the_call_at_once_and_cancels_the_others_search(aio, datastore, keys):
    """Without `allow_partial`, a shard whose replicas all failed fails the call: UNAVAILABLE naming it,
    at once, the other shards' searches cancelled. The router and the fan-out client waited for every
    shard first: behind a slow shard, the whole deadline, and then said DEADLINE_EXCEEDED naming the slow one."""
    cancelled, searching = threading.Event(), threading.Event()

    async def refuse(raw, context):  # as a draining replica refuses, once the other shard's search is under way
        for _ in range(500):  # (refused first, the other call may be cancelled before its search starts: nothing
            if searching.is_set():  # of it to cancel then, on a loaded machine)
                break
            await asyncio.sleep(0.01)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

    async def slow(*_args, **_kwargs):
        searching.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    seen = {}
    with serve(aio, datastore, 2) as served, RetrieverClient(served.address, timeout=30) as router, \
            RetrieverClient(served.shard_addresses(), timeout=30) as fan_out:
        fan_out.search(keys[:2], k=5)  # the shards' infos, known before they fail
        served.shards[0][0].service.handle_search = refuse
        served.shards[1][0].service.handle_search = slow
        for name, client in (("router", router), ("fan-out", fan_out)):
            cancelled.clear()
            searching.clear()
            with pytest.raises(RetrieverError) as refused:  # waiting for the slow shard: DEADLINE_EXCEEDED
                client.search(keys[:2], k=5)
            seen[name] = (refused.value.code.name, cancelled.wait(10.0))  # well before the deadline would end it
            assert "shard-00000 unavailable (" in str(refused.value) and "shard-00001" not in str(refused.value)
    assert seen == {name: ("UNAVAILABLE", True) for name in ("router", "fan-out")}


def test_an_error_that_is_no_shards_status_is_raised_not_merged(aio, datastore, keys):
    """A shard call that raises something other than its final status (a channel closed under it, a
    bug) was taken by the fan-out client for that shard's answer, and merged (AttributeError)."""
    def closed(*_args, **_kwargs):
        raise grpc.aio.UsageError("Channel is closed.")

    with serve(aio, datastore, 2) as served, RetrieverClient(served.shard_addresses(), timeout=3) as client:
        client.search(keys[:2], k=5)
        for stub in client.stubs.values():
            stub.Search = closed
        with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
            client.search(keys[:2], k=5)


def test_a_shard_list_that_is_not_one_datastore_is_refused_while_a_shard_is_down(aio, datastore, keys):
    """The fan-out client checks that its shard list is one datastore's shards, each once, before a search;
    it skipped that check while any shard was down, and then merged a shard's rows twice (duplicate ids)."""
    nowhere = "127.0.0.1:1"  # nothing listens there: a shard that is down
    with serve(aio, datastore, 2) as served:
        (s0,), (s1,) = served.shard_addresses()
        also_s0 = s0.replace("127.0.0.1", "localhost")
        lists = {"a shard twice": [[s0], [also_s0], [nowhere]], "a router as a shard": [[served.address], [nowhere]],
                 "more than the datastore's": [[s0], [s1], [nowhere]]}
        seen = {}
        for name, shards in lists.items():
            with RetrieverClient(shards, timeout=3) as client, pytest.raises(RetrieverError) as refused:
                client.search(keys[:4], k=5, allow_partial=True)
            seen[name] = (refused.value.code.name, str(refused.value))
    assert {name: code for name, (code, _) in seen.items()} == dict.fromkeys(lists, "FAILED_PRECONDITION")
    assert "shards given more than once: ['shard-00000']" in seen["a shard twice"][1]
    assert "answers as a 'router', not a shard server" in seen["a router as a shard"][1]
    assert "the datastore has 2 shards but 3 were given" in seen["more than the datastore's"][1]


def test_a_shard_down_is_named_as_itself_in_a_list_out_of_order(aio, datastore, keys):
    """Shards listed out of the datastore's order, shard-00000 down from the first search: the partial
    answer names shard-00000 as failed (it named the position, shard-00001, whose rows it returned)."""
    async def refuse(*_args):
        raise RuntimeError("down")  # the servicer answers UNKNOWN: a replica failed, retryable

    with serve(aio, datastore, 2) as served:
        (s0,), (s1,) = served.shard_addresses()
        down = served.shards[0][0].service
        down.handle_search = down.handle_info = refuse
        with RetrieverClient([[s1], [s0]], timeout=3) as client:
            found = client.search(keys[:4], k=5, allow_partial=True)
            with pytest.raises(RetrieverError, match=r"^UNAVAILABLE: shard-00000 unavailable \("):
                client.search(keys[:4], k=5)
    assert found.partial and set(found.failed_shards) == {"shard-00000"}
    assert found.ids.min() >= N // 2  # shard-00001's rows alone


def test_a_replica_serving_another_datastore_version_is_failed_over(aio, datastore, keys):
    """One replica of shard 0 serves another version (as after a restart on a new build): every search,
    through the router and the fan-out, is answered by its sibling; where every replica of the shard is
    of another version, the shard is unavailable, named; a version the caller asks for and the datastore
    lacks is still FAILED_PRECONDITION, from either."""
    with serve(aio, datastore, 2, replicas=2) as served, \
            RetrieverClient(served.address, timeout=5) as router, \
            RetrieverClient(served.shard_addresses(), timeout=5) as fan_out:
        expected = router.search(keys[:4], k=5).ids
        fan_out.search(keys[:4], k=5)
        stale = served.shards[0][0].service.shard
        stale._view = dataclasses.replace(stale._view, version="0123456789abcdef")
        found = [client.search(keys[:4], k=5).ids for client in (router, fan_out) for _ in range(10)]
        other = served.shards[0][1].service.shard
        other._view = dataclasses.replace(other._view, version="0123456789abcdef")
        with pytest.raises(RetrieverError) as gone:
            router.search(keys[:4], k=5)
        asked = [outcome(lambda c=client: c.search(keys[:4], k=5, expected_version="feedfacefeedface"))
                 for client in (router, fan_out)]
    assert all(np.array_equal(ids, expected) for ids in found)
    assert gone.value.code == grpc.StatusCode.UNAVAILABLE and "shard-00000 unavailable" in gone.value.message
    assert asked == ["FAILED_PRECONDITION", "FAILED_PRECONDITION"]


def test_a_replica_back_at_its_old_address_leaves_no_channel_open(aio, datastore):
    """The router sends shard 0's replica to another address and back: the channel it had there is closed
    by the time the router has drained (it used to be dropped open)."""
    with serve(aio, datastore, 2) as served:
        router, first = served.router.service, served.shard_addresses()[0][0]
        moved = aio.run(start_shard_server(ShardServerConfig(datastore, 0, replica=1, metrics_port=None)))
        try:
            original = router.channels[first]
            assert aio.run(router.replace_replica(0, 0, moved.address)) == first
            assert aio.run(router.replace_replica(0, 0, first)) == moved.address
            aio.run(served.router.drain(grace=0))

            async def state(channel):
                return channel.get_state()

            assert aio.run(state(original)) == grpc.ChannelConnectivity.SHUTDOWN
        finally:
            aio.run(moved.drain(grace=0))


def test_a_call_without_a_deadline_has_none_where_no_replica_could_take_over(aio, datastore, keys):
    """timeout=None: the shard sees no deadline from a client of its address, nor through a router over
    one replica per shard (it used to see 120 s, the time after which failover gives up an attempt)."""
    with serve(aio, datastore, 2) as served:
        shard = served.shards[0][0].service
        search, seen = shard.handle_search, []

        async def spy(raw, context):
            seen.append(context.time_remaining())
            return await search(raw, context)

        shard.handle_search = spy
        for address in (served.shards[0][0].address, served.address):
            with RetrieverClient(address, timeout=None) as client:
                client.search(keys[:1], k=3)
    assert seen == [None, None]


def test_a_router_above_its_shards_limits_says_so_at_start(aio, datastore, caplog):
    """Shards that take k and batches up to 100 behind a router with the default limits: the router warns,
    naming the flag to change, rather than accepting requests its shards refuse unannounced."""
    small = Limits(max_k=100, max_batch=100)
    shards = [aio.run(start_shard_server(ShardServerConfig(datastore, i, metrics_port=None, limits=small)))
              for i in range(2)]
    try:
        with caplog.at_level(logging.WARNING, logger="retriever_server.serving.router"):
            router = aio.run(start_router(RouterConfig(((shards[0].address,), (shards[1].address,)),
                                                       metrics_port=None)))
            aio.run(router.drain(grace=0))
    finally:
        for shard in shards:
            aio.run(shard.drain(grace=0))
    warned = [r.getMessage() for r in caplog.records if "under this router's" in r.getMessage()]
    assert warned == ["shards accept max_k up to 100, under this router's 2048: requests between are refused by the "
                      "shards; give the router --max-k 100 or the shards a larger one",
                      "shards accept max_batch up to 100, under this router's 16384: requests between are refused by "
                      "the shards; give the router --max-batch 100 or the shards a larger one"]


def test_a_replica_failing_every_call_is_logged_once_in_a_while_with_a_count(caplog, monkeypatch):
    """A replica down for a while fails every call sent to it: one warning, then one per WARN_EVERY_S
    with the number left unlogged (the router's log used to take a line per request)."""
    from retriever_server.serving import failover

    replicas = failover.ReplicaSet("shard-00000", ["a:1", "a:2"])
    with caplog.at_level(logging.WARNING, logger="retriever_server.serving.failover"):
        for _ in range(5):
            replicas.warn("a:1", grpc.StatusCode.UNAVAILABLE)
        monkeypatch.setattr(failover, "WARN_EVERY_S", 0.0)
        replicas.warn("a:1", grpc.StatusCode.UNAVAILABLE)
        replicas.warn("a:2", grpc.StatusCode.DEADLINE_EXCEEDED)
    assert [r.getMessage() for r in caplog.records] == [
        "shard-00000 replica a:1 failed: UNAVAILABLE",
        "shard-00000 replica a:1 failed: UNAVAILABLE (4 more failures since the last one logged)",
        "shard-00000 replica a:2 failed: DEADLINE_EXCEEDED"]


def test_a_replica_whose_files_fail_at_load_leaves_its_shard_to_the_other_replica(aio, datastore, keys, tmp_path):
    """Shard 0's first replica serves a copy whose index is damaged (started as `serve` starts it, without
    waiting for the load): it answers UNAVAILABLE naming the file, so the router and the fan-out move every
    call to the sound replica (it used to answer FAILED_PRECONDITION, which no failover retries)."""
    damaged = damaged_copy(datastore, tmp_path / "damaged", "shard-00000/index.faiss")
    bad = aio.run(start_shard_server(ShardServerConfig(damaged, 0, metrics_port=None), wait_loaded=False))
    good = [aio.run(start_shard_server(ShardServerConfig(datastore, s, metrics_port=None))) for s in range(2)]
    router = None
    try:
        async def loaded() -> None:
            await bad.ready

        with pytest.raises(DatastoreError, match="checksum"):
            aio.run(loaded())
        shards = ((bad.address, good[0].address), (good[1].address,))
        router = aio.run(start_router(RouterConfig(shards, metrics_port=None)))
        with RetrieverClient(bad.address, timeout=5) as alone:
            refused = outcome(lambda: alone.search(keys[:2], k=5))
            with pytest.raises(RetrieverError, match="shard failed to load: .*index.faiss"):
                alone.search(keys[:2], k=5)
        with RetrieverClient(router.address, timeout=5) as through_router, \
                RetrieverClient([list(s) for s in shards], timeout=5) as fan_out:
            found = [client.search(keys[:4], k=5).ids for client in (through_router, fan_out) for _ in range(4)]
        with RetrieverClient([(good[0].address,), (good[1].address,)], timeout=5) as sound:
            expected = sound.search(keys[:4], k=5).ids
    finally:
        for server in ([router] if router else []) + [bad, *good]:
            aio.run(server.drain(grace=0))
    assert refused == "UNAVAILABLE"
    assert all(np.array_equal(ids, expected) for ids in found)


def test_first_searches_made_at_once_start_one_recheck_of_a_silent_replica(aio, datastore, keys, monkeypatch):
    """Threads whose first searches on one fan-out client overlap while a replica's GetInfo hangs: one loop
    rechecks that replica (each search used to start its own, and a replica that never answers kept each
    going for the client's life), and every search answers as the router does."""
    import retriever_server.serving.client as client_module

    started = []
    real = client_module.check_late_replicas

    def counted(*args, **kwargs):
        started.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "check_late_replicas", counted)
    with serve(aio, datastore, 2, replicas=2) as served:
        served.shards[0][0].service.handle_info = hang
        with RetrieverClient(served.address, timeout=30) as router:
            expected = router.search(keys[:4], k=5).ids
        with RetrieverClient(served.shard_addresses(), timeout=30) as client:
            found: list = []
            threads = [threading.Thread(target=lambda: found.append(client.search(keys[:4], k=5).ids))
                       for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert len(found) == 4 and all(np.array_equal(ids, expected) for ids in found)
    assert len(started) == 1 and [s.name for s in started[0]] == ["shard-00000"]
