"""S shards x R replicas as the router and the fan-out client see them: the `--shards` syntax, the
replica sets and their names, and the check, from every replica's GetInfo, that the shards are one
whole datastore (failover itself: `failover`)."""

from __future__ import annotations

import asyncio
import re

import grpc

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.datastore.manifest import shard_name
from retriever_server.serving.failover import ReplicaSet
from retriever_server.wire.request import DatastoreView
from retriever_server.wire.tensors import nbytes, numpy_dtype
from retriever_server.wire.untrusted import safe_text

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


def check_shards(infos: list[list[pb.InfoResponse]], given: int | None = None) -> str | None:
    """Why shards (each the infos of its answering replicas) are not one whole datastore, or None.

    Every replica must be a shard server (not a router) of the same datastore version, the shards must
    be all of the datastore's shards, each once, and their id ranges must tile [0, ntotal).

    `given`: the number of shards listed, where some did not answer (`infos` then holds those that did):
    they are checked for what they can show, no more listed than the datastore has, and id ranges that
    overlap nowhere within [0, ntotal) (a shard listed twice, or a router as a shard, returned its rows twice).
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
    everyone = [info for replicas in infos for info in replicas]
    versions = sorted({info.datastore_version for info in everyone})
    if len(versions) > 1:
        return f"the shards serve different datastores (versions {', '.join(safe_text(v) for v in versions[:4])})"
    for replicas in infos:
        if len({info.shard for info in replicas}) > 1:
            return f"replicas given as one shard serve different shards {sorted({i.shard for i in replicas})}"
    names = [replicas[0].shard for replicas in infos]
    if len(set(names)) != len(names):
        return f"shards given more than once: {sorted({n for n in names if names.count(n) > 1})}"
    expected, listed = everyone[0].num_shards, len(infos) if given is None else given
    if expected and (expected != listed if given is None else listed > expected):
        return f"the datastore has {expected} shards but {listed} were given ({', '.join(names)})"
    ranges = sorted((r[0].shards[0].id_start, r[0].shards[0].id_end) for r in infos)
    ends = [0] + [end for _, end in ranges]
    ntotal = everyone[0].datastore_ntotal
    if given is not None:  # some shards missing: their ranges are gaps, but none may overlap
        if any(start < end for (start, _), end in zip(ranges, ends)) or ends[-1] > ntotal:
            return f"the shards' id ranges {ranges} overlap, or pass {ntotal}"
    elif any(start != end for (start, _), end in zip(ranges, ends)) or ends[-1] != ntotal:
        return f"the shards' id ranges {ranges} do not cover [0, {ntotal}) once"
    return None


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


def combined_info(sets: list[ReplicaSet], infos: list[pb.InfoResponse]) -> pb.InfoResponse:
    """One GetInfo for a shard list, as a router's: the first shard's, with every shard and the total."""
    combined = pb.InfoResponse()
    combined.CopyFrom(infos[0])
    combined.role, combined.shard, combined.ntotal = "client-fanout", "", sum(i.ntotal for i in infos)
    del combined.shards[:]
    for replicas, info in zip(sets, infos):
        shard = pb.ShardInfo()
        shard.CopyFrom(info.shards[0])
        shard.replicas = len(replicas.addresses)
        combined.shards.append(shard)
    return combined


def view_of(info: pb.InfoResponse) -> DatastoreView:
    """What requests are checked against, from a shard's GetInfo."""
    row_bytes = {p.name: nbytes(numpy_dtype(p.dtype), p.row_shape) for p in info.payloads}
    return DatastoreView(info.dimension, info.nlist, info.default_nprobe, info.has_keys, row_bytes,
                         info.datastore_version)


async def replica_infos(stubs: dict, sets: list[ReplicaSet], timeout: float, metadata: tuple,
                        silent: dict[str, str] | None = None) -> list[list[pb.InfoResponse]]:
    """GetInfo of every replica of each shard that answers within `timeout` s (asyncio `stubs` by
    address), so that a replica that is not what the others are (another shard, a router) is found
    before it answers a search. A replica down now is left out (failover copes with one that fails);
    why it did not answer goes to `silent`, when given."""

    async def one(address: str) -> pb.InfoResponse | None:
        try:
            return await stubs[address].GetInfo(pb.GetInfoRequest(), timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            if silent is not None:
                silent[address] = f"{err.code().name} {err.details()}"
            return None

    found = await asyncio.gather(*(asyncio.gather(*(one(a) for a in s.addresses)) for s in sets))
    return [[info for info in infos if info is not None] for infos in found]
