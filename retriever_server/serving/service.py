"""What the shard server and the router share: admission, accounting, errors, start and drain.

A subclass implements `ready()`, `handle_search()` and `info()`; this base turns a `RequestError`
into a gRPC status, bounds the requests in flight, refuses work while loading or draining,
records metrics, and keeps health NOT_SERVING until the subclass is ready.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from retrieval.v1 import retriever_pb2 as pb
from retrieval.v1 import retriever_pb2_grpc as pb_grpc
from retriever_server.logs import EventCounter
from retriever_server.security.auth import AuthInterceptor, TokenSet
from retriever_server.security.config import ServerSecurity
from retriever_server.security.tls import ServerCertificates
from retriever_server.serving.failover import BUSY, STALE
from retriever_server.serving.grpc_setup import (
    HEALTH_IDLE_MS,
    HEALTH_PORT_CALLS,
    HEALTH_REQUEST_BYTES,
    add_health,
    add_health_and_reflection,
    keep_freed_memory,
    most_calls,
    server_options,
    set_serving,
)
from retriever_server.serving.metrics import ServerMetrics
from retriever_server.wire.request import Limits, RequestError
from retriever_server.wire.request_counts import check_wire_counts
from retriever_server.wire.response import add_retriever_servicer
from retriever_server.wire.untrusted import one_line

log = logging.getLogger(__name__)


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class BaseRetrieverService(pb_grpc.RetrieverServicer):
    """The Retriever service's request handling, minus what a shard or a router does to answer."""

    role = "server"

    def __init__(self, limits: Limits, metrics: ServerMetrics):
        self.limits = limits
        self.metrics = metrics
        self.draining = False
        self.inflight = 0
        self.refusals = EventCounter(log)  # refused searches, logged as counts per interval
        metrics.count_inflight(lambda: self.inflight)

    def not_ready_error(self) -> RequestError | None:
        """Why the service cannot answer yet (loading, failed), or None when it can."""
        raise NotImplementedError

    async def handle_search(self, raw: bytes, context: grpc.aio.ServicerContext) -> tuple[bytes, int]:
        """The answer's wire bytes (`encode_search_response`) and the number of queries, from the
        request's wire bytes (`decode_search` turns bad bytes into INVALID_ARGUMENT)."""
        raise NotImplementedError

    async def handle_info(self) -> pb.InfoResponse:
        raise NotImplementedError

    async def close(self) -> None:
        """Releases what the service holds (channels, threads) after the server stops."""

    def _draining_error(self) -> RequestError | None:
        """UNAVAILABLE once a drain began (Search and GetInfo alike, so that routers and clients count a
        draining server as down), else None."""
        if self.draining:
            return RequestError(grpc.StatusCode.UNAVAILABLE, f"{self.role} is draining (shutting down)")
        return None

    def _admit(self) -> None:
        error = self._draining_error() or self.not_ready_error()
        if error is not None:
            raise error
        if self.inflight >= self.limits.max_inflight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.role} has {self.inflight} requests in flight, its limit; retry later",
                busy=True,
            )

    async def Search(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        status, nq = "OK", 0
        counted = False
        try:
            self._admit()
            self.inflight += 1
            counted = True
            answer, nq = await self.handle_search(raw, context)
            return answer
        except RequestError as err:
            status, failure = err.code.name, err
            self.refusals.record(f"{self.role} refused a search with {status}", err.message)
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            status = "CANCELLED"
            raise
        except Exception as err:  # noqa: BLE001 - a bug must still answer with a status, not a reset
            status = "INTERNAL"
            failure = RequestError(grpc.StatusCode.INTERNAL,
                                   f"{self.role} internal error: {type(err).__name__}: {one_line(str(err), 200)}")
            log.exception("search failed inside the %s", self.role)
        finally:  # accounted before the caller can see the answer or the error
            if counted:
                self.inflight -= 1
            if status in ("OK", "CANCELLED") and _deadline_passed(context):  # what the caller saw: an answer
                status = "DEADLINE_EXCEEDED"  # past its deadline is dropped, and gRPC cancels a handler then
            seconds = time.perf_counter() - started
            self.metrics.observe("Search", status, seconds, nq if status == "OK" else 0)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("search", extra={"status": status, "nq": nq, "bytes": len(raw),
                                           "ms": round(seconds * 1e3, 3)})
        marks = (*((BUSY,) if failure.busy else ()), *((STALE,) if failure.stale else ()))
        await context.abort(failure.code, failure.message, trailing_metadata=marks)

    async def GetInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        started = time.perf_counter()
        error = self.not_ready_error()
        try:
            pb.GetInfoRequest.FromString(raw)
        except DecodeError:
            error = RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a GetInfoRequest "
                                                                   f"({len(raw)} bytes that do not parse)")
        error = self._draining_error() or error  # as Search: a draining server is refused before anything else
        if error is not None:
            self.metrics.observe("GetInfo", error.code.name, time.perf_counter() - started)
            self.refusals.record(f"{self.role} refused GetInfo with {error.code.name}", error.message)
            await context.abort(error.code, error.message)
        info = await self.handle_info()
        self.metrics.observe("GetInfo", "OK", time.perf_counter() - started)
        return info


