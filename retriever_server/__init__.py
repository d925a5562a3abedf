"""Sharded FAISS IVFPQ retrieval datastore served over gRPC.

The pieces, one per module:

- on disk: `manifest` (the datastore's layout and checksums), `index` (FAISS factory, train, load,
  search), `build_inputs` (what to build, checked first), `build` (the Ray build job), `publish`
  (atomic replacement);
- on the wire: `wire` (arrays as bytes), `request` (checking a Search), `result` (`SearchResult`);
- serving: `shard` (search over one loaded shard), `service` (what every server shares),
  `shard_server`, `merge` (exact top-k merge), `fanout` (replicas, deadlines, shard-set checks),
  `router`, `client` (`RetrieverClient`), `metrics`, `grpc_util`, `logs`;
- running: `launcher` (every shard and a router as local processes), `cli` (`retriever-server`).
"""

__version__ = "0.1.0"
