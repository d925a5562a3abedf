"""S shards x R replicas as the router and the fan-out client see them: the `--shards` syntax, the
replica sets and their names, the check, from every replica's GetInfo, that the shards are one whole
datastore (and, later, that a replica down then serves what it was given as, within the limits reported);
the calls to every shard at once, and what a call lacking some shards' answers says (failover between
replicas: `failover`)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import grpc

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.datastore.manifest import shard_name
from retriever_server.serving.failover import CallFailed, Deadline, ReplicaSet, ShardFailed
from retriever_server.wire.request import DatastoreView
from retriever_server.wire.tensors import TensorError, nbytes, numpy_dtype, shown_shape
from retriever_server.wire.untrusted import safe_text

log = logging.getLogger(__name__)
RECHECK_FIRST_S = 1.0  # a replica down when the shards were checked is asked for its GetInfo after this long...
RECHECK_MOST_S = 30.0  # ...then twice as long each time, up to this, until it answers as expected
# The outcome of a shard's call cancelled on this side, not by `gather_until`: its channel closed under it.
CANCELLED_HERE = "CANCELLED on this side (its channel was closed during the call)"

SHARD_NAME = re.compile(r"shard-[0-9]{5,9}")  # `shard_name`'s form

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")  # gRPC targets, left to gRPC


def check_address(address: str) -> str:
    """`address` if it names a port gRPC can dial: "HOST:PORT" (or "[V6]:PORT") with a port in
    [1, 65535], or a gRPC target with a scheme ("unix:PATH", "unix-abstract:NAME", "dns:///h:p",
    "ipv4:a:p", ...); else ValueError (gRPC itself would dial a port past 65535 modulo 65536: another
    port)."""
    if address.startswith(SCHEMES) or "://" in address:
        return address
    if "," in address:
        raise ValueError(f"address {address!r} holds a comma: give one HOST:PORT, or a list with one entry "
                         "per shard to fan out to")
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port or host.startswith("[") != host.endswith("]"):
        raise ValueError(f"address {address!r} names no port: give HOST:PORT")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"address {address!r}: the port must be a number in [1, 65535]")
    return address


def parse_shards(spec: str) -> list[list[str]]:
    """'a:1|a:2,b:1' -> [['a:1', 'a:2'], ['b:1']]: shards by comma, replicas of a shard by '|'
    (ValueError for an address without a valid port)."""
    parts = spec.split(",")
    if any(not part.strip() for part in parts) and any(part.strip() for part in parts):
        raise ValueError(f"an empty entry in {spec!r}: give each shard's addresses between commas")
    shards = [[check_address(r.strip()) for r in part.split("|") if r.strip()] for part in parts if part.strip()]
    if not shards:
        raise ValueError(f"no shard addresses in {spec!r}")
    addresses = [a for replicas in shards for a in replicas]
    for twice in sorted({a for a in addresses if addresses.count(a) > 1}):
        raise ValueError(f"address {twice} is given twice in {spec!r}: each replica of each shard once")
    return shards


def parse_target(target: str) -> str | list[list[str]]:
    """One server's address as given, or a shard list ("a:1|a:2,b:1", as `parse_shards` reads it)."""
    return parse_shards(target) if "," in target or "|" in target else target


def replica_sets(shards: list[list[str]]) -> list[ReplicaSet]:
    """Names shards in the datastore's order: shard-00000, shard-00001, ..."""
    return [ReplicaSet(shard_name(i), list(addresses)) for i, addresses in enumerate(shards)]


