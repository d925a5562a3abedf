"""What every server and channel here shares: message-size and concurrency options, health (bounded:
it answers callers without a token, so their requests are read with a deadline and a few at a time),
reflection (opt-in), and a server process's heap settings.

A server's heap keeps freed memory for the next request instead of giving it back. glibc gives each
allocation over 128 KiB-32 MiB its own mapping and unmaps it when freed, and trims the heap's free top
past 128 KiB; a server answering megabyte requests then faulted every page of its buffers in afresh
on each request (about 1,500 page faults per request of 64 queries x 1024 neighbours through the
router: a third of its CPU). `keep_freed_memory` raises both thresholds, so buffers come from the heap
and their pages stay mapped: memory grows to the peak a request needs, and stays there.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.security.config import ClientSecurity
from retriever_server.security.tls import open_channel

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retriever"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MAX_MESSAGE = 1024 * 1024 * 1024 - 1  # responses, either way
MAX_SENT_REQUEST = 2 ** 31 - 1  # gRPC's int32: the receiving server's --max-request-mb (up to 2047 MiB) bounds them
OTHER_CALLS = 256  # calls a server takes at once beyond its searches in flight (health, GetInfo, refusals)
MAX_WATCHES = 64  # health Watch streams open at once
HEALTH_REQUEST_BYTES = 4096  # the largest request the health-only port reads
HEALTH_READ_S = 5.0  # a health call whose request has not come whole by then is refused (DEADLINE_EXCEEDED)
HEALTH_READS = 4  # health requests a main port reads at once (each up to --max-request-mb); more wait unread
# Health calls a main port holds unread at once; more are refused at once (RESOURCE_EXHAUSTED), so that calls
# without a token (these and MAX_WATCHES watches) cannot take the call slots that callers with one need.
HEALTH_WAITING = 32
# The health-only port closes a connection that has had no call for this long (the kubelet opens one per probe).
HEALTH_IDLE_MS = 30_000
# The health-only port's calls at once (each request 4 KiB at most: 16 MiB in all): calls that never send their
# request, each held HEALTH_READ_S, crowd out a probe only past this many.
HEALTH_PORT_CALLS = 4096
# The process itself: SERVING from its first health status on, whatever the server's ("" and the Retriever
# service, which turn NOT_SERVING to leave rotation: loading, draining, files that failed verification), so
# that a liveness probe asking for it restarts a process whose event loop no longer answers, and no other.
LIVENESS = "liveness"
HEALTH_SERVICES = ("", SERVICE_NAME, LIVENESS)  # what health answers for; any other name is NOT_FOUND at once


def server_options(max_request_bytes: int) -> list[tuple[str, int]]:
    """gRPC server options: requests bounded by `max_request_bytes`, responses up to 1 GiB."""
    return [
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 0),
    ]


def most_calls(max_inflight: int) -> int:
    """The calls a server holds at once (`grpc.aio.server(maximum_concurrent_rpcs=...)`): its searches'
    limit, which it refuses past itself (RESOURCE_EXHAUSTED marked busy), and OTHER_CALLS more; past
    that gRPC refuses a call before reading it, so callers, a token or not, hold a bounded memory."""
    return max_inflight + OTHER_CALLS


class BoundedHealth(health.aio.HealthServicer):
    """grpc.health.v1, which answers without a token, bounded: Check and Watch answer for the server (""),
    the Retriever service and `LIVENESS` alone, any other name NOT_FOUND at once (the stock servicer watches any
    name for as long as the stream is open, holding its request); at most MAX_WATCHES Watch streams are
    open at once, more are refused with RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        super().__init__()
        self.watching = 0

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        if request.service not in HEALTH_SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such service here")
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        if request.service not in HEALTH_SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such service here")
        if self.watching >= MAX_WATCHES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_WATCHES} health watches are open already")
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1


