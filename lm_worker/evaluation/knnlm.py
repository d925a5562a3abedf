"""kNN-LM scoring (Khandelwal et al., ICLR 2020), in probability space:

    p(y | x) = λ · p_kNN(y | x) + (1 - λ) · p_LM(y | x),
    p_kNN(y | x) ∝ Σ_{neighbours i with value y} exp(-d_i / T),

d the squared L2 distance of the context's key to neighbour i's key, over the k neighbours found.
Neighbours that are missing (value -1, distance inf) weigh nothing; a context with no neighbour at
all has p_kNN = 0 everywhere, so its interpolated probability is (1 - λ) · p_LM (in decoding at λ = 1,
where that is 0 for every token, such a row takes p_LM: `mix_log_probs`).

Example:
    >>> knn = knn_target_log_prob(distances, values, targets, temperature=1.0)  # (N,)
    >>> mixed = interpolate(lm_target_log_prob, knn, lam=0.25)                  # (N,)
    >>> step = mix_log_probs(lm_log_probs, distances, values, lam=0.25)          # (N, V), decoding
"""

from __future__ import annotations

import math

import torch


def _neighbour_log_weights(distances: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(-d / T) over the valid neighbours (N, k); -inf for missing ones."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    d = distances.to(torch.float32)  # (N, k)
    valid = (values >= 0) & torch.isfinite(d)  # (N, k)
    d = d.masked_fill(~valid, math.inf)
    # Shift by the nearest distance before dividing: d - d_min is exact for close distances, so far
    # neighbours (d ~ 1e4) keep full float32 precision instead of cancelling two large numbers.
    nearest = d.min(dim=-1, keepdim=True).values  # (N, 1), inf if no neighbour
    logits = -(d - nearest.masked_fill(~torch.isfinite(nearest), 0.0)) / temperature  # (N, k), -inf if missing
    logits = logits.masked_fill(~valid, -math.inf)
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1), -inf if no neighbour
    return logits - norm.masked_fill(~torch.isfinite(norm), 0.0)