def check_shards(infos: list[list[pb.InfoResponse]]) -> str | None:
    """Why shards (each the infos of its answering replicas, in the order listed) are not one whole datastore, or None.

    Every replica must be a shard server (not a router) of the same datastore version, the replicas listed as one
    shard must serve that shard, the shards must be all of the datastore's shards, each once, and their id ranges
    must tile [0, ntotal). A shard with no infos (no replica answered) is down: the others are checked as fully,
    their id ranges for overlaps alone (a shard twice, or a router as one, returns rows twice). One must answer.
    """
    for position, replicas in enumerate(infos):
        for info in replicas:
            if info.role != "shard":  # a router's answers hold every shard's ids: merged again, each twice
                return (f"the address given as shard {position} answers as a {safe_text(info.role or 'server')}, "
                        "not a shard server: give the shard servers' own addresses")
            if not SHARD_NAME.fullmatch(info.shard):  # its name goes into logs and statuses: only a shard's own
                return f"the address given as shard {position} names its shard {safe_text(info.shard)}"
            version = info.datastore_version
            if not (version.isprintable() and 0 < len(version) <= 64):  # ...and so does its version
                return f"the address given as shard {position} reports datastore version {safe_text(version)}"
            problem = payload_problem(info)  # its answers are checked against its payloads: no array, no answer
            if problem is not None:
                return f"the address given as shard {position} reports {problem}"
    everyone = [info for replicas in infos for info in replicas]
    versions = sorted({info.datastore_version for info in everyone})
    if len(versions) > 1:
        return f"the shards serve different datastores (versions {', '.join(safe_text(v) for v in versions[:4])})"
    if len({described(info) for info in everyone}) > 1:
        return "the shards describe different dimensions or payloads: the shards of one datastore all have the same"
    for replicas in infos:
        if len({info.shard for info in replicas}) > 1:
            return f"replicas given as one shard serve different shards {sorted({i.shard for i in replicas})}"
    names = [replicas[0].shard for replicas in infos if replicas]
    if len(set(names)) != len(names):
        return f"shards given more than once: {sorted({n for n in names if names.count(n) > 1})}"
    expected = everyone[0].num_shards
    if expected and expected != len(infos):
        return f"the datastore has {expected} shards but {len(infos)} were given ({', '.join(names)})"
    ranges = sorted((r[0].shards[0].id_start, r[0].shards[0].id_end) for r in infos if r)
    ends = [0] + [end for _, end in ranges]
    ntotal = everyone[0].datastore_ntotal
    if len(names) < len(infos):  # some shards down: their ranges are gaps, but none may overlap
        if any(start < end for (start, _), end in zip(ranges, ends)) or ends[-1] > ntotal:
            return f"the shards' id ranges {ranges} overlap, or pass {ntotal}"
    elif any(start != end for (start, _), end in zip(ranges, ends)) or ends[-1] != ntotal:
        return f"the shards' id ranges {ranges} do not cover [0, {ntotal}) once"
    return None


def probe_outcomes(sets: list[ReplicaSet], asked: list[int], outcomes: list) -> tuple[dict[int, pb.InfoResponse],
                                                                                    dict[int, CallFailed]]:
    """The GetInfo answers among `outcomes` (`gather_until`'s, of the shards of `sets` at the positions `asked`)
    and the shards down (every replica failed, or none answered in time), by position. Raises any other status
    (a refusal: the call's), or UNAVAILABLE naming every shard where all were asked and none answered."""
    answered, down = {}, {}
    for position, outcome in zip(asked, outcomes):
        if not isinstance(outcome, CallFailed):
            answered[position] = outcome
        elif isinstance(outcome, ShardFailed) or outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            down[position] = outcome
        else:
            raise outcome
    if not answered and len(asked) == len(sets):  # nothing to search
        raise CallFailed(grpc.StatusCode.UNAVAILABLE, failure_message({sets[i].name: down[i].message for i in down}))
    return answered, down


def name_in_part(sets: list[ReplicaSet], answered: list[ReplicaSet], infos: list[pb.InfoResponse]) -> None:
    """Names the shards that answered (`answered`, their `infos`) as they name themselves, and the others
    by the one name left where one is down, else by address: a list out of the datastore's order named by
    position would name an answering shard as the one that failed."""
    for replicas, info in zip(answered, infos):
        replicas.name = info.shard
    down = [replicas for replicas in sets if replicas not in answered]
    left = sorted({shard_name(i) for i in range(infos[0].num_shards)} - {info.shard for info in infos})
    for replicas in down:
        replicas.name = left[0] if len(down) == len(left) == 1 else f"the shard at {replicas.addresses[0]}"


def payload_problem(info: pb.InfoResponse) -> str | None:
    """Why a shard's GetInfo describes a payload that no array can be (an unknown dtype, a row shape of
    more dimensions than an array has, or too large), in words escaped; None when it does not."""
    for payload in info.payloads:
        try:
            nbytes(numpy_dtype(payload.dtype), payload.row_shape)
        except TensorError as err:
            return f"payload {safe_text(payload.name)} as no array can be: {err}"
    return None


def described(info: pb.InfoResponse) -> tuple:
    """What a shard's answers hold, as its GetInfo describes it: the keys' width and each payload's name,
    dtype and row shape, by name (the same at every replica of every shard of one datastore)."""
    return info.dimension, tuple(sorted((p.name, p.dtype, tuple(p.row_shape)) for p in info.payloads))


