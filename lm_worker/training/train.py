"""Training of the baseline LM and of RETRO on a prepared corpus (`prepare_corpus` output).

Batches are random windows of seq_len + 1 tokens of the training split's stream (`split`: "train",
or "retro" to retro-fit RETRO on text its base LM never saw), drawn from a generator seeded by
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would. RETRO windows
start at chunk boundaries and come with the precomputed neighbours of their chunks
(`neighbours-SPLIT.npy`, int32 (n_chunks, K, 2L), row c for tokens[c*L:(c+1)*L], written by the
neighbours step). AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA.

The output folder receives `checkpoint.pt` (every `checkpoint_every` steps and at the end),
`losses.json` and `loss.png`; with `resume=True` a run continues from its checkpoint. The held-out loss is
recorded every `eval_every` steps and at the last; each checkpoint's is evaluated before it is written (and
recorded only at those steps, so a run stopped and resumed records what an uninterrupted one does): a
training loss or held-out loss that is not finite stops training with a ValueError, and the last good
checkpoint stays as it was.

Example:
    >>> report = train(TrainConfig(kind="lm", preset="small", steps=2000), Path("run/data"), Path("run/lm"))
    >>> report.heldout_loss, report.tokens_per_s
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lm_worker.models.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig
from lm_worker.training.batches import Windows, open_data
from lm_worker.training.config import KINDS, TrainConfig, TrainReport, lr_at, pick_device
from lm_worker.training.loss_plot import loss_plot_title, plot_losses

BASE_FINGERPRINT = "base_fingerprint"  # checkpoint extra of a retro-fitted RETRO: its base LM's model_fingerprint

log = logging.getLogger(__name__)


def _loss(model: nn.Module, batch, device: torch.device, amp: bool) -> torch.Tensor:
    tokens, targets, neighbours = batch
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        if isinstance(model, Retro):
            return model.loss(tokens, neighbours, targets)
        return model.loss(tokens, targets)


@torch.no_grad()
def evaluate(model: nn.Module, windows: Windows, indices: np.ndarray, batch_size: int, device: torch.device,
             amp: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over the windows `indices`, in eval mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(indices), batch_size):
        part = indices[start:start + batch_size]
        total += _loss(model, windows.batch(part, device), device, amp).item() * len(part)
    model.train(was_training)
    return total / len(indices)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def _resume(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
            mcfg, fingerprint: str, base: str | None, device: torch.device) -> tuple[int, dict]:
    """Loads the checkpoint in `out_dir` into model and optimizer; returns its step and losses."""
    loaded = load_checkpoint(out_dir / CHECKPOINT_NAME, device=device)
    previous, losses = _resume_extras(out_dir / CHECKPOINT_NAME, loaded.extra)
    fitted_onto = loaded.extra.get(BASE_FINGERPRINT)
    if base and fitted_onto and fitted_onto != base:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME} was retro-fitted onto another LM ({fitted_onto}) than "
                         f"init_from {config.init_from} ({base}); use another output folder or resume=False")
    if loaded.kind != config.kind or loaded.config != mcfg:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME} holds a {loaded.kind} model {loaded.config}, not {mcfg}; "
                         "use another output folder or resume=False")
    if loaded.tokenizer_fingerprint != fingerprint:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME} was trained with tokenizer {loaded.tokenizer_fingerprint}, "
                         f"the data uses {fingerprint}")
    if loaded.optimizer_state is None:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME} has no optimizer state to resume from")
    _check_same_parameters(out_dir / CHECKPOINT_NAME, optimizer, loaded.optimizer_state, previous, config)
    changed = {k for k, v in dataclasses.asdict(config).items() if previous.get(k) != v}
    if changed:
        log.warning("resuming with changed training settings: %s", sorted(changed))
    model.load_state_dict(loaded.model.state_dict())
    optimizer.load_state_dict(loaded.optimizer_state)
    log.info("resuming from step %d of %s", loaded.step, out_dir / CHECKPOINT_NAME)
    return loaded.step, losses


def _resume_extras(file: Path, extra: dict) -> tuple[dict, dict]:
    """The training config and the losses a checkpoint's extras record (what `train` saves there), each checked;
    a ValueError naming the file and the extra for one of another shape (it failed deep in the training loop)."""
    losses = extra.get("losses", {"train": [], "heldout": []})
    shapes = {
        "train_config": (type(extra.get("train_config", {})) is dict, "a dict"),
        BASE_FINGERPRINT: (type(extra.get(BASE_FINGERPRINT, "")) is str, "a str"),
        "losses": (type(losses) is dict and set(losses) == {"train", "heldout"}
                   and all(type(series) is list and all(_is_loss(point) for point in series)
                           for series in losses.values()),
                   "a dict of 'train' and 'heldout' lists of [step, loss] pairs"),
    }
    for name, (good, wanted) in shapes.items():
        if not good:
            raise ValueError(f"{file} cannot be resumed: its extra {name!r} must be {wanted}, got "
                             f"{str(extra[name])[:120]!r}")
    return extra.get("train_config", {}), losses


def _is_loss(point: object) -> bool:
    """Whether `point` is a [step, loss] pair as `train` records it: an int and a number, no bools."""
    return (type(point) in (list, tuple) and len(point) == 2 and type(point[0]) is int
            and type(point[1]) in (int, float))


def _check_same_parameters(file: Path, optimizer: torch.optim.Optimizer, state: dict, previous: dict,
                           config: TrainConfig) -> None:
    """ValueError when the checkpoint's optimizer state is for other trainable parameters than this run's
    (`freeze_base` toggled, or `init_from` given or left out), naming the setting, before torch's opaque one."""
    if config.init_from and "freeze_base" in previous and previous["freeze_base"] != config.freeze_base:
        raise ValueError(f"resuming {file} with freeze_base={config.freeze_base} would change which parameters "
                         f"train (it was trained with freeze_base={previous['freeze_base']}): keep that setting, or "
                         "start afresh with resume=False")
    saved = [len(group["params"]) for group in state.get("param_groups", [])]
    now = [len(group["params"]) for group in optimizer.param_groups]
    if saved != now:
        raise ValueError(f"{file} trained other parameters ({sum(saved)} tensors) than this run would "
                         f"({sum(now)}; init_from or freeze_base changed?): start afresh with resume=False")


