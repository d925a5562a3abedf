"""The frozen retrieval encoder for RETRO: MiniLM embeddings of chunks of BPE tokens.

A chunk of the LM's tokens is decoded to text, word-pieced for MiniLM (truncated to
`max_wordpieces`: by default 256, all-MiniLM-L6-v2's own `max_seq_length`, which a chunk of 64 BPE
tokens of code stays within; 64 cut half of such chunks), and mean-pooled over its real word pieces
into a unit-norm 384-d vector: the key of a RETRO datastore row, and the query a RETRO worker sends
for each completed chunk. Chunks cut short are counted in the log.

Example:
    >>> encoder = ChunkEncoder(tokenizer)
    >>> keys = encoder.embed(chunks)  # chunks int (n, L) -> float32 (n, 384)
"""

from __future__ import annotations

import logging

import numpy as np

from lm_worker.data.tokenizer import Tokenizer
from lm_worker.encoders.minilm import CLS, SEP, EncoderConfig, MiniLMEncoder, torch_threads

log = logging.getLogger(__name__)
DEFAULT_WORDPIECES = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
MAX_WORDPIECES = 510  # MiniLM's 512 positions, less [CLS] and [SEP]


class ChunkEncoder:
    """Embeds chunks of the LM's token ids with the frozen MiniLM encoder (dimension 384)."""

    dimension = MiniLMEncoder.dimension

    def __init__(self, tokenizer: Tokenizer, max_wordpieces: int = DEFAULT_WORDPIECES, batch_size: int = 128,
                 threads: int = 0, device: str = "cpu"):
        if not 1 <= max_wordpieces <= MAX_WORDPIECES:
            raise ValueError(f"max_wordpieces must be in [1, {MAX_WORDPIECES}] (MiniLM's 512 positions), "
                             f"got {max_wordpieces}")
        self.tokenizer = tokenizer
        self.device = device
        self.max_wordpieces = max_wordpieces
        self.batch_size = batch_size
        self.minilm = MiniLMEncoder(EncoderConfig(batch_size=batch_size, threads=threads, device=device))
        self.fingerprint = f"{self.minilm.fingerprint}/wp{max_wordpieces}"
        self.cut = 0  # chunks embedded from their first max_wordpieces word pieces only

    def _wordpieces(self, chunks: np.ndarray) -> list[list[int]]:
        texts = [self.tokenizer.decode(row) for row in np.asarray(chunks)]
        encoded = self.minilm.tokenizer.encode_batch(texts, add_special_tokens=False)
        self.cut += sum(len(e.ids) > self.max_wordpieces for e in encoded)
        return [[CLS, *e.ids[: self.max_wordpieces], SEP] for e in encoded]

    def embed(self, chunks: np.ndarray, progress: bool = False) -> np.ndarray:
        """float32 (n, 384) unit-norm embeddings of int (n, L) token chunks."""
        import torch
        from tqdm.auto import tqdm

        chunks = np.asarray(chunks)
        cut_before = self.cut
        out = np.empty((len(chunks), self.dimension), dtype=np.float32)
        steps = range(0, len(chunks), self.batch_size)
        with torch.inference_mode(), torch_threads(self.minilm.config.threads):
            for start in tqdm(steps, desc="embedding chunks", unit="batch", disable=not progress):
                pieces = self._wordpieces(chunks[start:start + self.batch_size])
                width = max(len(p) for p in pieces)
                ids = torch.zeros(len(pieces), width, dtype=torch.long)  # (b, W), 0 is [PAD]
                mask = torch.zeros(len(pieces), width, dtype=torch.long)  # (b, W)
                for row, p in enumerate(pieces):
                    ids[row, : len(p)] = torch.tensor(p)
                    mask[row, : len(p)] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                hidden = self.minilm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, W, 384)
                m = mask[..., None].to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1)  # (b, 384)
                out[start:start + len(pieces)] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        if cut := self.cut - cut_before:  # a bulk encode says so; a worker's chunk-by-chunk queries only in debug
            log.log(logging.INFO if progress else logging.DEBUG, "%d of %d chunks were longer than %d word pieces: "
                    "embedded from their first %d", cut, len(chunks), self.max_wordpieces, self.max_wordpieces)
        return out
