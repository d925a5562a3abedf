"""The same shard files searched inside this process, one shard after another, merged exactly: the
reference the benchmarks and tests compare the service against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lm_worker.retrieval.config import Ranges, RetrievalConfig
from lm_worker.retrieval.retriever import Retriever, exclude_ranges
from retriever_server.client import SearchResult, make_request
from retriever_server.datastore.manifest import read_manifest
from retriever_server.serving.merge import merge_results
from retriever_server.serving.shard import Shard, ShardOptions
from retriever_server.wire.request import Limits, RequestError, parse_search

MANY = 1 << 40
UNBOUNDED = Limits(max_k=1 << 30, max_batch=MANY, max_neighbours=MANY, max_request_bytes=MANY,
                   max_excluded=MANY, max_excluded_ranges=MANY, max_excluded_per_query=MANY,
                   max_excluded_ranges_per_query=MANY, max_payloads=1 << 20, max_string=1 << 20,
                   max_response_bytes=MANY, max_successors=1 << 20)


class InProcessRetriever(Retriever):
    """A datastore's shards opened in this process (memory-mapped, unverified) and searched in turn.

    Args:
        datastore: the datastore directory.
        config: per-request knobs.
        threads: FAISS threads (0: FAISS's default).
    """

    def __init__(self, datastore: Path, config: RetrievalConfig = RetrievalConfig(), threads: int = 0):
        super().__init__(config)
        manifest = read_manifest(Path(datastore))
        options = ShardOptions(verify=False, threads=threads)
        self.shards = [Shard.open(Path(datastore), i, options) for i in range(len(manifest.shards))]
        self.metric = manifest.metric
        self.dimension = manifest.dimension
        self.ntotal = manifest.ntotal
        self.metadata = dict(manifest.metadata)
        self.limits = UNBOUNDED  # the servers' limits guard them against callers; this searches for its own

    def search(self, queries: np.ndarray, payload: str, exclude: Ranges, successors: int = 0,
               return_keys: bool = False) -> SearchResult:
        c = self.config
        request = make_request(queries, c.k, c.nprobe, c.exact_rerank, c.rerank_candidates, [payload],
                               return_keys, exclude_per_query=exclude_ranges(exclude), successors=successors)
        try:
            searches = [parse_search(request, shard.view(), self.limits) for shard in self.shards]
        except RequestError as err:  # a value no search can take (k < 1, a NaN query, ...), named by its field
            raise ValueError(f"in-process search: {err}") from None
        parts = [shard.search(search) for shard, search in zip(self.shards, searches)]
        return merge_results(parts, c.k, self.metric)
