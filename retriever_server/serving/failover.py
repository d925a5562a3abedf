"""Failover between the replicas of a shard: one policy for the router and the fan-out client.

A call tries the replicas of one shard in turn (round-robin, recently failed or slow ones last, the
longer the more they failed in a row).
Each attempt has a timeout taken from the caller's deadline. When an attempt has not answered after
the hedge delay (by default the p95 of the shard's recent answers), a second attempt goes to the next
replica (one hedge at a time), and the first answer wins; the other attempt is cancelled, and its
replica tried last for a while. An attempt that fails with a status a healthy replica could answer
(RETRYABLE, its own timeout, a replica too busy: RESOURCE_EXHAUSTED marked `BUSY`, or a replica serving
another version of the datastore than the one asked for: FAILED_PRECONDITION marked `STALE`) moves the
call on to the next replica; any other status, a request over a limit among them, is the answer.

`Attempts` holds that policy for one call; `call_async` runs it on asyncio stubs, for the router and
for the fan-out client (whose calls run on an event loop of its own); `call_once` runs a call with
one replica to try on a blocking stub, for a client of one address. The calls to every shard at once,
and what a call lacking some shards answers: `fanout`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from retriever_server.wire.untrusted import one_line

log = logging.getLogger(__name__)

# A replica answering with one of these may be down: try the next replica of its shard.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
})
# RESOURCE_EXHAUSTED is retried only with this trailing metadata: a server with all its requests in
# flight (busy now, another replica may not be). A request over a limit is refused alike by every replica.
BUSY = ("retriever-busy", "1")
# FAILED_PRECONDITION is retried only with this one: a replica serving another version of the datastore
# than the request names (the router and the fan-out client name the version the shards agreed on at
# start, so such a replica is one restarted on another build; the shard's other replicas may be current).
STALE = ("retriever-stale-version", "1")


def _marked(err: grpc.RpcError, mark: tuple[str, str]) -> bool:
    try:
        return mark in tuple(err.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - a call that failed before any metadata came back
        return False


def is_busy(err: grpc.RpcError) -> bool:
    """Whether a failed call's server refused it only for being busy (`BUSY` in its trailing metadata)."""
    return _marked(err, BUSY)


def is_stale(err: grpc.RpcError) -> bool:
    """Whether a failed call's server refused it for serving another datastore version (`STALE`)."""
    return _marked(err, STALE)


@dataclass(frozen=True)
class FailoverPolicy:
    """How a call moves between the replicas of a shard.

    Attributes:
        hedge: send a second attempt to the next replica when the first is slow.
        hedge_delay_s: how slow; None: the p95 of the shard's recent answers, within
            [hedge_min_s, hedge_max_s] (`hedge_initial_s` until 20 answers are known).
        attempt_timeout_s: one attempt's timeout when the caller sets no deadline and another replica could
            take over (a hung replica is given up after it); with one replica to try, a call without a
            deadline has none.
    """

    hedge: bool = True
    hedge_delay_s: float | None = None
    hedge_min_s: float = 0.02
    hedge_max_s: float = 1.0
    hedge_initial_s: float = 0.1
    attempt_timeout_s: float = 120.0


P95_EVERY = 16  # answers between two computations of a shard's p95 (each costs tens of µs)
WARN_EVERY_S = 10.0  # a replica's failures are logged once in this long, with a count of the others
SHOWN_DETAILS = 400  # characters of a replica's status details passed on in the call's own status


