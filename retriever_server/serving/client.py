"""`RetrieverClient`: neighbours over gRPC as numpy arrays, from a router or straight from shards.

Example:
    >>> client = RetrieverClient("127.0.0.1:50051")                # a router (or a single shard)
    >>> client = RetrieverClient(["127.0.0.1:7001", "127.0.0.1:7002"])  # shards: fan out here
    >>> result = client.search(queries, k=10, nprobe=16)           # queries: (nq, d) float32
    >>> result.ids.shape, result.distances.shape                   # (nq, 10), (nq, 10)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.security.client_files import RETIRED_CLOSE_S, WatchedClientSecurity
from retriever_server.security.config import ClientSecurity, SecurityError
from retriever_server.security.tls import open_aio_channel, open_channel
from retriever_server.serving.event_loop import LoopThread
from retriever_server.serving.failover import (
    Attempts,
    CallFailed,
    Deadline,
    FailoverPolicy,
    ReplicaSet,
    ShardFailed,
    call_async,
    call_once,
)
from retriever_server.serving.fanout import (
    check_address,
    check_late_replicas,
    check_shards,
    combined_info,
    failure_message,
    gather_until,
    least_limits,
    name_in_part,
    not_a_status,
    probe_outcomes,
    replica_infos,
    replica_sets,
    shard_answers,
    shard_deadline,
)
from retriever_server.serving.grpc_setup import CHANNEL_OPTIONS
from retriever_server.serving.merge import merge_results
from retriever_server.wire.result import AnswerShape, SearchResult
from retriever_server.wire.search_args import Exclude, check_timeout, make_request
from retriever_server.wire.stub import retriever_stub
from retriever_server.wire.untrusted import safe_text

__all__ = ["Exclude", "RetrieverClient", "RetrieverError", "make_request"]

log = logging.getLogger(__name__)
REPLICA_INFO_S = 1.0  # how long a fan-out client's first search waits for its shards' and replicas' GetInfo...
PROBE_SHARE = 0.25  # ...at most, and at most this share of the search's time (a hung replica costs no more)


class RetrieverError(Exception):
    """A Search or GetInfo the service refused or could not answer.

    Attributes:
        code: the gRPC status code (INVALID_ARGUMENT, UNAVAILABLE, ...).
        message: the server's explanation, naming the field or shard at fault.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # pickled whole (e.g. raised in a Ray worker): code and message, not one string
        return type(self), (self.code, self.message)


async def _open_channels(addresses: list[str], security: ClientSecurity) -> dict[str, grpc.aio.Channel]:
    return {a: open_aio_channel(a, security, CHANNEL_OPTIONS) for a in addresses}


async def _close_channels(channels: list[grpc.aio.Channel]) -> None:
    await asyncio.gather(*(c.close() for c in channels))


