"""Models: the base LM, RETRO, a Hugging Face causal LM behind the same interface, and their checkpoints.

- `layers`: RMSNorm, rotary embeddings, attention with a key/value cache, cross-attention, blocks;
- `ragged_cache`: a key/value cache whose rows hold different lengths, each rewound on its own;
- `transformer_lm`: the decoder-only base LM, which also returns kNN-LM keys (`TransformerLM`);
- `retro`: RETRO, with chunked cross-attention to encoded neighbours (`Retro`);
- `ragged_retro`: RETRO's cache with a length per row (`RaggedRetroCache`), each row rewound on its own;
- `hf_causal_lm`: a local Hugging Face causal LM as a kNN-LM base (`HFCausalLM`);
- `checkpoint`: saving and loading any of them with its config and training state;
- `checkpoint_checks`: what loading a checkpoint checks: plain data, its fields, tied weights, a digest;
- `fingerprint`: which weights made a datastore's keys.

Imports: lm_worker.models, lm_worker.data.tokenizer
"""
