"""Failover between the replicas of a shard: which replica to try next, the caller's deadline, and
the two retry loops that use them, side by side: the router's (asyncio) and the fan-out client's
(blocking).

The two loops differ today: the router also moves on to the next replica when an attempt ends in
DEADLINE_EXCEEDED before the caller's deadline, the client does not; the client fails over only when
it fans out itself (a single target's error is the caller's to see).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from retriever_server.wire.request import RequestError

log = logging.getLogger(__name__)

# A replica answering with one of these may be down or busy: try the next replica of its shard.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
})


@dataclass
class ReplicaSet:
    """The replicas of one shard, tried round-robin, recently failed ones last."""

    name: str
    addresses: list[str]
    cooldown_s: float = 2.0
    _turn: itertools.count = field(default_factory=itertools.count)
    _failed_at: dict[str, float] = field(default_factory=dict)

    def order(self) -> list[str]:
        """The replicas in the order to try them for the next call."""
        start = next(self._turn) % len(self.addresses)
        rotated = self.addresses[start:] + self.addresses[:start]
        now = time.monotonic()
        fresh = [a for a in rotated if now - self._failed_at.get(a, -1e9) > self.cooldown_s]
        return fresh + [a for a in rotated if a not in fresh]

    def failed(self, address: str) -> None:
        self._failed_at[address] = time.monotonic()

    def succeeded(self, address: str) -> None:
        self._failed_at.pop(address, None)


class Deadline:
    """The caller's deadline, shared by every attempt of one call (None: no deadline)."""

    def __init__(self, timeout: float | None):
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def failure_message(failures: dict[str, str]) -> str:
    """'shard-00001 unavailable (reason); ...' for a status message."""
    return "; ".join(f"{name} unavailable ({reason})" for name, reason in sorted(failures.items()))


class ShardFailed(Exception):
    """Every replica of a shard failed with a retryable status; the message is the last reason."""


class CallFailed(Exception):
    """A blocking call the caller sees as a status: `code` and `message` (the client wraps it)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


# ---------------------------------------------------------------------------------------------- the router


async def search_replicas(replicas: ReplicaSet, stubs: dict, request, deadline: Deadline, metadata=()):
    """The router's loop: Search on one replica of the shard after another until one answers.

    Raises:
        RequestError: the deadline passed, or a replica refused the request (not retryable).
        ShardFailed: every replica failed with a retryable status (or its own attempt timed out).
    """
    reason = "no replica answered"
    for address in replicas.order():
        if deadline.expired():
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed waiting for {replicas.name}")
        try:
            response = await stubs[address].Search(request, timeout=deadline.remaining(), metadata=metadata)
            replicas.succeeded(address)
            return response
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline.expired():
                raise RequestError(err.code(), f"deadline passed waiting for {replicas.name}") from None
            if err.code() not in RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}:
                raise RequestError(err.code(), f"{replicas.name}: {err.details()}") from None
            replicas.failed(address)
            reason = f"{address}: {err.code().name} {err.details()}"
            log.warning("%s replica %s failed: %s", replicas.name, address, reason)
    raise ShardFailed(reason)


# ---------------------------------------------------------------------------------------------- the client


def call_replicas(replicas: ReplicaSet, stubs: dict, method: str, request, deadline: Deadline, fail_over: bool,
                  metadata=()):
    """The fan-out client's loop: `method` on one replica after another until one answers.

    Args:
        fail_over: try the next replica on a retryable status (else the first error is final).

    Raises:
        CallFailed: the deadline passed, a replica refused the request, or every replica failed.
    """
    last: grpc.RpcError | None = None
    for address in replicas.order():
        if deadline.expired():
            raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed waiting for {replicas.name}")
        try:
            reply = getattr(stubs[address], method)(request, timeout=deadline.remaining(), metadata=metadata)
            replicas.succeeded(address)
            return reply
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE or not fail_over:
                raise CallFailed(err.code(), err.details() or str(err)) from None
            replicas.failed(address)
            last = err
            log.warning("%s replica %s failed: %s", replicas.name, address, err.code().name)
    raise CallFailed(last.code(), f"{last.code().name} {last.details()}")
