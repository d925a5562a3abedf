"""The datastore on disk and the job that builds it.

- `manifest`: `manifest.json`, shard entries, checksums, `read_manifest`, `DatastoreError`;
- `headers`: the cheap checks a shard makes on every open (index header and list sizes, array shapes);
- `index`: everything FAISS: factory strings, seeded training, adding with global ids, load, search;
- `coarse`: the coarse quantizer of a large IVF index (two-level k-means, graph-assisted assignment);
- `shard_fill`: one shard task's add loop (`add_rows`), timed by phase;
- `spill`: one shard's IVF index filled in bounded memory (lists spilled to disk, written list by list);
- `stream_io`: a build's reads ahead and writes behind, on a thread, with O_DIRECT (off the page cache);
- `row_parts`: one (N, ...) array stored as several .npy files (`NAME.parts.json`);
- `build_inputs`: what a build is asked to do, checked before any work starts;
- `resume`: what an unfinished build left that a rerun takes up (its work folder, codec, finished shards);
- `build`: the Ray build job (train the codec once, fill shards in parallel, resume, publish);
- `publish`: replacing a directory atomically.

Imports: retriever_server.datastore, retriever_server.cluster.connect, retriever_server.wire.untrusted
"""
