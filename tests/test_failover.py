"""Replicas that hang, die and come back, under `retriever-server serve` (LocalDeployment: real
processes on loopback): a SIGSTOPped replica costs no request, to the router or to the client's own
fan-out; a killed replica is restarted on its port and back in rotation; a shard with no replica left
gives UNAVAILABLE naming it, or a partial answer when allowed, while the router stays up; a killed
router comes back at its address."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build, synthetic

from retriever_server.cluster.launcher import NO_DRAIN, LocalDeployment
from retriever_server.cluster.supervisor import Child, RestartPolicy
from retriever_server.serving.client import RetrieverClient, RetrieverError
from retriever_server.serving.event_loop import LoopThread
from retriever_server.serving.failover import (
    BUSY,
    P95_EVERY,
    Attempts,
    CallFailed,
    Deadline,
    FailoverPolicy,
    ReplicaSet,
    call_async,
    call_once,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N, D = 3000, 16
QUERIES = 6


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return synthetic(N, D, seed=11)


@pytest.fixture(scope="module")
def datastore(ray_cluster, keys, tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("failover"), keys, "ds", shards=2, factory="IVF8,Flat")


@pytest.fixture(scope="module")
def deployment(datastore):
    with LocalDeployment(datastore, replicas=2, restart_policy=RestartPolicy(first_delay_s=0.2), extra_args=NO_DRAIN,
                         router_args=NO_DRAIN) as d:
        yield d
    assert d.log_dir.is_dir()  # kept: these tests restart processes on purpose...
    shutil.rmtree(d.log_dir)  # ...and leave nothing behind


@pytest.fixture(scope="module")
def expected(deployment, keys) -> np.ndarray:
    with RetrieverClient(deployment.router_address) as client:
        return client.search(keys[:QUERIES], k=5, nprobe=8).ids


def wait_until(condition, seconds: float, poll_s: float = 0.05) -> bool:
    """Polls `condition` until it holds or `seconds` pass; whether it held."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


def back_serving(child: Child, pid: int) -> bool:
    return child.popen.pid != pid and child.serving and not child.exited()


def searches_served(child: Child) -> float:
    """Searches the process answered OK since it started, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{child.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    lines = [line for line in text.splitlines()
             if line.startswith("retriever_requests_total{") and 'method="Search"' in line and 'status="OK"' in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_a_hung_replica_costs_no_request(deployment, keys, expected):
    """SIGSTOP one replica of shard 0: with a 1 s deadline, every one of 200 searches through the router,
    and 200 through the client's own fan-out over the replicas, answers, with the same neighbours."""
    hung = deployment.shards[0][0].popen.pid
    os.kill(hung, signal.SIGSTOP)
    failed = []
    try:
        with RetrieverClient(deployment.router_address, timeout=1.0) as router, \
                RetrieverClient(deployment.shard_addresses, timeout=1.0) as fan_out:
            for client in (router, fan_out):
                for _ in range(200):
                    try:
                        ids = client.search(keys[:QUERIES], k=5, nprobe=8).ids
                        if not np.array_equal(ids, expected):
                            failed.append("different neighbours")
                    except RetrieverError as err:
                        failed.append(err.code.name)
    finally:
        os.kill(hung, signal.SIGCONT)
    assert failed == []


