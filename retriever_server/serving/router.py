"""The router: the Retriever service in front of S shards x R replicas.

It checks each request once, sends it to one replica of every shard in parallel (the next replica
when one fails, within the caller's deadline), and merges the per-shard top-k exactly. When a shard
has no replica left, the request fails with UNAVAILABLE naming the shard, unless the caller set
`allow_partial`: then the other shards' merged answer comes back flagged partial. Before serving,
it checks that its shards are all the shards of one datastore, once each.

Run it with `retriever-server router --shards HOST:PORT,HOST:PORT`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.security.client_files import RETIRED_CLOSE_S, WatchedClientSecurity
from retriever_server.security.config import ClientSecurity, SecurityError, ServerSecurity
from retriever_server.security.tls import open_aio_channel
from retriever_server.serving.failover import (
    Attempts,
    CallFailed,
    Deadline,
    FailoverPolicy,
    ReplicaSet,
    ShardFailed,
    call_async,
)
from retriever_server.serving.fanout import (
    check_late_replicas,
    check_shards,
    gather_until,
    least_limits,
    replica_infos,
    replica_problem,
    replica_sets,
    router_limits,
    shard_answers,
    shard_deadline,
    shard_request_bytes,
    view_of,
)
from retriever_server.serving.grpc_setup import CHANNEL_OPTIONS
from retriever_server.serving.merge import merge_results
from retriever_server.serving.metrics import ServerMetrics
from retriever_server.serving.service import BaseRetrieverService, RunningServer, decode_search, start_server
from retriever_server.wire.request import DatastoreView, Limits, RequestError, parse_search
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.result import AnswerShape, PayloadRows, SearchResult, payload_rows
from retriever_server.wire.stub import retriever_stub
from retriever_server.wire.untrusted import one_line

log = logging.getLogger(__name__)
INLINE_ELEMENTS = 1 << 18  # requests and answers this small are checked and merged on the event loop (~2 ms)
FORWARD_SLACK = 1 << 20  # what the router may add to a request it forwards (its datastore version), at most
DISCOVERY_REPORT_S = 10.0  # how often a router waiting for its shards says which have not answered


def merge_values(spec, answers: int, dimension: int) -> int:
    """What a merge of `answers` shard answers to `spec` moves, in neighbours (an id and its distance), each
    key's values and each payload counting one more, successors too: whether it runs on the event loop. A
    merge of ids and distances alone counts its neighbours, as INLINE_ELEMENTS was measured by."""
    per_row = 1 + (dimension if spec.return_keys else 0) + len(spec.payloads)
    return spec.nq * spec.k * answers * (1 + spec.successors) * per_row


def shard_limits(router: Limits) -> Limits:
    """The limits a router's shards need for every request the router accepts under `router`: a request
    it forwards may be FORWARD_SLACK bytes larger than the one it received."""
    return dataclasses.replace(router, max_request_bytes=router.max_request_bytes + FORWARD_SLACK)


def forwarded_overrides(version: str) -> bytes:
    """SearchRequest fields written after a request forwarded as it came, where the last value read
    wins: allow_partial false (written out, though protobuf leaves a false bool unwritten) and the
    datastore's `version`."""
    allow_partial = pb.SearchRequest.DESCRIPTOR.fields_by_name["allow_partial"].number
    return bytes([allow_partial << 3, 0]) + pb.SearchRequest(expected_datastore_version=version).SerializeToString()


@dataclass(frozen=True)
class RouterConfig:
    """The shards (each a list of replica addresses) and where the router listens."""

    shards: tuple[tuple[str, ...], ...]
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = 0
    limits: Limits = field(default_factory=Limits)
    info_timeout_s: float = 2.0
    security: ServerSecurity = field(default_factory=ServerSecurity)  # the router's own port
    shard_security: ClientSecurity = field(default_factory=ClientSecurity)  # its calls to the shards
    metrics_host: str = "127.0.0.1"
    health_port: int | None = None  # a plaintext port for health checks alone (0: ephemeral)
    health_host: str = "127.0.0.1"
    failover: FailoverPolicy = field(default_factory=FailoverPolicy)  # between the replicas of a shard


