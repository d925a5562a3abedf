"""What `lm_worker.models.checkpoint` checks in a checkpoint's payload: plain data only (what loading reads
back), the fields and their types, tied weights equal, and sha256 digests, which find a file damaged (torch's
zip reader checks no CRC) or edited by hand (a config field no tensor shape shows, such as chunk_len or n_head;
the step, the tokenizer fingerprint that pairs a model with its data, the extras).

A version-2 file holds two digests, both required: `digest` over everything saved (kind, config, weights,
optimizer state, step, tokenizer fingerprint, extra) and `meta_digest` over all of it but the tensors, which
the readers that build no model check cheaply. A version-1 file held at most a digest over the config and the
weights (`payload_digest`); one saved before digests had none, and loads unchecked.

The digest hashes every tensor's bytes once on save and once on load: O(size of the model and its optimizer
state), small for this project's models. Hugging Face model folders load through another path and are never
hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PLAIN = (str, int, float, bool, type(None))  # with dicts, lists and tuples of them: what loading unpickles
FIELDS = ("kind", "config", "model", "optimizer", "step", "tokenizer_fingerprint", "extra")
META_FIELDS = ("kind", "config", "step", "tokenizer_fingerprint", "extra")  # what `meta_digest` covers
DIGESTS = ("digest", "meta_digest")  # a version-2 file's, each a str: over FIELDS, over META_FIELDS


def check_plain(extra: Any, where: str = "extra") -> None:
    """ValueError unless `extra` is plain data (dicts, lists, tuples, strings, numbers, None) of exactly those
    types: what `load_checkpoint` reads back, as it loads without unpickling other objects (a numpy scalar,
    a Path, a defaultdict, a namedtuple or an IntEnum was saved, and the checkpoint then never loaded)."""
    if type(extra) is dict:
        for key, value in extra.items():
            check_plain(key, f"{where} key {key!r}")
            check_plain(value, f"{where}[{key!r}]")
    elif type(extra) in (list, tuple):
        for i, value in enumerate(extra):
            check_plain(value, f"{where}[{i}]")
    elif type(extra) not in PLAIN:
        raise ValueError(f"{where} is a {type(extra).__module__}.{type(extra).__qualname__}: a checkpoint holds "
                         "plain data only (dicts, lists, tuples, strings, numbers, None); convert it first")


def plain_config(config: Any) -> dict:
    """The config dataclass as the plain dict a checkpoint stores, numpy scalars turned into Python ones
    (a dropout of np.float64 passes the config's checks); ValueError (`check_plain`) for anything else."""
    values = {k: _python_scalars(v) for k, v in dataclasses.asdict(config).items()}
    check_plain(values, "config")
    return values


def _python_scalars(value: Any) -> Any:
    """`value` with numpy scalars, also inside lists and tuples, as Python ones."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (list, tuple):
        return type(value)(_python_scalars(v) for v in value)
    return value


def payload_digest(config: dict, state: dict) -> str:
    """Version 1's digest: "sha256:" + the hash of the config (canonical JSON) and every tensor (names sorted;
    name, dtype and shape, then its bytes) of `state`."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=repr).encode())
    for name in sorted(state):
        tensor = state[name].detach()
        h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def content_digests(payload: dict) -> dict[str, str]:
    """The digests a version-2 checkpoint holds (`DIGESTS`): "sha256:" + the hash of its FIELDS, and of its
    META_FIELDS, each value fed by type (`_feed`): a tuple is not a list, 1 is not 1.0 nor True."""
    return {"digest": _digest(payload, FIELDS), "meta_digest": _digest(payload, META_FIELDS)}


def _digest(payload: dict, names: tuple[str, ...]) -> str:
    """"sha256:" + the hash of the payload's fields `names` (`_feed`)."""
    h = hashlib.sha256()
    _feed(h, {name: payload[name] for name in names})
    return "sha256:" + h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    """Feeds `value` (plain data, tensors, dicts of them) to the hash `h`, each part typed and sized, so that no
    two values feed the same bytes; a dict's items in the order of their keys' `_key`."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        h.update(f"T{tensor.dtype}{list(tensor.shape)};".encode())
        h.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):  # a state_dict is an OrderedDict
        h.update(f"D{len(value)};".encode())
        for key in sorted(value, key=_key):
            _feed(h, key)
            _feed(h, value[key])
    elif type(value) in (list, tuple):
        h.update(f"{'L' if type(value) is list else 'U'}{len(value)};".encode())
        for item in value:
            _feed(h, item)
    else:
        text = _key(value).encode()
        h.update(f"S{len(text)};".encode() + text)


def _key(value: Any) -> str:
    """A plain value as text that tells its type: a dict's keys sort by it."""
    return f"{type(value).__name__}:{value!r}"


