"""Training of the baseline LM and of RETRO on a prepared corpus (`prepare_corpus` output).

Batches are random windows of seq_len + 1 tokens of the training split's stream (`split`: "train",
or "retro" to retro-fit RETRO on text its base LM never saw), drawn from a generator seeded by
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would. RETRO windows
start at chunk boundaries and come with the precomputed neighbours of their chunks
(`neighbours-SPLIT.npy`, int32 (n_chunks, K, 2L), row c for tokens[c*L:(c+1)*L], written by the
neighbours step). AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA.

The output folder receives `checkpoint.pt` (every `checkpoint_every` steps and at the end),
`losses.json` and `loss.png`; with `resume=True` a run continues from its checkpoint.

Example:
    >>> report = train(TrainConfig(kind="lm", preset="small", steps=2000), Path("run/data"), Path("run/lm"))
    >>> report.heldout_loss, report.tokens_per_s
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lm_worker.checkpoint import CHECKPOINT_NAME, MODELS, load_checkpoint, save_checkpoint
from lm_worker.model import LMConfig
from lm_worker.retro import Retro, RetroConfig
from lm_worker.token_store import RETRO_SPLIT, TokenStore
from lm_worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

KINDS = MODELS  # kind -> (config class, model class)
PRESETS = ("tiny", "small", "gpu")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `preset` picks `LMConfig`/`RetroConfig` tiny, small or gpu; for RETRO, `seq_len` must
    be a multiple of the chunk length (the preset's unless `chunk_len` is set) and K comes from the
    neighbours file. `vocab_size` 0 takes the tokenizer's (DATA/tokenizer.json). `init_from` (RETRO only) is a
    base LM checkpoint to retro-fit (`lm_worker.retrofit`): the decoder takes the LM's shape and weights, and with
    `freeze_base` only the new layers train. `split` is the folder of the data the model trains on: "train",
    or "retro" (`prepare_retro_split`), text the LM never trained on, for retro-fitting RETRO onto it."""

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
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"need lr > 0 and min_lr >= 0, got lr {self.lr}, min_lr {self.min_lr}")
        if not self.split or self.split != Path(self.split).name or self.split in (".", "..", "heldout"):
            raise ValueError(f"split must name a split folder of the data other than heldout (train, retro), "
                             f"got {self.split!r}")
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
    """"auto" is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Windows:
    """Training or held-out windows of seq_len + 1 tokens, with RETRO neighbours for their chunks.

    Args:
        store: the split's tokens.
        seq_len: input length T (targets are the next T tokens).
        chunk_len: RETRO's L: windows start at multiples of L; 0 for the plain LM.
        neighbours: int32 (n_chunks, K, 2L) neighbours of the split's chunks, or None.
    """

    def __init__(self, store: TokenStore, seq_len: int, chunk_len: int = 0, neighbours: np.ndarray | None = None):
        self.tokens, self.seq_len, self.neighbours = store.tokens, seq_len, neighbours
        self.stride = chunk_len or 1
        last_start = len(self.tokens) - seq_len - 1  # windows need seq_len + 1 tokens
        if last_start < 0:
            raise ValueError(f"{store.directory} has {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.n_windows = last_start // self.stride + 1
        if neighbours is not None:
            chunks = seq_len // chunk_len
            self.n_windows = min(self.n_windows, len(neighbours) - chunks + 1)
            if self.n_windows < 1:
                raise ValueError(f"{len(neighbours)} neighbour rows do not cover one window of {chunks} chunks")

    def batch(self, indices: np.ndarray, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs (B, T), targets (B, T) and neighbours (B, C, K, 2L) or None of windows `indices`."""
        starts = indices * self.stride
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows).to(device)
        neighbours = None
        if self.neighbours is not None:
            C = self.seq_len // self.stride
            block = np.stack([self.neighbours[c:c + C] for c in indices]).astype(np.int64)  # (B, C, K, 2L)
            neighbours = torch.from_numpy(block).to(device)
        return rows[:, :-1], rows[:, 1:], neighbours

    def random(self, seed: int, step: int, batch_size: int, device: torch.device):
        """The batch of training step `step`: the same for a given (seed, step) in every run."""
        rng = np.random.default_rng([seed, step])
        return self.batch(rng.integers(0, self.n_windows, size=batch_size), device)

    def fixed(self, n: int) -> np.ndarray:
        """`n` evenly spaced window indices (fewer if there are fewer windows): the held-out set."""
        return np.unique(np.linspace(0, self.n_windows - 1, num=min(n, self.n_windows)).astype(np.int64))