def test_a_hung_shard_leaves_a_partial_answer_in_time_when_one_is_allowed(deployment, keys, expected, tmp_path):
    """SIGSTOP every replica of shard 1: with allow_partial, the router and the client's own fan-out
    answer within the deadline with shard 0's neighbours, shard 1 named as failed; without it the call
    runs out of time, named by the address the client dialled."""
    hung = [c.popen.pid for c in deployment.shards[1]]
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        with RetrieverClient(deployment.router_address, timeout=2.0) as router, \
                RetrieverClient(deployment.shard_addresses, timeout=2.0) as fan_out:
            for client in (router, fan_out):
                partial = client.search(keys[:QUERIES], k=5, nprobe=8, allow_partial=True)  # within its 2 s deadline
                assert partial.partial and set(partial.failed_shards) == {"shard-00001"}
                found = partial.ids[partial.ids >= 0]
                assert found.size and (found < N // 2).all()  # shard 0's rows alone
            with pytest.raises(RetrieverError) as late:
                router.search(keys[:QUERIES], k=5, nprobe=8, timeout=0.5)
        np.save(tmp_path / "q.npy", keys[:2])
        command = [sys.executable, "-m", "retriever_server.cli", "search", deployment.router_address, "--queries",
                   str(tmp_path / "q.npy"), "-k", "3", "--timeout", "2", "--allow-partial"]
        shown = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert late.value.message == f"deadline passed waiting for {deployment.router_address}"
    assert shown.returncode == 0 and shown.stdout.startswith("query 0: ids "), shown.stderr
    assert "partial answer: no neighbours from shard-00001 (" in shown.stderr


def test_a_killed_replica_is_restarted_on_its_port_and_back_in_rotation(deployment, keys, expected):
    child = deployment.shards[1][0]
    pid, address, ports = child.popen.pid, child.address, (child.metrics_port, child.health_port)
    deployment.kill(shard=1, replica=0)
    with RetrieverClient(deployment.router_address, timeout=5) as client:
        np.testing.assert_array_equal(client.search(keys[:QUERIES], k=5, nprobe=8).ids, expected)  # the other one
        assert wait_until(lambda: back_serving(child, pid), 60)
        assert child.address == address and child.restarts >= 1
        assert (child.metrics_port, child.health_port) == ports and None not in ports  # what was printed holds
        argv = Path(f"/proc/{child.popen.pid}/cmdline").read_bytes().split(b"\0")
        ppid = int(Path(f"/proc/{child.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == os.getpid() and b"--shard" in argv and argv[argv.index(b"--shard") + 1] == b"1" \
            and argv[argv.index(b"--replica") + 1] == b"0"  # still this process's child, named by its argv
        # The router's channel reconnects within its 1 s backoff and the replica's 2 s cooldown ends.
        assert wait_until(lambda: client.search(keys[:QUERIES], k=5, nprobe=8) and searches_served(child) > 0, 5.0)


def test_a_shard_without_replicas_leaves_the_router_up(deployment, keys, expected):
    children = deployment.shards[1]
    pids = [c.popen.pid for c in children]
    for replica in range(2):
        deployment.kill(shard=1, replica=replica)
    with RetrieverClient(deployment.router_address, timeout=5) as client:
        with pytest.raises(RetrieverError) as refused:
            client.search(keys[:QUERIES], k=5, nprobe=8)
        partial = client.search(keys[:QUERIES], k=5, nprobe=8, allow_partial=True)
        assert wait_until(lambda: all(back_serving(c, p) for c, p in zip(children, pids)), 60)
        assert wait_until(lambda: not client.search(keys[:QUERIES], k=5, nprobe=8, allow_partial=True).partial, 10)
        np.testing.assert_array_equal(client.search(keys[:QUERIES], k=5, nprobe=8).ids, expected)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "shard-00001" in refused.value.message
    assert partial.partial and set(partial.failed_shards) == {"shard-00001"}
    shard0 = partial.ids[partial.ids >= 0]
    assert shard0.size and (shard0 < N // 2).all()  # shard 0's rows alone


def test_a_killed_router_comes_back_at_its_address(deployment, keys, expected):
    router = deployment.router
    pid, address, metrics_port = router.popen.pid, router.address, router.metrics_port
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: back_serving(router, pid), 60)
    assert router.address == address and router.metrics_port == metrics_port is not None
    with RetrieverClient(address, timeout=5) as client:
        np.testing.assert_array_equal(client.search(keys[:QUERIES], k=5, nprobe=8).ids, expected)


def test_restarts_back_off_to_the_cap_however_often_a_child_fails():
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=30.0)
    assert [policy.delay(n) for n in (1, 2, 3, 7, 8)] == [0.5, 1.0, 2.0, 30.0, 30.0]
    assert policy.delay(1025) == policy.delay(10 ** 6) == 30.0  # a child failing for hours, no overflow


def test_a_restart_is_logged_with_why_the_child_ended(tmp_path):
    from retriever_server.cluster.supervisor import exit_reason

    failing = Child("shard-00000-r0", [sys.executable, "-c", "print('loading'); print('error: index.faiss: checksum "
                                       "does not match\\x1b[2J'); raise SystemExit(1)"],
                    tmp_path / "a.log", tmp_path / "a.json")
    killed = Child("shard-00001-r0", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "b.log",
                   tmp_path / "b.json")
    for child in (failing, killed):
        child.spawn()
    killed.popen.kill()
    for child in (failing, killed):
        child.popen.wait(timeout=30)
    assert exit_reason(failing) == "exited with code 1: error: index.faiss: checksum does not match\\x1b[2J"
    assert exit_reason(killed) == "was killed by SIGKILL"
    failing.command = [sys.executable, "-c", "import os; os._exit(3)"]  # restarted, it says nothing this time
    failing.spawn()
    failing.popen.wait(timeout=30)
    assert exit_reason(failing) == "exited with code 3"  # not the last run's line


def run_policy(replicas: list[str], answer, policy=FailoverPolicy(hedge_delay_s=0.02), timeout=2.0):
    """`call_async` over `replicas` with `answer(address)` (async: a reply, or raise); the reply (or the
    CallFailed) and the addresses tried, in order."""
    tried: list[str] = []

    async def call(address: str, _timeout: float | None):
        tried.append(address)
        return await answer(address)

    attempts = Attempts(ReplicaSet("shard-00000", replicas), policy, Deadline(timeout))
    try:
        return asyncio.run(call_async(attempts, call)), tried
    except CallFailed as failed:
        return failed, tried


def test_one_hedge_at_a_time_whatever_the_replicas():
    """Three slow replicas: the first attempt and one hedge, not an attempt on every replica."""
    async def slow(address):
        await asyncio.sleep(0.3)
        return address

    reply, tried = run_policy(["a:1", "a:2", "a:3"], slow)
    assert reply == "a:1" and tried == ["a:1", "a:2"]

    async def second_fails(address):  # the hedge fails: the third replica becomes the next hedge
        if address == "a:2":
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        await asyncio.sleep(0.3 if address == "a:1" else 0.01)
        return address

    reply, tried = run_policy(["a:1", "a:2", "a:3"], second_fails)
    assert reply == "a:3" and tried == ["a:1", "a:2", "a:3"]


@pytest.mark.parametrize("busy", [True, False], ids=["busy", "over-a-limit"])
def test_resource_exhausted_moves_on_only_when_the_replica_is_busy(busy):
    """RESOURCE_EXHAUSTED for the requests in flight (marked BUSY) tries the next replica; for a request
    over a limit it is the answer, from the first replica: every other would refuse it alike."""
    metadata = grpc.aio.Metadata(BUSY) if busy else grpc.aio.Metadata()

    async def first_refuses(address):
        if address == "a:1":
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), metadata, "refused")
        return address

    reply, tried = run_policy(["a:1", "a:2"], first_refuses, FailoverPolicy(hedge=False))
    if busy:
        assert reply == "a:2" and tried == ["a:1", "a:2"]
    else:
        assert isinstance(reply, CallFailed) and reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED and tried == ["a:1"]


