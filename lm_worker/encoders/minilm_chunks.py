"""The frozen retrieval encoder for RETRO: MiniLM embeddings of chunks of BPE tokens.

A chunk of the LM's tokens is decoded to text, word-pieced for MiniLM (truncated to
`max_wordpieces`), and mean-pooled over its real word pieces into a unit-norm 384-d vector: the
key of a RETRO datastore row, and the query a RETRO worker sends for each completed chunk.

Example:
    >>> encoder = ChunkEncoder(tokenizer)
    >>> keys = encoder.embed(chunks)  # chunks int (n, L) -> float32 (n, 384)
"""

from __future__ import annotations

import logging

import numpy as np

from lm_worker.data.tokenizer import Tokenizer
from lm_worker.encoders.minilm import CLS, SEP, EncoderConfig, MiniLMEncoder

log = logging.getLogger(__name__)


class ChunkEncoder:
    """Embeds chunks of the LM's token ids with the frozen MiniLM encoder (dimension 384)."""

    dimension = MiniLMEncoder.dimension

    def __init__(self, tokenizer: Tokenizer, max_wordpieces: int = 64, batch_size: int = 128, threads: int = 0,
                 device: str = "cpu"):
        self.tokenizer = tokenizer
        self.device = device
        self.max_wordpieces = max_wordpieces
        self.batch_size = batch_size
        self.minilm = MiniLMEncoder(EncoderConfig(batch_size=batch_size, threads=threads, device=device))
        self.fingerprint = f"{self.minilm.fingerprint}/wp{max_wordpieces}"

    def _wordpieces(self, chunks: np.ndarray) -> list[list[int]]:
        texts = [self.tokenizer.decode(row) for row in np.asarray(chunks)]
        encoded = self.minilm.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [[CLS, *e.ids[: self.max_wordpieces], SEP] for e in encoded]

    def embed(self, chunks: np.ndarray, progress: bool = False) -> np.ndarray:
        """float32 (n, 384) unit-norm embeddings of int (n, L) token chunks."""
        import torch
        from tqdm.auto import tqdm

        chunks = np.asarray(chunks)
        out = np.empty((len(chunks), self.dimension), dtype=np.float32)
        steps = range(0, len(chunks), self.batch_size)
        with torch.inference_mode():
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
        return out
