"""The Python client of the retrieval service: `RetrieverClient`, the `Exclude` rows it takes, the
`SearchResult` it returns and the `RetrieverError` it raises.

This is the stable import path; the code lives in `retriever_server.serving.client`.

Example:
    >>> from retriever_server.client import RetrieverClient
    >>> with RetrieverClient("127.0.0.1:50051") as client:     # a router, one shard, or a list of shards
    ...     result = client.search(queries, k=10)             # queries: (nq, d) float32
    >>> result.ids.shape, result.distances.shape              # (nq, 10), (nq, 10)
"""

from retriever_server.serving.client import Exclude, RetrieverClient, RetrieverError, make_request
from retriever_server.wire.result import SearchResult

__all__ = ["Exclude", "RetrieverClient", "RetrieverError", "SearchResult", "make_request"]
