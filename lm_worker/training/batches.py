"""Training and held-out windows of a prepared split, with RETRO's precomputed neighbours.

Batches are random windows of seq_len + 1 tokens of the split's stream, drawn from a generator seeded
by (seed, step), so a resumed run sees exactly the batches an uninterrupted one would. RETRO windows
start at chunk boundaries and come with the neighbours of their chunks (`neighbours-SPLIT.npy`, int32
(n_chunks, K, 2L), row c for tokens[c*L:(c+1)*L], written by `lm-worker neighbours`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lm_worker.data.token_store import RETRO_SPLIT, TokenStore
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.models.retro import RetroConfig
from lm_worker.models.transformer_lm import LMConfig
from lm_worker.training.config import TrainConfig, model_config

log = logging.getLogger(__name__)


class Windows:
    """Training or held-out windows of seq_len + 1 tokens, with RETRO neighbours for their chunks.

    Args:
        store: the split's tokens.
        seq_len: input length T (targets are the next T tokens).
        chunk_len: RETRO's L: windows start at multiples of L; 0 for the plain LM.
        neighbours: int32 (n_chunks, K, 2L) neighbours of the split's chunks, or None.
    """

    def __init__(self, store: TokenStore, seq_len: int, chunk_len: int = 0, neighbours: np.ndarray | None = None):
        self.tokens, self.seq_len, self.neighbours = store.tokens, seq_len, neighbours
        self.stride = chunk_len or 1
        last_start = len(self.tokens) - seq_len - 1  # windows need seq_len + 1 tokens
        if last_start < 0:
            raise ValueError(f"{store.directory} has {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.n_windows = last_start // self.stride + 1
        if neighbours is not None:
            chunks = seq_len // chunk_len
            self.n_windows = min(self.n_windows, len(neighbours) - chunks + 1)
            if self.n_windows < 1:
                raise ValueError(f"{len(neighbours)} neighbour rows do not cover one window of {chunks} chunks")

    def batch(self, indices: np.ndarray, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs (B, T), targets (B, T) and neighbours (B, C, K, 2L) or None of windows `indices`."""
        starts = indices * self.stride
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows).to(device)
        neighbours = None
        if self.neighbours is not None:
            C = self.seq_len // self.stride
            block = np.stack([self.neighbours[c:c + C] for c in indices]).astype(np.int64)  # (B, C, K, 2L)
            neighbours = torch.from_numpy(block).to(device)
        return rows[:, :-1], rows[:, 1:], neighbours

    def random(self, seed: int, step: int, batch_size: int, device: torch.device):
        """The batch of training step `step`: the same for a given (seed, step) in every run."""
        rng = np.random.default_rng([seed, step])
        return self.batch(rng.integers(0, self.n_windows, size=batch_size), device)

    def fixed(self, n: int) -> np.ndarray:
        """`n` evenly spaced window indices (fewer if there are fewer windows): the held-out set."""
        return np.unique(np.linspace(0, self.n_windows - 1, num=min(n, self.n_windows)).astype(np.int64))


