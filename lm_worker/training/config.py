"""How to train (`TrainConfig`), what a run reports (`TrainReport`), the model config of a preset, and
the learning-rate schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lm_worker.models.checkpoint import MODELS
from lm_worker.models.retro import RetroConfig
from lm_worker.models.transformer_lm import LMConfig

KINDS = MODELS  # kind -> (config class, model class)


PRESETS = ("tiny", "small", "gpu")
# The held-out text and the pipeline's two parts of it (`lm_worker.pipeline.data_stage.split_heldout`): "valid",
# where kNN-LM's temperature is chosen, and "test", where perplexity is reported. A model never trains on them.
HELD_OUT = ("heldout", "valid", "test")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `preset` picks `LMConfig`/`RetroConfig` tiny, small or gpu; for RETRO, `seq_len` must
    be a multiple of the chunk length (the preset's unless `chunk_len` is set) and K comes from the
    neighbours file. `vocab_size` 0 takes the tokenizer's (DATA/tokenizer.json). `init_from` (RETRO only) is a
    base LM checkpoint to retro-fit (`lm_worker.training.retrofit`): the decoder takes the LM's shape and
    weights, and with `freeze_base` only the new layers train. `split` is the folder of the data the model
    trains on: "train", or "retro" (`prepare_retro_split`), text the LM never trained on, for retro-fitting
    RETRO onto it; never a held-out one (`HELD_OUT`). `grad_clip` 0 clips no gradient."""

    kind: str = "lm"
    preset: str = "small"
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    chunk_len: int = 0
    vocab_size: int = 0
    init_from: str = ""
    freeze_base: bool = True
    split: str = "train"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ValueError(f"min_lr must be >= 0 and finite, got {self.min_lr}")
        for name in ("warmup", "threads"):  # threads 0: torch's default
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):  # grad_clip 0: no clipping; < 0 would flip the gradients
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if not self.split or self.split != Path(self.split).name or self.split in (".", "..", *HELD_OUT):
            raise ValueError(f"split must name a folder of the data to train on (train, retro), not a "
                             f"held-out one ({', '.join(HELD_OUT)}), got {self.split!r}")
        if self.init_from and self.kind != "retro":
            raise ValueError(f"init_from retro-fits a base LM into RETRO: it needs kind 'retro', not {self.kind!r}")


@dataclass(frozen=True)
class TrainReport:
    """What a training run did. `train_loss` is the mean of the last 10 steps' losses; `tokens_per_s` counts the
    time of this call's optimizer steps only (batches included; evaluation and checkpoints not)."""

    steps: int
    train_loss: float
    heldout_loss: float
    tokens_per_s: float
    checkpoint: Path
    losses: Path
    plot: Path


def model_config(config: TrainConfig, vocab_size: int, n_neighbours: int = 2) -> LMConfig | RetroConfig:
    """The model config of a training config's kind and preset."""
    config_cls = KINDS[config.kind][0]
    overrides = {}
    if config.kind == "lm":
        preset_len = getattr(config_cls, config.preset)(vocab_size).max_len
        overrides["max_len"] = max(preset_len, config.seq_len)
    else:
        overrides["n_neighbours"] = n_neighbours
        if config.chunk_len:
            overrides["chunk_len"] = config.chunk_len
    return getattr(config_cls, config.preset)(vocab_size, **overrides)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr` (at most `lr`)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    min_lr = min(config.min_lr, config.lr)
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    """"auto" is cuda when available, else cpu. ValueError for a CUDA device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device: {str(err).splitlines()[0]}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device{'s' * (count != 1)} "
                             f"(torch {torch.__version__}); give cpu or auto")
    return device