class RetrieverClient:
    """A blocking client for a router, one shard, or a list of shards it fans out to itself.

    A client of one address calls it from the caller's thread on a blocking channel. Over a list of
    shards its calls run on an asyncio event loop in a thread of the client's (`event_loop.LoopThread`),
    the failover policy as the router runs it. Any thread may call it; `close()` closes the channels
    (and ends the thread).

    Args:
        target: "host:port" of a router or shard; or a list with one entry per shard, each an
            address or a list of replica addresses (the client fails over between them).
        timeout: default deadline in seconds for each call, in (0, 1e6] (None: no deadline).
        security: TLS and the bearer token (default: plaintext, and the RETRIEVER_AUTH_TOKEN
            environment variable's token when it is set).
        failover: how calls move between the replicas of a shard when the client fans out
            (hedging, attempt timeouts), as the router does.

    Raises:
        SecurityError: a TLS file is missing, a certificate was given without its key, or a bearer token would
            go in plaintext to an address that is not loopback (unless `security.plaintext_token`).
        ValueError: an address names no port, or one outside [1, 65535].
    """

    def __init__(self, target: str | Sequence[str | Sequence[str]], timeout: float | None = 30.0,
                 security: ClientSecurity = ClientSecurity(), failover: FailoverPolicy = FailoverPolicy()):
        if isinstance(target, str):
            shards = [[target]]
            self.fan_out = False
        else:
            shards = [[t] if isinstance(t, str) else list(t) for t in target]
            self.fan_out = True
        if not shards or not all(shards):
            raise ValueError("RetrieverClient needs at least one address")
        for address in (a for replicas in shards for a in replicas):
            check_address(address)
        self.timeout = check_timeout(timeout)
        self.failover = failover
        self.sets = replica_sets(shards)
        if not self.fan_out:  # a router or a shard: its errors name the address dialled
            self.sets[0].name = target
        security.check()
        self.credentials = WatchedClientSecurity(security)  # its token and TLS files, read again on a change
        self._closed = False
        self._refreshing = threading.Lock()
        self._retired: list[tuple[float, object]] = []  # (when, channel) of TLS files since changed
        # one address: no failover, so no event loop (a loop hop costs a call CPU)
        self._loop: LoopThread | None = LoopThread("retriever-client") if self.fan_out else None
        try:
            self._open([a for s in shards for a in s])
        except BaseException:
            if self._loop is not None:
                self._loop.close()
            raise
        self._infos: list[pb.InfoResponse] | None = None  # once every shard is checked
        self._checked: list[list[pb.InfoResponse]] = [[] for _ in shards]  # each shard's replicas' infos, once checked
        self._rechecking: list[concurrent.futures.Future] = []  # `check_late_replicas`, on the loop
        self._rechecked: set[int] = set()  # the shards whose silent replicas a `check_late_replicas` loop has

    def _open(self, addresses: list[str]) -> None:
        """Channels and stubs to `addresses`, with the TLS files as they are now."""
        security = self.credentials.security
        if self._loop is None:
            self.channels = {a: open_channel(a, security, CHANNEL_OPTIONS) for a in addresses}
        else:
            self.channels = self._loop.run(_open_channels(addresses, security))
        self.stubs = {a: retriever_stub(c) for a, c in self.channels.items()}

    def _close(self, channels: list) -> None:
        if self._loop is None:
            for channel in channels:
                channel.close()
        elif channels:
            self._loop.run(_close_channels(channels))

    def _refresh_credentials(self) -> None:
        """Takes up a rotated token at once, and changed TLS files on new channels to every address (a
        renewed client certificate, a new CA). The channels before them stay open RETIRED_CLOSE_S for the
        calls on their way, then close at a later change or at close()."""
        with self._refreshing:
            if self._closed or not self.credentials.refresh():
                return
            current = self.channels
            try:
                self._open(list(current))  # sets the channels and stubs once all are open
            except (SecurityError, OSError) as err:  # rewritten again since checked: keep what works
                log.warning("TLS files of the calls out changed but cannot be read yet (%s); keeping the current "
                            "connections", err)
                return
            log.info("new channels to the service, with the changed TLS files")
            now = time.monotonic()
            expired = [c for when, c in self._retired if now - when > RETIRED_CLOSE_S]
            self._retired = [(when, c) for when, c in self._retired if now - when <= RETIRED_CLOSE_S]
            self._retired += [(now, c) for c in current.values()]
            self._close(expired)

    def __enter__(self) -> RetrieverClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RetrieverError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed: make a new one")

    def close(self) -> None:
        """Closes the channels and stops the client's event loop."""
        if self._closed:
            return
        self._closed = True
        with self._refreshing:
            self._close([*self.channels.values(), *(c for _, c in self._retired)])
        if self._loop is not None:
            self._loop.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of every call: the current bearer token (the token file's first, read again
        when the file changes, as the TLS files are: see `_refresh_credentials`)."""
        return self.credentials.metadata

    def _call(self, method: str, request, deadline: Deadline):
        """The answer of the client's one address (a router or a shard), called from the caller's thread."""
        self._check_open()
        self._refresh_credentials()
        attempts = Attempts(self.sets[0], self.failover, deadline, fail_over=False)
        try:
            return call_once(attempts, self._attempt(method, request))
        except CallFailed as err:
            self._check_not_closed_since()
            raise RetrieverError(err.code, err.message) from None

    def _on_loop(self, coroutine):
        """The coroutine's result, run on the client's loop; a call cut short by `close()` from another
        thread is a RetrieverError (CANCELLED), as any other failed call."""
        try:
            return self._loop.run(coroutine)
        except (Exception, asyncio.CancelledError, concurrent.futures.CancelledError):  # e.g. a closed channel's
            self._check_not_closed_since()
            raise

    def _check_not_closed_since(self) -> None:
        """A call that failed because `close()` ran meanwhile (its channels closed under it) fails as
        CANCELLED, whatever gRPC made of it."""
        if self._closed:
            raise RetrieverError(grpc.StatusCode.CANCELLED, "the client was closed during the call") from None

    def _attempt(self, method: str, request, **expect):
        """`attempt(address, timeout)`: one call of `method` to one address, as the failover policy makes it."""
        def attempt(address: str, timeout: float | None):
            return getattr(self.stubs[address], method)(request, timeout=timeout, metadata=self.metadata, **expect)

        return attempt

    async def _attempts(self, replicas: ReplicaSet, method: str, request, deadline: Deadline, **expect):
        """One shard's answer by the failover policy, or the CallFailed that ended its call (on the loop)."""
        attempts = Attempts(replicas, self.failover, deadline, fail_over=self.fan_out)
        try:
            return await call_async(attempts, self._attempt(method, request, **expect))
        except CallFailed as err:
            return err

    async def _every_shard(self, sets: list[ReplicaSet], method: str, request, deadline: Deadline,
                           ends_call: Callable[[object], bool] = lambda outcome: False, **expect) -> list:
        """The answer or CallFailed of each shard of `sets`, asked at once; None for those cancelled once one
        `ends_call`. Any other exception (a channel closed under the call) ends the call too, and is raised. A
        Search's answers must have the shape `expect=` (an AnswerShape) names."""
        outcomes = await gather_until([self._attempts(s, method, request, deadline, **expect) for s in sets],
                                      lambda outcome: ends_call(outcome) or not_a_status(outcome))
        for outcome in filter(not_a_status, outcomes):
            raise outcome
        return outcomes

    def _answers(self, sets: list[ReplicaSet], method: str, request, deadline: Deadline,
                 ends_call: Callable[[object], bool], allow_partial: bool = False, late: grpc.StatusCode | None = None,
                 down: dict[str, CallFailed] | None = None, **expect) -> tuple[list, dict]:
        """The answers of the shards of `sets` (`_every_shard`) and the shards left out of them (`shard_answers`:
        with `allow_partial`, those whose replicas all failed, or whose status is `late`, and those `down`);
        RetrieverError for a call that fails (CANCELLED where `close()` ran meanwhile)."""
        outcomes = self._on_loop(self._every_shard(sets, method, request, deadline, ends_call, **expect))
        if any(isinstance(outcome, CallFailed) for outcome in outcomes):
            self._check_not_closed_since()
        try:
            return shard_answers(sets, outcomes, allow_partial, late, down)
        except CallFailed as err:  # a refusal, or shards failed and no partial answer may (or can) be made
            raise RetrieverError(err.code, err.message) from None

    def info(self, timeout: float | None = None) -> pb.InfoResponse:
        """The datastore's description (GetInfo); over a shard list, the shards' infos, asked at once,
        combined, once they are checked to be one whole datastore, as a search checks them (else
        RetrieverError FAILED_PRECONDITION)."""
        deadline = Deadline(self.timeout if timeout is None else check_timeout(timeout))
        if not self.fan_out:
            return self._call("GetInfo", pb.GetInfoRequest(), deadline)
        self._check_open()
        self._refresh_credentials()
        infos, _ = self._answers(self.sets, "GetInfo", pb.GetInfoRequest(), deadline,
                                 lambda outcome: isinstance(outcome, CallFailed))
        if (problem := check_shards([[info] for info in infos])) is not None:
            raise RetrieverError(grpc.StatusCode.FAILED_PRECONDITION, problem)
        return combined_info(self.sets, infos)

    def _shard_infos(self, deadline: Deadline, partial: bool) -> tuple[list[ReplicaSet], list[pb.InfoResponse], dict]:
        """The shards to search, their GetInfo, those down ({name: CallFailed}). Asks those not yet checked (down for
        now where each replica fails or is silent past `_probe_timeout`), then each replica of those that answer; checks
        them with those before (`check_shards`), keeps all once all are; the silent go to `check_late_replicas`."""
        if self._infos is not None:
            return self.sets, self._infos, {}
        asked = [i for i, known in enumerate(self._checked) if not known]  # every shard at first, then those down
        outcomes = self._on_loop(self._every_shard([self.sets[i] for i in asked], "GetInfo", pb.GetInfoRequest(),
                                                   Deadline(self._probe_timeout(deadline, partial))))
        try:
            answered, down = probe_outcomes(self.sets, asked, outcomes)
        except CallFailed as err:
            self._check_not_closed_since()
            raise RetrieverError(err.code, err.message) from None
        silent: dict[str, str] = {}  # the replicas that do not answer now: out of rotation until checked
        every = self._on_loop(replica_infos(self.stubs, [self.sets[i] for i in answered],
                                            self._probe_timeout(deadline, True), self.metadata, silent))
        found = {i: [info, *replicas] for (i, info), replicas in zip(answered.items(), every)}
        checked = [found.get(i, known) for i, known in enumerate(self._checked)]
        if (problem := check_shards(checked)) is not None:
            raise RetrieverError(grpc.StatusCode.FAILED_PRECONDITION, problem)
        self._checked = checked
        for i in set(answered) - self._rechecked:  # a shard a recheck loop has keeps the loop's view of it
            self.sets[i].unchecked = set(self.sets[i].addresses) & set(silent)
        if fresh := [i for i in answered if self.sets[i].unchecked and i not in self._rechecked]:  # one loop a shard
            self._rechecked.update(fresh)
            checks = check_late_replicas([self.sets[i] for i in fresh], [found[i][0] for i in fresh],
                                         lambda a: self.stubs[a], REPLICA_INFO_S, lambda: self.metadata,
                                         least_limits([info for known in checked for info in known]))
            try:
                self._rechecking.append(asyncio.run_coroutine_threadsafe(checks, self._loop.loop))
            except RuntimeError:  # the loop closed meanwhile (close() from another thread): nothing to check
                checks.close()
        up, infos = [r for r, known in zip(self.sets, checked) if known], [known[0] for known in checked if known]
        name_in_part(self.sets, up, infos)
        self._infos = None if down else infos
        return up, infos, {self.sets[i].name: failed for i, failed in down.items()}

    @staticmethod
    def _probe_timeout(deadline: Deadline, partial: bool) -> float:
        """How long a search's GetInfo calls may take: REPLICA_INFO_S, at most PROBE_SHARE of its time; a shard's
        all of it without `partial` (one left unchecked would fail the call); a replica's never (`partial`)."""
        left = deadline.remaining()
        return REPLICA_INFO_S if left is None else min(REPLICA_INFO_S, PROBE_SHARE * left) if partial else left

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int = 0, *, exact_rerank: bool = False,
               rerank_candidates: int = 0, payloads: Sequence[str] = (), return_keys: bool = False,
               exclude: Exclude | None = None, exclude_per_query: Sequence[Exclude] | None = None,
               allow_partial: bool = False, expected_version: str = "", successors: int = 0,
               timeout: float | None = None) -> SearchResult:
        """k nearest neighbours of each row of `queries`.

        Args:
            queries: (nq, d) float32 or float16 array (float64 is sent as float32).
            k: neighbours per query.
            nprobe: inverted lists to probe (0: the datastore's default).
            exact_rerank: re-rank `rerank_candidates` (default k) candidates by exact distance.
            payloads: payload arrays to return per neighbour ("values", "tokens", ...).
            return_keys: also return the neighbours' stored keys.
            exclude: rows excluded for every query; exclude_per_query: one Exclude per query.
            allow_partial: accept an answer from the shards that responded, flagged partial.
            expected_version: refuse (FAILED_PRECONDITION) unless the datastore has this version.
            successors: also return the n rows after each neighbour in the datastore (within its
                shard), with the same payloads and keys: `successor_ids`, `successor_payloads`,
                `successor_keys` (in a kNN-LM datastore, row i+1 continues row i).
            timeout: deadline in seconds for the whole call, in (0, 1e6] (None: the client's).

        Returns:
            SearchResult with ids int64 (nq, k), distances float32 (nq, k), payloads, keys.

        Raises:
            RetrieverError: the request was refused (bad argument, datastore mismatch) or no
                replica of a needed shard answered.
        """
        request = make_request(queries, k, nprobe, exact_rerank, rerank_candidates, payloads, return_keys,
                               exclude, exclude_per_query, allow_partial, expected_version, successors)
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        if not self.fan_out:
            return self._call("Search", request, Deadline(timeout))
        return self._fan_out(request, k, shard_deadline(timeout, allow_partial))

    def _fan_out(self, request: pb.SearchRequest, k: int, deadline: Deadline) -> SearchResult:
        self._check_open()
        self._refresh_credentials()
        allow_partial = request.allow_partial
        sets, infos, down = self._shard_infos(deadline, allow_partial)
        request.allow_partial = False
        version = infos[0].datastore_version
        if request.expected_datastore_version and request.expected_datastore_version != version:
            raise RetrieverError(grpc.StatusCode.FAILED_PRECONDITION,  # as a shard would: its replicas all agree
                                 f"expected_datastore_version is {safe_text(request.expected_datastore_version)} "
                                 f"but this datastore is version {version}")
        if down and not allow_partial:  # a shard down is not searched: the call fails at once, naming it
            raise RetrieverError(grpc.StatusCode.UNAVAILABLE, failure_message({n: f.message for n, f in down.items()}))
        request.expected_datastore_version = version  # a replica of another version fails over (`STALE`)
        body = request.SerializeToString()  # once, for every shard
        late = grpc.StatusCode.DEADLINE_EXCEEDED if allow_partial else None  # a shard not answering in time

        def ends_call(outcome) -> bool:  # a refusal, or, unless a partial answer is allowed, a shard lost
            return isinstance(outcome, CallFailed) and not (
                allow_partial and (isinstance(outcome, ShardFailed) or outcome.code == late))

        answers, failures = self._answers(sets, "Search", body, deadline, ends_call, allow_partial, late, down,
                                          expect=AnswerShape.of(request, infos[0]))
        merged = merge_results(answers, k, infos[0].metric, ranked=True)
        merged.partial, merged.failed_shards = bool(failures), failures
        return merged
