"""Speculative retrieval for batched kNN-LM decoding (RaLMSpec): each sequence guesses its neighbours
from a local cache of the rows it retrieved and their successors (or its token from the LM alone),
verified in batched requests; and its RETRO form, per chunk.

- `decoder`: `RaLMSpecKnnLM`, the decoder: its requests, mixing and model steps;
- `row_decode`: `RowDecode`, its loop for greedy decoding and sampling: guess, verify, roll back row by row;
- `rows`: `CommittedRows`, the tokens and log-probs each row has committed;
- `beam`: the same for beam search, a prompt's beams rolled back together;
- `scheduler`: `StrideScheduler`, RaLMSpec's optimal stride (or a serial step where guessing cannot pay);
- `config`: `SpeculationConfig` and `SpeculationStats`;
- `retro`: `RaLMSpecRetro`, RETRO decoding on guessed chunk neighbours;
- `retro_batch`: `RetroBatchDecode`, its loop with the batch rolled back together (the default);
- `retro_rows`: `RetroRowDecode`, its loop with rows at their own positions, each rolled back alone;
- `chunk_caches`: `ChunkCaches`, each sequence's cache of the RETRO chunks it found, and the guesses from it.
- `split`: requests split into pieces whose answers fit the service's response limit, joined in order.

Imports: lm_worker.decoding, lm_worker.evaluation.knnlm, lm_worker.models.ragged_cache, lm_worker.models.transformer_lm,
    lm_worker.retrieval
"""
