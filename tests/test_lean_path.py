"""The service's lean path: a server's heap keeps freed buffers, and a shard list fans out."""

from __future__ import annotations

from lm_worker.retrieval.service import resolve_target
from retriever_server.serving.grpc_setup import keep_freed_memory
from retriever_server.serving.metrics import ServerMetrics
from retriever_server.serving.service import BaseRetrieverService
from retriever_server.wire.request import Limits


def test_servers_keep_freed_memory(aio, monkeypatch, tmp_path):
    """glibc takes both thresholds, and every server sets them as it starts."""
    from retriever_server.serving import service

    assert keep_freed_memory()
    calls = []
    monkeypatch.setattr(service, "keep_freed_memory", lambda: calls.append(True))
    running = aio.run(service.start_server(Idle(), "127.0.0.1", 0, None))
    aio.run(running.drain(grace=0))
    assert calls == [True]


class Idle(BaseRetrieverService):
    role = "idle"

    def __init__(self):
        super().__init__(Limits(), ServerMetrics("idle"))

    def not_ready_error(self):
        return None


def test_a_shard_list_is_fanned_out_to():
    assert resolve_target("127.0.0.1:1") == "127.0.0.1:1"
    assert resolve_target("a:1|a:2,b:1") == [["a:1", "a:2"], ["b:1"]]
    assert resolve_target("a:1|a:2") == [["a:1", "a:2"]]


def test_a_loop_thread_runs_coroutines_for_other_threads_and_stops():
    import asyncio
    import threading

    from retriever_server.serving.event_loop import LoopThread

    loop = LoopThread("test-loop")
    try:
        assert loop.run(asyncio.sleep(0, "done")) == "done"
        seen = loop.run(_thread_name())
        assert seen == "test-loop" != threading.current_thread().name

        async def nested():
            return loop.run(asyncio.sleep(0))  # from its own loop: refused, never a deadlock

        try:
            loop.run(nested())
        except RuntimeError as err:
            assert "its own loop" in str(err)
        else:
            raise AssertionError("LoopThread.run from its own loop did not refuse")
    finally:
        loop.close()
    assert loop.loop.is_closed()
    loop.close()  # a second close does nothing


async def _thread_name() -> str:
    import threading

    return threading.current_thread().name


def test_a_caller_still_waiting_when_its_loop_thread_closes_is_cancelled_not_stranded():
    import asyncio
    import concurrent.futures
    import threading

    from retriever_server.serving.event_loop import LoopThread

    loop = LoopThread("test-loop")
    started, outcome = threading.Event(), []

    async def forever():
        started.set()
        await asyncio.Event().wait()

    def caller():
        try:
            loop.run(forever())
        except concurrent.futures.CancelledError:
            outcome.append("cancelled")

    waiting = threading.Thread(target=caller, daemon=True)
    waiting.start()
    assert started.wait(5)
    loop.close()  # from another thread, while the caller waits
    waiting.join(5)
    assert outcome == ["cancelled"] and not waiting.is_alive()
    try:
        loop.run(asyncio.sleep(0))  # a closed loop runs nothing, and says so at once
    except concurrent.futures.CancelledError:
        pass
    else:
        raise AssertionError("a closed LoopThread ran a coroutine")


def test_closing_a_loop_thread_ends_what_runs_on_it(caplog):
    """close() with calls in flight from other threads: each call's coroutine is cancelled and finishes
    (its finally runs), its caller gets CancelledError, and asyncio reports no task destroyed pending and
    no coroutine never awaited (a coroutine handed over just before close() used to be both)."""
    import gc
    import warnings

    caplog.set_level("ERROR", logger="asyncio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for round_ in range(30):
            _close_with_calls_in_flight(wait_until_started=round_ % 2 == 1)
        gc.collect()  # once: a full collection in a process holding the whole suite's objects is slow
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def _close_with_calls_in_flight(wait_until_started: bool) -> None:
    import asyncio
    import concurrent.futures
    import threading

    from retriever_server.serving.event_loop import LoopThread

    loop, ended, outcomes = LoopThread("test-close"), [], []
    started = [threading.Event() for _ in range(3)]

    async def long_call(event: threading.Event) -> None:
        event.set()
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(True)

    def caller(event: threading.Event) -> None:
        try:
            loop.run(long_call(event))
        except concurrent.futures.CancelledError:
            outcomes.append("cancelled")

    threads = [threading.Thread(target=caller, args=(event,)) for event in started]
    for thread in threads:
        thread.start()
    if wait_until_started:  # the calls surely under way; else some may just have been handed over
        assert all(event.wait(5) for event in started)
    loop.close()
    for thread in threads:
        thread.join(10)
    assert outcomes == ["cancelled"] * 3
    assert len(ended) == sum(event.is_set() for event in started)


def test_a_merge_of_keys_payloads_or_successors_counts_them_to_leave_the_event_loop():
    """The router merged on its event loop whatever had few neighbours: 4 shards' 1024 x 64 neighbours with
    their 384-d keys (96 MiB) took 273 ms there, every other call of the router stalled meanwhile."""
    from types import SimpleNamespace

    from retriever_server.serving.router import INLINE_ELEMENTS, merge_values

    def spec(**more):
        return SimpleNamespace(**{"nq": 1024, "k": 64, "return_keys": False, "payloads": (), "successors": 0, **more})

    assert merge_values(spec(), 4, 384) == 1024 * 64 * 4 == INLINE_ELEMENTS  # ids and distances: on the loop
    assert merge_values(spec(return_keys=True), 4, 384) > INLINE_ELEMENTS
    assert merge_values(spec(payloads=("values",)), 4, 384) > INLINE_ELEMENTS
    assert merge_values(spec(successors=16), 4, 384) > INLINE_ELEMENTS


def test_a_replicas_status_details_reach_the_callers_status_escaped_and_bounded():
    """The router put a shard's status details into its own as they came: only the shards' own escaping
    kept a misbehaving replica's (or gRPC's) text off the caller's terminal and logs."""
    import grpc
    import pytest

    from retriever_server.serving.failover import (
        SHOWN_DETAILS,
        Attempts,
        CallFailed,
        Deadline,
        FailoverPolicy,
        ReplicaSet,
    )

    attempts = Attempts(ReplicaSet("shard-00000", ["a:1"]), FailoverPolicy(), Deadline(5.0))
    with pytest.raises(CallFailed) as caught:
        attempts.failed("a:1", grpc.StatusCode.INVALID_ARGUMENT, "k\n2026 INFO FORGED\x1b[2J" + "x" * 10_000)
    assert caught.value.message.startswith("k\\n2026 INFO FORGED\\x1b[2J")
    assert "\n" not in caught.value.message and caught.value.message.endswith("x...")
    assert len(caught.value.message) < SHOWN_DETAILS + 10  # the first SHOWN_DETAILS characters, escaped
