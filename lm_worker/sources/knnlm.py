"""A kNN-LM source: the LM's key at every position of the train stream, with the next token as value.

Example:
    >>> info = encode_knnlm(model, TokenStore.open(Path("run/data/train")), Path("run/knnlm-source"))
    >>> info.rows, info.dimension
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_worker.data.token_store import TokenStore
from lm_worker.data.windows import iter_windows
from lm_worker.models.fingerprint import describe_model, model_fingerprint
from lm_worker.sources.output import new_source
from lm_worker.sources.source import KEYS, SourceInfo

log = logging.getLogger(__name__)


def knn_windows(n: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The forward windows that give every position of an n-token stream its kNN-LM key.

    Window (start, lo, hi) runs the model on tokens[start:hi] and keeps the keys of positions [lo, hi).
    Windows are context_len long (shorter only when n < context_len) and keep their last `stride`
    positions (the first window keeps all of its), so every position p has at least
    min(p, context_len - stride) tokens of left context. The kept ranges tile [0, n) in order.
    """
    if not 0 < stride <= context_len:
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    return [(w.start, w.score_from, w.end) for w in iter_windows(n, context_len, stride)]


@torch.inference_mode()
def window_keys(model, tokens: np.ndarray, windows: list[tuple[int, int, int]], device: str) -> np.ndarray:
    """float32 keys of the kept positions of equally long windows, concatenated in window order."""
    batch = torch.from_numpy(np.stack([tokens[s:h] for s, _, h in windows]).astype(np.int64)).to(device)  # (b, W)
    keys = model.keys(batch) if hasattr(model, "keys") else model(batch, return_keys=True)[1]  # (b, W, d)
    keys = keys.float().cpu().numpy()
    return np.concatenate([keys[j, lo - s:h - s] for j, (s, lo, h) in enumerate(windows)])  # (rows, d)


def encode_knnlm(model: torch.nn.Module, store: TokenStore, out_dir: Path, context_len: int = 256, stride: int = 128,
                 batch_size: int = 16, device: str = "cpu", progress: bool = True,
                 fingerprint: str | None = None) -> SourceInfo:
    """Writes a kNN-LM source: row i = the LM's key at stream position i, value = tokens[i + 1].

    Keys come from sliding windows (see `knn_windows`) run cache-free in batches, and are written
    into memory-mapped .npy files as they come, so the stream may be far larger than memory.

    Args:
        model: anything called as `model(tokens (B, T), return_keys=True) -> (logits, keys (B, T, d))`,
            e.g. `TransformerLM` or a Hugging Face adapter, already on `device`; it is put in eval mode.
        store: the train split; its last position has no next token and gets no row.
        out_dir: the source directory (created; an existing source there is replaced once the new
            one is whole, and the folder's other files are kept; see `lm_worker.sources.output`).
        context_len: window length, at most the model's `config.max_len`.
        stride: positions kept per window after the first; each key sees >= context_len - stride tokens.
        batch_size: windows per forward pass.
        device: where the token windows go.
        progress: show a progress bar.
        fingerprint: the model's fingerprint for the datastore's metadata; default `model_fingerprint(model)`.

    Returns:
        The source's `SourceInfo` (kind "knnlm").

    Raises:
        ValueError: a stream of fewer than 2 tokens, a bad stride, context_len above the model's max_len, or
            an `out_dir` holding files but no source (each before anything is written).
    """
    n = len(store) - 1
    if n < 1:
        raise ValueError(f"{store.directory} has {len(store)} tokens; a kNN-LM source needs at least 2")
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    if isinstance(max_len, int) and context_len > max_len:
        raise ValueError(f"context_len {context_len} exceeds the model's max_len {max_len}")
    windows = knn_windows(n, context_len, stride)
    started = time.time()
    model.eval()
    with new_source(out_dir) as work:  # out_dir keeps its earlier source until this one is whole
        values = np.lib.format.open_memmap(work / "values.npy", mode="w+", dtype=np.int32, shape=(n,))
        values[:] = store.tokens[1:n + 1]
        values.flush()
        del values
        dimension = _write_keys(model, store.tokens, windows, work / KEYS, batch_size, device, progress)
        info = SourceInfo(
            work, "knnlm", n, dimension, store.tokenizer_fingerprint, fingerprint or model_fingerprint(model),
            details={"context_len": context_len, "stride": stride, "model": describe_model(model),
                     "store": str(store.directory), "seconds": round(time.time() - started, 3)})
        info.write()
    log.info("kNN-LM source %s: %d rows of dimension %d", out_dir, n, dimension)
    return dataclasses.replace(info, directory=Path(out_dir))


def _write_keys(model, tokens: np.ndarray, windows: list[tuple[int, int, int]], path: Path, batch_size: int,
                device: str, progress: bool) -> int:
    """Writes the keys of every window's kept positions into the .npy at `path`; returns their dimension."""
    keys = None
    for b in tqdm(range(0, len(windows), batch_size), desc="kNN-LM keys", unit="batch", disable=not progress):
        group = windows[b:b + batch_size]
        rows = window_keys(model, tokens, group, device)  # (rows, d)
        if keys is None:
            keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(windows[-1][2], rows.shape[1]))
        keys[group[0][1]:group[-1][2]] = rows
    dimension = keys.shape[1]
    keys.flush()
    del keys
    return dimension