def test_a_caller_that_stops_waiting_cancels_its_calls():
    """Ctrl-C in a thread blocked on the client's loop cancels the coroutine it waits for."""
    loop, cancelled = LoopThread("test"), threading.Event()

    async def long_call():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    # Ctrl-C as a terminal's foreground process gets it, even where this run started with SIGINT ignored
    # (a shell's background job)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = threading.Timer(0.2, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run(long_call())
        assert cancelled.wait(5)
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGINT, handler)
        loop.close()


def test_a_blocking_call_takes_one_replica_alone():
    two = Attempts(ReplicaSet("shard-00000", ["a:1", "a:2"]), FailoverPolicy(), Deadline(1.0))
    with pytest.raises(ValueError, match="one replica"):
        call_once(two, lambda address, timeout: None)
    one = Attempts(ReplicaSet("shard-00000", ["a:1", "a:2"]), FailoverPolicy(), Deadline(1.0), fail_over=False)
    assert call_once(one, lambda address, timeout: (address, timeout is not None and timeout <= 1.0)) == ("a:1", True)


def test_the_hedge_delay_is_the_p95_of_recent_answers_computed_again_every_few_answers():
    policy = FailoverPolicy()
    replicas = ReplicaSet("shard-00000", ["a:1", "a:2"])
    for _ in range(19):
        replicas.succeeded("a:1", 0.05)
    assert replicas.hedge_delay(policy) == policy.hedge_initial_s  # fewer than 20 answers known
    replicas.succeeded("a:1", 0.05)
    assert replicas.hedge_delay(policy) == pytest.approx(0.05)
    for _ in range(P95_EVERY - 1):  # the shard slows down: 15 of 35 answers now take 0.5 s
        replicas.succeeded("a:2", 0.5)
    assert replicas.hedge_delay(policy) == pytest.approx(0.05)  # the p95 computed 15 answers ago
    replicas.succeeded("a:2", 0.5)
    assert replicas.hedge_delay(policy) == pytest.approx(0.5)  # computed again: the p95 of all 36
    for _ in range(2 * P95_EVERY):
        replicas.succeeded("a:2", 5.0)
    assert replicas.hedge_delay(policy) == policy.hedge_max_s
    assert replicas.hedge_delay(FailoverPolicy(hedge_delay_s=0.3)) == 0.3
