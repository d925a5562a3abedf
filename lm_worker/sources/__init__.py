"""Datastore sources: what `retriever-server build` turns into a kNN-LM or RETRO datastore.

- `source`: a source on disk and its source.json (`SourceInfo`);
- `output`: where a source is written: its folder's checks, a work folder beside it, the swap;
- `knnlm`: the LM's key at every position, the next token as value (`encode_knnlm`);
- `retro`: chunk embeddings, chunk + continuation as payload (`encode_retro`, `embed_chunks`);
- `exclusions`: the rows of a query's own document, left out of its neighbours;
- `neighbours`: RETRO's neighbours of every chunk of a split, fetched once (`precompute_neighbours`);
- `build`: a source's datastore, by the service's build job (`build_source`).

Imports: lm_worker.sources, lm_worker.data, lm_worker.models.fingerprint,
    retriever_server.datastore.row_parts, retriever_server.datastore.build, retriever_server.datastore.publish
"""
