"""The pipeline's models: the base LM, and RETRO retro-fitted onto it (or trained from scratch),
each resumed from its checkpoint and retrained only when it was started another way. A saved model
trained with other settings than the run's (`MODEL_SETTINGS`), or for more steps, is refused up front
(`settings_refusal`, by `staleness.check_models`), never reused under the run's new settings."""

from __future__ import annotations

import functools
import logging
from dataclasses import fields, replace
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


# The training settings (`TrainConfig` fields) that make the model what it is: another value trains another model,
# so a saved model trained with another one is neither reused nor trained on (`settings_refusal`). Left out:
# `steps` (compared on its own: more trains the saved model on, fewer is refused: training cannot be undone);
# `eval_every`, `eval_batches` and `checkpoint_every` (when the held-out loss is measured and the model saved, not
# what it learns: the loop reseeds every step); `device`, `amp` and `threads` (where and how fast it runs, as
# `device="auto"` picks whatever the machine has); `init_from` (a path, which a moved run changes: whether the
# model is retro-fitted is its start, and the LM it was fitted onto is checked by fingerprint,
# `staleness.stale_retro`); `split` (its start too: a model started otherwise is trained afresh, `same_start`).
MODEL_SETTINGS = ("kind", "preset", "seq_len", "batch_size", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
                  "seed", "chunk_len", "vocab_size", "freeze_base")


def is_trained(config: PipelineConfig, train_config: TrainConfig, name: str) -> bool:
    saved = saved_checkpoint(config, name)
    return saved is not None and saved[0] >= train_config.steps and saved[1:] == training_start(train_config)


def training_start(train_config: TrainConfig) -> tuple[bool, str]:
    """How a model's training starts: retro-fitted (has an init_from) or not, and the split it trains on."""
    return bool(train_config.init_from), train_config.split


def saved_settings(config: PipelineConfig, name: str) -> tuple[int, dict] | None:
    """RUN/name's checkpoint: its step and the training settings it recorded (train_config); None if there is none.
    Read once per version of the file, however many checks ask (the dict is shared: not to be changed)."""
    path = config.run / name / "checkpoint.pt"
    if not path.exists():
        return None
    stamp = path.stat()
    return _settings_of(path, stamp.st_mtime_ns, stamp.st_size)


@functools.lru_cache(maxsize=8)
def _settings_of(path: Path, mtime_ns: int, size: int) -> tuple[int, dict]:
    """`saved_settings` of the checkpoint file at `path` as it was at (mtime_ns, size)."""
    from lm_worker.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    return loaded.step, loaded.extra.get("train_config", {})


def saved_checkpoint(config: PipelineConfig, name: str) -> tuple[int, bool, str] | None:
    """RUN/name's checkpoint: its step, whether it was retro-fitted and its training split; None if there is none."""
    saved = saved_settings(config, name)
    return None if saved is None else (saved[0], *started(saved[1]))


def same_start(config: PipelineConfig, train_config: TrainConfig, name: str) -> bool:
    """False when RUN/name holds a checkpoint that started otherwise: from scratch where RUN/lm is to be
    retro-fitted or the other way round, or on another split (a run made before `retro_init` or
    `max_retro_tokens` changed). A moved run still matches."""
    saved = saved_checkpoint(config, name)
    return saved is None or saved[1:] == training_start(train_config)


def changed_settings(saved: dict, asked: TrainConfig) -> dict[str, tuple]:
    """The `MODEL_SETTINGS` in which `asked` differs from a saved train_config, as name -> (saved, asked). A
    setting that a checkpoint saved before it existed counts as its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {key: (saved.get(key, defaults[key]), getattr(asked, key)) for key in MODEL_SETTINGS
            if saved.get(key, defaults[key]) != getattr(asked, key)}


def settings_refusal(config: PipelineConfig, train_config: TrainConfig, name: str) -> str | None:
    """Why RUN/name's model is neither reused nor trained on: it was trained for more steps than `steps`, or
    with other `MODEL_SETTINGS`. None when it can be (or there is none, or it started otherwise and is
    trained afresh, or it recorded no settings to compare)."""
    saved = saved_settings(config, name)
    if saved is None or not saved[1] or started(saved[1]) != training_start(train_config):
        return None
    step, settings = saved
    changed = changed_settings(settings, train_config)
    if step > train_config.steps:
        changed = {"steps": (step, train_config.steps), **changed}
    if not changed:
        return None
    return (f"{config.run / name} was trained with other settings than this run's (saved -> asked): "
            + ", ".join(f"{name}.{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()))


def started(settings: dict) -> tuple[bool, str]:
    """`training_start` of a saved train_config."""
    return bool(settings.get("init_from", "")), settings.get("split", "train")


def changes(config: PipelineConfig, train_config: TrainConfig, name: str) -> int | None:
    """The step of RUN/name's model when training would change it (train it on, or afresh when it started
    otherwise); None when it is there and trained, or there is none."""
    saved = saved_settings(config, name)
    if saved is None:
        return None
    step, settings = saved
    return step if step < train_config.steps or started(settings) != training_start(train_config) else None


def trained_parameters(config: PipelineConfig, retro) -> int:
    """RETRO's parameters that training changed: the new layers only when retro-fitted with a frozen base."""
    from lm_worker.training.retrofit import is_base_parameter

    frozen = config.retro_init == "lm" and config.retro.freeze_base
    return sum(p.numel() for n, p in retro.named_parameters() if not (frozen and is_base_parameter(n)))


def retro_train_config(config: PipelineConfig) -> TrainConfig:
    """RETRO's training settings: retro-fitted onto RUN/lm, or from scratch (`retro_init`)."""
    init_from = str(config.run / "lm" / "checkpoint.pt") if config.retro_init == "lm" else ""
    return replace(config.retro, init_from=init_from, split=config.retro_split)

