"""The sliding windows an evaluation scores, in batches, and the LM's log-probabilities and keys on them.

Position i of the store's stream predicts token i + 1. Windows of `context_len` input positions slide
by `stride`: the first window scores every position, each later one only its last `stride`, so every
scored position after the first window sees at least `context_len - stride` earlier tokens (fairseq's
`--context-window`). Consecutive windows of one length form a batch; `count_batches` and a range of
batches let evaluations of disjoint ranges add up to the whole (`lm_worker.evaluation.distributed`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lm_worker.data.token_store import TokenStore
from lm_worker.data.windows import Window, iter_windows
from lm_worker.evaluation.config import EvalConfig, scored_positions

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Windows of one length, stacked: inputs and targets (B, T), the scored cells and their positions."""

    windows: list[Window]
    inputs: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long
    rows: torch.Tensor  # (n,) window of each scored position
    cols: torch.Tensor  # (n,) offset in the window
    positions: np.ndarray  # (n,) stream positions

    @property
    def scored_targets(self) -> torch.Tensor:
        return self.targets[self.rows, self.cols]  # (n,)


def make_batch(store: TokenStore, windows: list[Window]) -> Batch:
    tokens = torch.from_numpy(np.stack([store.tokens[w.start:w.end + 1] for w in windows]).astype(np.int64))
    rows = np.concatenate([np.full(w.end - w.score_from, b) for b, w in enumerate(windows)])
    cols = np.concatenate([np.arange(w.score_from - w.start, w.end - w.start) for w in windows])
    positions = np.concatenate([np.arange(w.score_from, w.end) for w in windows])
    return Batch(windows, tokens[:, :-1], tokens[:, 1:], torch.from_numpy(rows), torch.from_numpy(cols), positions)


def plan_batches(store: TokenStore, config: EvalConfig, align: int = 1) -> list[list[Window]]:
    """Consecutive windows of equal length, at most `batch_size` to a batch."""
    groups: list[list[Window]] = []
    n = scored_positions(store, config.max_tokens)
    for w in iter_windows(n, config.context_len, config.stride, align):
        last = groups[-1] if groups else None
        if last and len(last) < config.batch_size and last[0].end - last[0].start == w.end - w.start:
            last.append(w)
        else:
            groups.append([w])
    return groups


def count_batches(store: TokenStore, config: EvalConfig, align: int = 1) -> int:
    """How many batches an evaluation of `store` runs: `batches=range(...)` selects some of them, so
    evaluations of disjoint ranges add up to the whole (`lm_worker.evaluation.distributed` splits this way)."""
    return len(plan_batches(store, config, align))


def check_scorable(store: TokenStore, config: EvalConfig, align: int = 1) -> None:
    """Raises ValueError where an evaluation of `store` would score nothing: a perplexity over no tokens."""
    if scored_positions(store, config.max_tokens) < align:  # RETRO (align: its chunk length) scores whole chunks
        what = f"one chunk of {align} tokens and the token after it" if align > 1 else "one token after another"
        raise ValueError(f"nothing to evaluate: the store holds {len(store)} tokens"
                         f"{f' (max_tokens {config.max_tokens})' if config.max_tokens else ''}, too few to score "
                         f"{what}")


def select_batches(groups: list[list[Window]], batches: range | None) -> list[list[Window]]:
    if batches is None:
        return groups
    if batches.step != 1 or batches.start < 0 or batches.stop > len(groups):
        raise ValueError(f"batches must be a contiguous range within [0, {len(groups)}), got {batches}")
    return groups[batches.start:batches.stop]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_window(model: torch.nn.Module, config: EvalConfig) -> None:
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    if max_len is not None and config.context_len > max_len:
        raise ValueError(f"context_len {config.context_len} exceeds the model's max_len {max_len}")


def target_log_probs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """log p(target) at the scored cells: logits (B, T, V) -> float32 (n,) on the CPU."""
    scored = logits[batch.rows.to(logits.device), batch.cols.to(logits.device)].float()  # (n, V)
    log_probs = F.log_softmax(scored, dim=-1)
    targets = batch.scored_targets.to(logits.device)
    return log_probs.gather(1, targets[:, None]).squeeze(1).cpu()  # (n,)


@torch.inference_mode()
def lm_step(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, np.ndarray]:
    """The LM's target log-probabilities (n,) and its kNN-LM keys (n, d) float32 at the scored cells."""
    logits, keys = model(batch.inputs.to(model_device(model)), return_keys=True)  # (B, T, V), (B, T, d)
    scored_keys = keys[batch.rows.to(keys.device), batch.cols.to(keys.device)].float().cpu().numpy()  # (n, d)
    return target_log_probs(logits, batch), scored_keys


class Clock(dict):
    """Seconds spent per activity."""

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self[name] = self.get(name, 0.0) + seconds


def completed(value) -> Future:
    future = Future()
    future.set_result(value)
    return future

