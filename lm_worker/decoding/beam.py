"""Beam search with length normalisation and EOS, every prompt's beams as one batch: one stepper call
per step.

Length normalisation: a finished hypothesis of n generated tokens (EOS included) with summed log-prob
S scores S / lp(n), with lp(n) = ((5 + n) / 6) ** alpha ("gnmt", Wu et al. 2016), n ** alpha
("power", as in Hugging Face's `length_penalty`), or 1 ("none"). alpha = 0 means no normalisation
in either form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lm_worker.decoding.config import DecodeLoop, GenerateConfig, GenerateOutput
from lm_worker.decoding.stepper import SplitStepper, await_step, end_decoding


def length_normaliser(length: int | torch.Tensor, alpha: float, kind: str = "gnmt") -> float | torch.Tensor:
    """lp(n): what a hypothesis's summed log-prob is divided by (see the module doc)."""
    if kind == "none" or alpha == 0.0:
        return torch.ones_like(length, dtype=torch.float32) if torch.is_tensor(length) else 1.0
    base = (5.0 + length) / 6.0 if kind == "gnmt" else length * 1.0
    return base ** alpha


class Hypotheses:
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


@dataclass
class BeamChoice:
    """One step's selection for B prompts of W beams: the ranked candidates (B, 2W) as beam * V + token,
    the rows (B*W,) the new beams continue and their tokens (B*W,), the new beams' scores (B, W) and
    histories (B*W, t + 1)."""

    top_index: torch.Tensor
    source: torch.Tensor
    token: torch.Tensor
    scores: torch.Tensor
    history: torch.Tensor


def select_beams(log_probs: torch.Tensor, scores: torch.Tensor, history: torch.Tensor, hyps: list[Hypotheses],
                 t: int, config: GenerateConfig) -> BeamChoice:
    """Step t of beam search: from the beams' log-probs (B*W, V) and scores (B, W), the 2W best (beam,
    token) candidates per prompt; those ending in EOS within the top W become finished hypotheses (added
    to `hyps`, which also settle), the W best others the new beams."""
    B, W, eos, device = scores.shape[0], config.num_beams, config.eos_id, scores.device
    V = log_probs.shape[-1]
    candidates = (scores[..., None] + log_probs.view(B, W, V)).view(B, W * V)
    top_scores, top_index = candidates.topk(min(2 * W, W * V), dim=1)  # (B, 2W), sorted
    top_beam, top_token = top_index // V, top_index % V
    is_eos = top_token == eos if eos is not None else torch.zeros_like(top_token, dtype=torch.bool)
    _collect_finished(hyps, history, top_scores, top_beam, is_eos, W, eos)
    live_scores, pick = top_scores.masked_fill(is_eos, -math.inf).topk(W, dim=1)  # (B, W)
    source = (torch.arange(B, device=device)[:, None] * W + top_beam.gather(1, pick)).view(-1)  # (B*W,)
    token = top_token.gather(1, pick).view(-1)  # (B*W,)
    history = torch.cat([history.index_select(0, source), token[:, None]], dim=1)
    for b, h in enumerate(hyps):
        if not h.done:
            h.settle(float(live_scores[b, 0]), t + 1)
    return BeamChoice(top_index, source, token, live_scores, history)


def finish_beams(hyps: list[Hypotheses], scores: torch.Tensor, history: torch.Tensor, W: int, eos: int | None,
                 device: torch.device) -> GenerateOutput:
    """The live beams of the prompts not done finish as they are; each prompt's best hypothesis."""
    for b, h in enumerate(hyps):
        if not h.done:
            for w in range(W):
                h.add(history[b * W + w].tolist(), float(scores[b, w]))
    return _best(hyps, eos, device)


def beam_search(stepper: SplitStepper, prompt: torch.Tensor, config: GenerateConfig) -> DecodeLoop:
    """Every prompt's `num_beams` beams as one batch of B * W rows, reordered through the stepper.

    Each step takes the 2W best (beam, token) candidates per prompt (`select_beams`): those ending in EOS
    within the top W become finished hypotheses, the W best others the new beams. A prompt is done when
    no live beam can beat its W finished ones (`Hypotheses.settle`); at max_new_tokens the live beams
    finish as they are.
    """
    B, W, device = prompt.shape[0], config.num_beams, prompt.device
    log_probs = yield from await_step(stepper, stepper.submit_start(prompt), last=config.max_new_tokens <= 1)  # (B, V)
    rows = torch.arange(B, device=device).repeat_interleave(W)  # (B*W,)
    stepper.reorder(rows)
    log_probs = log_probs.float().index_select(0, rows)  # (B*W, V)
    beam_scores = torch.full((B, W), -math.inf, device=device)
    beam_scores[:, 0] = 0.0  # the W copies are identical: start from one
    history = torch.zeros(B * W, 0, dtype=torch.long, device=device)  # (B*W, t)
    hyps = [Hypotheses(W, config) for _ in range(B)]
    for t in range(config.max_new_tokens):
        choice = select_beams(log_probs, beam_scores, history, hyps, t, config)
        beam_scores, history = choice.scores, choice.history
        if all(h.done for h in hyps) or t == config.max_new_tokens - 1:
            break
        stepper.reorder(choice.source)
        last = t + 2 >= config.max_new_tokens
        log_probs = (yield from await_step(stepper, stepper.submit_step(choice.token), last)).float()
    end_decoding(stepper)
    return finish_beams(hyps, beam_scores, history, W, config.eos_id, device)


def _collect_finished(hyps: list[Hypotheses], history: torch.Tensor, scores: torch.Tensor, beams: torch.Tensor,
                      is_eos: torch.Tensor, W: int, eos: int | None) -> None:
    """Adds candidates ending in EOS among each prompt's top W as finished hypotheses."""
    for b, r in is_eos[:, :W].nonzero().tolist():
        if not hyps[b].done:
            hyps[b].add(history[b * W + int(beams[b, r])].tolist() + [eos], float(scores[b, r]))


def _best(hyps: list[Hypotheses], eos: int | None, device: torch.device) -> GenerateOutput:
    best = [h.items[0] if h.items else (-math.inf, -math.inf, []) for h in hyps]  # none: every beam had p = 0
    width = max(len(tokens) for _, _, tokens in best)
    tokens = torch.full((len(best), width), eos if eos is not None else 0, dtype=torch.long)
    for b, (_, _, seq) in enumerate(best):
        tokens[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    out = GenerateOutput(tokens, torch.tensor([lp for _, lp, _ in best]),
                         torch.tensor([len(seq) for _, _, seq in best]), torch.tensor([s for s, _, _ in best]))
    return GenerateOutput(*(t.to(device) for t in (out.tokens, out.log_probs, out.lengths, out.scores)))

