"""Rules for talking to S shards x R replicas, shared by the router and the fan-out client."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import grpc

from retriever_server.manifest import shard_name

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
