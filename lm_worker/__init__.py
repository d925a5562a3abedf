"""LM workers: the language-model side of the retrieval datastore.

Rooms, in the order data flows through them (each a package with its own docstring):

- `data`: corpora, the BPE tokenizer, token streams on disk, sliding windows;
- `models`: the base transformer LM, RETRO, a Hugging Face adapter, their layers and checkpoints;
- `encoders`: the frozen encoders that embed RETRO chunks (MiniLM, or the LM's own keys);
- `sources`: datastore sources (kNN-LM keys, RETRO chunks), own-document exclusions, RETRO neighbours;
- `retrieval`: the one gateway to the retrieval service; everything else sees neighbours as arrays;
- `training`: training the LM and RETRO (and retro-fitting RETRO onto the LM);
- `evaluation`: kNN-LM scoring, perplexity evaluation, distributed evaluation, reports and plots;
- `decoding`: greedy, sampling and beam search over steppers that retrieve, speculatively or pipelined;
- `jobs`: the Ray Data encode job;
- `pipeline`: every stage on one corpus into one run folder (`lm-worker pipeline`, `demo`);
- `cli`: the `lm-worker` command, one module per group of commands.

Imports: lm_worker
"""
