"""RETRO's perplexity with its retrieved neighbours and with them withheld, over the same chunk-aligned
windows and the same scored tokens. Each chunk of the stream is embedded and retrieved once, while
the model runs without neighbours; own-document exclusion as in kNN-LM evaluation.

Example:
    >>> result = evaluate_retro(retro, heldout, retriever, encoder, EvalConfig(context_len=256, stride=128))
    >>> result.perplexity, result.perplexity_without
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_worker.data.token_store import TokenStore
from lm_worker.data.windows import Window
from lm_worker.evaluation.batches import (
    Clock,
    check_scorable,
    check_window,
    completed,
    make_batch,
    model_device,
    plan_batches,
    select_batches,
    target_log_probs,
)
from lm_worker.evaluation.config import EvalConfig, perplexity
from lm_worker.retrieval.config import check_retro_inputs
from lm_worker.sources.exclusions import chunk_exclusions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetroEvalResult:
    """RETRO's perplexity with its retrieved neighbours and with them withheld, over the same tokens;
    `nll` and `nll_without` are the summed negative log-likelihoods (float64)."""

    tokens: int
    perplexity: float
    perplexity_without: float
    relative_reduction: float
    n_neighbours: int
    model_seconds: float
    embed_seconds: float
    retrieval_seconds: float
    seconds: float
    nll: float = 0.0
    nll_without: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _ChunkNeighbours:
    """Neighbours of stream chunks: each chunk embedded and retrieved once (kept while windows overlap it)."""

    def __init__(self, store: TokenStore, retriever, encoder, chunk_len: int, exclude: bool, clock: Clock,
                 window: int):
        self.store, self.retriever, self.encoder, self.L, self.clock = store, retriever, encoder, chunk_len, clock
        self.exclusions = chunk_exclusions(store, chunk_len, window) if exclude else None  # per chunk of the store
        self.cache: dict[int, np.ndarray] = {}  # chunk id -> (K, 2L)

    def submit(self, windows: list[Window]) -> tuple[np.ndarray, np.ndarray, Future]:
        """The windows' chunk ids (B, C), those not cached (m,), and the future of their neighbours (m, K, 2L)."""
        ids = np.stack([w.start // self.L + np.arange((w.end - w.start) // self.L) for w in windows])  # (B, C)
        missing = np.array([c for c in np.unique(ids) if c not in self.cache], dtype=np.int64)
        if len(missing) == 0:
            return ids, missing, completed(None)
        chunks = np.stack([self.store.tokens[c * self.L:(c + 1) * self.L] for c in missing])  # (m, L)
        with self.clock.timing("embed"):
            embeddings = self.encoder.embed(chunks)  # (m, d)
        exclude = None if self.exclusions is None else [self.exclusions[c] for c in missing]
        sent = time.perf_counter()
        future = self.retriever.submit_chunks(embeddings, exclude)
        future.add_done_callback(lambda _: self.clock.add("retrieval", time.perf_counter() - sent))
        return ids, missing, future

    def collect(self, ids: np.ndarray, missing: np.ndarray, future: Future, K: int) -> torch.Tensor:
        """Neighbours (B, C, K, 2L) of the chunk ids, once the fetch has arrived."""
        found = future.result()  # (m, k, 2L) or None, k >= K: the nearest K are the model's
        if found is not None and found.shape[1] >= K:
            found = found[:, :K]
        if found is not None and found.shape[1:] != (K, 2 * self.L):
            raise ValueError(f"the datastore returned neighbours of shape {found.shape[1:]}, the model needs "
                             f"({K}, {2 * self.L}): is it a RETRO datastore with chunk_len {self.L}?")
        fetched = {} if found is None else {int(c): found[i] for i, c in enumerate(missing)}
        self.cache = {int(c): fetched.get(int(c), self.cache.get(int(c))) for c in np.unique(ids)}
        if ids.shape[1] == 0:  # windows shorter than a chunk (the last, where the stride is one chunk)
            return torch.zeros((len(ids), 0, K, 2 * self.L), dtype=torch.long)  # (B, 0, K, 2L)
        return torch.from_numpy(np.stack([[self.cache[int(c)] for c in row] for row in ids]))  # (B, C, K, 2L)


def evaluate_retro(model: torch.nn.Module, store: TokenStore, retriever, encoder, config: EvalConfig = EvalConfig(),
                   progress: bool = True, batches: range | None = None) -> RetroEvalResult:
    """RETRO perplexity with retrieved neighbours and with `neighbours=None`, over chunk-aligned windows.

    Args:
        model: a `Retro` model.
        store: the token stream to score.
        retriever: a retriever over a RETRO datastore; `retriever.config.k` at least the model's n_neighbours
            (the nearest n_neighbours are used).
        encoder: the frozen chunk encoder (`ChunkEncoder`: `.embed(chunks (n, L)) -> (n, d)`).
        config: windows (multiples of the chunk length), batch size, own-document exclusion.
        progress: show a progress bar.
        batches: only these batches (of `count_batches(store, config, align=chunk_len)`); default all.

    Returns:
        A `RetroEvalResult`.

    Raises:
        ValueError: k is below the model's n_neighbours, the window is not chunk-aligned, the store is
            too short to score, or the datastore's neighbours do not fit the model.
    """
    check_retro_inputs(model, retriever, encoder)
    check_window(model, config)
    L, K = model.config.chunk_len, model.config.n_neighbours
    check_scorable(store, config, align=L)
    if retriever.config.k < K:
        raise ValueError(f"the retriever asks for k={retriever.config.k} neighbours, the model takes {K}: ask for "
                         f"{K} or more (the nearest {K} are used, as RetroStepper does)")
    if config.exclude_own_document and retriever.ntotal != len(store) // L:
        raise ValueError(f"exclude_own_document needs the datastore built from this store: it has "
                         f"{retriever.ntotal} rows, the store {len(store)} tokens in chunks of {L}")
    model.eval()
    device, clock, started = model_device(model), Clock(model=0.0, embed=0.0, retrieval=0.0), time.perf_counter()
    fetch = _ChunkNeighbours(store, retriever, encoder, L, config.exclude_own_document, clock, config.context_len)
    nll_with = nll_without = 0.0
    tokens = 0
    for windows in tqdm(select_batches(plan_batches(store, config, align=L), batches), desc="RETRO eval", unit="batch",
                        disable=not progress):
        batch = make_batch(store, windows)
        inputs = batch.inputs.to(device)
        ids, missing, future = fetch.submit(windows)
        with clock.timing("model"), torch.inference_mode():
            without = target_log_probs(model(inputs, None), batch)  # (n,), while the retrieval runs
        neighbours = fetch.collect(ids, missing, future, K).to(device)  # (B, C, K, 2L)
        with clock.timing("model"), torch.inference_mode():
            with_neighbours = target_log_probs(model(inputs, neighbours), batch)  # (n,)
        nll_with += -with_neighbours.double().sum().item()
        nll_without += -without.double().sum().item()
        tokens += len(without)
    ppl, ppl_without = perplexity(nll_with, tokens), perplexity(nll_without, tokens)
    reduction = 1.0 - ppl / ppl_without if math.isfinite(ppl_without) else 0.0
    log.log(logging.INFO if batches is None else logging.DEBUG,
            "RETRO over %d tokens: perplexity %.3f with neighbours, %.3f without", tokens, ppl, ppl_without)
    return RetroEvalResult(tokens, ppl, ppl_without, reduction, K, clock["model"], clock["embed"], clock["retrieval"],
                           time.perf_counter() - started, nll_with, nll_without)

