"""Model checkpoints: one torch file holding the weights, the model config as a plain dict, the
optimizer state, the training step, the tokenizer's fingerprint and free-form `extra` data.

Writes are atomic (a temporary file in the same folder, then `os.replace`), so a reader never sees
half a checkpoint, even when training is killed mid-save. A sha256 digest over everything saved, checked on
load before the model is built, refuses a file damaged or edited by hand; a second one over all but the
tensors lets the readers that build no model check what they read (`lm_worker.models.checkpoint_checks`;
files of VERSION 1 load as that version did, unchecked where they hold no digest). A
directory holding a Hugging Face `config.json` loads as a causal LM through `lm_worker.models.hf_causal_lm`
(kind "hf").

Example:
    >>> save_checkpoint(Path("run/lm/checkpoint.pt"), kind="lm", model=model, config=model.config,
    ...                 step=1000, tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    >>> loaded = load_checkpoint(Path("run/lm/checkpoint.pt"))
    >>> logits = loaded.model(tokens)  # (B, T, V)
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lm_worker.models.checkpoint_checks import (
    check_digest,
    check_payload,
    check_plain,
    check_tied,
    content_digests,
    plain_config,
)
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

log = logging.getLogger(__name__)

FORMAT = "lm_worker.models.checkpoint"
VERSION = 2  # 2: digests over all fields, required; 1: an optional digest over the config and weights
READS = (1, VERSION)
CHECKPOINT_NAME = "checkpoint.pt"
MODELS: dict[str, tuple[type, type[nn.Module]]] = {"lm": (LMConfig, TransformerLM), "retro": (RetroConfig, Retro)}


@dataclass
class LoadedModel:
    """A model read back from a checkpoint (or a Hugging Face directory).

    Attributes:
        kind: "lm" (TransformerLM), "retro" (Retro) or "hf" (HFCausalLM).
        model: the model, in eval mode, on the requested device.
        config: LMConfig, RetroConfig or HFLMConfig.
        step: training steps done (0 for a Hugging Face model).
        tokenizer_fingerprint: fingerprint of the tokenizer the model was trained with.
        optimizer_state: the optimizer's state_dict, or None.
        extra: free-form data saved with the checkpoint (e.g. the training config and losses).
    """

    kind: str
    model: nn.Module
    config: Any
    step: int
    tokenizer_fingerprint: str
    optimizer_state: dict | None = None
    extra: dict = field(default_factory=dict)


def save_checkpoint(path: Path, *, kind: str, model: nn.Module, config: Any, step: int, tokenizer_fingerprint: str,
                    extra: dict, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Writes a checkpoint atomically.

    Args:
        path: the file to write (its folder is created).
        kind: "lm" or "retro".
        model: the model whose state_dict is saved.
        config: the model's frozen config dataclass (stored as a plain dict).
        step: training steps done.
        tokenizer_fingerprint: the fingerprint of the tokenizer of the training data.
        extra: plain data (dicts, lists, tuples, numbers, strings, None; exactly those types) stored alongside.
        optimizer: its state is saved too when given, so training can resume.

    Returns:
        The path written.

    Raises:
        ValueError: unknown kind, a config that is not a dataclass, or not the model's own, or a config,
            extra or fingerprint that loading would refuse (each before anything is written).
    """
    if kind not in MODELS:
        raise ValueError(f"cannot save kind {kind!r}: checkpoints hold {sorted(MODELS)} models")
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"config must be a dataclass, got {type(config).__name__}")
    if not isinstance(model, MODELS[kind][1]):  # loading builds MODELS[kind] from the config saved
        raise ValueError(f"kind {kind!r} holds {MODELS[kind][1].__name__} models, not {type(model).__name__}")
    if getattr(model, "config", config) != config:
        raise ValueError(f"config does not describe the model: {config} against the model's {model.config}")
    values = plain_config(config)  # numpy scalars become Python ones; anything else not plain is refused
    if type(extra) is not dict or type(tokenizer_fingerprint) is not str:
        raise ValueError(f"extra must be a dict and tokenizer_fingerprint a str, got {type(extra).__name__} and "
                         f"{type(tokenizer_fingerprint).__name__}")
    check_plain(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": values,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "step": int(step),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "extra": extra,
    }
    payload.update(content_digests(payload))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a crash leaves the old file or the new
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("saved %s checkpoint at step %d to %s", kind, step, path)
    return path


