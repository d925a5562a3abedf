"""Perplexity evaluation over a token store: the base LM, kNN-LM over a sweep of λ, and RETRO with
and without its retrieved neighbours, all over the same sliding windows and the same scored tokens.

Position i of the store's stream predicts token i + 1 (its kNN-LM key is the LM's key at i, as in
the datastore). Windows of `context_len` input positions slide by `stride`: the first window scores
every position, each later one only its last `stride`, so every scored position after the first
window sees at least `context_len - stride` earlier tokens (fairseq's `--context-window`).

kNN-LM retrieves once per batch of windows (every scored position in one request, submitted while
the model runs the next batch) and scores every λ from the same neighbours, as Khandelwal et al.
do. Evaluating on the store the datastore was built from needs `exclude_own_document=True`.

Example:
    >>> config = EvalConfig(context_len=256, stride=128, retrieval=RetrievalConfig(k=1024))
    >>> result = evaluate_knnlm(model, heldout, InProcessRetriever(Path("run/knnlm-datastore"), config.retrieval),
    ...                         config)
    >>> result.base_perplexity, result.best_lambda, result.best_perplexity
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lm_worker.encode import chunk_exclusions, knn_exclusions
from lm_worker.knnlm import interpolate, knn_target_log_prob
from lm_worker.retrieval import KnnNeighbours, RetrievalConfig
from lm_worker.token_store import TokenStore
from lm_worker.windows import Window, iter_windows

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    `stride` positions are scored per window after the first; `max_tokens` caps the scored positions
    (0: the whole store); `lambdas` and `temperature` are kNN-LM's; `exclude_own_document` makes each
    query skip the datastore rows of its own document (for a datastore built from this very store).
    `overlap` sends a batch's kNN-LM retrieval while the model runs the next batch.
    """

    context_len: int = 256
    stride: int = 128
    batch_size: int = 8
    max_tokens: int = 0
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    temperature: float = 1.0
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    exclude_own_document: bool = False
    overlap: bool = True

    def __post_init__(self):
        if self.context_len < 1 or not 1 <= self.stride <= self.context_len:
            raise ValueError(f"need 1 <= stride <= context_len, got stride {self.stride}, "
                             f"context_len {self.context_len}")
        if self.batch_size < 1 or self.max_tokens < 0:
            raise ValueError(f"batch_size must be >= 1 and max_tokens >= 0, got {self.batch_size}, {self.max_tokens}")
        if not self.lambdas or not all(0.0 <= lam <= 1.0 for lam in self.lambdas):
            raise ValueError(f"lambdas must be a non-empty list of values in [0, 1], got {self.lambdas}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def scored_positions(store: TokenStore, max_tokens: int = 0) -> int:
    """How many positions (tokens predicted) an evaluation of `store` scores."""
    n = max(len(store) - 1, 0)
    return min(n, max_tokens) if max_tokens else n


@dataclass
class _Batch:
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


def _make_batch(store: TokenStore, windows: list[Window]) -> _Batch:
    tokens = torch.from_numpy(np.stack([store.tokens[w.start:w.end + 1] for w in windows]).astype(np.int64))
    rows = np.concatenate([np.full(w.end - w.score_from, b) for b, w in enumerate(windows)])
    cols = np.concatenate([np.arange(w.score_from - w.start, w.end - w.start) for w in windows])
    positions = np.concatenate([np.arange(w.score_from, w.end) for w in windows])
    return _Batch(windows, tokens[:, :-1], tokens[:, 1:], torch.from_numpy(rows), torch.from_numpy(cols), positions)


def _batches(store: TokenStore, config: EvalConfig, align: int = 1) -> list[list[Window]]:
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
    evaluations of disjoint ranges add up to the whole (`lm_worker.distributed_eval` splits this way)."""
    return len(_batches(store, config, align))


def _selected(groups: list[list[Window]], batches: range | None) -> list[list[Window]]:
    if batches is None:
        return groups
    if batches.step != 1 or batches.start < 0 or batches.stop > len(groups):
        raise ValueError(f"batches must be a contiguous range within [0, {len(groups)}), got {batches}")
    return groups[batches.start:batches.stop]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_window(model: torch.nn.Module, config: EvalConfig) -> None:
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    if max_len is not None and config.context_len > max_len:
        raise ValueError(f"context_len {config.context_len} exceeds the model's max_len {max_len}")


def _target_log_probs(logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """log p(target) at the scored cells: logits (B, T, V) -> float32 (n,) on the CPU."""
    scored = logits[batch.rows.to(logits.device), batch.cols.to(logits.device)].float()  # (n, V)
    log_probs = F.log_softmax(scored, dim=-1)
    targets = batch.scored_targets.to(logits.device)
    return log_probs.gather(1, targets[:, None]).squeeze(1).cpu()  # (n,)


@torch.inference_mode()
def _lm_step(model: torch.nn.Module, batch: _Batch) -> tuple[torch.Tensor, np.ndarray]:
    """The LM's target log-probabilities (n,) and its kNN-LM keys (n, d) float32 at the scored cells."""
    logits, keys = model(batch.inputs.to(_device(model)), return_keys=True)  # (B, T, V), (B, T, d)
    scored_keys = keys[batch.rows.to(keys.device), batch.cols.to(keys.device)].float().cpu().numpy()  # (n, d)
    return _target_log_probs(logits, batch), scored_keys


def perplexity(nll: float, tokens: int) -> float:
    """exp(nll / tokens): the perplexity of a summed negative log-likelihood (inf when it overflows)."""
    mean = nll / max(tokens, 1)
    return math.exp(mean) if mean < 700 else math.inf


# ---------------------------------------------------------------------------------------------
# The base LM and kNN-LM
# ---------------------------------------------------------------------------------------------

def evaluate_lm(model: torch.nn.Module, store: TokenStore, config: EvalConfig = EvalConfig(),
                progress: bool = True) -> tuple[float, int]:
    """Perplexity of an LM over the store's sliding windows.

    Args:
        model: a `TransformerLM`, or any module with `forward(tokens, return_keys=True)`; put in eval mode.
        store: the token stream to score.
        config: windows, batch size and token cap.
        progress: show a progress bar.

    Returns:
        (perplexity, tokens scored).

    Raises:
        ValueError: the window is longer than the model's `max_len`.
    """
    _check_window(model, config)
    model.eval()
    nll, tokens = 0.0, 0
    for windows in tqdm(_batches(store, config), desc="lm eval", unit="batch", disable=not progress):
        lm, _ = _lm_step(model, _make_batch(store, windows))
        nll += -lm.double().sum().item()
        tokens += len(lm)
    return perplexity(nll, tokens), tokens


@dataclass(frozen=True)
class KnnEvalResult:
    """kNN-LM perplexity per λ over `tokens` scored positions, against the base LM's (λ = 0).

    `relative_reduction` is 1 - best / base. `retrieval_seconds` sums the retrieval requests' wall
    times (with `overlap`, two can be in flight at once), `retrieval_wait_seconds` is the time the
    evaluation spent blocked on them, `seconds` the whole evaluation's wall time. `base_nll` and `nll`
    (per λ) are the summed negative log-likelihoods (float64), which results over disjoint batch
    ranges add up.
    """

    tokens: int
    base_perplexity: float
    perplexity: dict[float, float]
    best_lambda: float
    best_perplexity: float
    relative_reduction: float
    k: int
    temperature: float
    model_seconds: float
    retrieval_seconds: float
    retrieval_wait_seconds: float
    seconds: float
    base_nll: float = 0.0
    nll: dict[float, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.inf

    def to_dict(self) -> dict:
        out = asdict(self)
        out["perplexity"] = {str(lam): ppl for lam, ppl in self.perplexity.items()}
        out["nll"] = {str(lam): v for lam, v in self.nll.items()}
        return out


class _Sums:
    """Summed negative log-likelihoods: the base LM's and each λ's."""

    def __init__(self, lambdas: tuple[float, ...]):
        self.tokens, self.base = 0, 0.0
        self.per_lambda = dict.fromkeys(lambdas, 0.0)

    def add(self, lm: torch.Tensor, targets: torch.Tensor, found: KnnNeighbours, temperature: float) -> None:
        distances, values = torch.as_tensor(np.array(found.distances)), torch.as_tensor(np.array(found.values))
        knn = knn_target_log_prob(distances, values, targets, temperature)  # (n,)
        self.tokens += len(lm)
        self.base += -lm.double().sum().item()
        for lam in self.per_lambda:
            self.per_lambda[lam] += -interpolate(lm, knn, lam).double().sum().item()


class _Clock(dict):
    """Seconds spent per activity."""

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self[name] = self.get(name, 0.0) + seconds


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def evaluate_knnlm(model: torch.nn.Module, store: TokenStore, retriever, config: EvalConfig = EvalConfig(),
                   progress: bool = True, batches: range | None = None) -> KnnEvalResult:
    """kNN-LM perplexity for every λ in `config.lambdas`, from one retrieval per batch of windows.

    Args:
        model: the LM whose keys built the datastore (`forward(tokens, return_keys=True)`).
        store: the token stream to score.
        retriever: a `ServiceRetriever` or `InProcessRetriever` over a kNN-LM datastore; its config sets k.
        config: windows, batch size, λs, temperature, own-document exclusion.
        progress: show a progress bar.
        batches: only these batches (of `count_batches(store, config)`); default all.

    Returns:
        A `KnnEvalResult`; its λ = 0 perplexity equals `evaluate_lm`'s exactly.

    Raises:
        ValueError: the window exceeds the model's `max_len`, the keys' dimension is not the datastore's,
            or `exclude_own_document` is set for a datastore not built from `store`.
    """
    _check_window(model, config)
    if config.exclude_own_document and retriever.ntotal != len(store) - 1:
        raise ValueError(f"exclude_own_document needs the datastore built from this store: it has "
                         f"{retriever.ntotal} rows, the store {len(store) - 1} positions")
    model.eval()
    sums, clock, started = _Sums(config.lambdas), _Clock(model=0.0, retrieval=0.0, wait=0.0), time.perf_counter()

    def retrieve(keys: np.ndarray, exclude) -> Future:
        sent = time.perf_counter()
        future = retriever.submit_knn(keys, exclude) if config.overlap else _done(retriever.knn(keys, exclude))
        future.add_done_callback(lambda _: clock.add("retrieval", time.perf_counter() - sent))
        return future

    def score(lm: torch.Tensor, targets: torch.Tensor, future: Future) -> None:
        with clock.timing("wait"):
            found = future.result()
        sums.add(lm, targets, found, config.temperature)

    pending = None  # the previous batch, scored once the model has run this one
    for windows in tqdm(_selected(_batches(store, config), batches), desc="kNN-LM eval", unit="batch",
                        disable=not progress):
        batch = _make_batch(store, windows)
        with clock.timing("model"):
            lm, keys = _lm_step(model, batch)
        if keys.shape[1] != retriever.dimension:
            raise ValueError(f"the model's keys have dimension {keys.shape[1]}, the datastore {retriever.dimension}")
        exclude = knn_exclusions(store, batch.positions) if config.exclude_own_document else None
        current = (lm, batch.scored_targets, retrieve(keys, exclude))
        if pending is not None:
            score(*pending)
        pending = current
    if pending is not None:
        score(*pending)
    base = perplexity(sums.base, sums.tokens)
    per_lambda = {lam: perplexity(nll, sums.tokens) for lam, nll in sums.per_lambda.items()}
    best = min(per_lambda, key=lambda lam: per_lambda[lam])
    reduction = 1.0 - per_lambda[best] / base if math.isfinite(base) else 0.0
    log.log(logging.INFO if batches is None else logging.DEBUG,
            "kNN-LM over %d tokens: base perplexity %.3f, best λ %.2f gives %.3f (%.1f%% lower)",
            sums.tokens, base, best, per_lambda[best], 100 * reduction)
    return KnnEvalResult(sums.tokens, base, per_lambda, best, per_lambda[best], reduction, config.retrieval.k,
                         config.temperature, clock["model"], clock["retrieval"], clock["wait"],
                         time.perf_counter() - started, sums.base, dict(sums.per_lambda))


# ---------------------------------------------------------------------------------------------
# RETRO
# ---------------------------------------------------------------------------------------------

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

    def __init__(self, store: TokenStore, retriever, encoder, chunk_len: int, exclude: bool, clock: _Clock):
        self.store, self.retriever, self.encoder, self.L, self.clock = store, retriever, encoder, chunk_len, clock
        self.exclusions = chunk_exclusions(store, chunk_len) if exclude else None  # per chunk of the store
        self.cache: dict[int, np.ndarray] = {}  # chunk id -> (K, 2L)

    def submit(self, windows: list[Window]) -> tuple[np.ndarray, np.ndarray, Future]:
        """The windows' chunk ids (B, C), those not cached (m,), and the future of their neighbours (m, K, 2L)."""
        ids = np.stack([w.start // self.L + np.arange((w.end - w.start) // self.L) for w in windows])  # (B, C)
        missing = np.array([c for c in np.unique(ids) if c not in self.cache], dtype=np.int64)
        if len(missing) == 0:
            return ids, missing, _done(None)
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
        found = future.result()  # (m, K, 2L) or None
        if found is not None and found.shape[1:] != (K, 2 * self.L):
            raise ValueError(f"the datastore returned neighbours of shape {found.shape[1:]}, the model needs "
                             f"({K}, {2 * self.L}): is it a RETRO datastore with chunk_len {self.L}?")
        fetched = {} if found is None else {int(c): found[i] for i, c in enumerate(missing)}
        self.cache = {int(c): fetched.get(int(c), self.cache.get(int(c))) for c in np.unique(ids)}
        return torch.from_numpy(np.stack([[self.cache[int(c)] for c in row] for row in ids]))  # (B, C, K, 2L)


def evaluate_retro(model: torch.nn.Module, store: TokenStore, retriever, encoder, config: EvalConfig = EvalConfig(),
                   progress: bool = True, batches: range | None = None) -> RetroEvalResult:
    """RETRO perplexity with retrieved neighbours and with `neighbours=None`, over chunk-aligned windows.

    Args:
        model: a `Retro` model.
        store: the token stream to score.
        retriever: a retriever over a RETRO datastore; `retriever.config.k` must equal the model's n_neighbours.
        encoder: the frozen chunk encoder (`ChunkEncoder`: `.embed(chunks (n, L)) -> (n, d)`).
        config: windows (multiples of the chunk length), batch size, own-document exclusion.
        progress: show a progress bar.
        batches: only these batches (of `count_batches(store, config, align=chunk_len)`); default all.

    Returns:
        A `RetroEvalResult`.

    Raises:
        ValueError: k differs from the model's n_neighbours, the window is not chunk-aligned, or the
            datastore's neighbours do not fit the model.
    """
    _check_window(model, config)
    L, K = model.config.chunk_len, model.config.n_neighbours
    if retriever.config.k != K:
        raise ValueError(f"the retriever asks for k={retriever.config.k} neighbours, the model takes {K}")
    if config.exclude_own_document and retriever.ntotal != len(store) // L:
        raise ValueError(f"exclude_own_document needs the datastore built from this store: it has "
                         f"{retriever.ntotal} rows, the store {len(store)} tokens in chunks of {L}")
    model.eval()
    device, clock, started = _device(model), _Clock(model=0.0, embed=0.0, retrieval=0.0), time.perf_counter()
    fetch = _ChunkNeighbours(store, retriever, encoder, L, config.exclude_own_document, clock)
    nll_with = nll_without = 0.0
    tokens = 0
    for windows in tqdm(_selected(_batches(store, config, align=L), batches), desc="RETRO eval", unit="batch",
                        disable=not progress):
        batch = _make_batch(store, windows)
        inputs = batch.inputs.to(device)
        ids, missing, future = fetch.submit(windows)
        with clock.timing("model"), torch.inference_mode():
            without = _target_log_probs(model(inputs, None), batch)  # (n,), while the retrieval runs
        neighbours = fetch.collect(ids, missing, future, K).to(device)  # (B, C, K, 2L)
        with clock.timing("model"), torch.inference_mode():
            with_neighbours = _target_log_probs(model(inputs, neighbours), batch)  # (n,)
        nll_with += -with_neighbours.double().sum().item()
        nll_without += -without.double().sum().item()
        tokens += len(without)
    ppl, ppl_without = perplexity(nll_with, tokens), perplexity(nll_without, tokens)
    reduction = 1.0 - ppl / ppl_without if math.isfinite(ppl_without) else 0.0
    log.log(logging.INFO if batches is None else logging.DEBUG,
            "RETRO over %d tokens: perplexity %.3f with neighbours, %.3f without", tokens, ppl, ppl_without)
    return RetroEvalResult(tokens, ppl, ppl_without, reduction, K, clock["model"], clock["embed"], clock["retrieval"],
                           time.perf_counter() - started, nll_with, nll_without)