def decode_search(raw: bytes, limits: Limits) -> pb.SearchRequest:
    """A SearchRequest from its wire bytes, its repeated fields counted against `limits` before protobuf
    makes an object of each (`check_wire_counts`); bytes that do not parse are INVALID_ARGUMENT."""
    check_wire_counts(raw, limits)
    try:
        return pb.SearchRequest.FromString(raw)
    except DecodeError:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the request is not a SearchRequest ({len(raw)} bytes that do not parse)") from None


@dataclass
class RunningServer:
    """A started server: its bound port, health servicer and metrics port; `drain()` stops it,
    `reload_security()` reads its certificates and tokens again (SIGHUP)."""

    server: grpc.aio.Server
    service: BaseRetrieverService
    health: object
    host: str
    port: int
    metrics_port: int | None
    ready: asyncio.Future | None = None
    certificates: ServerCertificates | None = None
    tokens: TokenSet | None = None
    counters: list[EventCounter] = field(default_factory=list)
    flusher: asyncio.Task | None = None
    health_server: grpc.aio.Server | None = None  # plaintext health alone, for probes that cannot do TLS
    health_port: int | None = None

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    async def mark_ready(self, serving: bool = True) -> None:
        """Health SERVING (or, with serving=False, NOT_SERVING again: the service cannot answer); once
        draining, NOT_SERVING for good: a shard done loading, or a router done waiting for its shards,
        after the drain began does not turn it SERVING."""
        await set_serving(self.health, serving and not self.service.draining)

    def reload_security(self) -> None:
        """Reads the TLS files and the token file again, changed or not."""
        if self.certificates is not None:
            self.certificates.reload()
        if self.tokens is not None:
            self.tokens.reload()

    async def flush_counts(self, every_s: float = 10.0) -> None:
        """Logs the counts of repeated refusals as their intervals end, until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            for counter in self.counters:
                counter.flush()

    async def drain(self, grace: float = 5.0, delay: float = 0.0) -> None:
        """Drains: health NOT_SERVING for good (a load or discovery still running is cancelled) and new
        searches refused (UNAVAILABLE) for `delay` seconds, so load balancers and routers move away, then
        the port closes and in-flight requests get `grace` seconds to finish."""
        self.service.draining = True
        if self.ready is not None:
            self.ready.cancel()  # still loading, or waiting for the shards: it never turns SERVING now
        await set_serving(self.health, False)
        log.info("%s at %s draining (delay %.1fs, grace %.1fs)", self.service.role, self.address, delay, grace)
        if delay > 0:
            await asyncio.sleep(delay)
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.service.close()
        self.service.metrics.stop()
        if self.flusher is not None:
            self.flusher.cancel()
        for counter in self.counters:
            counter.flush()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def host_port(host: str, port: int) -> str:
    """"HOST:PORT", an IPv6 address in brackets ("[::1]:7000"): gRPC reads "::1:7000" as no address."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_free(host: str, port: int, what: str = "") -> None:
    """OSError naming `host:port` and the reason when it cannot be bound (taken by a listening socket, or
    `host` not an address of this machine), found before gRPC tries: gRPC's own failure adds a C-level
    log line to the caller's one-line error. Port 0 (any free one) is probed for the host alone."""
    try:
        families = {info[0] for info in socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)}
    except OSError as err:
        raise OSError(f"could not bind {what}{host}:{port}: not an address of this machine ({err.strerror or err})") \
            from None
    for family in families:
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # a family this machine lacks (IPv6): left to gRPC
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: past TIME_WAIT, not a listener
            try:
                probe.bind((host.strip("[]"), port))
            except OSError as err:
                if err.errno == errno.EADDRNOTAVAIL:
                    raise OSError(f"could not bind {what}{host}:{port}: not an address of this machine") from None
                if err.errno in (errno.EADDRINUSE, errno.EACCES) and port:  # else (no IPv6 here, ...): left to gRPC
                    raise OSError(f"could not bind {what}{host}:{port} ({err.strerror})") from None


