"""Rules for talking to S shards x R replicas, shared by the router and the fan-out client."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import grpc

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.manifest import shard_name
from retriever_server.request import DatastoreView
from retriever_server.wire import nbytes, numpy_dtype

# A replica answering with one of these may be down or busy: try the next replica of its shard.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
})


def parse_shards(spec: str) -> list[list[str]]:
    """'a:1|a:2,b:1' -> [['a:1', 'a:2'], ['b:1']]: shards by comma, replicas of a shard by '|'."""
    shards = [[r.strip() for r in part.split("|") if r.strip()] for part in spec.split(",") if part.strip()]
    if not shards:
        raise ValueError(f"no shard addresses in {spec!r}")
    return shards


@dataclass
class ReplicaSet:
    """The replicas of one shard, tried round-robin, recently failed ones last."""

    name: str
    addresses: list[str]
    cooldown_s: float = 2.0
    _turn: itertools.count = field(default_factory=itertools.count)
    _failed_at: dict[str, float] = field(default_factory=dict)

    def order(self) -> list[str]:
        start = next(self._turn) % len(self.addresses)
        rotated = self.addresses[start:] + self.addresses[:start]
        now = time.monotonic()
        fresh = [a for a in rotated if now - self._failed_at.get(a, -1e9) > self.cooldown_s]
        return fresh + [a for a in rotated if a not in fresh]

    def failed(self, address: str) -> None:
        self._failed_at[address] = time.monotonic()

    def succeeded(self, address: str) -> None:
        self._failed_at.pop(address, None)


def replica_sets(shards: list[list[str]]) -> list[ReplicaSet]:
    """Names shards in the datastore's order: shard-00000, shard-00001, ..."""
    return [ReplicaSet(shard_name(i), list(addresses)) for i, addresses in enumerate(shards)]


def failure_message(failures: dict[str, str]) -> str:
    """'shard-00001 unavailable (reason); ...' for a status message."""
    return "; ".join(f"{name} unavailable ({reason})" for name, reason in sorted(failures.items()))


class Deadline:
    """The caller's deadline, shared by every attempt of one call (None: no deadline)."""

    def __init__(self, timeout: float | None):
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def check_shards(infos: list[list[pb.InfoResponse]]) -> str | None:
    """Why shards (each the infos of its answering replicas) are not one whole datastore, or None.

    Every replica must serve the same datastore version, the shards must be all of the datastore's
    shards, each once, and their id ranges must tile [0, ntotal).
    """
    everyone = [info for replicas in infos for info in replicas]
    versions = sorted({info.datastore_version for info in everyone})
    if len(versions) > 1:
        return f"the shards serve different datastores (versions {versions})"
    for replicas in infos:
        if len({info.shard for info in replicas}) > 1:
            return f"replicas given as one shard serve different shards {sorted({i.shard for i in replicas})}"
    names = [replicas[0].shard for replicas in infos]
    if len(set(names)) != len(names):
        return f"shards given more than once: {sorted({n for n in names if names.count(n) > 1})}"
    expected = everyone[0].num_shards
    if expected and expected != len(infos):
        return f"the datastore has {expected} shards but {len(infos)} were given ({', '.join(names)})"
    ranges = sorted((r[0].shards[0].id_start, r[0].shards[0].id_end) for r in infos)
    ends = [0] + [end for _, end in ranges]
    if any(start != end for (start, _), end in zip(ranges, ends)) or ends[-1] != everyone[0].datastore_ntotal:
        return f"the shards' id ranges {ranges} do not cover [0, {everyone[0].datastore_ntotal}) once"
    return None


def view_of(info: pb.InfoResponse) -> DatastoreView:
    """What requests are checked against, from a shard's GetInfo."""
    row_bytes = {p.name: nbytes(numpy_dtype(p.dtype), p.row_shape) for p in info.payloads}
    return DatastoreView(info.dimension, info.nlist, info.default_nprobe, info.has_keys, row_bytes,
                         info.datastore_version)