LIMITS = ("max_k", "max_batch", "max_request_bytes")  # the InfoResponse fields that bound a request


def least_limits(infos: list[pb.InfoResponse]) -> dict[str, int]:
    """Each of LIMITS at its least over `infos`, leaving out those that report none (0); 0 where none does:
    a request over any shard's limit is refused, so the least is the datastore's."""
    return {name: min((getattr(i, name) for i in infos if getattr(i, name)), default=0) for name in LIMITS}


def version_bytes(version: str) -> int:
    """What a fan-out client adds to a request it sends to the shards, at most: the datastore's `version`
    as its expected_datastore_version (and takes away: allow_partial, always false to a shard)."""
    return len(pb.SearchRequest(expected_datastore_version=version).SerializeToString())


def router_limits(own, caps: dict[str, int], shard_bytes: int, added: int) -> tuple[dict[str, int], dict[str, int]]:
    """What a router reports of LIMITS, and what a replica that joins later must take of each not to make
    that untrue: each the least of the router's own (`own`, its Limits) and its shards' (`caps`, their
    `least_limits`); the request size the shards' least (`shard_bytes`) less the `added` bytes the router
    writes after a request it forwards, which a replica joining later must take with those bytes added."""
    reported = {name: min(getattr(own, name), caps[name] or getattr(own, name)) for name in LIMITS[:2]}
    reported["max_request_bytes"] = min(own.max_request_bytes, shard_bytes - added)
    return reported, {**reported, "max_request_bytes": reported["max_request_bytes"] + added}


def shard_request_bytes(infos: list[pb.InfoResponse], own: int, slack: int) -> int:
    """The size of the requests a router's shards take (`infos`: every replica's GetInfo): the least they
    report, or the router's own limit `own` where none reports one; said in the log where it is under `own`
    plus `slack`, what the router may add to a request it forwards."""
    least = min(info.max_request_bytes or own for info in infos)
    if least < own:
        log.warning("shards accept requests up to %d bytes, under this router's %d (+%d): give them a larger "
                    "--max-request-mb, or larger requests are refused here", least, own, slack)
    elif least < own + slack:  # the same limit: the default
        log.info("shards accept requests up to %d bytes, as this router: requests within %d bytes of it are "
                 "refused here, as forwarding may add that much", least, slack)
    return least


def combined_info(sets: list[ReplicaSet], infos: list[pb.InfoResponse]) -> pb.InfoResponse:
    """One GetInfo for a shard list, as a router's: the first shard's, with every shard, the total, and each
    limit the least of the shards' (`least_limits`), the request size less what the client adds to each
    request it sends them (`version_bytes`)."""
    combined = pb.InfoResponse()
    combined.CopyFrom(infos[0])
    combined.role, combined.shard, combined.ntotal = "client-fanout", "", sum(i.ntotal for i in infos)
    for name, least in least_limits(infos).items():
        setattr(combined, name, least)
    if combined.max_request_bytes:
        combined.max_request_bytes = max(1, combined.max_request_bytes - version_bytes(combined.datastore_version))
    del combined.shards[:]
    for replicas, info in zip(sets, infos):
        shard = pb.ShardInfo()
        shard.CopyFrom(info.shards[0])
        shard.replicas = len(replicas.addresses)
        combined.shards.append(shard)
    return combined


def view_of(info: pb.InfoResponse) -> DatastoreView:
    """What requests are checked against, from a shard's GetInfo; TensorError for a payload no array can be
    (`payload_problem`: `check_shards` refuses such a shard first)."""
    row_bytes = {p.name: nbytes(numpy_dtype(p.dtype), p.row_shape) for p in info.payloads}
    return DatastoreView(info.dimension, info.nlist, info.default_nprobe, info.has_keys, row_bytes,
                         info.datastore_version)


async def replica_infos(stubs: dict, sets: list[ReplicaSet], timeout: float, metadata: tuple,
                        silent: dict[str, str] | None = None) -> list[list[pb.InfoResponse]]:
    """GetInfo of every replica of each shard that answers within `timeout` s (asyncio `stubs` by
    address), so that a replica that is not what the others are (another shard, a router) is found
    before it answers a search. A replica down now is left out (failover copes with one that fails);
    why it did not answer goes to `silent`, when given."""

    found = await asyncio.gather(*(asyncio.gather(*(replica_info(stubs[a], timeout, metadata, silent, a)
                                                    for a in s.addresses)) for s in sets))
    return [[info for info in infos if info is not None] for infos in found]


