"""Decoding (seed 004): greedy, sampling with temperature / top-k / top-p, and beam search with length
normalisation and EOS, over any `Stepper` (a model with its key/value cache, plus retrieval for kNN-LM
and RETRO; see `lm_worker.steppers`).

A stepper turns a prompt, then one token per row at a time, into next-token log-probabilities:

    start(prompt (B, T) long) -> (B, V)    step(tokens (B,) long) -> (B, V)    reorder(indices (B',) long)

`reorder` keeps (and duplicates) batch rows, as beam search needs. A `SplitStepper` also offers each
step in two phases, `submit_start` / `submit_step` (the model runs and the retrieval is sent; a handle
comes back) and `finish(handle)` (wait for the neighbours, mix). Each strategy is a decode loop written
as a generator that yields while a step is in flight; `drive` runs loops round-robin, so with several
loops (`lm_worker.pipelined`) one loop's retrieval is in flight while another computes. `generate` runs
one loop, or the pipeline when the stepper asks for it (`stepper.pipelined`, e.g. `KnnLMStepper(overlap=True)`).

The filters (`apply_temperature`, `top_k_filter`, `top_p_filter`) are pure functions on log-prob
tensors, applied in that order when sampling. Each row samples from its own generator, seeded with
(seed, row index) (`row_generators`), so a row's tokens do not depend on which rows share its batch.
Beam search runs every prompt's beams as one batch: one stepper call per step.

Length normalisation (beam search only): a finished hypothesis of n generated tokens (EOS included)
with summed log-prob S scores S / lp(n), with lp(n) = ((5 + n) / 6) ** alpha ("gnmt", Wu et al. 2016,
the seed's `length_norm`), n ** alpha ("power", as in Hugging Face's `length_penalty`), or 1 ("none").
alpha = 0 means no normalisation in either form.

Example:
    >>> stepper = LMStepper(model)
    >>> out = generate(stepper, prompt, GenerateConfig(strategy="beam", num_beams=4, eos_id=tok.eos_id))
    >>> out.tokens, out.scores  # (B, T_new) best beam per prompt, (B,) its normalised score
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

STRATEGIES = ("greedy", "sample", "beam")
LENGTH_NORMS = ("gnmt", "power", "none")


class Stepper(Protocol):
    """An LM advanced one token per row at a time (see the module doc)."""

    def start(self, prompt: torch.Tensor) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, indices: torch.Tensor) -> None: ...


class SplitStepper(Protocol):
    """A stepper whose steps come in two phases: `submit_*` runs the model and sends the retrieval,
    `finish` waits for it and returns the log-probs (b, V). `reorder` only between a finish and the next submit."""

    def submit_start(self, prompt: torch.Tensor) -> Any: ...

    def submit_step(self, tokens: torch.Tensor) -> Any: ...

    def finish(self, handle: Any) -> torch.Tensor: ...

    def reorder(self, indices: torch.Tensor) -> None: ...


class _WholeSteps:
    """A plain `Stepper` as a `SplitStepper`: submitting runs the whole step, its log-probs are the handle."""

    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    def submit_start(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.stepper.start(prompt)

    def submit_step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.stepper.step(tokens)

    def finish(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def reorder(self, indices: torch.Tensor) -> None:
        self.stepper.reorder(indices)


def split_phase(stepper: Stepper | SplitStepper) -> SplitStepper:
    """The stepper itself if it has the two-phase API, else an adapter that runs whole steps."""
    return stepper if hasattr(stepper, "submit_step") else _WholeSteps(stepper)


@dataclass(frozen=True)
class GenerateConfig:
    """How to decode.

    strategy: "greedy" (argmax), "sample" (temperature, then top-k, then top-p) or "beam".
    top_k: keep the k most likely tokens when sampling (0: all). top_p: keep the smallest set of most
    likely tokens whose probability reaches p (1.0: all). length_penalty is alpha of `length_norm`
    (see the module doc). eos_id: rows stop after emitting it (None: no EOS). seed: of the samplers,
    one per row (`row_generators`).
    """

    strategy: str = "greedy"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 0.6
    length_norm: str = "gnmt"
    eos_id: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.length_norm not in LENGTH_NORMS:
            raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {self.length_norm!r}")
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.top_k < 0:
            raise ValueError("max_new_tokens and num_beams must be >= 1 and top_k >= 0")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


@dataclass
class GenerateOutput:
    """What `generate` returns, one row per prompt.

    tokens: (B, T_new) long generated tokens, rows that finished early padded with eos_id.
    log_probs: (B,) summed log-prob of each row's tokens under the stepper (through its EOS; sampling
        filters do not change it). lengths: (B,) tokens generated per row, EOS included.
    scores: (B,) beam search: the best hypothesis's length-normalised score; otherwise `log_probs`.
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor


