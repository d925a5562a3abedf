"""Results of evaluations over disjoint batch ranges (the shares of a distributed evaluation) added
up into one: summed negative log-likelihoods in share order, so the same shares give the same
figures to the last digit whatever the number of workers."""

from __future__ import annotations

import math

from lm_worker.evaluation.config import perplexity
from lm_worker.evaluation.knnlm_eval import KnnEvalResult, best_lambdas
from lm_worker.evaluation.retro_eval import RetroEvalResult


def knn_result(body: dict) -> KnnEvalResult:
    """A `KnnEvalResult` from its `to_dict()` (JSON's text keys back to λs). One saved before results kept
    the searched positions' own sums takes them as every position's less the followed ones' (exact where
    it followed no pointer; `lm_worker.evaluation.shares.current` computes again the shares that did)."""
    body = dict(body)
    body["perplexity"] = {float(k): v for k, v in body["perplexity"].items()}
    body["nll"] = {float(k): v for k, v in body["nll"].items()}
    body["followed_nll"] = {float(k): v for k, v in body.get("followed_nll", {}).items()}
    body["searched_nll"] = {float(k): v for k, v in body.get("searched_nll", {}).items()}
    return KnnEvalResult(**body)


def combine_knn(parts: list[KnnEvalResult], seconds: float) -> KnnEvalResult:
    """One result from results over disjoint batch ranges, summed in the order given (the same parts in
    the same order give the same figures to the last digit); `seconds` is the whole run's wall time."""
    if not parts:
        raise ValueError("no results to combine")
    tokens = sum(p.tokens for p in parts)
    base_nll = math.fsum(p.base_nll for p in parts)
    nll = {lam: math.fsum(p.nll[lam] for p in parts) for lam in parts[0].nll}
    followed_nll = {lam: math.fsum(p.followed_nll.get(lam, 0.0) for p in parts) for lam in parts[0].nll}
    searched_nll = {lam: math.fsum(p.searched_nll[lam] for p in parts) for lam in parts[0].nll}
    searched = sum(p.searched for p in parts)
    base = perplexity(base_nll, tokens)
    per_lambda = {lam: perplexity(v, tokens) for lam, v in nll.items()}
    best, best_followed, best_ppl = best_lambdas(nll, followed_nll, tokens, tokens - searched, searched_nll)
    reduction = 1.0 - best_ppl / base if math.isfinite(base) else 0.0
    return KnnEvalResult(tokens, base, per_lambda, best, best_ppl, reduction, parts[0].k, parts[0].temperature,
                         sum(p.model_seconds for p in parts), sum(p.retrieval_seconds for p in parts),
                         sum(p.retrieval_wait_seconds for p in parts), seconds, base_nll, nll, searched,
                         best_followed, parts[0].followed_temperature, followed_nll, searched_nll=searched_nll)


def combine_retro(parts: list[RetroEvalResult], seconds: float) -> RetroEvalResult:
    """One RETRO result from results over disjoint batch ranges; `seconds` is the whole run's wall time."""
    if not parts:
        raise ValueError("no results to combine")
    tokens = sum(p.tokens for p in parts)
    nll, nll_without = math.fsum(p.nll for p in parts), math.fsum(p.nll_without for p in parts)
    ppl, ppl_without = perplexity(nll, tokens), perplexity(nll_without, tokens)
    reduction = 1.0 - ppl / ppl_without if math.isfinite(ppl_without) else 0.0
    return RetroEvalResult(tokens, ppl, ppl_without, reduction, parts[0].n_neighbours,
                           sum(p.model_seconds for p in parts), sum(p.embed_seconds for p in parts),
                           sum(p.retrieval_seconds for p in parts), seconds, nll, nll_without)


def combine(kind: str, bodies: list[dict], seconds: float) -> KnnEvalResult | RetroEvalResult:
    if kind == "knnlm":
        return combine_knn([knn_result(b["result"]) for b in bodies], seconds)
    return combine_retro([RetroEvalResult(**b["result"]) for b in bodies], seconds)
