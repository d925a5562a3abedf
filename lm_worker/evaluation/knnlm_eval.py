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

import logging
import math
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_worker.data.token_store import TokenStore
from lm_worker.evaluation.batches import (
    Clock,
    check_scorable,
    check_window,
    completed,
    lm_step,
    make_batch,
    plan_batches,
    select_batches,
)
from lm_worker.evaluation.config import EvalConfig, perplexity
from lm_worker.evaluation.knnlm import check_knnlm_inputs, interpolate, knn_target_log_prob
from lm_worker.evaluation.pointers import follow_pointers
from lm_worker.retrieval.config import KnnNeighbours
from lm_worker.sources.exclusions import knn_exclusions

log = logging.getLogger(__name__)


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
        ValueError: the window is longer than the model's `max_len`, or the store too short to score.
    """
    check_window(model, config)
    check_scorable(store, config)
    model.eval()
    nll, tokens = 0.0, 0
    for windows in tqdm(plan_batches(store, config), desc="lm eval", unit="batch", disable=not progress):
        lm, _ = lm_step(model, make_batch(store, windows))
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

    With pointers (`EvalConfig.pointer_steps`), the `tokens - searched` followed positions score
    with temperature `followed_temperature`; `perplexity` takes one λ everywhere, while `best_lambda`
    (searched positions) and `followed_lambda` (followed ones) are the best pair, which gives
    `best_perplexity`. `followed_nll` and `searched_nll` (per λ) are the followed and the searched
    positions' shares of `nll`, each summed on its own: a λ impossible at one followed position (inf)
    leaves the searched positions' sum finite. A result made without `searched_nll` (saved before
    results kept it) takes it as `nll` less `followed_nll`, inf wherever `nll` is, as those results did.

    `best_lambda`, `followed_lambda` and `best_perplexity` are the best of this text's own sweep, an
    optimistic figure, unless `lambdas_from` names the other text they were chosen on (`at_lambdas`):
    a held-out figure takes its λs from validation text, as the pipeline does.
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
    searched: int = 0  # positions searched: `tokens`, or fewer where pointers were followed (pointer_steps)
    followed_lambda: float = 0.0
    followed_temperature: float = 0.0
    followed_nll: dict[float, float] = field(default_factory=dict)
    lambdas_from: str = ""  # the text best_lambda and followed_lambda were chosen on; "": this one's sweep
    searched_nll: dict[float, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.searched_nll:  # made before results kept it: every position's less the followed ones'
            object.__setattr__(self, "searched_nll", {lam: _searched_by_difference(self.nll, self.followed_nll, lam)
                                                      for lam in self.nll})

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.inf

    def to_dict(self) -> dict:
        out = asdict(self)
        out["perplexity"] = {str(lam): ppl for lam, ppl in self.perplexity.items()}
        out["nll"] = {str(lam): v for lam, v in self.nll.items()}
        out["followed_nll"] = {str(lam): v for lam, v in self.followed_nll.items()}
        out["searched_nll"] = {str(lam): v for lam, v in self.searched_nll.items()}
        return out


def _searched_by_difference(nll: dict[float, float], followed_nll: dict[float, float], lam: float) -> float:
    """The searched positions' share of λ's summed NLL where only the whole and the followed positions' share
    are known: their difference, exact where nothing was followed. inf - inf (a λ at which both parts are
    impossible) is no total: it counts as inf, never as the best."""
    return nll[lam] - followed_nll.get(lam, 0.0) if math.isfinite(nll[lam]) else math.inf


def best_lambdas(nll: dict[float, float], followed_nll: dict[float, float], tokens: int, followed: int,
                 searched_nll: dict[float, float] | None = None) -> tuple[float, float, float]:
    """(λ at searched positions, λ at followed ones, perplexity): the best pair, from the summed negative
    log-likelihoods per λ over every position (`nll`), over the `followed` positions alone (`followed_nll`)
    and over the searched ones alone (`searched_nll`; None: `nll` less `followed_nll`, which makes a λ
    impossible at every searched position wherever it is at one followed position)."""
    if not followed:
        best = min(nll, key=lambda lam: nll[lam])
        return best, best, perplexity(nll[best], tokens)
    searched = searched_nll or {lam: _searched_by_difference(nll, followed_nll, lam) for lam in nll}
    lam_s = min(nll, key=lambda lam: searched[lam])
    lam_f = min(followed_nll, key=lambda lam: followed_nll[lam])
    return lam_s, lam_f, perplexity(searched[lam_s] + followed_nll[lam_f], tokens)


def at_lambdas(result: KnnEvalResult, lam: float, followed_lam: float, chosen_on: str) -> KnnEvalResult:
    """`result` with its headline at λs chosen on other text (`chosen_on`, e.g. the validation split):
    `lam` at searched positions, `followed_lam` at followed ones, both among the λs it was evaluated at.

    Raises:
        ValueError: a λ that `result` was not evaluated at.
    """
    for name, value in (("lam", lam), ("followed_lam", followed_lam)):
        if value not in result.nll:
            raise ValueError(f"{name}={value:g} is not among the evaluated λs {sorted(result.nll)}")
    ppl = perplexity(result.searched_nll[lam] + result.followed_nll.get(followed_lam, 0.0), result.tokens)
    base = result.base_perplexity
    return replace(result, best_lambda=lam, followed_lambda=followed_lam, best_perplexity=ppl,
                   relative_reduction=1.0 - ppl / base if math.isfinite(base) else 0.0, lambdas_from=chosen_on)


class _Sums:
    """Summed negative log-likelihoods: the base LM's, and each λ's over every position, over the
    followed ones and over the searched ones (each its own sum: a followed position impossible at λ
    leaves the searched ones' sum finite)."""

    def __init__(self, lambdas: tuple[float, ...]):
        self.tokens, self.followed_tokens, self.base = 0, 0, 0.0
        self.per_lambda = dict.fromkeys(lambdas, 0.0)
        self.followed = dict.fromkeys(lambdas, 0.0)
        self.searched = dict.fromkeys(lambdas, 0.0)

    def add(self, lm: torch.Tensor, targets: torch.Tensor, found: KnnNeighbours, temperature: float,
            followed: np.ndarray | None = None, followed_temperature: float = 1.0) -> None:
        """Scores one batch: lm (n,) the LM's log-prob of each target; `followed` (n,) bool marks the
        positions whose neighbours came from pointers, scored at `followed_temperature`."""
        distances, values = torch.as_tensor(np.array(found.distances)), torch.as_tensor(np.array(found.values))
        knn = knn_target_log_prob(distances, values, targets, temperature)  # (n,)
        mask = torch.as_tensor(followed) if followed is not None else torch.zeros(len(lm), dtype=torch.bool)
        if mask.any():
            knn[mask] = knn_target_log_prob(distances[mask], values[mask], targets[mask], followed_temperature)
        self.tokens += len(lm)
        self.followed_tokens += int(mask.sum())
        self.base += -lm.double().sum().item()
        for lam in self.per_lambda:
            mixed = interpolate(lm, knn, lam).double()  # (n,)
            self.per_lambda[lam] += -mixed.sum().item()
            self.followed[lam] += -mixed[mask].sum().item()
            self.searched[lam] += -mixed[~mask].sum().item()


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
        ValueError: the window exceeds the model's `max_len`, the store is too short to score, the keys'
            dimension is not the datastore's, or `exclude_own_document` is set for a datastore not built from `store`.
    """
    check_window(model, config)
    check_scorable(store, config)
    check_knnlm_inputs(model, retriever)
    if config.exclude_own_document and retriever.ntotal != len(store) - 1:
        raise ValueError(f"exclude_own_document needs the datastore built from this store: it has "
                         f"{retriever.ntotal} rows, the store {len(store) - 1} positions")
    model.eval()
    sums, clock, started = _Sums(config.lambdas), Clock(model=0.0, retrieval=0.0, wait=0.0), time.perf_counter()
    searched = 0  # positions searched
    followed_temperature = config.temperature * config.pointer_temperature_scale

    def retrieve(keys: np.ndarray, exclude, batch) -> Future:
        nonlocal searched
        if config.pointer_steps:
            return follow(keys, batch)
        searched += len(keys)
        sent = time.perf_counter()
        if config.overlap:
            future = retriever.submit_knn(keys, exclude)
        else:  # the search blocks: all of it is waited for
            with clock.timing("wait"):
                future = completed(retriever.knn(keys, exclude))
        future.add_done_callback(lambda _: clock.add("retrieval", time.perf_counter() - sent))
        return future

    def follow(keys: np.ndarray, batch) -> Future:
        """Neighbours from one search per run of positions and the pointers after it, blocking. Each
        window's scored positions are a run of their own, so a round's request searches for all windows."""
        nonlocal searched
        with clock.timing("retrieval"), clock.timing("wait"):
            found, followed = follow_pointers(keys, batch.scored_targets.numpy(), batch.positions,
                                              lambda rows, steps: retriever.knn(keys[rows], None, steps),
                                              config.pointer_steps, config.min_pointers,
                                              agreement=config.pointer_agreement, temperature=config.temperature,
                                              crowd=config.pointer_crowd, runs=batch.rows.numpy())
        searched += int((~followed).sum())
        return completed((found, followed))

    def score(lm: torch.Tensor, targets: torch.Tensor, future: Future) -> None:
        with clock.timing("wait"):
            found = future.result()
        found, followed = found if isinstance(found, tuple) else (found, None)
        sums.add(lm, targets, found, config.temperature, followed, followed_temperature)

    pending = None  # the previous batch, scored once the model has run this one
    for windows in tqdm(select_batches(plan_batches(store, config), batches), desc="kNN-LM eval", unit="batch",
                        disable=not progress):
        batch = make_batch(store, windows)
        with clock.timing("model"):
            lm, keys = lm_step(model, batch)
        if keys.shape[1] != retriever.dimension:
            raise ValueError(f"the model's keys have dimension {keys.shape[1]}, the datastore {retriever.dimension}")
        exclude = knn_exclusions(store, batch.positions) if config.exclude_own_document else None
        current = (lm, batch.scored_targets, retrieve(keys, exclude, batch))
        if pending is not None:
            score(*pending)
        pending = current
    if pending is not None:
        score(*pending)
    base = perplexity(sums.base, sums.tokens)
    per_lambda = {lam: perplexity(nll, sums.tokens) for lam, nll in sums.per_lambda.items()}
    best, best_followed, best_ppl = best_lambdas(sums.per_lambda, sums.followed, sums.tokens, sums.followed_tokens,
                                                 sums.searched)
    reduction = 1.0 - best_ppl / base if math.isfinite(base) else 0.0
    log.log(logging.INFO if batches is None else logging.DEBUG,
            "kNN-LM over %d tokens: base perplexity %.3f, best λ %.2f gives %.3f (%.1f%% lower)",
            sums.tokens, base, best, best_ppl, 100 * reduction)
    return KnnEvalResult(sums.tokens, base, per_lambda, best, best_ppl, reduction, retriever.config.k,
                         config.temperature, clock["model"], clock["retrieval"], clock["wait"],
                         time.perf_counter() - started, sums.base, dict(sums.per_lambda), searched, best_followed,
                         followed_temperature, dict(sums.followed), searched_nll=dict(sums.searched))