async def replica_info(stub, timeout: float, metadata: tuple, silent: dict[str, str] | None = None,
                       address: str = "") -> pb.InfoResponse | None:
    """A replica's GetInfo, or None when it does not answer (why, in `silent` by `address`, when given)."""
    try:
        return await stub.GetInfo(pb.GetInfoRequest(), timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as err:
        if silent is not None:
            silent[address] = f"{err.code().name} {err.details()}"
        return None


def replica_problem(info: pb.InfoResponse, expected: pb.InfoResponse,
                    needs: dict[str, int] | None = None) -> str | None:
    """Why a replica's GetInfo is not that of the shard `expected` (its name, datastore version, a shard
    server's role, its keys' width and payloads: `described`), or takes less of a limit than `needs` (those
    of LIMITS that requests are let through with; 0, or one the replica does not report: none), in words
    escaped; None when it is neither."""
    if (info.role, info.shard, info.datastore_version) != ("shard", expected.shard, expected.datastore_version):
        return (f"it answers as {safe_text(info.shard)} of version {safe_text(info.datastore_version)}, role "
                f"{safe_text(info.role)}, not as {expected.shard} of version {expected.datastore_version}")
    if info.dimension != expected.dimension:
        return f"it describes keys of dimension {info.dimension}, not the datastore's {expected.dimension}"
    if described(info) != described(expected):
        theirs, ours = ({p.name: p for p in i.payloads} for i in (info, expected))
        name = next((n for n in sorted({*theirs, *ours}) if theirs.get(n) != ours.get(n)), None)
        if name is None:
            return "it describes one of its payloads twice"
        return (f"it describes payload {safe_text(name)} as {_payload_words(theirs.get(name))}, not as the "
                f"datastore's {_payload_words(ours.get(name))}")
    for name, least in (needs or {}).items():
        theirs = getattr(info, name)
        if least and 0 < theirs < least:
            return f"it takes {name} up to {theirs}, under the {least} that requests to it are let through with"
    return None


def _payload_words(payload: pb.PayloadInfo | None) -> str:
    if payload is None:
        return "none"
    dtype = pb.DType.Name(payload.dtype) if payload.dtype in pb.DType.values() else str(payload.dtype)
    return f"{dtype} rows of shape {shown_shape(payload.row_shape)}"


async def check_late_replicas(sets: list[ReplicaSet], expected: list[pb.InfoResponse], stub_of: Callable,
                              timeout: float, metadata: Callable[[], tuple],
                              needs: dict[str, int] | None = None) -> None:
    """Puts each replica in `ReplicaSet.unchecked` (down when the shards were checked) into rotation once
    its GetInfo shows the shard `expected` of its set, taking the limits `needs` (`replica_problem`: what
    the router or client reports stays true), asking RECHECK_FIRST_S after the start, then twice as long
    each time up to RECHECK_MOST_S, until none is left. One that answers as anything else stays out, logged
    once, and is asked again. `stub_of(address)`: the asyncio stub to ask."""
    wait, told = RECHECK_FIRST_S, set()
    while any(replicas.unchecked for replicas in sets):
        await asyncio.sleep(wait)
        wait = min(RECHECK_MOST_S, 2 * wait)
        asked = [(replicas, info, a) for replicas, info in zip(sets, expected) for a in sorted(replicas.unchecked)]
        found = await asyncio.gather(*(_late_info(stub_of, a, timeout, metadata()) for _, _, a in asked))
        for (replicas, info, address), answer in zip(asked, found):
            problem = None if answer is None else replica_problem(answer, info, needs)
            if answer is not None and problem is None:
                replicas.unchecked.discard(address)
                log.info("%s replica %s, down at start, answers as that shard: in rotation", replicas.name, address)
            elif problem is not None and address not in told:
                told.add(address)
                log.warning("%s replica %s stays out of rotation: %s", replicas.name, address, problem)


async def _late_info(stub_of: Callable, address: str, timeout: float, metadata: tuple) -> pb.InfoResponse | None:
    """`replica_info` of a late replica; None, to ask again later, on any error (a channel closed by a TLS
    refresh, say): one replica's error must not end the checks of the others."""
    try:
        return await replica_info(stub_of(address), timeout, metadata)
    except Exception as err:  # noqa: BLE001 - asked again at the next check
        log.debug("asking late replica %s failed: %s", address, err)
        return None


PARTIAL_RESERVE = 0.2  # with allow_partial, the share of the caller's time kept back (at most...
PARTIAL_RESERVE_MAX_S = 1.0  # ...this long) to answer with the shards that answered in time


def shard_deadline(timeout: float | None, allow_partial: bool) -> Deadline:
    """The deadline of a call's attempts on the shards: the caller's own; with `allow_partial`, a share
    of it earlier, so that a shard that does not answer in time (a hung one) leaves the time to answer
    with the others, flagged partial, instead of the whole call running out of time."""
    if timeout is None or not allow_partial:
        return Deadline(timeout)
    return Deadline(timeout - min(PARTIAL_RESERVE * timeout, PARTIAL_RESERVE_MAX_S))


def failure_code(failures: dict[str, CallFailed], allow_partial: bool) -> grpc.StatusCode:
    """The status of a call that lacks some shards' answers: UNAVAILABLE, or, where a partial answer was
    allowed (so a shard's lost time counts as its failure) and every failed shard ran out of time,
    DEADLINE_EXCEEDED."""
    timed_out = allow_partial and all(f.code == grpc.StatusCode.DEADLINE_EXCEEDED for f in failures.values())
    return grpc.StatusCode.DEADLINE_EXCEEDED if timed_out else grpc.StatusCode.UNAVAILABLE


def failure_message(failures: dict[str, str]) -> str:
    """'shard-00001 unavailable (reason); ...' for a status message."""
    return "; ".join(f"{name} unavailable ({reason})" for name, reason in sorted(failures.items()))


def shard_answers(sets: list[ReplicaSet], outcomes: list, allow_partial: bool, late: grpc.StatusCode | None = None,
                  down: dict[str, CallFailed] | None = None) -> tuple[list, dict[str, str]]:
    """The answers among the `outcomes` of `gather_until` (one per shard of `sets`; None: cancelled once
    another ended the call) and the shards left out ({name: why}): those that failed whole (ShardFailed,
    or a CallFailed with code `late`), and those `down` (not asked: failed before). Raises any other exception
    among them (a CallFailed: the call's status), or a CallFailed naming the failed shards when no partial
    answer may (or can) be made."""
    failed = dict(down or {})
    for replicas, outcome in zip(sets, outcomes):
        if isinstance(outcome, ShardFailed) or (isinstance(outcome, CallFailed) and outcome.code == late):
            failed[replicas.name] = outcome
        elif isinstance(outcome, BaseException):
            raise outcome
    answers = [outcome for outcome in outcomes if outcome is not None and not isinstance(outcome, BaseException)]
    failures = {name: outcome.message for name, outcome in failed.items()}
    if failures and (not allow_partial or not answers):
        raise CallFailed(failure_code(failed, allow_partial), failure_message(failures))
    return answers, failures


async def gather_until(awaitables: list[Awaitable], ends_call: Callable[[object], bool]) -> list:
    """The outcomes of `awaitables` run at once (each its result or the exception it raised), in their
    order, as `asyncio.gather(..., return_exceptions=True)` gives them; but as soon as one outcome
    `ends_call` (a shard's failure that fails the whole call), the others are cancelled (their searches
    with them) and their outcomes are None: the call fails at once, not when its slowest shard answers.
    One cancelled otherwise (its call's channel closed on this side) is a ShardFailed (CANCELLED_HERE)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    stopped: set[asyncio.Future] = set()  # the tasks cancelled here

    def settled(task: asyncio.Future) -> None:
        if ends_call(_outcome(task, stopped)):
            stopped.update(other for other in tasks if other.cancel())  # a task done already: nothing

    for task in tasks:
        task.add_done_callback(settled)
    await asyncio.gather(*tasks, return_exceptions=True)  # the caller cancelled: every task with it
    return [_outcome(task, stopped) for task in tasks]


def not_a_status(outcome: object) -> bool:
    """Whether an outcome of `gather_until` is an exception other than a call's final status (CallFailed)."""
    return isinstance(outcome, BaseException) and not isinstance(outcome, CallFailed)


def _outcome(task: asyncio.Future, stopped: set[asyncio.Future]) -> object:
    if task.cancelled():
        return None if task in stopped else ShardFailed(grpc.StatusCode.CANCELLED, CANCELLED_HERE)
    return task.exception() or task.result()
