"""LM workers: corpora and tokenizers, encoders, models, kNN-LM and RETRO evaluation and decoding.

`lm_worker` reaches the retrieval service only through `retriever_server.client`.
"""

__version__ = "0.1.0"