def _check_out_dir(config: TrainConfig, out_dir: Path) -> None:
    """ValueError for an `out_dir` whose checkpoint is `init_from`'s own file (training there would replace the
    base LM, with or without resume), or that holds a model folder of another kind (config.json, which loading
    the folder would then take instead of its checkpoint.pt)."""
    if (out_dir / "config.json").exists():
        raise ValueError(f"out_dir {out_dir} holds config.json: a model folder of another kind (Hugging Face), "
                         "which loading it would take instead of a checkpoint written there; give another folder")
    if not config.init_from:
        return
    from lm_worker.models.checkpoint import checkpoint_file

    base = checkpoint_file(Path(config.init_from))  # FileNotFoundError when there is none
    mine = out_dir / CHECKPOINT_NAME
    if base is not None and mine.exists() and os.path.samefile(base, mine):
        raise ValueError(f"out_dir {out_dir} holds the base LM that init_from {config.init_from} names: training "
                         "there would replace it; give another output folder")


def train(config: TrainConfig, data_dir: Path, out_dir: Path, neighbours_dir: Path | None = None,
          resume: bool = True, progress: bool = True, stop_at: int | None = None) -> TrainReport:
    """Trains an LM or RETRO model and writes `checkpoint.pt`, `losses.json` and `loss.png` to `out_dir`.

    Args:
        config: what to train and how.
        data_dir: a `prepare_corpus` output folder (tokenizer.json, train/, heldout/).
        out_dir: the run's model folder, e.g. RUN/lm or RUN/retro.
        neighbours_dir: for RETRO, the folder with neighbours-SPLIT.npy (and neighbours-heldout.npy).
        resume: continue from `out_dir/checkpoint.pt` when there is one (else start afresh, overwriting it).
        progress: show a tqdm progress bar.
        stop_at: stop after this step, checkpointing, as if interrupted (the schedule still ends at
            `config.steps`); a later call with `resume=True` carries on.

    Returns:
        A `TrainReport`.

    Raises:
        FileNotFoundError: missing data folder, tokenizer, split or neighbours file.
        ValueError: inconsistent inputs (seq_len vs chunk_len, neighbours shape, a checkpoint of another model,
            or of a RETRO retro-fitted onto another LM than `init_from`'s), or training diverged (a training or
            held-out loss that is not finite; nothing is saved).
    """
    device = pick_device(config.device)  # before the data is opened or anything written
    windows, heldout, mcfg, fingerprint = open_data(config, data_dir, neighbours_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    _check_out_dir(config, out_dir)
    torch.manual_seed(config.seed)
    model, mcfg, base = _new_model(config, mcfg, fingerprint)  # init_from checked before out_dir is made
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device)
    optimizer = make_optimizer(model, config)
    step, losses = 0, {"train": [], "heldout": []}
    if resume and (out_dir / CHECKPOINT_NAME).is_file():
        step, losses = _resume(out_dir, model, optimizer, config, mcfg, fingerprint, base, device)
    end = config.steps if stop_at is None else min(config.steps, stop_at)
    eval_indices = heldout.fixed(config.eval_batches * config.batch_size)
    log.info("training %s (%s, %.2fM parameters) on %s for steps %d..%d", config.kind, config.preset,
             sum(p.numel() for p in model.parameters()) / 1e6, device, step, end)

    def checkpoint(done: int) -> Path:
        extra = {"train_config": dataclasses.asdict(config), "losses": losses}
        if base:  # the LM it was retro-fitted onto (`_resume` refuses one that recorded another)
            extra[BASE_FINGERPRINT] = base
        (out_dir / "losses.json").write_text(json.dumps(losses))
        return save_checkpoint(out_dir / CHECKPOINT_NAME, kind=config.kind, model=model, config=mcfg, step=done,
                               tokenizer_fingerprint=fingerprint, extra=extra, optimizer=optimizer)

    def heldout_at(done: int) -> float:
        """The held-out loss after step `done`, evaluated unless it was recorded, and recorded at an eval step
        (every `eval_every` and the last) only; a ValueError when it is not finite: weights that give nan (or
        1e30 weights whose forward overflows) are never saved."""
        if losses["heldout"] and losses["heldout"][-1][0] == done:
            value = losses["heldout"][-1][1]
        else:
            value = evaluate(model, heldout, eval_indices, config.batch_size, device, config.amp)
            if done % config.eval_every == 0 or done == config.steps:
                losses["heldout"].append([done, value])
        if not math.isfinite(value):
            raise ValueError(f"held-out loss became {value} at step {done}: training diverged (try a lower lr than "
                             f"{config.lr}); stopped without saving a checkpoint")
        return value

    model.train()
    train_time, start_step = 0.0, step
    bar = tqdm(total=end, initial=step, desc=f"train {config.kind}", disable=not progress, unit="step")
    try:
        while step < end:
            tick = time.perf_counter()
            loss = _train_step(model, optimizer, windows, config, step, device)
            if not math.isfinite(loss):  # the weights are lost: saving them would only spoil the last checkpoint
                raise ValueError(f"the training loss became {loss} at step {step + 1}: training diverged (try a "
                                 f"lower lr than {config.lr}); stopped without saving a checkpoint")
            train_time += time.perf_counter() - tick
            step += 1
            losses["train"].append([step, loss])
            tokens_per_s = (step - start_step) * config.batch_size * config.seq_len / max(train_time, 1e-9)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
            bar.update()
            saving = step % config.checkpoint_every == 0 and step != end
            if step % config.eval_every == 0 or step == config.steps or saving:  # every checkpoint is evaluated
                held_out = heldout_at(step)
                log.info("step %d: train %.4f, held-out %.4f", step, loss, held_out)
            if saving:
                checkpoint(step)
    finally:
        bar.close()
    # A finished run resumed is kept as it is, so that what its file stamps stays valid; else the last checkpoint
    # is written once its held-out loss is known to be finite.
    unchanged = step == start_step and (out_dir / CHECKPOINT_NAME).is_file()
    heldout_loss = None if unchanged else heldout_at(step)
    path = out_dir / CHECKPOINT_NAME if unchanged else checkpoint(step)
    plot = plot_losses(losses, out_dir / "loss.png", loss_plot_title(config))
    if heldout_loss is None:
        at_end = losses["heldout"] and losses["heldout"][-1][0] == step
        heldout_loss = losses["heldout"][-1][1] if at_end else evaluate(model, heldout, eval_indices,
                                                                        config.batch_size, device, config.amp)
    recent = [v for _, v in losses["train"][-10:]]
    tokens_done = (step - start_step) * config.batch_size * config.seq_len
    return TrainReport(steps=step, train_loss=float(np.mean(recent)) if recent else float("nan"),
                       heldout_loss=heldout_loss, tokens_per_s=tokens_done / train_time if train_time else 0.0,
                       checkpoint=path, losses=out_dir / "losses.json", plot=plot)


