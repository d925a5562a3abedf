"""`SearchResult`: neighbours as numpy arrays, and its conversion to and from a SearchResponse."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire.tensors import fill_tensor, from_tensor


@dataclass
class SearchResult:
    """Neighbours of a batch of queries.

    Attributes:
        ids: int64 (nq, k) global row ids; -1 where fewer than k rows qualify.
        distances: float32 (nq, k), squared L2 (ascending) or inner product (descending).
        payloads: name -> (nq, k, *row_shape) arrays, zeros where the id is -1.
        keys: float32 (nq, k, d) stored keys, when asked for.
        partial: some shards did not answer (only with allow_partial).
        failed_shards: shard name -> reason, for the shards that did not answer.
        datastore_version: version of the datastore that answered.
        successor_ids: int64 (nq, k, n) ids of the n rows after each neighbour (-1: none), when asked for.
        successor_payloads: name -> (nq, k, n, *row_shape) payloads of those rows.
        successor_keys: float32 (nq, k, n, d) their stored keys, when keys were asked for too.
    """

    ids: np.ndarray
    distances: np.ndarray
    payloads: dict[str, np.ndarray] = field(default_factory=dict)
    keys: np.ndarray | None = None
    partial: bool = False
    failed_shards: dict[str, str] = field(default_factory=dict)
    datastore_version: str = ""
    successor_ids: np.ndarray | None = None
    successor_payloads: dict[str, np.ndarray] = field(default_factory=dict)
    successor_keys: np.ndarray | None = None

    def to_proto(self) -> pb.SearchResponse:
        response = pb.SearchResponse(
            partial=self.partial,
            datastore_version=self.datastore_version,
            failed_shards=[pb.ShardFailure(shard=s, reason=r) for s, r in sorted(self.failed_shards.items())],
        )
        fill_tensor(response.ids, self.ids)
        fill_tensor(response.distances, self.distances)
        for name, array in self.payloads.items():
            fill_tensor(response.payloads[name], array)
        if self.keys is not None:
            fill_tensor(response.keys, self.keys)
        if self.successor_ids is not None:
            fill_tensor(response.successor_ids, self.successor_ids)
        for name, array in self.successor_payloads.items():
            fill_tensor(response.successor_payloads[name], array)
        if self.successor_keys is not None:
            fill_tensor(response.successor_keys, self.successor_keys)
        return response

    @classmethod
    def from_proto(cls, response: pb.SearchResponse) -> SearchResult:
        return cls(
            ids=from_tensor(response.ids, "ids"),
            distances=from_tensor(response.distances, "distances"),
            payloads={name: from_tensor(t, f"payloads[{name}]") for name, t in response.payloads.items()},
            keys=from_tensor(response.keys, "keys").astype(np.float32, copy=False)
            if response.HasField("keys") else None,
            partial=response.partial,
            failed_shards={f.shard: f.reason for f in response.failed_shards},
            datastore_version=response.datastore_version,
            successor_ids=from_tensor(response.successor_ids, "successor_ids")
            if response.HasField("successor_ids") else None,
            successor_payloads={name: from_tensor(t, f"successor_payloads[{name}]")
                                for name, t in response.successor_payloads.items()},
            successor_keys=from_tensor(response.successor_keys, "successor_keys").astype(np.float32, copy=False)
            if response.HasField("successor_keys") else None,
        )