async def _health_only_server(health, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext server answering grpc.health.v1 alone, with the main server's health states."""
    check_free(host, port, "the health port ")
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),  # a port taken is refused, not shared
                                      ("grpc.max_receive_message_length", HEALTH_REQUEST_BYTES),
                                      ("grpc.max_connection_idle_ms", HEALTH_IDLE_MS)],
                             maximum_concurrent_rpcs=HEALTH_PORT_CALLS)
    add_health(server, health)
    try:
        bound = server.add_insecure_port(host_port(host, port))
    except RuntimeError:  # gRPC's word for a port it cannot bind
        bound = 0
    if bound == 0:
        raise OSError(f"could not bind the health port {host}:{port} (in use?)")
    await server.start()
    return server, bound


async def start_server(service: BaseRetrieverService, host: str, port: int, metrics_port: int | None,
                       security: ServerSecurity = ServerSecurity(), metrics_host: str = "127.0.0.1",
                       health_port: int | None = None, health_host: str = "127.0.0.1") -> RunningServer:
    """Binds `host:port` (0 for an ephemeral port), starts serving NOT_SERVING, returns the handle.
    The process's heap keeps freed memory from then on (`grpc_setup.keep_freed_memory`).

    `health_port` (0: ephemeral; None: none) adds a plaintext port answering health checks only, for
    probes that cannot speak TLS or carry a token; it tells nothing but SERVING or NOT_SERVING.

    Raises:
        SecurityError: the security settings cannot work, or would leave a non-loopback port unprotected.
        OSError: an address cannot be bound.
        Either way the service is closed (its threads, a router's channels to its shards).
    """
    try:
        return await _serve(service, host, port, metrics_port, security, metrics_host, health_port, health_host)
    except BaseException:
        await service.close()
        raise


async def _serve(service: BaseRetrieverService, host: str, port: int, metrics_port: int | None,
                 security: ServerSecurity, metrics_host: str, health_port: int | None, health_host: str
                 ) -> RunningServer:
    security.check(host)
    check_free(host, port)
    keep_freed_memory()
    tokens = TokenSet(security.token_file) if security.token_file is not None else None
    unauthenticated = EventCounter(log)
    interceptors = [AuthInterceptor(tokens, unauthenticated)] if tokens is not None else []
    server = grpc.aio.server(options=server_options(service.limits.max_request_bytes), interceptors=interceptors,
                             maximum_concurrent_rpcs=most_calls(service.limits.max_inflight))
    add_retriever_servicer(service, server)
    health = add_health_and_reflection(server, reflect=security.reflection)
    certificates = ServerCertificates(security) if security.tls else None
    address = host_port(host, port)
    try:
        bound = server.add_secure_port(address, certificates.credentials()) if certificates else \
            server.add_insecure_port(address)
    except RuntimeError:  # gRPC's word for a port it cannot bind
        bound = 0
    if bound == 0:
        raise OSError(f"could not bind {address} (in use?)")
    await server.start()
    await set_serving(health, False)
    health_server, hport = None, None
    try:
        if health_port is not None:
            health_server, hport = await _health_only_server(health, health_host, health_port)
        mport = service.metrics.serve(metrics_host, metrics_port) if metrics_port is not None else None
    except Exception:  # a port taken: nothing of this server is left listening
        await server.stop(0)
        if health_server is not None:
            await health_server.stop(0)
        raise
    log.info("%s listening on %s:%d (%s)", service.role, host, bound, security.describe())
    running = RunningServer(server, service, health, host, bound, mport, certificates=certificates, tokens=tokens,
                            counters=[service.refusals, unauthenticated], health_server=health_server,
                            health_port=hport)
    running.flusher = asyncio.ensure_future(running.flush_counts())
    return running
