"""Data: corpora, the tokenizer, tokenized splits on disk, and sliding windows over them.

- `corpus`: the CPython stdlib, text folders and JSONL files as documents, held out by a hash of their names;
- `tokenizer`: a byte-level BPE tokenizer (Hugging Face `tokenizers`) with its fingerprint;
- `token_store`: one split as a flat token stream with the document of every token (`TokenStore`);
- `prepare`: a corpus split, tokenized and written (`prepare_corpus`, the retro split, `load_prepared`);
- `windows`: the sliding windows shared by kNN-LM encoding and evaluation;
- `folders`: a folder replaced whole by two renames, the old one put back when stopped between them, and the
  lock that keeps a folder to one writer at a time.

Imports: lm_worker.data
"""
