"""RETRO-fitting: a RETRO model whose decoder is a trained base LM (Borgeaud et al., section 4.2).

The decoder's embeddings, blocks, final norm and head are copied from a `TransformerLM` (the two
share module names), chunked cross-attention and the neighbour encoder are added, and the output
projection of every CCA layer starts at zero. So before any training the retro-fitted model's
logits equal the LM's, with or without neighbours; training then teaches the new layers to use
the neighbours. With `freeze_base` only the new layers train (a few percent of the work of a
model from scratch), and with neighbours withheld the model stays exactly the base LM.

Example:
    >>> config = retrofit_config(lm.config, chunk_len=16, n_neighbours=2)
    >>> retro = retrofit(lm, config, freeze_base=True)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

log = logging.getLogger(__name__)

NEW_MODULES = ("cca", "norm_cca", "encoder")  # what RETRO adds to the LM's modules


def retrofit_config(lm: LMConfig, chunk_len: int, n_neighbours: int, enc_n_layer: int = 2) -> RetroConfig:
    """A RETRO config with the LM's decoder shape; CCA in every other layer from layer 1."""
    return RetroConfig(vocab_size=lm.vocab_size, chunk_len=chunk_len, n_neighbours=n_neighbours,
                       n_layer=lm.n_layer, n_head=lm.n_head, d_model=lm.d_model, d_ff=lm.d_ff,
                       enc_n_layer=enc_n_layer, cca_layers=tuple(range(1, lm.n_layer, 2)), dropout=lm.dropout)


def is_base_parameter(name: str) -> bool:
    """True for a parameter that the retro-fitted model took from the LM."""
    return name.split(".", 1)[0] not in NEW_MODULES


def freeze_base(model: Retro) -> int:
    """Stops gradients to the LM's parameters; returns how many parameters still train."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not is_base_parameter(name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def retrofit(lm: TransformerLM, config: RetroConfig, freeze: bool = True) -> Retro:
    """A `Retro` with `lm`'s weights, new layers that start as a no-op, and optionally a frozen base.

    Raises:
        ValueError: `config`'s decoder is not the LM's shape.
    """
    c = lm.config
    shape = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff")
    if any(getattr(config, name) != getattr(c, name) for name in shape):
        raise ValueError(f"RETRO decoder {[getattr(config, n) for n in shape]} does not match the LM's "
                         f"{[getattr(c, n) for n in shape]} ({', '.join(shape)})")
    model = Retro(config)
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    if unexpected or any(is_base_parameter(name) for name in missing):
        raise ValueError(f"the LM's weights do not fit RETRO's decoder: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for layer in model.cca.values():
            nn.init.zeros_(layer.attn.proj.weight)  # CCA adds nothing until it learns to
    trainable = freeze_base(model) if freeze else sum(p.numel() for p in model.parameters())
    log.info("retro-fitted a %d-layer LM with CCA in layers %s; %.2fM of %.2fM parameters train", c.n_layer,
             list(config.decoder_cca_layers), trainable / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)
    return model
