"""What the shard server and the router share: admission, accounting, errors, start and drain.

A subclass implements `ready()`, `handle_search()` and `info()`; this base turns a `RequestError`
into a gRPC status, bounds the requests in flight, refuses work while loading or draining,
records metrics, and keeps health NOT_SERVING until the subclass is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from retrieval.v1 import retriever_pb2 as pb
from retrieval.v1 import retriever_pb2_grpc as pb_grpc
from retriever_server.serving.grpc_setup import add_health_and_reflection, server_options, set_serving
from retriever_server.serving.metrics import ServerMetrics
from retriever_server.wire.request import Limits, RequestError
from retriever_server.wire.response import add_retriever_servicer

log = logging.getLogger(__name__)


class BaseRetrieverService(pb_grpc.RetrieverServicer):
    """The Retriever service's request handling, minus what a shard or a router does to answer."""

    role = "server"

    def __init__(self, limits: Limits, metrics: ServerMetrics):
        self.limits = limits
        self.metrics = metrics
        self.draining = False
        self.inflight = 0

    def not_ready_error(self) -> RequestError | None:
        """Why the service cannot answer yet (loading, failed), or None when it can."""
        raise NotImplementedError

    async def handle_search(self, request: pb.SearchRequest,
                            context: grpc.aio.ServicerContext) -> pb.SearchResponse | bytes:
        """The answer: a SearchResponse, or its wire bytes (`encode_search_response`)."""
        raise NotImplementedError

    async def handle_info(self) -> pb.InfoResponse:
        raise NotImplementedError

    async def close(self) -> None:
        """Releases what the service holds (channels, threads) after the server stops."""

    def _admit(self) -> None:
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{self.role} is draining (shutting down)")
        error = self.not_ready_error()
        if error is not None:
            raise error
        if self.inflight >= self.limits.max_inflight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.role} has {self.inflight} requests in flight, its limit; retry later",
            )

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse | bytes:
        started = time.perf_counter()
        status = "OK"
        counted = False
        try:
            self._admit()
            self.inflight += 1
            counted = True
            self.metrics.inflight.inc()
            return await self.handle_search(request, context)
        except RequestError as err:
            status, failure = err.code.name, err
            log.info("search refused: %s", err.message, extra={"status": status, "role": self.role})
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as err:  # noqa: BLE001 - a bug must still answer with a status, not a reset
            status = "INTERNAL"
            failure = RequestError(grpc.StatusCode.INTERNAL, f"{self.role} internal error: {type(err).__name__}: {err}")
            log.exception("search failed inside the %s", self.role)
        finally:  # accounted before the caller can see the answer or the error
            if counted:
                self.inflight -= 1
                self.metrics.inflight.dec()
            nq = int(request.queries.shape[0]) if len(request.queries.shape) else 0
            seconds = time.perf_counter() - started
            self.metrics.observe("Search", status, seconds, nq if status == "OK" else 0)
            log.debug("search", extra={"status": status, "nq": nq, "k": request.k, "ms": round(seconds * 1e3, 3)})
        await context.abort(failure.code, failure.message)

    async def GetInfo(self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        started = time.perf_counter()
        error = self.not_ready_error()
        if error is not None:
            self.metrics.observe("GetInfo", error.code.name, time.perf_counter() - started)
            await context.abort(error.code, error.message)
        info = await self.handle_info()
        self.metrics.observe("GetInfo", "OK", time.perf_counter() - started)
        return info


@dataclass
class RunningServer:
    """A started server: its bound port, health servicer and metrics port; `drain()` stops it."""

    server: grpc.aio.Server
    service: BaseRetrieverService
    health: object
    host: str
    port: int
    metrics_port: int | None
    ready: asyncio.Future | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def mark_ready(self) -> None:
        await set_serving(self.health, True)

    async def drain(self, grace: float = 5.0, delay: float = 0.0) -> None:
        """Drains: health NOT_SERVING and new searches refused (UNAVAILABLE) for `delay` seconds,
        so load balancers and routers move away, then the port closes and in-flight requests
        get `grace` seconds to finish."""
        self.service.draining = True
        await set_serving(self.health, False)
        log.info("%s at %s draining (delay %.1fs, grace %.1fs)", self.service.role, self.address, delay, grace)
        if delay > 0:
            await asyncio.sleep(delay)
        await self.server.stop(grace)
        await self.service.close()
        self.service.metrics.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(service: BaseRetrieverService, host: str, port: int,
                       metrics_port: int | None) -> RunningServer:
    """Binds `host:port` (0 for an ephemeral port), starts serving NOT_SERVING, returns the handle."""
    server = grpc.aio.server(options=server_options(service.limits.max_request_bytes))
    add_retriever_servicer(service, server)
    health = add_health_and_reflection(server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    await set_serving(health, False)
    mport = service.metrics.serve(host, metrics_port) if metrics_port is not None else None
    log.info("%s listening on %s:%d", service.role, host, bound)
    return RunningServer(server, service, health, host, bound, mport)