def knn_target_log_prob(distances: torch.Tensor, values: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """log p_kNN(target) per context: distances (N, k), values (N, k) long, targets (N,) -> (N,).

    -inf where no neighbour carries the target (or there is no neighbour).
    """
    w = _neighbour_log_weights(distances, values, temperature)  # (N, k)
    w = w.masked_fill(values != targets[:, None], -math.inf)
    return torch.logsumexp(w, dim=-1)  # (N,)


def knn_log_probs(distances: torch.Tensor, values: torch.Tensor, vocab_size: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """log p_kNN over the whole vocabulary: distances (N, k), values (N, k) long -> (N, V).

    Computed in log space, as `knn_target_log_prob`: a neighbour far beyond the nearest (d - d_min
    over ~100·T, whose weight exp(-d / T) would underflow in float32) keeps its log-probability.
    Decoding, where the next token is not known yet, mixes with `mix_log_probs` instead: the same
    mixture without building this (N, V) array; this is its dense reference.
    """
    tokens = values.clamp(min=0)  # (N, k): missing neighbours (weight 0) point at token 0
    at_tokens = _token_log_probs(_neighbour_log_weights(distances, values, temperature), tokens, vocab_size)  # (N, k)
    out = torch.full((values.shape[0], vocab_size), -math.inf, dtype=at_tokens.dtype, device=at_tokens.device)
    return out.scatter_(1, tokens, at_tokens)  # (N, V)


def _token_log_probs(log_weights: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p_kNN of each neighbour's token, at each neighbour: log weights (N, k) (-inf for missing
    neighbours), tokens (N, k) long -> (N, k), equal wherever two neighbours carry one token.

    Each token's logsumexp over its neighbours, shifted by that token's own largest log weight, so that
    no weight underflows however far the token's neighbours lie. One (N, V) scratch row per context holds
    first the per-token maxima, then the per-token sums (added in neighbour order); only the neighbours'
    tokens of it are written or read.
    """
    scratch = torch.zeros(tokens.shape[0], vocab_size, dtype=log_weights.dtype, device=log_weights.device)
    scratch.scatter_reduce_(1, tokens, log_weights, "amax", include_self=False)  # (N, V): max at each token
    shift = scratch.gather(1, tokens)  # (N, k)
    shift = shift.masked_fill(torch.isneginf(shift), 0.0)  # a token of missing neighbours only: weights all 0
    scratch.scatter_(1, tokens, 0.0).scatter_add_(1, tokens, (log_weights - shift).exp())  # (N, V): sums
    return scratch.gather(1, tokens).log() + shift  # (N, k)


def check_mixing(lam: float, temperature: float) -> None:
    """ValueError unless λ lies in [0, 1] and the neighbours' temperature is positive and finite."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"the neighbours' temperature must be > 0 and finite, got {temperature}")


def check_knnlm_inputs(model: torch.nn.Module, retriever) -> None:
    """ValueError when `model` cannot query `retriever`'s datastore as a kNN-LM: a RETRO model (it makes
    no kNN-LM keys), a datastore of inner products (the neighbours' weights are softmax(-d / T) of squared
    L2 distances d), a datastore whose manifest says it is another kind, or one whose keys another model
    made (the manifest's `encoder`, a model fingerprint, is not this model's: its queries would live in
    another space, and the scores come out plausible and wrong). A datastore whose manifest says
    neither (keys of your own) passes."""
    from lm_worker.models.fingerprint import model_fingerprint
    from lm_worker.models.retro import Retro

    if isinstance(model, Retro):
        raise ValueError("kNN-LM takes a language model (a TransformerLM or a Hugging Face causal LM), got a "
                         "Retro model: decode it with RetroStepper, evaluate it with evaluate_retro")
    metric = getattr(retriever, "metric", None)
    if metric not in (None, "", "l2"):  # softmax(-d / T) of an inner product would favour the least similar
        raise ValueError(f"kNN-LM weighs neighbours by their squared L2 distances; the datastore's metric is "
                         f"{shown(str(metric))}: build it with --metric l2")
    metadata = getattr(retriever, "metadata", None) or {}
    kind = metadata.get("kind")  # the manifest's values may be anything JSON holds: compared as text
    if kind is not None and str(kind) != "knnlm":
        raise ValueError(f"the datastore is a {shown(kind)} datastore (its manifest's kind), not a kNN-LM one")
    made_by = str(metadata.get("encoder") or "")
    if made_by.startswith("lm:") and made_by != (mine := model_fingerprint(model)):
        raise ValueError(f"the datastore's keys were made by the model {shown(made_by)}, not by this one "
                         f"({mine!r}): query it with the model that built it, or build one with this model")


def shown(value: object, limit: int = 80) -> str:
    """A datastore's metadata value (the datastore may come from anyone) for a message: `repr` of the first
    `limit` characters of its text (`str`, for a value that is no string), so that no newline or control
    character it holds reaches a terminal or a log."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def interpolate(lm_log_prob: torch.Tensor, knn_log_prob: torch.Tensor, lam: float) -> torch.Tensor:
    """log(λ · p_kNN + (1 - λ) · p_LM), elementwise; λ = 0 returns `lm_log_prob` itself, exactly."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    if lam == 0.0:
        return lm_log_prob
    if lam == 1.0:
        return knn_log_prob
    return torch.logaddexp(lm_log_prob + math.log1p(-lam), knn_log_prob + math.log(lam))


def mix_log_probs(lm_log_probs: torch.Tensor, distances: torch.Tensor, values: torch.Tensor, lam: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """log(λ · p_kNN + (1 - λ) · p_LM) over the whole vocabulary: the LM's log-probs (N, V), the
    neighbours' distances (N, k) and values (N, k) long -> (N, V).

    The numbers of `interpolate(lm_log_probs, knn_log_probs(...), lam)`, computed where p_kNN is not
    zero only: elsewhere the mixture is log(1 - λ) + log p_LM, and logaddexp with -inf returns its other
    operand exactly, so those entries are the dense mixture's bit for bit. Where p_kNN > 0 they take
    log p_kNN from the same log-space sums as `knn_log_probs` (a far neighbour's token keeps its tiny
    p_kNN) and may differ from the dense mixture in the last bit. Every decoder mixes with this function,
    and a row's numbers do not depend on the rows mixed with it, so decoders agree with each other bit for
    bit. A decoding step so costs one pass over (N, V) instead of six (the log over the vocabulary and the
    logaddexp were most of a step's mixing). With λ = 1 a row the service found no neighbour for takes
    the LM's log-probs, as no token could be chosen from p_kNN = 0.
    """
    if lam == 0.0:
        return lm_log_probs
    if lam == 1.0:  # p_kNN alone; a row with no neighbour has none (every entry -inf): it decodes from the LM
        knn = knn_log_probs(distances, values, lm_log_probs.shape[-1], temperature)  # (N, V)
        found = ((values >= 0) & torch.isfinite(distances)).any(dim=-1, keepdim=True)  # (N, 1)
        return torch.where(found, knn, lm_log_probs)
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    tokens = values.clamp(min=0)  # (N, k)
    weights = _neighbour_log_weights(distances, values, temperature)  # (N, k)
    knn = _token_log_probs(weights, tokens, lm_log_probs.shape[-1])  # (N, k), as knn_log_probs sums it
    near = _logaddexp(lm_log_probs.gather(1, tokens) + math.log1p(-lam), knn + math.log(lam))  # (N, k)
    return (lm_log_probs + math.log1p(-lam)).scatter_(1, tokens, near)  # (N, V)


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) elementwise, each entry's bits whatever the tensor's size: torch.logaddexp
    rounds the entries past the last whole SIMD vector otherwise than those within one, so a row mixed
    alone (a speculative decoder settling one row) and in a batch (serial decoding) could differ in the last
    bit. Where either operand is -inf the other is returned exactly."""
    high = torch.maximum(a, b)
    out = high + torch.log1p(torch.exp(-(a - b).abs()))
    return torch.where(torch.isneginf(torch.minimum(a, b)), high, out)
