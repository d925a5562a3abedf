"""Greedy decoding and sampling with temperature, top-k and top-p.

The filters (`apply_temperature`, `top_k_filter`, `top_p_filter`) are pure functions on log-prob
tensors (B, V), applied in that order when sampling. Each row samples from its own generator, seeded
with (seed, row index) (`row_generators`), so a row's generator is seeded the same whatever rows share its
batch. The model's forward is not exactly batch-independent: a row's log-probs agree between batches to
about 1e-6, so its tokens agree except where two tokens' probabilities are that near a draw's boundary.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lm_worker.decoding.config import DecodeLoop, GenerateConfig, GenerateOutput
from lm_worker.decoding.stepper import SplitStepper, await_step, end_decoding


def apply_temperature(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Renormalised log softmax(log p / T): T < 1 sharpens, T > 1 flattens; -inf stays -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if temperature == 1.0:
        return log_probs
    # each row's best at 0 before dividing: a tiny T sends the others to -inf, not every token (NaN); the
    # best stay 0 where T is 0 in the tensor's dtype (0 / 0), and ruled-out tokens -inf where T is inf
    # in it (-inf / inf)
    shifted = log_probs - log_probs.max(dim=-1, keepdim=True).values  # (B, V)
    scaled = (shifted / temperature).masked_fill(shifted == 0, 0.0)
    return torch.log_softmax(torch.where(torch.isneginf(shifted), shifted, scaled), dim=-1)


def top_k_filter(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k most likely tokens per row, and every token tied with the k-th, renormalised; k = 0 keeps
    all. Ties kept whole, as Hugging Face's top-k does, give the same tokens on every device (which of two
    tied tokens `topk` returns first differs between CPU and CUDA)."""
    if k <= 0 or k >= log_probs.shape[-1]:
        return log_probs
    kth = log_probs.topk(k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest
    return torch.log_softmax(log_probs.masked_fill(log_probs < kth, -math.inf), dim=-1)


TOP_P_SLACK = 1e-6  # how far below p a float32 distribution's summed mass still counts as reaching p


def top_p_filter(log_probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability sums to >= p, renormalised (the
    probabilities taken relative to the row's total, where it is not 1).

    A token is kept when the mass of the tokens ranked before it is still below p, so the most likely
    token is always kept; p = 1 keeps all. Masses are summed in float64, and a mass within TOP_P_SLACK of
    p has reached it: float32 log-probs do not tell them apart (ten tokens of 0.1 reach p = 0.3 at three).
    Of tokens tied where the set ends, those of lower id are kept.
    """
    if p >= 1.0:
        return log_probs
    # stable: of tokens tied at the cut, the lower ids are kept, on every device (an unstable sort's tie
    # order differs between CPU and CUDA)
    sorted_lp, order = log_probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    cumulative = sorted_lp.double().exp().cumsum(dim=-1)  # (B, V)
    total = cumulative[..., -1:].clamp_min(torch.finfo(torch.float64).tiny)  # a row of no mass: no NaN
    cumulative = cumulative / total  # of the row's mass: a kNN-LM row without neighbours has 1 - λ
    mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)  # (B, V), exclusive
    drop_sorted = mass_before >= p - TOP_P_SLACK
    drop_sorted[..., 0] = False  # the most likely token, whatever p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    return torch.log_softmax(log_probs.masked_fill(drop, -math.inf), dim=-1)


def filter_log_probs(log_probs: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the distribution `sample` draws from."""
    filtered = apply_temperature(log_probs.float(), config.temperature)
    return top_p_filter(top_k_filter(filtered, config.top_k), config.top_p)


def row_generators(seed: int, rows: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """Samplers for `rows` of a batch (`GenerateConfig.row_indices`): row r's is seeded from (seed, r)
    through numpy's `SeedSequence`, so a row's generator is seeded the same whether it is decoded alone or in
    any batch (its tokens agree too, except at near-ties: see the module doc)."""
    def row_seed(row: int) -> int:
        return int(np.random.SeedSequence((seed % 2 ** 64, row)).generate_state(1)[0])

    return [torch.Generator(device=device).manual_seed(row_seed(r)) for r in rows]


def choose_tokens(log_probs: torch.Tensor, config: GenerateConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row (B,): argmax, or one draw per row from its filtered distribution and generator."""
    if config.strategy == "greedy":
        return log_probs.argmax(dim=-1)
    probs = filter_log_probs(log_probs, config).exp()  # (B, V)
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


def sample_or_greedy(stepper: SplitStepper, prompt: torch.Tensor, config: GenerateConfig,
                      first_row: int) -> DecodeLoop:
    B, device = prompt.shape[0], prompt.device
    sampled = config.strategy == "sample"
    generators = row_generators(config.seed, config.row_indices(B, first_row), device) if sampled else []
    log_probs = yield from await_step(stepper, stepper.submit_start(prompt), last=config.max_new_tokens <= 1)  # (B, V)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    total = torch.zeros(B, dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    out = []
    for t in range(config.max_new_tokens):
        token = choose_tokens(log_probs, config, generators)  # (B,)
        if config.eos_id is not None:
            token = token.masked_fill(finished, config.eos_id)
        live = ~finished
        total += torch.where(live, log_probs.float().gather(1, token[:, None]).squeeze(1), 0.0)
        lengths += live.long()
        out.append(token)
        if config.eos_id is not None:
            finished |= token == config.eos_id
        if bool(finished.all()) or t == config.max_new_tokens - 1:
            break
        log_probs = yield from await_step(stepper, stepper.submit_step(token), last=t + 2 >= config.max_new_tokens)
    end_decoding(stepper)
    return GenerateOutput(torch.stack(out, dim=1), total, lengths, total.clone())