def load_neighbours(path: Path, chunk_len: int, vocab_size: int) -> np.ndarray:
    """Memory-maps a neighbours file and checks its shape and token ids.

    Raises:
        FileNotFoundError: no file. ValueError: not (n, K, 2 * chunk_len) or ids outside the vocabulary.
    """
    if not path.is_file():
        raise FileNotFoundError(f"RETRO training needs precomputed neighbours at {path} (run the encode step)")
    neighbours = np.load(path, mmap_mode="r")
    if neighbours.ndim != 3 or neighbours.shape[2] != 2 * chunk_len:
        raise ValueError(f"{path} must be (n_chunks, K, 2 * chunk_len = {2 * chunk_len}), got {neighbours.shape}")
    if len(neighbours) and (neighbours.min() < 0 or neighbours.max() >= vocab_size):
        raise ValueError(f"{path} holds token ids outside [0, {vocab_size})")
    return neighbours


def _vocab_size(config: TrainConfig, data_dir: Path) -> int:
    if config.vocab_size:
        return config.vocab_size
    return Tokenizer.load(data_dir / "tokenizer.json").vocab_size


def _open_data(config: TrainConfig, data_dir: Path, neighbours_dir: Path | None
               ) -> tuple[Windows, Windows, LMConfig | RetroConfig, str]:
    """Train and held-out windows, the model config and the tokenizer fingerprint."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no data folder at {data_dir} (run prepare first)")
    vocab_size = _vocab_size(config, data_dir)
    if not (data_dir / config.split).is_dir():
        hint = " (prepare with max_retro_tokens)" if config.split == RETRO_SPLIT else ""
        raise FileNotFoundError(f"no {config.split!r} split at {data_dir / config.split}{hint}")
    train_store, heldout_store = TokenStore.open(data_dir / config.split), TokenStore.open(data_dir / "heldout")
    if len(train_store) and int(train_store.tokens.max()) >= vocab_size:
        raise ValueError(f"{data_dir / config.split} holds token ids >= vocab_size {vocab_size}")
    if config.kind == "lm":
        mcfg = model_config(config, vocab_size)
        return (Windows(train_store, config.seq_len), Windows(heldout_store, config.seq_len), mcfg,
                train_store.tokenizer_fingerprint)
    L = model_config(config, vocab_size).chunk_len
    if config.seq_len % L:
        raise ValueError(f"RETRO seq_len {config.seq_len} must be a multiple of chunk_len {L}")
    if neighbours_dir is None:
        raise ValueError(f"RETRO training needs neighbours_dir (the folder with neighbours-{config.split}.npy)")
    neighbours_dir = Path(neighbours_dir)
    train_nb = load_neighbours(neighbours_dir / f"neighbours-{config.split}.npy", L, vocab_size)
    heldout_path = neighbours_dir / "neighbours-heldout.npy"
    heldout_nb = load_neighbours(heldout_path, L, vocab_size) if heldout_path.is_file() else None
    if heldout_nb is None:
        log.warning("no %s: held-out loss is measured without retrieval", heldout_path)
    elif heldout_nb.shape[1] != train_nb.shape[1]:
        raise ValueError(f"held-out neighbours have K={heldout_nb.shape[1]}, train K={train_nb.shape[1]}")
    mcfg = model_config(config, vocab_size, n_neighbours=train_nb.shape[1])
    return (Windows(train_store, config.seq_len, L, train_nb), Windows(heldout_store, config.seq_len, L, heldout_nb),
            mcfg, train_store.tokenizer_fingerprint)


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
            mcfg, fingerprint: str, device: torch.device) -> tuple[int, dict]:
    """Loads the checkpoint in `out_dir` into model and optimizer; returns its step and losses."""
    loaded = load_checkpoint(out_dir / CHECKPOINT_NAME, device=device)
    if loaded.kind != config.kind or loaded.config != mcfg:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME} holds a {loaded.kind} model {loaded.config}, not {mcfg}; "
                         "use another output folder or resume=False")
    if loaded.tokenizer_fingerprint != fingerprint:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME} was trained with tokenizer {loaded.tokenizer_fingerprint}, "
                         f"the data uses {fingerprint}")
    if loaded.optimizer_state is None:
        raise ValueError(f"{out_dir / CHECKPOINT_NAME} has no optimizer state to resume from")
    previous = loaded.extra.get("train_config", {})
    changed = {k for k, v in dataclasses.asdict(config).items() if previous.get(k) != v}
    if changed:
        log.warning("resuming with changed training settings: %s", sorted(changed))
    model.load_state_dict(loaded.model.state_dict())
    optimizer.load_state_dict(loaded.optimizer_state)
    log.info("resuming from step %d of %s", loaded.step, out_dir / CHECKPOINT_NAME)
    return loaded.step, loaded.extra.get("losses", {"train": [], "heldout": []})


def plot_losses(losses: dict, path: Path, title: str) -> Path:
    """Train (per step) and held-out (per evaluation) loss against step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if losses["train"]:
        steps, values = zip(*losses["train"])
        ax.plot(steps, values, lw=0.8, alpha=0.6, label="train")
    if losses["heldout"]:
        steps, values = zip(*losses["heldout"])
        ax.plot(steps, values, "o-", label="held-out")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


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
        ValueError: inconsistent inputs (seq_len vs chunk_len, neighbours shape, a checkpoint of another model).
    """
    windows, heldout, mcfg, fingerprint = _open_data(config, data_dir, neighbours_dir)
    device = pick_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model, mcfg = _new_model(config, mcfg, fingerprint)
    model = model.to(device)
    optimizer = make_optimizer(model, config)
    step, losses = 0, {"train": [], "heldout": []}
    if resume and (out_dir / CHECKPOINT_NAME).is_file():
        step, losses = _resume(out_dir, model, optimizer, config, mcfg, fingerprint, device)
    end = config.steps if stop_at is None else min(config.steps, stop_at)
    eval_indices = heldout.fixed(config.eval_batches * config.batch_size)
    log.info("training %s (%s, %.2fM parameters) on %s for steps %d..%d", config.kind, config.preset,
             sum(p.numel() for p in model.parameters()) / 1e6, device, step, end)

    def checkpoint(done: int) -> Path:
        extra = {"train_config": dataclasses.asdict(config), "losses": losses}
        (out_dir / "losses.json").write_text(json.dumps(losses))
        return save_checkpoint(out_dir / CHECKPOINT_NAME, kind=config.kind, model=model, config=mcfg, step=done,
                               tokenizer_fingerprint=fingerprint, extra=extra, optimizer=optimizer)

    model.train()
    train_time, start_step = 0.0, step
    bar = tqdm(total=end, initial=step, desc=f"train {config.kind}", disable=not progress, unit="step")
    while step < end:
        tick = time.perf_counter()
        loss = _train_step(model, optimizer, windows, config, step, device)
        train_time += time.perf_counter() - tick
        step += 1
        losses["train"].append([step, loss])
        tokens_per_s = (step - start_step) * config.batch_size * config.seq_len / max(train_time, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
        bar.update()
        if step % config.eval_every == 0 or step == config.steps:
            losses["heldout"].append([step, evaluate(model, heldout, eval_indices, config.batch_size, device,
                                                     config.amp)])
            log.info("step %d: train %.4f, held-out %.4f", step, loss, losses["heldout"][-1][1])
        if step % config.checkpoint_every == 0 and step != end:
            checkpoint(step)
    bar.close()
    path = checkpoint(step)
    plot = plot_losses(losses, out_dir / "loss.png", f"{config.kind} ({config.preset}, seq_len {config.seq_len})")
    at_end = losses["heldout"] and losses["heldout"][-1][0] == step
    heldout_loss = losses["heldout"][-1][1] if at_end else evaluate(model, heldout, eval_indices, config.batch_size,
                                                                    device, config.amp)
    recent = [v for _, v in losses["train"][-10:]]
    tokens_done = (step - start_step) * config.batch_size * config.seq_len
    return TrainReport(steps=step, train_loss=float(np.mean(recent)) if recent else float("nan"),
                       heldout_loss=heldout_loss, tokens_per_s=tokens_done / train_time if train_time else 0.0,
                       checkpoint=path, losses=out_dir / "losses.json", plot=plot)


def _new_model(config: TrainConfig, mcfg: LMConfig | RetroConfig, fingerprint: str
               ) -> tuple[nn.Module, LMConfig | RetroConfig]:
    """A freshly initialised model, or RETRO retro-fitted onto `config.init_from`; and its config."""
    if not config.init_from:
        return KINDS[config.kind][1](mcfg), mcfg
    from lm_worker.retrofit import retrofit, retrofit_config

    base = load_checkpoint(Path(config.init_from))
    if base.kind != "lm":
        raise ValueError(f"init_from {config.init_from} holds a {base.kind} model; retro-fitting needs a base LM")
    if base.tokenizer_fingerprint != fingerprint:
        raise ValueError(f"init_from {config.init_from} was trained with tokenizer {base.tokenizer_fingerprint}, "
                         f"the data uses {fingerprint}")
    fitted = retrofit_config(base.config, mcfg.chunk_len, mcfg.n_neighbours, mcfg.enc_n_layer)
    return retrofit(base.model, fitted, freeze=config.freeze_base), fitted


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, windows: Windows, config: TrainConfig,
                step: int, device: torch.device) -> float:
    """One optimizer step on the batch of `step`; returns its loss."""
    torch.manual_seed(config.seed * 1_000_003 + step)  # dropout masks depend on the step alone
    for group in optimizer.param_groups:
        group["lr"] = lr_at(config, step)
    loss = _loss(model, windows.random(config.seed, step, config.batch_size, device), device, config.amp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()
