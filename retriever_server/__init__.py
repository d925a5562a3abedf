"""Sharded FAISS IVFPQ retrieval datastore served over gRPC.

The pieces, one per module: `manifest` (the datastore on disk), `index` (FAISS factory, train, add,
load), `build` (the Ray build job), `shard` (search over one loaded shard), `shard_server` (its gRPC
server), `merge` (exact top-k merge), `router` (fan-out server), `client` (`RetrieverClient`),
`launcher` (every shard and a router as local processes), `cli` (`retriever-server`).
"""

__version__ = "0.1.0"