class RouterService(BaseRetrieverService):
    """Fans Search out over the shards and merges; GetInfo describes the whole datastore."""

    role = "router"

    def __init__(self, config: RouterConfig):
        super().__init__(config.limits, ServerMetrics("router"))
        self.config = config
        self.sets = replica_sets([list(s) for s in config.shards])
        self.credentials = WatchedClientSecurity(config.shard_security)  # its token and TLS files, watched
        self.channels = {a: open_aio_channel(a, config.shard_security, CHANNEL_OPTIONS)
                         for s in config.shards for a in s}
        self.stubs = {a: retriever_stub(c, aligned=False) for a, c in self.channels.items()}
        self.retired: list[tuple[float, grpc.aio.Channel]] = []  # (when, channel) of TLS files since changed
        self.closing: set[asyncio.Future] = set()
        self.tls_generation = 0  # how many times the TLS files changed: channels made before are retired
        self.infos: list[pb.InfoResponse] | None = None
        self.view: DatastoreView | None = None
        self.rows: PayloadRows = {}  # each payload's dtype and row shape: what the shards' answers must hold
        # what GetInfo reports of its limits, and what a replica joining later must take (`router_limits`)
        self.reported: dict[str, int] = {}
        self.needs: dict[str, int] = {}
        self.config_error: str | None = None
        self.overrides = b""  # written after each request forwarded as it came (`forwarded_overrides`)
        self.shard_request_bytes = config.limits.max_request_bytes + FORWARD_SLACK
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="merge")
        self.rechecking: asyncio.Future | None = None  # `check_late_replicas`, while replicas down at start remain

    def _hedge_delay_of(self, replicas: ReplicaSet) -> Callable[[], float]:
        policy = self.config.failover
        return lambda: replicas.hedge_delay(policy) if policy.hedge else float("nan")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of every call to a shard: the current bearer token."""
        return self.credentials.metadata

    def _refresh_credentials(self) -> None:
        """Takes up a rotated token at once, and changed TLS files on new channels to every replica. The
        channels before them stay open RETIRED_CLOSE_S for the calls on their way (longer than an attempt
        may take), then close at a later change, or at close()."""
        if not self.credentials.refresh():
            return
        try:
            channels = {a: open_aio_channel(a, self.config.shard_security, CHANNEL_OPTIONS)
                        for s in self.sets for a in s.addresses}
        except (SecurityError, OSError) as err:  # rewritten again since checked: keep what works
            log.warning("TLS files of the calls to the shards changed but cannot be read yet (%s); keeping the "
                        "current connections", err)
            return
        log.info("new channels to the shards, with the changed TLS files")
        self._retire(list(self.channels.values()))
        self.tls_generation += 1
        self.channels = channels
        self.stubs = {a: retriever_stub(c, aligned=False) for a, c in self.channels.items()}

    def _retire(self, channels: list[grpc.aio.Channel]) -> None:
        """Keeps `channels` open RETIRED_CLOSE_S more for the calls on their way; closes those retired
        longer ago."""
        now = time.monotonic()
        for _, old in [r for r in self.retired if now - r[0] > RETIRED_CLOSE_S]:
            self._close_later(old)
        self.retired = [r for r in self.retired if now - r[0] <= RETIRED_CLOSE_S] + [(now, c) for c in channels]

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        closing = asyncio.ensure_future(channel.close())
        self.closing.add(closing)  # held until done: the loop keeps only weak references to tasks
        closing.add_done_callback(self.closing.discard)

    def not_ready_error(self) -> RequestError | None:
        if self.config_error is not None:
            return RequestError(grpc.StatusCode.FAILED_PRECONDITION, self.config_error)
        if self.view is None:
            return RequestError(grpc.StatusCode.UNAVAILABLE, "router is waiting for its shards to load")
        return None

    async def discover(self, poll_s: float = 0.2) -> None:
        """Waits until every shard has a replica answering GetInfo, checks they form one whole
        datastore, then is ready; raises RuntimeError (and refuses requests) when they do not. While it
        waits, it says every DISCOVERY_REPORT_S seconds which shards have not answered, and why."""
        report_at = time.monotonic() + DISCOVERY_REPORT_S
        while True:
            self._refresh_credentials()
            silent: dict[str, str] = {}
            infos = await replica_infos(self.stubs, self.sets, self.config.info_timeout_s, self.metadata, silent)
            if all(infos):
                break
            if time.monotonic() >= report_at:
                waiting = [f"{r.name} ({', '.join(f'{a}: {silent.get(a)}' for a in r.addresses)})"
                           for r, found in zip(self.sets, infos) if not found]
                log.warning("router still waits for %d of %d shards to answer: %s", len(waiting), len(self.sets),
                            one_line("; ".join(waiting), 1000))
                report_at = time.monotonic() + DISCOVERY_REPORT_S
            await asyncio.sleep(poll_s)
        problem = check_shards(infos)
        if problem is not None:
            self.config_error = problem
            log.error("router refuses its shards: %s", problem)
            raise RuntimeError(problem)
        for replicas, shard_infos in zip(self.sets, infos):
            replicas.name = shard_infos[0].shard
            replicas.unchecked = {a for a in replicas.addresses if a in silent}  # in rotation once checked
            if replicas.unchecked:
                log.warning("%s: %d of %d replicas answered at start; the others join once they answer as %s",
                            replicas.name, len(shard_infos), len(replicas.addresses), replicas.name)
        self.metrics.watch_hedge_delays({s.name: self._hedge_delay_of(s) for s in self.sets})  # named now
        self.infos, everyone = [shard_infos[0] for shard_infos in infos], [i for found in infos for i in found]
        self.shard_request_bytes = shard_request_bytes(everyone, self.limits.max_request_bytes, FORWARD_SLACK)
        self.overrides = forwarded_overrides(self.infos[0].datastore_version)
        self.reported, self.needs = router_limits(self.limits, self._check_limits(everyone), self.shard_request_bytes,
                                                  len(self.overrides))
        if any(replicas.unchecked for replicas in self.sets):  # let in once as the others, limits and all
            self.rechecking = asyncio.ensure_future(check_late_replicas(  # on the channels current then
                self.sets, self.infos, lambda a: self.stubs[a], self.config.info_timeout_s, lambda: self.metadata,
                self.needs))
        self.view, self.rows = view_of(self.infos[0]), payload_rows(self.infos[0])

    def _check_limits(self, infos: list[pb.InfoResponse]) -> dict[str, int]:
        """The least of the shards' limits (`least_limits`); warns where they refuse what this router accepts:
        a k or a batch over theirs."""
        caps = least_limits(infos)
        for name, mine in (("max_k", self.limits.max_k), ("max_batch", self.limits.max_batch)):
            theirs = caps[name] or mine
            if theirs < mine:
                log.warning("shards accept %s up to %d, under this router's %d: requests between are refused by "
                            "the shards; give the router --%s %d or the shards a larger one", name, theirs, mine,
                            name.replace("_", "-"), theirs)
        return caps

    async def _off_loop(self, elements: int, function, *args):
        if elements <= INLINE_ELEMENTS:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def _checked(self, raw: bytes) -> tuple[bytes, object]:
        """The request parsed and checked, and the bytes forwarded: its known fields alone (unknown fields
        are dropped, not carried to the shards), the answer whole, this datastore's version required.
        A request of known fields alone goes on as it came (the shards parse the same bytes the router
        parsed and checked), those two fields written again after it (the last value read wins); one
        with unknown fields is written anew."""
        request = decode_search(raw, self.limits)
        spec = parse_search(request, self.view, self.limits, read_exclusions=False)
        size = request.ByteSize()
        request.DiscardUnknownFields()
        if request.ByteSize() == size:  # no unknown field, at any depth: the shards parse what was checked
            forwarded = raw + self.overrides
        else:
            request.allow_partial = False
            request.expected_datastore_version = self.view.version
            forwarded = request.SerializeToString()
        size = len(forwarded)
        if size > self.shard_request_bytes:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the request is {size} bytes as sent to the shards, over their limit of "
                               f"{self.shard_request_bytes} bytes")
        return forwarded, spec

    async def _search_shard(self, replicas: ReplicaSet, request: bytes, deadline: Deadline, partial: bool,
                            expect: AnswerShape):
        """One shard's answer, by the failover policy; ShardFailed when the others may answer without it
        (every replica failed, or, with `partial`, its time ran out); RequestError when the call must fail whole."""
        def attempt(address: str, timeout: float | None):
            return self.stubs[address].Search(request, expect=expect, timeout=timeout, metadata=self.metadata)

        try:
            return await call_async(Attempts(replicas, self.config.failover, deadline), attempt)
        except ShardFailed:
            raise
        except CallFailed as err:
            if partial and err.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # a hung shard: answer without it
                raise ShardFailed(err.code, err.message) from None
            if err.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # the shard refused the router's own credentials, not the caller's: the service is what failed
                log.error("%s refused the router's credentials (%s): %s", replicas.name, err.code.name,
                          one_line(err.message, 200))
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{replicas.name} refused the router's credentials "
                                   f"({err.code.name}): check the router's --shard-auth-token-file and --shard-tls-*") \
                    from None
            message = err.message if err.code == grpc.StatusCode.DEADLINE_EXCEEDED else \
                f"{replicas.name}: {err.message}"
            raise RequestError(err.code, message) from None

    async def handle_search(self, raw: bytes, context: grpc.aio.ServicerContext) -> tuple[bytes, int]:
        forwarded, spec = await self._off_loop(len(raw) // 4, self._checked, raw)
        self._refresh_credentials()
        deadline = shard_deadline(context.time_remaining(), spec.allow_partial)
        def ends_call(outcome) -> bool:  # a refusal, or, unless a partial answer is allowed, a shard lost
            return isinstance(outcome, BaseException) and not (spec.allow_partial and isinstance(outcome, ShardFailed))

        expect = AnswerShape(spec.nq, spec.k, spec.payloads, spec.return_keys, spec.successors,  # each shard's answer
                             rows=self.rows, dimension=self.view.dimension)
        outcomes = await gather_until([self._search_shard(s, forwarded, deadline, spec.allow_partial, expect)
                                       for s in self.sets], ends_call)
        try:
            answers, failures = shard_answers(self.sets, outcomes, spec.allow_partial)
        except CallFailed as err:  # shards failed, and no partial answer may (or can) be made
            raise RequestError(err.code, err.message) from None
        answer = await self._off_loop(merge_values(spec, len(answers), self.view.dimension), self._merge, answers,
                                      spec.k, failures)
        return answer, spec.nq

    def _merge(self, answers: list[SearchResult], k: int, failures: dict[str, str]) -> bytes:
        merged = merge_results(answers, k, self.infos[0].metric, ranked=True)
        merged.partial = bool(failures)
        merged.failed_shards = failures
        return encode_search_response(merged)

    async def handle_info(self) -> pb.InfoResponse:
        info = pb.InfoResponse()
        info.CopyFrom(self.infos[0])
        info.role, info.shard, info.replica = "router", "", 0
        for name, least in self.reported.items():  # the least of its own and its shards': what it accepts
            setattr(info, name, least)
        info.ntotal = sum(i.ntotal for i in self.infos)
        del info.shards[:]
        for replicas, shard in zip(self.sets, self.infos):
            info.shards.append(pb.ShardInfo(name=shard.shard, id_start=shard.shards[0].id_start,
                                            id_end=shard.shards[0].id_end, ntotal=shard.ntotal,
                                            replicas=len(replicas.addresses)))
        return info

    async def replace_replica(self, shard: int, replica: int, address: str, timeout_s: float = 10.0) -> str | None:
        """Sends replica `replica` of `shard`'s share to `address` once it answers GetInfo as that shard of
        this datastore version, taking what the router reports (ValueError if not: `replica_problem`, as a
        replica down at start is checked); returns the old address, None when unchanged. The old
        channel stays open until close(), for calls already on their way (they fail over as any failed call)."""
        replicas = self.sets[shard]
        old = replicas.addresses[replica]
        if old == address:
            return None
        generation = self.tls_generation
        channel = open_aio_channel(address, self.config.shard_security, CHANNEL_OPTIONS)
        stub = retriever_stub(channel, aligned=False)
        try:
            info = await stub.GetInfo(pb.GetInfoRequest(), timeout=timeout_s, metadata=self.metadata)
            problem = replica_problem(info, self.infos[shard], self.needs)  # as a replica down at start is let in
            if problem is not None:
                problem = f"{address} is not taken as replica {replica} of {self.infos[shard].shard}: {problem}"
                log.warning("%s", problem)  # as a late replica's is (the caller may be a Ray actor's call, unread)
                raise ValueError(problem)
        except BaseException:
            await channel.close()  # kept nowhere: closed here or never
            raise
        if generation != self.tls_generation:  # the TLS files changed meanwhile: a channel with the new ones
            self._retire([channel])
            channel = open_aio_channel(address, self.config.shard_security, CHANNEL_OPTIONS)
            stub = retriever_stub(channel, aligned=False)
        if address in self.channels:  # an address served before (a replica back where it was)
            self._retire([self.channels[address]])
        self.channels[address], self.stubs[address] = channel, stub
        replicas.addresses[replica] = address
        replicas.unchecked.discard(old)
        return old

    async def close(self) -> None:
        if self.rechecking is not None:
            self.rechecking.cancel()
        await asyncio.gather(*(c.close() for c in [*self.channels.values(), *(c for _, c in self.retired)]))
        self.pool.shutdown(wait=False, cancel_futures=True)


async def start_router(config: RouterConfig, wait_ready: bool = True) -> RunningServer:
    """Starts a router; it turns SERVING once every shard answers and they form one datastore.

    Args:
        config: shard replica addresses, listen address and limits.
        wait_ready: return only when the router is SERVING (raising RuntimeError if its shards
            are not one whole datastore).

    Returns:
        The running router; `await running.drain()` stops it.
    """
    service = RouterService(config)
    running = await start_server(service, config.host, config.port, config.metrics_port, config.security,
                                 config.metrics_host, config.health_port, config.health_host)

    async def become_ready() -> None:
        await service.discover()
        await running.mark_ready()
        log.info("router SERVING on %s over %d shards", running.address, len(config.shards))

    task = asyncio.ensure_future(become_ready())
    running.ready = task
    if wait_ready:
        try:
            await task
        except Exception:
            await running.drain(grace=0)  # no port, channel or task left behind a router that never served
            raise
    else:
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
    return running