def _sync_folder(folder: Path) -> None:
    """fsyncs a folder, so that a rename in it survives a crash (where the file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_config(kind: str, values: dict) -> LMConfig | RetroConfig:
    """Rebuilds a model config from its stored dict (lists become tuples again); every field must be there,
    as `save_checkpoint` writes them all (a missing one would take its default silently).

    Raises:
        ValueError: unknown kind, fields the config does not have or lacks, or values it refuses.
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODELS)}")
    config_cls = MODELS[kind][0]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown, missing = set(values) - names, names - set(values)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no fields {sorted(unknown)}")
    if missing:
        raise ValueError(f"its {config_cls.__name__} lacks the fields {sorted(missing)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_checkpoint(path: Path, device: str | torch.device = "cpu", kinds: tuple[str, ...] = (),
                    flag: str = "this use") -> LoadedModel:
    """Reads a checkpoint written by `save_checkpoint`, or a Hugging Face causal LM directory.

    Args:
        path: a checkpoint file; a folder holding `checkpoint.pt`; or a Hugging Face model folder
            (with `config.json`), loaded offline as kind "hf".
        device: where the model's weights go.
        kinds: the kinds the caller can use ("lm", "retro", "hf"); () takes any.
        flag: what names `path` in the error on another kind, e.g. "--retro".

    Returns:
        The model (in eval mode) with its config, step, tokenizer fingerprint and saved extras.

    Raises:
        FileNotFoundError: nothing loadable at `path`.
        ValueError: the file is not a readable lm_worker checkpoint, or is of an unknown kind or
            version, or of none of `kinds`, or a field is missing or of another type, or what it holds does
            not match the digests saved with it (damaged or edited; checked before the model is built), or
            it is of this version and lacks them; each names the file.

    Example:
        >>> retro = load_checkpoint(Path("run/retro"), kinds=("retro",), flag="--retro").model
    """
    path = Path(path)
    file = checkpoint_file(path)
    if file is None:
        check_kind("hf", path, kinds, flag)
        return _load_hf(path, device)
    payload = _read(file, device)  # its fields checked (`check_payload`)
    kind = payload["kind"]
    check_kind(kind, path, kinds, flag)
    config = _config(file, payload)  # the config and the weights' fit checked before the digests: their errors
    _check_fits(file, kind, config, payload["model"])  # say more
    check_digest(file, payload)  # before the model is built: an edited d_ff allocates nothing
    try:
        model = MODELS[kind][1](config)
        model.load_state_dict(payload["model"])
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as err:  # no memory for it, say
        raise _unloadable(file, kind, err) from None
    model.to(device).eval()
    return LoadedModel(kind=kind, model=model, config=config, step=payload["step"],
                       tokenizer_fingerprint=payload["tokenizer_fingerprint"], optimizer_state=payload["optimizer"],
                       extra=payload["extra"] or {})


