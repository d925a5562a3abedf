"""Neighbours from the retrieval service over gRPC: a router, or shards the client fans out to.

Example:
    >>> with ServiceRetriever(resolve_target("127.0.0.1:50051"), RetrievalConfig(k=64)) as retriever:
    ...     found = retriever.knn(keys)                # keys (n, d) float32
    >>> found.distances.shape, found.values.shape      # (n, 64), (n, 64)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm_worker.retrieval.config import Ranges, RetrievalConfig
from lm_worker.retrieval.retriever import Retriever, exclude_ranges
from retriever_server.client import RetrieverClient, RetrieverError, SearchResult
from retriever_server.security.config import (
    TOKEN_ENV,
    ClientSecurity,
    SecurityError,
    dialled_hosts,
    is_loopback_host,
)
from retriever_server.serving.fanout import parse_shards, parse_target
from retriever_server.wire.request import Limits

__all__ = ["ServiceRetriever", "RetrieverError", "ClientSecurity", "SecurityError", "TOKEN_ENV", "RAY_PREFIX",
           "resolve_target", "join_cluster_of", "is_loopback"]

RAY_PREFIX = "ray:"


def join_cluster_of(target: str | None, address: str | None = None) -> None:
    """For a "ray:NAME" target, joins the Ray cluster that runs the deployment, unless this process is in
    one already: `address` (host:port, ray://host:port, or "auto"), else RAY_ADDRESS, else the cluster
    `ray start` made on this machine; never a new local cluster, where no deployment runs. Any other
    target (or None): nothing.

    Raises:
        ClusterUnreachable: no cluster answers there (a ConnectionError naming it and what to do).
    """
    if target and target.startswith(RAY_PREFIX):
        from retriever_server.cluster.connect import connect  # Ray: only for ray: targets

        connect(address, existing=True, log_to_driver=False)


def resolve_target(target: str, address: str | None = None) -> str | list[str]:
    """A retrieval target as `ServiceRetriever` takes it: "ray:NAME" becomes the router address of the
    deployment NAME on the Ray cluster (joined by `join_cluster_of(target, address)` if this process is
    in none), "a:1|a:2,b:1" the replicas of each shard (the client fans out to them itself), else the
    address."""
    if target.startswith(RAY_PREFIX):
        from retriever_server.cluster.ray_serving import lookup  # Ray: only for ray: targets

        join_cluster_of(target, address)
        return lookup(target[len(RAY_PREFIX):])
    return parse_target(target)


def is_loopback(target: str) -> bool:
    """Whether every address of a target ("HOST:PORT", shards comma-separated, replicas '|') is on this machine."""
    if target.startswith(RAY_PREFIX):
        return False
    return all(is_loopback_host(host) for shard in parse_shards(target) for address in shard
               for host in dialled_hosts(address))


class ServiceRetriever(Retriever):
    """Neighbours from the retrieval service over gRPC.

    Args:
        target: "host:port" of a router or shard, or one address (or replica list) per shard.
        config: per-request knobs.
        security: TLS and the bearer token of the calls (default: plaintext, and RETRIEVER_AUTH_TOKEN's
            token when that variable is set).

    Raises:
        RetrieverError: the service did not answer GetInfo (UNAUTHENTICATED without an accepted token).
        SecurityError: a TLS or token file is missing.
    """

    def __init__(self, target: str | Sequence[str | Sequence[str]], config: RetrievalConfig = RetrievalConfig(),
                 security: ClientSecurity = ClientSecurity()):
        super().__init__(config)
        try:
            self.client = RetrieverClient(target, timeout=config.timeout_s, security=security)
        except BaseException:
            super().close()
            raise
        try:
            info = self.client.info()
        except BaseException:  # no service: its client's thread and channels, and the pool, go too
            self.close()
            raise
        self.dimension: int = info.dimension
        self.ntotal: int = info.ntotal
        self.metric: str = info.metric  # "l2" or "ip", as the datastore was built
        self.metadata: dict[str, str] = dict(info.metadata)
        self.version: str = info.datastore_version
        # the bounds it reports on a request, for callers that size their requests (RaLMSpec's verifications)
        self.limits = Limits(max_k=info.max_k or Limits.max_k, max_batch=info.max_batch or Limits.max_batch,
                             max_request_bytes=info.max_request_bytes or Limits.max_request_bytes)

    def search(self, queries: np.ndarray, payload: str, exclude: Ranges, successors: int = 0,
               return_keys: bool = False) -> SearchResult:
        c = self.config
        return self.client.search(queries, k=c.k, nprobe=c.nprobe, exact_rerank=c.exact_rerank,
                                  rerank_candidates=c.rerank_candidates, payloads=[payload], return_keys=return_keys,
                                  exclude_per_query=exclude_ranges(exclude), expected_version=self.version,
                                  successors=successors)

    def interrupt(self) -> None:
        """Closes the client: the calls under way end at once (CANCELLED) instead of at their deadline."""
        self.client.close()

    def close(self, cancel: bool = False) -> None:
        """Waits for the look-ups under way (with `cancel`, ends them first: `Retriever.close`), then
        closes the client's channels."""
        super().close(cancel)
        self.client.close()