def check_digest(path: Path, payload: dict, meta_only: bool = False) -> None:
    """ValueError naming `path` when the payload does not hash to the digests saved with it, or when a version-2
    payload lacks one. `meta_only` checks `meta_digest` alone, which reads no tensor. A version-1 file is checked
    against its digest over the config and weights where it has one (none with `meta_only`); a file written
    before digests were saved has none, and still loads, unchecked."""
    if payload["version"] == 1:
        saved = payload.get("digest")
        if saved is None:
            log.debug("%s was saved without a digest: its weights and config are not checked", path)
        elif not meta_only and saved != payload_digest(payload["config"], payload["model"]):
            _refuse(path, "its config and weights do not match the digest saved with them")
        return
    for name in DIGESTS:
        if name not in payload:
            _refuse(path, f"it lacks the field {name!r} that version {payload['version']} checkpoints hold")
    if payload["meta_digest"] != _digest(payload, META_FIELDS):
        _refuse(path, "its config, step, tokenizer fingerprint or extras do not match the digest saved with them")
    if not meta_only and payload["digest"] != _digest(payload, FIELDS):
        _refuse(path, "what it holds (its weights, optimizer state, config...) does not match the digest saved "
                "with it")


def _refuse(path: Path, why: str) -> None:
    raise ValueError(f"{path} is damaged or edited: {why}; train it again or restore a copy")


def check_payload(path: Path, payload: dict, kinds: tuple[str, ...]) -> None:
    """ValueError naming `path` and the field when a checkpoint's payload lacks a field or holds one of
    another type than `save_checkpoint` writes, or a model kind none of `kinds`."""
    missing = [name for name in FIELDS if name not in payload]
    if missing:
        raise ValueError(f"{path} is not a loadable checkpoint: it lacks the field {missing[0]!r}")
    kind, step, state, optimizer = payload["kind"], payload["step"], payload["model"], payload["optimizer"]
    if type(kind) is not str or kind not in kinds:
        raise ValueError(f"{path} holds a model of unknown kind {str(kind)[:80]!r} (field 'kind'); expected one of "
                         f"{kinds}")
    problems = {  # dicts as isinstance: a state_dict is an OrderedDict (the unpickler makes nothing else)
        "config": not isinstance(payload["config"], dict),
        "model": not isinstance(state, dict) or not all(type(k) is str and isinstance(v, torch.Tensor)
                                                        for k, v in state.items()),
        "optimizer": optimizer is not None and (not isinstance(optimizer, dict) or
                                                not {"state", "param_groups"} <= set(optimizer)),
        "step": type(step) is not int,
        "tokenizer_fingerprint": type(payload["tokenizer_fingerprint"]) is not str,
        "extra": payload["extra"] is not None and not isinstance(payload["extra"], dict),  # older files: None
        **{name: name in payload and type(payload[name]) is not str for name in DIGESTS},
    }
    wanted = {"config": "a dict", "model": "a dict of named tensors", "optimizer": "None or an optimizer state",
              "step": "an int", "tokenizer_fingerprint": "a str", "extra": "a dict", "digest": "a str",
              "meta_digest": "a str"}
    for name, bad in problems.items():
        if bad:
            found = "None" if payload[name] is None else f"a {type(payload[name]).__name__}"
            raise ValueError(f"{path} is not a loadable checkpoint: its field {name!r} holds {found}, "
                             f"not {wanted[name]}")


def check_tied(model: nn.Module, state: dict) -> None:
    """ValueError naming both weights when `state` holds different tensors for weights that `model` ties
    (one Parameter under two names, as head.weight and tok_emb.weight): loading would keep either, silently.
    The caller names the file, as it does for `load_state_dict`'s errors."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for tied in names.values():
        present = [name for name in tied if name in state]
        first = present[0] if present else ""
        for name in present[1:]:
            if not _same(state[first], state[name]):
                raise ValueError(f"its field 'model' holds {name!r} and {first!r}, which the model ties, with "
                                 "different values")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values (one storage seen twice counts, NaNs and all)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b)