@dataclass
class ReplicaSet:
    """The replicas of one shard, tried round-robin, recently failed ones last; and how long the
    shard's recent answers took (for the hedge delay: their p95, computed again every `P95_EVERY`
    answers, not on every call).

    A replica that failed is tried last for `cooldown_s`, twice as long for each failure in a row after
    the first, up to `max_cooldown_s` (a hung replica is not given every call's first attempt every few
    seconds); an answer ends its run. The replicas in `unchecked` (down when the shards were checked at
    start: what they serve is unknown) are not tried while another is, until `fanout.check_late_replicas`
    takes them out of it. `clock`: seconds, monotonic (tests pass their own).
    """

    name: str
    addresses: list[str]
    cooldown_s: float = 2.0
    max_cooldown_s: float = 30.0
    unchecked: set[str] = field(default_factory=set)
    clock: Callable[[], float] = time.monotonic
    _turn: itertools.count = field(default_factory=itertools.count)
    _failed_at: dict[str, float] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)  # failures in a row, by replica
    _latencies: deque = field(default_factory=lambda: deque(maxlen=256))
    _p95: float | None = None
    _since_p95: int = 0  # answers since _p95 was computed
    _warned_at: dict[str, float] = field(default_factory=dict)
    _unwarned: dict[str, int] = field(default_factory=dict)  # failures since the last one logged

    def order(self) -> list[str]:
        """The replicas in the order to try them for the next call."""
        start = next(self._turn) % len(self.addresses)
        rotated = self.addresses[start:] + self.addresses[:start]
        rotated = [a for a in rotated if a not in self.unchecked] or rotated  # none checked: all, not none
        now = self.clock()
        fresh = [a for a in rotated if now - self._failed_at.get(a, -1e9) > self._cooldown(a)]
        return fresh + [a for a in rotated if a not in fresh]

    def _cooldown(self, address: str) -> float:
        return min(self.max_cooldown_s, self.cooldown_s * 2.0 ** min(self._failures.get(address, 1) - 1, 30))

    def failed(self, address: str, slower: bool = False) -> None:
        """Tries `address` last for its cooldown, longer for each failure in a row; `slower` (a hedge beat
        it: it may be healthy) for the first cooldown alone, its run of failures not lengthened."""
        self._failed_at[address] = self.clock()
        if not slower:
            self._failures[address] = self._failures.get(address, 0) + 1

    def warn(self, address: str, code: grpc.StatusCode) -> None:
        """Logs a replica's failure, once in WARN_EVERY_S per replica (a replica down for a while fails
        every call sent to it), with how many went unlogged since."""
        now = self.clock()
        if now - self._warned_at.get(address, -1e9) < WARN_EVERY_S:
            self._unwarned[address] = self._unwarned.get(address, 0) + 1
            return
        self._warned_at[address] = now
        more = self._unwarned.pop(address, 0)
        log.warning("%s replica %s failed: %s%s", self.name, address, code.name,
                    f" ({more} more failures since the last one logged)" if more else "")

    def succeeded(self, address: str, seconds: float) -> None:
        """`address` answered in `seconds`: its cooldown ends, its run of failures too."""
        self._failed_at.pop(address, None)
        self._failures.pop(address, None)
        self._latencies.append(seconds)
        self._since_p95 += 1

    def hedge_delay(self, policy: FailoverPolicy) -> float:
        """Seconds to wait for an attempt before hedging, by the policy."""
        if policy.hedge_delay_s is not None:
            return policy.hedge_delay_s
        if len(self._latencies) < 20:
            return policy.hedge_initial_s
        if self._p95 is None or self._since_p95 >= P95_EVERY:
            self._p95 = float(np.percentile(np.fromiter(self._latencies, float), 95))
            self._since_p95 = 0
        return min(policy.hedge_max_s, max(policy.hedge_min_s, self._p95))


class Deadline:
    """The caller's deadline, shared by every attempt of one call (None: no deadline)."""

    def __init__(self, timeout: float | None):
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


class CallFailed(Exception):
    """A call's final status: `code` and `message` (the router and the client turn it into theirs)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class ShardFailed(CallFailed):
    """Every replica of the shard failed with a retryable status; `code` is the last one's."""


@dataclass
class Attempts:
    """One call's attempts on the replicas of one shard, by the policy.

    Args:
        fail_over: move on to another replica (else the first attempt's outcome is final).
    """

    replicas: ReplicaSet
    policy: FailoverPolicy
    deadline: Deadline
    fail_over: bool = True
    _order: list[str] = field(init=False)
    _started: dict[str, float] = field(default_factory=dict)
    _last: tuple[grpc.StatusCode, str] | None = None

    def __post_init__(self) -> None:
        order = self.replicas.order()
        self._order = order if self.fail_over else order[:1]

    def single(self) -> bool:
        """Whether the call has one replica to try, and so nothing to hedge or fail over to."""
        return len(self._order) == 1

    def start(self) -> tuple[str, float | None] | None:
        """The next replica to try and its attempt's timeout; None when none is left or time is up."""
        untried = [a for a in self._order if a not in self._started]
        if not untried or self.deadline.expired():
            return None
        remaining = self.deadline.remaining()
        if remaining is None:
            timeout = None if len(self._order) == 1 else self.policy.attempt_timeout_s
        elif self.policy.hedge or not self.fail_over:
            timeout = remaining  # a slow attempt is overtaken by the hedge, not cut short
        else:
            timeout = remaining / len(untried)  # leave the replicas after this one their share
        self._started[untried[0]] = time.monotonic()
        return untried[0], timeout

    def hedge_after(self, in_flight: int) -> float | None:
        """Seconds to wait for the `in_flight` attempts before starting another; None: until one ends. One
        hedge at a time: with two attempts in flight, a third replica is tried only once one has failed."""
        if not (self.policy.hedge and self.fail_over) or in_flight >= 2 or len(self._started) == len(self._order) \
                or self.deadline.expired():
            return None
        since = time.monotonic() - max(self._started.values())
        return max(0.0, self.replicas.hedge_delay(self.policy) - since)

    def succeeded(self, address: str, in_flight: list[str]) -> None:
        """`address` answered; the attempts still `in_flight` lost to it (their replicas go last)."""
        self.replicas.succeeded(address, time.monotonic() - self._started[address])
        for slower in in_flight:
            self.replicas.failed(slower, slower=True)

    def failed(self, address: str, code: grpc.StatusCode, details: str | None, busy: bool = False,
               stale: bool = False) -> None:
        """Takes an attempt's error (`busy`: a RESOURCE_EXHAUSTED for requests in flight, not for the
        request; `stale`: a FAILED_PRECONDITION for the replica's datastore version); raises CallFailed
        when it is the call's answer."""
        name = self.replicas.name
        details = one_line(details, SHOWN_DETAILS) if details else details  # a replica's words: on one line, bounded
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.deadline.expired():
            raise CallFailed(code, f"deadline passed waiting for {name}")
        retryable = code in RETRYABLE or code == grpc.StatusCode.DEADLINE_EXCEEDED \
            or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy) \
            or (code == grpc.StatusCode.FAILED_PRECONDITION and stale)  # its own timeout; a busy or stale replica
        if not (retryable and self.fail_over):
            raise CallFailed(code, details or code.name)
        self.replicas.failed(address)
        self._last = (code, f"{address}: {code.name} {details or ''}".rstrip())
        self.replicas.warn(address, code)

    def exhausted(self) -> CallFailed:
        """Why the call ends with no attempt left: its deadline, or every replica failed."""
        if self.deadline.expired() or self._last is None:
            return CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed waiting for {self.replicas.name}")
        return ShardFailed(*self._last)


