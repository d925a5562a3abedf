"""Pipelined decoding: the prompts in independent groups, each with its own stepper (its own cache),
interleaved so that each group's retrieval is in flight while another group's model computes.

With two groups A and B, `decode.drive` runs their decode loops round-robin:

    A: model step t, send retrieval t ─┐                       ┌─ wait t, choose, model step t+1, send ...
    B:                                 └─ model step t, send t ┘                                ...

so A's request is served while B computes and B's while A computes; a step waits only for whatever
latency the other group's compute did not cover. Compared with splitting one step's batch in halves,
neither group's request has to be waited for right after it is sent.

The price is two forwards of half the batch (and two requests) per step instead of one. With c the cost
of a half-batch forward, C of the full one and R the retrieval latency, a round of both groups takes
max(2c, c + R) against C + R serially: the time saved is at most C - c, so the pipeline hides retrieval
only where a forward's cost grows with its rows (large batches, compute-bound models), not where it is
dominated by per-call overhead and weight reads (small batches), and only when the retrieval's latency
is not CPU work competing with the model for the same cores.

Groups never exchange rows: greedy and sampling rows are independent (a row samples from its own
generator, seeded by its index in the whole batch: `decode.row_generators`), and beam search keeps each
prompt's beams inside its group, so every prompt gets the tokens serial `generate` gives it. A group's
forward runs on fewer rows than serial's, whose matrix products round differently in the last bits: the
log-probs agree with serial's to about 1e-6, not bit for bit, and a token could differ at an exact near-tie.

Example:
    >>> stepper = KnnLMStepper(lm, retriever, lam=0.25, overlap=True)   # generate() pipelines it
    >>> out = generate_pipelined(stepper, prompt, GenerateConfig(max_new_tokens=32))
    >>> stepper.stats.retrieval_s - stepper.stats.wait_s                 # retrieval time hidden, both groups
"""

from __future__ import annotations

from typing import Protocol

import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.generate import decode_loop, drive
from lm_worker.decoding.stepper import SplitStepper, Stepper


class ForkableStepper(Protocol):
    """A stepper (`Stepper` or, to overlap anything, `SplitStepper`) that can make independent copies of
    itself: same model and retrieval, own cache, shared `stats`."""

    def fork(self) -> Stepper | SplitStepper: ...


def split_groups(n: int, groups: int = 2) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of `groups` contiguous groups of n prompts, sizes differing by at most one
    (fewer groups when n < groups)."""
    groups = max(1, min(groups, n))
    edges = [i * n // groups for i in range(groups + 1)]
    return list(zip(edges[:-1], edges[1:]))


def merge_outputs(outputs: list[GenerateOutput], pad: int) -> GenerateOutput:
    """The groups' outputs as one, rows in group order; shorter token tensors are padded with `pad`."""
    width = max(out.tokens.shape[1] for out in outputs)
    tokens = [torch.nn.functional.pad(out.tokens, (0, width - out.tokens.shape[1]), value=pad) for out in outputs]
    return GenerateOutput(torch.cat(tokens), *(torch.cat([getattr(out, name) for out in outputs])
                                               for name in ("log_probs", "lengths", "scores")))


@torch.no_grad()
def generate_pipelined(stepper: ForkableStepper, prompt: torch.Tensor, config: GenerateConfig = GenerateConfig(),
                       groups: int = 2) -> GenerateOutput:
    """`generate`, with the prompts decoded in `groups` interleaved groups (see the module doc).

    Args:
        stepper: a stepper with `fork()`, e.g. `KnnLMStepper`; each group decodes with a fork of it, so its
            own cache is left as it was, and the forks' timings add up in its `stats`. Retrieval overlaps
            compute only if the forks have the two-phase `SplitStepper` API.
        prompt: (B, T) long token ids.
        config: as for `generate`; beam search puts all of a prompt's beams in its prompt's group.
        groups: how many groups (at most B); 1 decodes serially with the stepper itself.

    Returns:
        The `GenerateOutput` serial `generate` returns for the same prompts (rows in prompt order; log-probs
        equal to about 1e-6, see the module doc).

    Raises:
        ValueError: an empty or non-2-D prompt.
    """
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (B, T) tensor, got shape {tuple(prompt.shape)}")
    prompt = prompt.long()
    bounds = split_groups(prompt.shape[0], groups)
    if len(bounds) == 1:
        return drive([decode_loop(stepper, prompt, config)])[0]
    loops = [decode_loop(stepper.fork(), prompt[lo:hi], config, first_row=lo) for lo, hi in bounds]
    return merge_outputs(drive(loops), pad=config.eos_id if config.eos_id is not None else 0)
