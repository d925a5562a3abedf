"""Decoding: greedy, sampling with temperature / top-k / top-p, and beam search with length
normalisation and EOS, over any stepper (`lm_worker.decoding.stepper`).

Each strategy is a decode loop written as a generator that yields while a step is in flight; `drive`
runs loops round-robin, so with several loops (`lm_worker.decoding.pipelined`) one loop's retrieval is in
flight while another computes. `generate` runs one loop, or the pipeline when the stepper asks for it
(`stepper.pipelined`, e.g. `KnnLMStepper(overlap=True)`).

Example:
    >>> stepper = LMStepper(model)
    >>> out = generate(stepper, prompt, GenerateConfig(strategy="beam", num_beams=4, eos_id=tok.eos_id))
    >>> out.tokens, out.scores  # (B, T_new) best beam per prompt, (B,) its normalised score
"""

from __future__ import annotations

import torch

from lm_worker.decoding.beam import beam_search
from lm_worker.decoding.config import DecodeLoop, GenerateConfig, GenerateOutput
from lm_worker.decoding.sampling import sample_or_greedy
from lm_worker.decoding.stepper import SplitStepper, Stepper, expect_positions, split_phase


def decode_loop(stepper: Stepper | SplitStepper, prompt: torch.Tensor, config: GenerateConfig,
                first_row: int = 0) -> DecodeLoop:
    """The decode loop of `config.strategy` over `prompt` (B, T) long, as a generator for `drive`.

    first_row: the index of the prompt's first row in the whole batch, which seeds its rows' samplers.
    """
    expect_positions(stepper, prompt.shape[1] + config.max_new_tokens - 1)
    stepper = split_phase(stepper)
    if config.strategy == "beam":
        return beam_search(stepper, prompt, config)
    return sample_or_greedy(stepper, prompt, config, first_row)


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


def _model_setting(stepper, name: str):
    """The stepper's model's config value `name` (`max_len`, `vocab_size`), None where it has none."""
    return getattr(getattr(getattr(stepper, "model", None), "config", None), name, None)


def check_room(stepper, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError when decoding would feed the `model` of `stepper` (a stepper, or anything with the model
    as `model`), where it has a `max_len`, more positions than it takes: the prompt's and
    max_new_tokens - 1 (the last token is never fed)."""
    max_len = _model_setting(stepper, "max_len")
    if max_len is not None and prompt_len + max_new_tokens - 1 > max_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} - 1 exceeds the model's "
                         f"max_len {max_len}")


def check_token_ids(stepper, prompt: torch.Tensor) -> None:
    """ValueError unless `prompt` holds integer token ids, each in [0, vocab_size) of the stepper's model
    where it has one (a float prompt would be cut to integers, an id past the vocabulary fail in the
    embedding, deep in the first step)."""
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    vocab = _model_setting(stepper, "vocab_size")
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        raise ValueError(f"prompt holds token id {bad}, outside the model's vocabulary [0, "
                         f"{vocab if vocab is not None else 'vocab_size'})")


@torch.no_grad()
def generate(stepper: Stepper | SplitStepper, prompt: torch.Tensor,
             config: GenerateConfig = GenerateConfig()) -> GenerateOutput:
    """Continues every prompt row by up to `config.max_new_tokens` tokens.

    Args:
        stepper: the model (and its retrieval) behind `start` / `step` / `reorder`, or the two-phase
            `SplitStepper` API. A stepper whose `pipelined` attribute is true (and which can `fork`) decodes
            two prompt groups interleaved (`lm_worker.decoding.pipelined.generate_pipelined`): the same tokens.
        prompt: (B, T) long token ids, T >= 1, all rows the same length.
        config: strategy and its knobs.

    Returns:
        A `GenerateOutput`; greedy and sampling stop early once every row has emitted EOS, beam search
        once no live beam can beat any prompt's finished hypotheses.

    Raises:
        ValueError: an empty or non-2-D prompt, one of other than integer token ids in the model's
            vocabulary, or one too long for the model's `max_len` with `max_new_tokens` more (checked
            before any step).

    Example:
        >>> generate(LMStepper(model), prompt, GenerateConfig(strategy="sample", top_p=0.9, seed=1))
    """
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (B, T) tensor, got shape {tuple(prompt.shape)}")
    if config.rows and len(config.rows) != prompt.shape[0]:
        raise ValueError(f"config.rows names {len(config.rows)} rows but the prompt has {prompt.shape[0]}")
    check_token_ids(stepper, prompt)
    prompt = prompt.long()
    check_room(stepper, prompt.shape[1], config.max_new_tokens)
    if getattr(stepper, "decodes_itself", False):  # e.g. `RaLMSpecKnnLM`: rows of different lengths
        return stepper.decode(prompt, config)
    if getattr(stepper, "pipelined", False) and prompt.shape[0] > 1:
        from lm_worker.decoding.pipelined import generate_pipelined  # imports this module: resolved at call time

        return generate_pipelined(stepper, prompt, config)
    return drive([decode_loop(stepper, prompt, config)])[0]