def _only_start(attempts: Attempts) -> tuple[str, float | None]:
    """The one replica to try and its timeout; CallFailed when the deadline has passed already."""
    chosen = attempts.start()
    if chosen is None:
        raise attempts.exhausted()
    return chosen


def _only_failed(attempts: Attempts, address: str, err: grpc.RpcError) -> CallFailed:
    """Why a call with one replica ends when its attempt failed (raised at once when the status is the answer)."""
    attempts.failed(address, err.code(), err.details(), is_busy(err), is_stale(err))
    return attempts.exhausted()


async def _only_attempt(attempts: Attempts, call: Callable[[str, float | None], Awaitable]):
    """A call with one replica to try: nothing to hedge or fail over to, so no task or timer."""
    chosen = _only_start(attempts)
    try:
        reply = await call(*chosen)
    except grpc.aio.AioRpcError as err:
        raise _only_failed(attempts, chosen[0], err) from None
    attempts.succeeded(chosen[0], [])
    return reply


def call_once(attempts: Attempts, call: Callable[[str, float | None], object]):
    """A blocking call with one replica to try, `call(address, timeout)` a blocking stub call: what
    `_only_attempt` does, on the caller's thread (a client of one address needs no event loop).

    Raises:
        CallFailed: the call's final status.
    """
    if not attempts.single():
        raise ValueError("call_once takes a call with one replica to try; call_async fails over between several")
    chosen = _only_start(attempts)
    try:
        reply = call(*chosen)
    except grpc.RpcError as err:
        raise _only_failed(attempts, chosen[0], err) from None
    attempts.succeeded(chosen[0], [])
    return reply


async def call_async(attempts: Attempts, call: Callable[[str, float | None], Awaitable]):
    """Runs `attempts` with `call(address, timeout)`, an asyncio stub call; the first answer.

    Raises:
        CallFailed: the call's final status (ShardFailed when every replica failed).
    """
    if attempts.single():
        return await _only_attempt(attempts, call)
    tasks: dict[asyncio.Future, str] = {}

    def launch() -> bool:
        chosen = attempts.start()
        if chosen is not None:
            tasks[asyncio.ensure_future(call(*chosen))] = chosen[0]
        return chosen is not None

    try:
        while True:
            if not tasks and not launch():
                raise attempts.exhausted()
            done, _ = await asyncio.wait(tasks, timeout=attempts.hedge_after(len(tasks)),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                launch()  # the hedge
            for task in done:
                address = tasks.pop(task)
                try:
                    reply = task.result()
                except grpc.aio.AioRpcError as err:
                    attempts.failed(address, err.code(), err.details(), is_busy(err), is_stale(err))
                    continue
                except asyncio.CancelledError:  # its call cancelled on this side (its channel closed), not this one
                    attempts.failed(address, grpc.StatusCode.CANCELLED, "cancelled on this side: its channel closed")
                    continue
                attempts.succeeded(address, list(tasks.values()))
                return reply
    finally:
        for task in tasks:
            task.cancel()
