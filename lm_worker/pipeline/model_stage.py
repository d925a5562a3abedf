"""The pipeline's models: the base LM, and RETRO retro-fitted onto it (or trained from scratch),
each resumed from its checkpoint and retrained only when it was started another way."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from lm_worker.pipeline.config import PipelineConfig
from lm_worker.training.config import TrainConfig

log = logging.getLogger(__name__)


def train_model(config: PipelineConfig, train_config: TrainConfig, name: str, neighbours: Path | None = None) -> Path:
    from lm_worker.training.train import train

    resume = same_start(config, train_config, name)
    if not resume:
        log.warning("%s holds a model trained from another start (init_from); training %s afresh",
                    config.run / name, name)
    report = train(train_config, config.run / "data", config.run / name, neighbours_dir=neighbours,
                   resume=resume, progress=config.progress)
    speed = f"{report.tokens_per_s:.0f} tokens/s" if report.tokens_per_s else "already trained, no step run"
    log.info("%s: %d steps, train loss %.3f, held-out loss %.3f, %s", name, report.steps, report.train_loss,
             report.heldout_loss, speed)
    return report.checkpoint


def is_trained(config: PipelineConfig, train_config: TrainConfig, name: str) -> bool:
    saved = saved_checkpoint(config, name)
    return saved is not None and saved[0] >= train_config.steps and saved[1:] == training_start(train_config)


def training_start(train_config: TrainConfig) -> tuple[bool, str]:
    """How a model's training starts: retro-fitted (has an init_from) or not, and the split it trains on."""
    return bool(train_config.init_from), train_config.split


def saved_checkpoint(config: PipelineConfig, name: str) -> tuple[int, bool, str] | None:
    """RUN/name's checkpoint: its step, whether it was retro-fitted and its training split; None if there is none."""
    from lm_worker.models.checkpoint import load_checkpoint

    path = config.run / name / "checkpoint.pt"
    if not path.exists():
        return None
    loaded = load_checkpoint(path)
    saved = loaded.extra.get("train_config", {})
    return loaded.step, bool(saved.get("init_from", "")), saved.get("split", "train")


def same_start(config: PipelineConfig, train_config: TrainConfig, name: str) -> bool:
    """False when RUN/name holds a checkpoint that started otherwise: from scratch where RUN/lm is to be
    retro-fitted or the other way round, or on another split (a run made before `retro_init` or
    `max_retro_tokens` changed). A moved run still matches."""
    saved = saved_checkpoint(config, name)
    return saved is None or saved[1:] == training_start(train_config)


def trained_parameters(config: PipelineConfig, retro) -> int:
    """RETRO's parameters that training changed: the new layers only when retro-fitted with a frozen base."""
    from lm_worker.training.retrofit import is_base_parameter

    frozen = config.retro_init == "lm" and config.retro.freeze_base
    return sum(p.numel() for n, p in retro.named_parameters() if not (frozen and is_base_parameter(n)))


def retro_train_config(config: PipelineConfig) -> TrainConfig:
    """RETRO's training settings: retro-fitted onto RUN/lm, or from scratch (`retro_init`)."""
    init_from = str(config.run / "lm" / "checkpoint.pt") if config.retro_init == "lm" else ""
    return replace(config.retro, init_from=init_from, split=config.retro_split)