def checkpoint_file(path: Path) -> Path | None:
    """The checkpoint file that `path` names (itself, or its folder's checkpoint.pt); None for a
    Hugging Face model folder.

    Raises:
        FileNotFoundError: nothing loadable at `path`.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        if not (path / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"{path} holds neither {CHECKPOINT_NAME} nor a Hugging Face config.json")
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def checkpoint_max_len(path: Path) -> int | None:
    """The longest sequence the model at `path` takes (None: no limit, as RETRO's), read without building
    the model. Raises as `load_checkpoint` does (its config, the weights' names and shapes, and `meta_digest`
    checked; the weights' bytes are hashed when it loads)."""
    file = checkpoint_file(path)
    if file is None:
        from lm_worker.models.hf_causal_lm import folder_max_len

        return folder_max_len(path)
    return getattr(_read_checked(file)[1], "max_len", None)


def checkpoint_config(path: Path) -> LMConfig | RetroConfig | None:
    """The model config of the checkpoint at `path` (None for a Hugging Face folder), read without building
    the model. Raises as `checkpoint_max_len` does."""
    file = checkpoint_file(path)
    if file is None:
        return None
    return _read_checked(file)[1]


def checkpoint_tokenizer(path: Path) -> str:
    """The fingerprint of the tokenizer the model at `path` was trained with ("" where none is recorded),
    read without building the model. Raises as `checkpoint_max_len` does."""
    file = checkpoint_file(path)
    if file is None:
        from lm_worker.models.hf_causal_lm import tokenizer_fingerprint

        return tokenizer_fingerprint(path)
    return _read_checked(file)[0]["tokenizer_fingerprint"]


def checkpoint_kind(path: Path) -> str:
    """The kind of model at `path` ("lm", "retro" or "hf"), read without building the model (the
    file's tensors are memory-mapped, not read). Raises as `checkpoint_max_len` does."""
    file = checkpoint_file(path)
    if file is None:
        return "hf"
    return _read_checked(file)[0]["kind"]


def check_kind(kind: str, path: Path, kinds: tuple[str, ...], flag: str = "this use") -> None:
    """Raises a ValueError naming `flag`, `path` and both kinds when `kind` is none of `kinds` (() takes any)."""
    if kinds and kind not in kinds:
        needed = " or ".join(repr(k) for k in kinds)
        raise ValueError(f"{flag} needs a checkpoint of kind {needed}, but {path} holds one of kind {kind!r}")


def require_kind(path: Path, kinds: tuple[str, ...], flag: str = "this use") -> None:
    """Checks, cheaply (see `checkpoint_kind`), that the checkpoint at `path` holds one of `kinds`;
    a ValueError naming `flag`, the path and the kind found otherwise."""
    check_kind(checkpoint_kind(path), path, kinds, flag)


def _read(path: Path, device: str | torch.device, mmap: bool = False) -> dict:
    """The payload dict of a checkpoint file, its format, version and fields checked."""
    try:
        with warnings.catch_warnings():  # the unpickler's warnings about a damaged file's bytes
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the file is not there to read: the OSError says which
    except OSError as err:  # torch reading a cut-short zip fails with EINVAL, naming nothing
        if err.errno != errno.EINVAL:
            raise ValueError(f"{path} could not be read ({_reason(err)})") from None
        raise ValueError(f"{path} is not a readable checkpoint: it is truncated or damaged "
                         f"({_reason(err)})") from None
    except Exception as err:  # unpickling damaged bytes raises anything: KeyError, IndexError, UnpicklingError...
        raise ValueError(f"{path} is not a readable checkpoint: it is not a torch checkpoint file "
                         f"({_reason(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lm_worker checkpoint (no format {FORMAT!r})")
    if payload.get("version") not in READS:
        raise ValueError(f"{path} has checkpoint version {payload.get('version')}; this code reads "
                         f"{' and '.join(map(str, READS))}")
    check_payload(path, payload, tuple(MODELS))
    return payload


def _read_mapped(file: Path) -> dict:
    """The payload of a checkpoint file with its tensors memory-mapped, not read (torch maps only its zip
    format)."""
    return _read(file, "cpu", mmap=zipfile.is_zipfile(file))


def _read_checked(file: Path) -> tuple[dict, LMConfig | RetroConfig]:
    """The payload of a checkpoint file (tensors memory-mapped) and its config, both checked as loading checks
    them but for the tensors' bytes (`check_digest` with `meta_only`)."""
    payload = _read_mapped(file)
    config = _config(file, payload)
    _check_fits(file, payload["kind"], config, payload["model"])
    check_digest(file, payload, meta_only=True)
    return payload, config


def _config(file: Path, payload: dict) -> LMConfig | RetroConfig:
    """The payload's config, built; a ValueError naming the file for one that is no config."""
    try:
        return build_config(payload["kind"], payload["config"])
    except (TypeError, ValueError, ArithmeticError) as err:
        raise _unloadable(file, payload["kind"], err) from None


def _check_fits(file: Path, kind: str, config: LMConfig | RetroConfig, state: dict) -> None:
    """A ValueError naming the file when `state` does not fit the model of `config`: names, shapes, tied weights
    (`check_tied`), checked on the model built on the meta device, which allocates nothing."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # loading into a meta model copies nothing, and torch says so
            skeleton = MODELS[kind][1](config)
            check_tied(skeleton, state)
            skeleton.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as err:
        raise _unloadable(file, kind, err) from None


def _unloadable(file: Path, kind: str, err: Exception) -> ValueError:
    """The error for a file whose config or weights make no model: the file named, the message on one line."""
    return ValueError(f"{file} does not hold a loadable {kind} model: {' '.join(str(err).split())[:300]}")


def _reason(err: Exception) -> str:
    """One line on why torch could not read a file: the weights-only unpickler's own error where it
    gives one, else the exception's type and first line."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0]
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _load_hf(path: Path, device: str | torch.device) -> LoadedModel:
    """A Hugging Face causal LM folder as a LoadedModel of kind "hf"."""
    from lm_worker.models.hf_causal_lm import HFCausalLM, tokenizer_fingerprint

    model = HFCausalLM.from_pretrained(path).to(device).eval()
    return LoadedModel(kind="hf", model=model, config=model.config, step=0,
                       tokenizer_fingerprint=tokenizer_fingerprint(path), extra={"path": str(path)})
