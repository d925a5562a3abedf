"""Sharded FAISS IVF retrieval datastore served over gRPC: SQ8 codes by default (`auto`; IVF-Flat
under 9,984 rows), PQ or any other FAISS factory on request.

Rooms, each a package with its own docstring:

- `datastore`: the datastore on disk and its build: manifest, FAISS index, build inputs, row
  parts, the Ray build job, atomic publish;
- `wire`: the API's messages as arrays: tensor bytes, request checks, `SearchResult`, response bytes;
- `serving`: the gRPC servers and their clients: shard, shard server, router, what servers share,
  merge, replica failover, fan-out, `RetrieverClient`, metrics;
- `security`: TLS, mutual TLS and bearer tokens, and the safe default for non-loopback ports;
- `cluster`: where servers run: local processes (`launcher`), Ray actors and their placement,
  joining a Ray cluster, CPU pinning;
- `cli`: the `retriever-server` command, one module per group of commands.

Beside them: `client` (the public import path of `RetrieverClient`) and `logs` (log formats, and
repeated events logged as counts).

Nothing here imports `lm_worker` or `torch`: a shard container needs FAISS, gRPC, numpy and Ray, with
the package's other core dependencies (prometheus_client for metrics, cryptography for certificates),
and never PyTorch.

Imports: retrieval, retriever_server.serving, retriever_server.wire, retriever_server.security
"""

__version__ = "0.1.0"