def _new_model(config: TrainConfig, mcfg: LMConfig | RetroConfig, fingerprint: str
               ) -> tuple[nn.Module, LMConfig | RetroConfig, str | None]:
    """A freshly initialised model, or RETRO retro-fitted onto `config.init_from`; its config; and the
    base LM's `model_fingerprint` (None when not retro-fitted)."""
    if not config.init_from:
        return KINDS[config.kind][1](mcfg), mcfg, None
    from lm_worker.models.fingerprint import model_fingerprint
    from lm_worker.training.retrofit import retrofit, retrofit_config

    base = load_checkpoint(Path(config.init_from))
    if base.kind != "lm":
        raise ValueError(f"init_from {config.init_from} holds a {base.kind} model; retro-fitting needs a base LM")
    if base.tokenizer_fingerprint != fingerprint:
        raise ValueError(f"init_from {config.init_from} was trained with tokenizer {base.tokenizer_fingerprint}, "
                         f"the data uses {fingerprint}")
    fitted = retrofit_config(base.config, mcfg.chunk_len, mcfg.n_neighbours, mcfg.enc_n_layer)
    return retrofit(base.model, fitted, freeze=config.freeze_base), fitted, model_fingerprint(base.model)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, windows: Windows, config: TrainConfig,
                step: int, device: torch.device) -> float:
    """One optimizer step on the batch of `step`; returns its loss."""
    torch.manual_seed(config.seed * 1_000_003 + step)  # dropout masks depend on the step alone
    for group in optimizer.param_groups:
        group["lr"] = lr_at(config, step)
    loss = _loss(model, windows.random(config.seed, step, config.batch_size, device), device, config.amp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:  # 0: no clipping
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()

