"""The gRPC servers and their clients.

- `shard`: one loaded shard and search over it (no gRPC);
- `service`: what every server shares: admission, accounting, errors, start and drain;
- `shard_server`: a shard behind the Retriever service;
- `router`: the Retriever service in front of S shards x R replicas;
- `merge`: ordering neighbours and the exact top-k merge of per-shard results;
- `overfetch`: per-query exclusions in one batched search (fetch more, drop the excluded);
- `failover`: which replica to try next, deadlines, and the router's and the client's retry loops;
- `fanout`: the `--shards` syntax, replica sets, the one-whole-datastore check (and the later check of a
  replica down then), the calls to every shard at once and what a call lacking some shards answers;
- `client`: `RetrieverClient` (import it from `retriever_server.client`);
- `event_loop`: an asyncio loop in a thread of its own, on which the blocking client's calls run;
- `grpc_setup`: message-size options, health and reflection, a server's heap settings;
- `metrics`: Prometheus metrics of one server.

Imports: retrieval, retriever_server.serving, retriever_server.wire, retriever_server.security,
    retriever_server.logs, retriever_server.datastore.index, retriever_server.datastore.manifest,
    retriever_server.datastore.headers
"""
