"""The shard server: one datastore shard behind the Retriever gRPC service.

The port is bound at once and health says NOT_SERVING while the shard loads (checksums verified,
headers checked, index memory-mapped); then SERVING. With verification off (`--no-verify`) the sha256
check runs after SERVING, in the background; files that fail it turn the shard NOT_SERVING for good,
answering UNAVAILABLE, so routers and clients move to another replica. FAISS runs in a thread pool, off
the event loop. SIGTERM drains.

Run it with `retriever-server serve --datastore DIR --shard I`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.datastore.manifest import DatastoreError, verify_shard
from retriever_server.security.config import ServerSecurity
from retriever_server.serving.metrics import ServerMetrics
from retriever_server.serving.service import BaseRetrieverService, RunningServer, decode_search, start_server
from retriever_server.serving.shard import GPU_MAX_K, SearchStopped, Shard, ShardOptions
from retriever_server.wire.request import Limits, RequestError, SearchSpec, parse_search
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.tensors import dtype_code
from retriever_server.wire.untrusted import one_line

log = logging.getLogger(__name__)
INLINE_REQUEST_BYTES = 1 << 14  # requests this small are parsed on the event loop (nq <= 10 at d=384)


@dataclass(frozen=True)
class ShardServerConfig:
    """Where the shard is and how it is served."""

    datastore: Path
    shard: int
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = 0
    replica: int = 0
    limits: Limits = field(default_factory=Limits)
    options: ShardOptions = field(default_factory=ShardOptions)
    search_threads: int = 4
    security: ServerSecurity = field(default_factory=ServerSecurity)
    metrics_host: str = "127.0.0.1"
    health_port: int | None = None  # a plaintext port for health checks alone (0: ephemeral)
    health_host: str = "127.0.0.1"


def _gpu_limits(config: ShardServerConfig) -> Limits:
    """The limits a shard serves under: on a GPU, k (and re-rank candidates) at most what a FAISS GPU
    search returns, so that a larger k is refused by name (INVALID_ARGUMENT) rather than failing in FAISS."""
    limits = config.limits
    if not config.options.gpu or limits.max_k <= GPU_MAX_K:
        return limits
    log.warning("--max-k %d is past the %d neighbours a FAISS GPU search returns: this GPU shard takes k up to %d",
                limits.max_k, GPU_MAX_K, GPU_MAX_K)
    return replace(limits, max_k=GPU_MAX_K)


class ShardService(BaseRetrieverService):
    """Answers Search and GetInfo from one loaded `Shard`."""

    role = "shard"

    def __init__(self, config: ShardServerConfig):
        super().__init__(_gpu_limits(config), ServerMetrics("shard"))
        self.config = config
        self.shard: Shard | None = None
        self.load_error: str | None = None
        self.broken: str | None = None  # why the files failed the sha256 check run after SERVING
        self.pool = ThreadPoolExecutor(config.search_threads, thread_name_prefix="faiss")

    def load(self) -> Shard:
        """Opens the shard (blocking); records the error so requests can report it."""
        try:
            self.shard = Shard.open(self.config.datastore, self.config.shard, self.config.options)
        except (DatastoreError, ValueError, OSError, RuntimeError) as err:
            self.load_error = one_line(str(err))  # its file's text may be in it: one line, escaped
            raise
        return self.shard

    def not_ready_error(self) -> RequestError | None:
        if self.load_error is not None:  # UNAVAILABLE: another replica, with its own files, may serve
            return RequestError(grpc.StatusCode.UNAVAILABLE, f"shard failed to load: {self.load_error}")
        if self.broken is not None:
            return RequestError(grpc.StatusCode.UNAVAILABLE, f"shard files failed verification: {self.broken}")
        if self.shard is None:
            return RequestError(grpc.StatusCode.UNAVAILABLE, "shard is loading; retry when health is SERVING")
        return None

    def _parse(self, raw: bytes) -> SearchSpec:
        return parse_search(decode_search(raw, self.limits), self.shard.view(), self.limits)

    def _answer(self, spec: SearchSpec, stop) -> bytes:
        """The answer's bytes to a checked request."""
        try:
            return encode_search_response(self.shard.search(spec, stop))
        except SearchStopped:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed (or the caller went away) "
                                                                  "during the search; it was stopped") from None

    def _search(self, raw: bytes, stop) -> tuple[bytes, int]:
        """Parses, checks and searches, in a worker thread: the answer's bytes and the number of queries."""
        spec = self._parse(raw)
        return self._answer(spec, stop), spec.nq

    async def handle_search(self, raw: bytes, context: grpc.aio.ServicerContext) -> tuple[bytes, int]:
        """A small request is parsed on the event loop, and a search of little work (`Shard.is_small`,
        well under a millisecond) answered there too: handing it to a thread would cost more CPU than
        it takes. Anything larger runs in the FAISS thread pool, checking the deadline between chunks."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the search started")
        spec = self._parse(raw) if len(raw) <= INLINE_REQUEST_BYTES else None
        if spec is not None and self.shard.is_small(spec):
            return self._answer(spec, None), spec.nq
        deadline = None if remaining is None else time.monotonic() + remaining
        gone = threading.Event()
        context.add_done_callback(lambda _: gone.set())  # the call ended: cancelled, or its deadline hit

        def stop() -> bool:
            return gone.is_set() or (deadline is not None and time.monotonic() >= deadline)

        loop = asyncio.get_running_loop()
        if spec is None:
            return await loop.run_in_executor(self.pool, self._search, raw, stop)
        return await loop.run_in_executor(self.pool, self._answer, spec, stop), spec.nq

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def handle_info(self) -> pb.InfoResponse:
        m, entry = self.shard.manifest, self.shard.entry
        return pb.InfoResponse(
            role="shard", dimension=m.dimension, metric=m.metric, factory=m.factory, ntotal=entry.ntotal,
            shard=entry.name, replica=self.config.replica, datastore_version=m.version,
            datastore_checksum=m.checksum, has_keys=m.has_keys, nlist=m.nlist, default_nprobe=m.default_nprobe,
            max_k=self.limits.max_k, max_batch=self.limits.max_batch, max_request_bytes=self.limits.max_request_bytes,
            metadata=m.metadata,
            gpu=self.config.options.gpu, num_shards=len(m.shards), datastore_ntotal=m.ntotal,
            payloads=[pb.PayloadInfo(name=p.name, dtype=dtype_code(p.dtype), row_shape=p.row_shape)
                      for p in m.payloads],
            shards=[pb.ShardInfo(name=entry.name, id_start=entry.id_start, id_end=entry.id_end,
                                 ntotal=entry.ntotal, replicas=1)],
        )


async def start_shard_server(config: ShardServerConfig, wait_loaded: bool = True) -> RunningServer:
    """Starts a shard server; it binds first, loads the shard off the loop, then turns SERVING.

    Args:
        config: the datastore, shard number, address and limits.
        wait_loaded: return only once the shard is loaded (raising its load error), else at once.

    Returns:
        The running server; `await running.drain()` stops it.

    Raises:
        DatastoreError: the shard's files do not match its manifest (when wait_loaded).
    """
    service = ShardService(config)
    running = await start_server(service, config.host, config.port, config.metrics_port, config.security,
                                 config.metrics_host, config.health_port, config.health_host)

    async def load() -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(service.pool, service.load)
        except Exception as err:  # noqa: BLE001 - every load failure is reported the same way
            log.error("shard %d of %s refused: %s", config.shard, config.datastore, one_line(str(err)))
            raise
        await running.mark_ready()
        log.info("shard %d of %s SERVING on %s", config.shard, config.datastore, running.address)

    task = asyncio.ensure_future(load())
    if not config.options.verify:
        task.add_done_callback(lambda t: t.cancelled() or t.exception() or _verify_in_background(service, running))
    running.ready = task
    if wait_loaded:
        try:
            await task
        except Exception:
            await running.drain(grace=0)
            raise
    else:
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
    return running


def _verify_in_background(service: ShardService, running: RunningServer) -> None:
    """Checks the loaded shard's sha256 in a daemon thread; on a mismatch marks it broken: health
    NOT_SERVING and every request UNAVAILABLE, for good (its files are not what the manifest says)."""
    loop = asyncio.get_running_loop()
    shard = service.shard

    def verify() -> None:
        try:
            verify_shard(shard.directory, shard.entry, full=True)
        except (DatastoreError, OSError) as err:
            why = one_line(str(err))  # file names from the manifest may be in it
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(_broken(service, running, why)))
            return
        log.info("%s verified (sha256) while serving", shard.entry.name)

    threading.Thread(target=verify, name="verify", daemon=True).start()


async def _broken(service: ShardService, running: RunningServer, why: str) -> None:
    service.broken = why
    log.error("%s answers nothing from now on: %s", service.shard.entry.name, why)
    await running.mark_ready(serving=False)