DecodeLoop = Generator[None, None, GenerateOutput]  # yields while a step is in flight, returns the output


# ---------------------------------------------------------------------------------------------
# Filters: pure functions on log-probs (B, V)
# ---------------------------------------------------------------------------------------------

def apply_temperature(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Renormalised log softmax(log p / T): T < 1 sharpens, T > 1 flattens; -inf stays -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return log_probs if temperature == 1.0 else torch.log_softmax(log_probs / temperature, dim=-1)


def top_k_filter(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps exactly the k most likely tokens per row (ties broken by `topk`), renormalised; k = 0 keeps all."""
    if k <= 0 or k >= log_probs.shape[-1]:
        return log_probs
    kept = log_probs.topk(k, dim=-1).indices  # (B, k)
    mask = torch.ones_like(log_probs, dtype=torch.bool).scatter_(-1, kept, False)  # True: drop
    return torch.log_softmax(log_probs.masked_fill(mask, -math.inf), dim=-1)


def top_p_filter(log_probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability sums to >= p, renormalised.

    A token is kept when the mass of the tokens ranked before it is still below p, so the most likely
    token is always kept; p = 1 keeps all.
    """
    if p >= 1.0:
        return log_probs
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()  # (B, V), exclusive cumulative sum
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    return torch.log_softmax(log_probs.masked_fill(drop, -math.inf), dim=-1)


def filter_log_probs(log_probs: torch.Tensor, config: GenerateConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the distribution `sample` draws from."""
    filtered = apply_temperature(log_probs.float(), config.temperature)
    return top_p_filter(top_k_filter(filtered, config.top_k), config.top_p)


def length_normaliser(length: int | torch.Tensor, alpha: float, kind: str = "gnmt") -> float | torch.Tensor:
    """lp(n): what a hypothesis's summed log-prob is divided by (see the module doc)."""
    if kind == "none" or alpha == 0.0:
        return torch.ones_like(length, dtype=torch.float32) if torch.is_tensor(length) else 1.0
    base = (5.0 + length) / 6.0 if kind == "gnmt" else length * 1.0
    return base ** alpha


# ---------------------------------------------------------------------------------------------
# Greedy and sampling
# ---------------------------------------------------------------------------------------------

def row_generators(seed: int, first_row: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """Samplers for rows first_row .. first_row + n - 1 of a batch: row r's is seeded from (seed, r) through
    numpy's `SeedSequence`, so a row draws the same tokens whether it is decoded alone or in any batch."""
    def row_seed(row: int) -> int:
        return int(np.random.SeedSequence((seed % 2 ** 64, row)).generate_state(1)[0])

    return [torch.Generator(device=device).manual_seed(row_seed(first_row + r)) for r in range(n)]


def _choose(log_probs: torch.Tensor, config: GenerateConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row (B,): argmax, or one draw per row from its filtered distribution and generator."""
    if config.strategy == "greedy":
        return log_probs.argmax(dim=-1)
    probs = filter_log_probs(log_probs, config).exp()  # (B, V)
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


def _await(stepper: SplitStepper, handle: Any) -> Generator[None, None, torch.Tensor]:
    """Yields once while the step `handle` is in flight (other loops compute meanwhile), then finishes it."""
    yield
    return stepper.finish(handle)


def _sample_or_greedy(stepper: SplitStepper, prompt: torch.Tensor, config: GenerateConfig,
                      first_row: int) -> DecodeLoop:
    B, device = prompt.shape[0], prompt.device
    generators = row_generators(config.seed, first_row, B, device) if config.strategy == "sample" else []
    log_probs = yield from _await(stepper, stepper.submit_start(prompt))  # (B, V)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    total = torch.zeros(B, dtype=torch.float32, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    out = []
    for t in range(config.max_new_tokens):
        token = _choose(log_probs, config, generators)  # (B,)
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
        log_probs = yield from _await(stepper, stepper.submit_step(token))
    return GenerateOutput(torch.stack(out, dim=1), total, lengths, total.clone())


# ---------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------

class _Hypotheses:
    """The best `width` finished hypotheses of one prompt, and when no live beam can beat them."""

    def __init__(self, width: int, config: GenerateConfig):
        self.width, self.config = width, config
        self.items: list[tuple[float, float, list[int]]] = []  # (normalised score, log-prob, tokens)
        self.done = False

    def norm(self, log_prob: float, length: int) -> float:
        return log_prob / length_normaliser(length, self.config.length_penalty, self.config.length_norm)

    def add(self, tokens: list[int], log_prob: float) -> None:
        if log_prob == -math.inf:
            return
        score = self.norm(log_prob, len(tokens))
        if len(self.items) < self.width or score > self.items[-1][0]:
            self.items.append((score, log_prob, tokens))
            self.items.sort(key=lambda item: -item[0])
            del self.items[self.width:]

    def settle(self, best_live: float, length: int) -> None:
        """Done once `width` hypotheses are in and none of the live beams (best summed log-prob `best_live`
        after `length` tokens) can beat the worst: a continuation's log-prob is at most `best_live` and its
        length lies in [length + 1, max_new_tokens], where lp is monotonic, so the bound is exact."""
        if len(self.items) < self.width:
            return
        bound = max(self.norm(best_live, length + 1), self.norm(best_live, self.config.max_new_tokens))
        self.done = best_live == -math.inf or bound <= self.items[-1][0]


def _beam_search(stepper: SplitStepper, prompt: torch.Tensor, config: GenerateConfig) -> DecodeLoop:
    """Every prompt's `num_beams` beams as one batch of B * W rows, reordered through the stepper.

    Each step takes the 2W best (beam, token) candidates per prompt: those ending in EOS within the top
    W become finished hypotheses, the W best others the new beams. A prompt is done when no live beam
    can beat its W finished ones (`_Hypotheses.settle`); at max_new_tokens the live beams finish as they are.
    """
    B, W, eos, device = prompt.shape[0], config.num_beams, config.eos_id, prompt.device
    log_probs = yield from _await(stepper, stepper.submit_start(prompt))  # (B, V)
    V = log_probs.shape[-1]
    rows = torch.arange(B, device=device).repeat_interleave(W)  # (B*W,)
    stepper.reorder(rows)
    log_probs = log_probs.float().index_select(0, rows)  # (B*W, V)
    beam_scores = torch.full((B, W), -math.inf, device=device)
    beam_scores[:, 0] = 0.0  # the W copies are identical: start from one
    history = torch.zeros(B * W, 0, dtype=torch.long, device=device)  # (B*W, t)
    hyps = [_Hypotheses(W, config) for _ in range(B)]
    for t in range(config.max_new_tokens):
        candidates = (beam_scores[..., None] + log_probs.view(B, W, V)).view(B, W * V)
        top_scores, top_index = candidates.topk(min(2 * W, W * V), dim=1)  # (B, 2W), sorted
        top_beam, top_token = top_index // V, top_index % V
        is_eos = top_token == eos if eos is not None else torch.zeros_like(top_token, dtype=torch.bool)
        _collect_finished(hyps, history, top_scores, top_beam, is_eos, W, eos)
        live_scores, pick = top_scores.masked_fill(is_eos, -math.inf).topk(W, dim=1)  # (B, W)
        source = (torch.arange(B, device=device)[:, None] * W + top_beam.gather(1, pick)).view(-1)  # (B*W,)
        token = top_token.gather(1, pick).view(-1)  # (B*W,)
        history = torch.cat([history.index_select(0, source), token[:, None]], dim=1)
        beam_scores = live_scores
        for b, h in enumerate(hyps):
            if not h.done:
                h.settle(float(beam_scores[b, 0]), t + 1)
        if all(h.done for h in hyps) or t == config.max_new_tokens - 1:
            break
        stepper.reorder(source)
        log_probs = (yield from _await(stepper, stepper.submit_step(token))).float()
    for b, h in enumerate(hyps):
        if not h.done:
            for w in range(W):
                h.add(history[b * W + w].tolist(), float(beam_scores[b, w]))
    return _best(hyps, eos, device)


def _collect_finished(hyps: list[_Hypotheses], history: torch.Tensor, scores: torch.Tensor, beams: torch.Tensor,
                      is_eos: torch.Tensor, W: int, eos: int | None) -> None:
    """Adds candidates ending in EOS among each prompt's top W as finished hypotheses."""
    for b, r in is_eos[:, :W].nonzero().tolist():
        if not hyps[b].done:
            hyps[b].add(history[b * W + int(beams[b, r])].tolist() + [eos], float(scores[b, r]))


def _best(hyps: list[_Hypotheses], eos: int | None, device: torch.device) -> GenerateOutput:
    best = [h.items[0] if h.items else (-math.inf, -math.inf, []) for h in hyps]  # none: every beam had p = 0
    width = max(len(tokens) for _, _, tokens in best)
    tokens = torch.full((len(best), width), eos if eos is not None else 0, dtype=torch.long)
    for b, (_, _, seq) in enumerate(best):
        tokens[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    out = GenerateOutput(tokens, torch.tensor([lp for _, lp, _ in best]),
                         torch.tensor([len(seq) for _, _, seq in best]), torch.tensor([s for s, _, _ in best]))
    return GenerateOutput(*(t.to(device) for t in (out.tokens, out.log_probs, out.lengths, out.scores)))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def decode_loop(stepper: Stepper | SplitStepper, prompt: torch.Tensor, config: GenerateConfig,
                first_row: int = 0) -> DecodeLoop:
    """The decode loop of `config.strategy` over `prompt` (B, T) long, as a generator for `drive`.

    first_row: the index of the prompt's first row in the whole batch, which seeds its rows' samplers.
    """
    stepper = split_phase(stepper)
    if config.strategy == "beam":
        return _beam_search(stepper, prompt, config)
    return _sample_or_greedy(stepper, prompt, config, first_row)


def drive(loops: list[DecodeLoop]) -> list[GenerateOutput]:
    """Runs decode loops round-robin to the end: each in turn finishes its step in flight, chooses its tokens
    and submits its next step, so with two or more loops each one's retrieval overlaps the others' compute."""
    results: dict[int, GenerateOutput] = {}
    while len(results) < len(loops):
        for i, loop in enumerate(loops):
            if i not in results:
                try:
                    next(loop)
                except StopIteration as stop:
                    results[i] = stop.value
    return [results[i] for i in range(len(loops))]


@torch.no_grad()
def generate(stepper: Stepper | SplitStepper, prompt: torch.Tensor,
             config: GenerateConfig = GenerateConfig()) -> GenerateOutput:
    """Continues every prompt row by up to `config.max_new_tokens` tokens.

    Args:
        stepper: the model (and its retrieval) behind `start` / `step` / `reorder`, or the two-phase
            `SplitStepper` API. A stepper whose `pipelined` attribute is true (and which can `fork`) decodes
            two prompt groups interleaved (`lm_worker.pipelined.generate_pipelined`): the same tokens.
        prompt: (B, T) long token ids, T >= 1, all rows the same length.
        config: strategy and its knobs.

    Returns:
        A `GenerateOutput`; greedy and sampling stop early once every row has emitted EOS, beam search
        once no live beam can beat any prompt's finished hypotheses.

    Raises:
        ValueError: an empty or non-2-D prompt.

    Example:
        >>> generate(LMStepper(model), prompt, GenerateConfig(strategy="sample", top_p=0.9, seed=1))
    """
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (B, T) tensor, got shape {tuple(prompt.shape)}")
    prompt = prompt.long()
    if getattr(stepper, "pipelined", False) and prompt.shape[0] > 1:
        from lm_worker.pipelined import generate_pipelined  # imports this module: resolved at call time

        return generate_pipelined(stepper, prompt, config)
    return drive([decode_loop(stepper, prompt, config)])[0]
