"""Where the LM workers get neighbours: the one module that talks to the retrieval service.

Models, scorers and decoders see neighbours as numpy arrays only. Two retrievers answer the same
calls: `ServiceRetriever` over gRPC (a router, or a list of shards the client fans out to), and
`InProcessRetriever`, the same shard files searched inside this process (the reference that the
benchmarks compare the service against). Both batch a whole step's queries into one request, and
`submit_*` returns a future so the caller can compute while the request is in flight.

Datastores (written by `lm_worker.encode`, built by `retriever-server build`):
    kNN-LM: one row per token position, key = the LM's last-FFN input, payload "values" = next token.
    RETRO:  one row per chunk, key = frozen-encoder embedding, payload "tokens" = chunk + continuation.

Example:
    >>> retriever = ServiceRetriever("127.0.0.1:50051", RetrievalConfig(k=64))
    >>> found = retriever.knn(keys)            # keys (n, d) float32
    >>> found.distances.shape, found.values.shape  # (n, 64), (n, 64)
    >>> tokens = retriever.chunks(embeddings, exclude=[(0, 12), None])  # (n, k, 2 * chunk_len)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever_server.client import Exclude, RetrieverClient, RetrieverError, make_request
from retriever_server.manifest import read_manifest
from retriever_server.merge import merge_results
from retriever_server.request import Limits, parse_search
from retriever_server.result import SearchResult
from retriever_server.shard import Shard, ShardOptions

log = logging.getLogger(__name__)

__all__ = ["RetrievalConfig", "KnnNeighbours", "ServiceRetriever", "InProcessRetriever", "RetrieverError",
           "exclude_ranges"]

Ranges = Sequence[tuple[int, int] | None] | None  # per query: one [start, end) row range to exclude, or None


@dataclass(frozen=True)
class RetrievalConfig:
    """Per-request knobs: neighbours per query, inverted lists probed (0: the datastore's default),
    exact re-ranking of `rerank_candidates` candidates from the stored keys, and the deadline."""

    k: int = 64
    nprobe: int = 0
    exact_rerank: bool = False
    rerank_candidates: int = 0
    timeout_s: float = 300.0


@dataclass
class KnnNeighbours:
    """kNN-LM neighbours: distances float32 (n, k) squared L2 (inf where there is no neighbour),
    values int64 (n, k) next-token ids (-1 where there is no neighbour), ids int64 (n, k) rows."""

    distances: np.ndarray
    values: np.ndarray
    ids: np.ndarray


def exclude_ranges(ranges: Ranges) -> list[Exclude] | None:
    """One `Exclude` per query from optional [start, end) ranges."""
    if ranges is None:
        return None
    return [Exclude(ranges=[r]) if r is not None else Exclude() for r in ranges]


def _knn(result: SearchResult) -> KnnNeighbours:
    if "values" not in result.payloads:
        raise ValueError("the datastore has no 'values' payload: is it a kNN-LM datastore?")
    values = result.payloads["values"].astype(np.int64).reshape(result.ids.shape)
    values[result.ids < 0] = -1
    return KnnNeighbours(result.distances, values, result.ids)


def _chunks(result: SearchResult) -> np.ndarray:
    if "tokens" not in result.payloads:
        raise ValueError("the datastore has no 'tokens' payload: is it a RETRO datastore?")
    return result.payloads["tokens"].astype(np.int64)  # (n, k, 2L)


class _Retriever:
    """What both retrievers share: kNN-LM and RETRO look-ups, blocking or as futures."""

    config: RetrievalConfig

    def __init__(self, config: RetrievalConfig):
        self.config = config
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="retrieval")

    def _search(self, queries: np.ndarray, payload: str, exclude: Ranges) -> SearchResult:
        raise NotImplementedError

    def knn(self, keys: np.ndarray, exclude: Ranges = None) -> KnnNeighbours:
        """kNN-LM neighbours of float32 keys (n, d), each query optionally excluding one row range."""
        return _knn(self._search(np.ascontiguousarray(keys, dtype=np.float32), "values", exclude))

    def chunks(self, embeddings: np.ndarray, exclude: Ranges = None) -> np.ndarray:
        """RETRO neighbours of chunk embeddings (n, d): int64 (n, k, 2 * chunk_len) token ids."""
        return _chunks(self._search(np.ascontiguousarray(embeddings, dtype=np.float32), "tokens", exclude))

    def submit_knn(self, keys: np.ndarray, exclude: Ranges = None) -> Future:
        """`knn` in a background thread; the future's result is a `KnnNeighbours`."""
        return self._pool.submit(self.knn, np.array(keys, dtype=np.float32), exclude)

    def submit_chunks(self, embeddings: np.ndarray, exclude: Ranges = None) -> Future:
        """`chunks` in a background thread; the future's result is the (n, k, 2L) token array."""
        return self._pool.submit(self.chunks, np.array(embeddings, dtype=np.float32), exclude)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


RAY_PREFIX = "ray:"


def resolve_target(target: str) -> str | list[str]:
    """A retrieval target as `ServiceRetriever` takes it: "ray:NAME" becomes the router address of the
    deployment NAME on the connected Ray cluster, "a:1,b:2" one address per shard, else the address."""
    if target.startswith(RAY_PREFIX):
        from retriever_server.ray_serving import lookup

        return lookup(target[len(RAY_PREFIX):])
    return target.split(",") if "," in target else target


class ServiceRetriever(_Retriever):
    """Neighbours from the retrieval service over gRPC.

    Args:
        target: "host:port" of a router or shard, or one address (or replica list) per shard.
        config: per-request knobs.
    """

    def __init__(self, target: str | Sequence[str | Sequence[str]], config: RetrievalConfig = RetrievalConfig()):
        super().__init__(config)
        self.client = RetrieverClient(target, timeout=config.timeout_s)
        info = self.client.info()
        self.dimension: int = info.dimension
        self.ntotal: int = info.ntotal
        self.metadata: dict[str, str] = dict(info.metadata)
        self.version: str = info.datastore_version

    def _search(self, queries: np.ndarray, payload: str, exclude: Ranges) -> SearchResult:
        c = self.config
        return self.client.search(queries, k=c.k, nprobe=c.nprobe, exact_rerank=c.exact_rerank,
                                  rerank_candidates=c.rerank_candidates, payloads=[payload],
                                  exclude_per_query=exclude_ranges(exclude), expected_version=self.version)

    def close(self) -> None:
        super().close()
        self.client.close()


class InProcessRetriever(_Retriever):
    """The same shard files searched inside this process, one shard after another, merged exactly."""

    def __init__(self, datastore: Path, config: RetrievalConfig = RetrievalConfig(), threads: int = 0):
        super().__init__(config)
        manifest = read_manifest(Path(datastore))
        options = ShardOptions(verify=False, threads=threads)
        self.shards = [Shard.open(Path(datastore), i, options) for i in range(len(manifest.shards))]
        self.metric = manifest.metric
        self.dimension = manifest.dimension
        self.ntotal = manifest.ntotal
        self.metadata = dict(manifest.metadata)
        self.limits = Limits(max_batch=1 << 30, max_request_bytes=1 << 40, max_response_bytes=1 << 40)

    def _search(self, queries: np.ndarray, payload: str, exclude: Ranges) -> SearchResult:
        c = self.config
        request = make_request(queries, c.k, c.nprobe, c.exact_rerank, c.rerank_candidates, [payload],
                               exclude_per_query=exclude_ranges(exclude))
        parts = [shard.search(parse_search(request, shard.view(), self.limits)) for shard in self.shards]
        return merge_results(parts, c.k, self.metric)