def load_neighbours(path: Path, chunk_len: int, vocab_size: int, store: TokenStore | None = None) -> np.ndarray:
    """Memory-maps a neighbours file and checks its shape, its rows (one per chunk of `store`, when given)
    and token ids.

    Raises:
        FileNotFoundError: no file. ValueError: not a readable .npy, not integers, not (n, K, 2 * chunk_len), another
            number of rows than the store's chunks (made for another version of the split), or ids outside
            the vocabulary.
    """
    if not path.is_file():
        raise FileNotFoundError(f"RETRO training needs precomputed neighbours at {path} (run lm-worker neighbours)")
    try:
        neighbours = np.load(path, mmap_mode="r", allow_pickle=False)
    except (EOFError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable .npy file ({err}): run lm-worker neighbours again") from None
    if not isinstance(neighbours, np.ndarray):
        neighbours.close()
        raise ValueError(f"{path} is a .npz archive, not an array of neighbours: run lm-worker neighbours again")
    if neighbours.dtype.kind not in "iu":  # floats would be cut to integers without a word
        raise ValueError(f"{path} holds {neighbours.dtype} neighbours, not integer token ids: run lm-worker "
                         "neighbours again")
    if neighbours.ndim != 3 or neighbours.shape[2] != 2 * chunk_len:
        raise ValueError(f"{path} must be (n_chunks, K, 2 * chunk_len = {2 * chunk_len}), got {neighbours.shape}")
    if store is not None and len(neighbours) != len(store) // chunk_len:
        raise ValueError(f"{path} has {len(neighbours)} rows, but {store.directory} has {len(store) // chunk_len} "
                         f"chunks of {chunk_len}: it was made for another version of the split (run lm-worker "
                         "neighbours again)")
    if len(neighbours) and (neighbours.min() < 0 or neighbours.max() >= vocab_size):
        raise ValueError(f"{path} holds token ids outside [0, {vocab_size})")
    return neighbours


def check_tokenized_alike(data_dir: Path, *stores: TokenStore) -> None:
    """ValueError unless the stores were tokenized by one tokenizer, DATA/tokenizer.json's where there is one
    (a split left by an earlier `prepare` with another tokenizer holds ids that mean other text)."""
    file = data_dir / "tokenizer.json"
    expected = Tokenizer.load(file).fingerprint if file.is_file() else stores[0].tokenizer_fingerprint
    for store in stores:
        if store.tokenizer_fingerprint != expected:
            raise ValueError(f"{store.directory} was tokenized with {store.tokenizer_fingerprint}, but "
                             f"{file if file.is_file() else stores[0].directory} with {expected}: prepare the "
                             "data again into a fresh folder")


def vocab_size_of(config: TrainConfig, data_dir: Path) -> int:
    if config.vocab_size:
        return config.vocab_size
    return Tokenizer.load(data_dir / "tokenizer.json").vocab_size


def open_data(config: TrainConfig, data_dir: Path, neighbours_dir: Path | None
               ) -> tuple[Windows, Windows, LMConfig | RetroConfig, str]:
    """Train and held-out windows, the model config and the tokenizer fingerprint."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no data folder at {data_dir} (run prepare first)")
    vocab_size = vocab_size_of(config, data_dir)
    if not (data_dir / config.split).is_dir():
        hint = " (prepare with max_retro_tokens)" if config.split == RETRO_SPLIT else ""
        raise FileNotFoundError(f"no {config.split!r} split at {data_dir / config.split}{hint}")
    train_store, heldout_store = TokenStore.open(data_dir / config.split), TokenStore.open(data_dir / "heldout")
    check_tokenized_alike(data_dir, train_store, heldout_store)
    if len(train_store) and int(train_store.tokens.max()) >= vocab_size:
        raise ValueError(f"{data_dir / config.split} holds token ids >= vocab_size {vocab_size}")
    if config.kind == "lm":
        mcfg = model_config(config, vocab_size)
        return (Windows(train_store, config.seq_len), Windows(heldout_store, config.seq_len), mcfg,
                train_store.tokenizer_fingerprint)
    L = model_config(config, vocab_size).chunk_len
    if config.seq_len % L:
        raise ValueError(f"RETRO seq_len {config.seq_len} must be a multiple of chunk_len {L}")
    if neighbours_dir is None:
        raise ValueError(f"RETRO training needs neighbours_dir (the folder with neighbours-{config.split}.npy)")
    neighbours_dir = Path(neighbours_dir)
    train_nb = load_neighbours(neighbours_dir / f"neighbours-{config.split}.npy", L, vocab_size, train_store)
    heldout_path = neighbours_dir / "neighbours-heldout.npy"
    heldout_nb = load_neighbours(heldout_path, L, vocab_size, heldout_store) if heldout_path.is_file() else None
    if heldout_nb is None:
        log.warning("no %s: held-out loss is measured without retrieval", heldout_path)
    elif heldout_nb.shape[1] != train_nb.shape[1]:
        raise ValueError(f"held-out neighbours have K={heldout_nb.shape[1]}, train K={train_nb.shape[1]}")
    mcfg = model_config(config, vocab_size, n_neighbours=train_nb.shape[1])
    return (Windows(train_store, config.seq_len, L, train_nb), Windows(heldout_store, config.seq_len, L, heldout_nb),
            mcfg, train_store.tokenizer_fingerprint)