class HealthReads:
    """grpc.health.v1 for callers without a token, read with bounds. Health calls are open, so a stock
    unary handler let anyone hold a call slot for good by never finishing a request, and made a main
    port buffer requests up to its largest (`--max-request-mb`) for anyone. Here Check and Watch take
    their request as a stream, and a call has HEALTH_READ_S to have it read (DEADLINE_EXCEEDED past
    that); with `at_once`, at most that many requests are read at once, the others waiting their turn
    unread (a burst of probes waits microseconds; calls that never send keep theirs for HEALTH_READ_S);
    with `waiting`, at most that many calls wait or read at once, the next refused (RESOURCE_EXHAUSTED)."""

    def __init__(self, servicer: BoundedHealth, at_once: int | None = None, waiting: int | None = None):
        self.servicer = servicer
        self.turns = asyncio.Semaphore(at_once) if at_once else None
        self.waiting, self.most_waiting = 0, waiting

    async def _read(self, context):
        if self.turns is None:
            return await context.read()
        async with self.turns:
            return await context.read()

    async def _request(self, context) -> health_pb2.HealthCheckRequest:
        if self.most_waiting is not None and self.waiting >= self.most_waiting:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.most_waiting} health calls are being read already")
        self.waiting += 1
        try:
            request = await asyncio.wait_for(self._read(context), HEALTH_READ_S)
        except asyncio.TimeoutError:
            request = None
        finally:
            self.waiting -= 1
        if request is None:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no health request read within {HEALTH_READ_S:g} s")
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a health call needs its request")
        return request

    async def check(self, _requests, context) -> health_pb2.HealthCheckResponse:
        return await self.servicer.Check(await self._request(context), context)

    async def watch(self, _requests, context) -> None:
        await self.servicer.Watch(await self._request(context), context)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of grpc.health.v1 to add to a server."""
        kinds = {"request_deserializer": health_pb2.HealthCheckRequest.FromString,
                 "response_serializer": health_pb2.HealthCheckResponse.SerializeToString}
        return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
            "Check": grpc.stream_unary_rpc_method_handler(self.check, **kinds),
            "Watch": grpc.stream_stream_rpc_method_handler(self.watch, **kinds)})


def add_health(server: grpc.aio.Server, servicer: BoundedHealth, main_port: bool = False) -> None:
    """Serves `servicer` on `server` as grpc.health.v1, its requests read with bounds (`HealthReads`): a
    main port reads HEALTH_READS at once and holds HEALTH_WAITING calls unread at most; the health-only
    port (a server of its own, its requests 4 KiB at most) reads any number."""
    reads = HealthReads(servicer, HEALTH_READS, HEALTH_WAITING) if main_port else HealthReads(servicer)
    server.add_generic_rpc_handlers((reads.handler(),))


# Failover is ours (serving.failover), so gRPC's own retries are off; a refused connection is retried
# after 0.1 s, backing off to at most 1 s, so a restarted replica is back within about a second.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_SENT_REQUEST),  # a router forwards what its --max-request-mb took
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def add_health_and_reflection(server: grpc.aio.Server, reflect: bool = False) -> health.aio.HealthServicer:
    """Adds grpc.health.v1 (`BoundedHealth`; every service NOT_SERVING until told) and, when `reflect`,
    server reflection."""
    servicer = BoundedHealth()
    add_health(server, servicer, main_port=True)
    if reflect:
        names = (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Marks the whole server and the Retriever service SERVING or NOT_SERVING (and `LIVENESS` SERVING)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)
    await servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)


def health_status(target: str, timeout: float = 2.0, security: ClientSecurity = ClientSecurity()) -> str:
    """SERVING, NOT_SERVING or UNAVAILABLE (no answer) for the Retriever service at `target`."""
    with open_channel(target, security, []) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.RpcError:
            return "UNAVAILABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # allocations up to this come from the heap (glibc's largest on 64-bit)
TRIM_THRESHOLD = 512 << 20  # the heap's free top is given back past this


def keep_freed_memory() -> bool:
    """Sets this process's malloc thresholds (glibc); False where there is no glibc `mallopt`."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("no glibc mallopt here: the heap keeps its default thresholds")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
