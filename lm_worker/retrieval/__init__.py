"""Retrieval: the one gateway through which the LM side talks to the retrieval service.

- `config`: what a retrieval asks for (`RetrievalConfig`), kNN-LM and RETRO neighbours as arrays;
- `retriever`: what both retrievers share: kNN-LM and RETRO look-ups, blocking or as futures;
- `service`: `ServiceRetriever` over gRPC (a router, or shards it fans out to), `resolve_target`;
- `in_process`: `InProcessRetriever`, the same shard files searched in this process (the reference);
- `local_cache`: each sequence's cache of the rows it retrieved and their successors (`LocalCaches`),
  searched exactly in process to guess neighbours (speculative retrieval);
- `errors`: the service's exceptions a command reports in one line (`SERVICE_ERRORS`: a call, a
  datastore folder or a build that failed);
- `demo`: the retrieval service alone on the built-in corpus (`lm-worker retrieval-demo`).

Only this room imports the service's serving and wire modules (its client, shards, merge, request
checks). Models, scorers and decoders see neighbours as numpy arrays and take a retriever object.
Outside this room, the LM side may use only these service APIs, for building and running datastores:

- `retriever_server.datastore.build` (the build job), `retriever_server.datastore.row_parts`
  (sources written in parts) and `retriever_server.datastore.publish` (the lock a folder's writer holds);
- `retriever_server.cluster.launcher` (a datastore served as local processes),
  `retriever_server.cluster.ray_serving` (served as Ray actors) and `retriever_server.cluster.connect`
  (joining a Ray cluster the way every job does).

Imports: lm_worker.retrieval, lm_worker.encoders, retriever_server.client, retriever_server.serving,
    retriever_server.wire, retriever_server.security, retriever_server.datastore, retriever_server.cluster
"""
