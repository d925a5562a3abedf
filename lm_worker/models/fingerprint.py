"""Which weights made a datastore's keys: a model's fingerprint and a JSON description of it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref

import torch

_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its tensors' versions, fingerprint)


def model_fingerprint(model: torch.nn.Module) -> str:
    """"lm:" + a hash of the model's class and state dict: which weights made a kNN-LM source's keys.
    Remembered per model until one of its tensors changes (an optimizer step, a load, a cast): a large
    model is hashed once, however many evaluations and decoders check it. The config is not hashed (a
    Hugging Face config holds its folder's path): the same tensors under another number of heads share
    a fingerprint. An edit through a tensor's `.data` bypasses torch's version count, and is seen only
    where it changes a tensor's first or last value."""
    # torch counts each in-place change; a cast or an assigned `.data` makes a new tensor (storage, dtype),
    # whose freed storage a later one may reuse at version 0: its first and last values tell those apart
    versions = tuple((t._version, t.data_ptr(), t.dtype, _ends(t)) for t in model.state_dict().values())
    known = _MEMO.get(model)
    if known is not None and known[0] == versions:
        return known[1]
    fingerprint = _hash(model)
    _MEMO[model] = (versions, fingerprint)
    return fingerprint


def _ends(tensor: torch.Tensor) -> bytes:
    """The bytes of a tensor's first and last values (none for an empty one)."""
    flat = tensor.detach().reshape(-1)
    return flat[[0, -1]].cpu().view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "lm:" + h.hexdigest()[:16]


def describe_model(model: torch.nn.Module) -> dict:
    """The model's class and config as plain JSON data, for a kNN-LM source's details."""
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):  # a Hugging Face config
        config = config.to_dict()
    return {"class": f"{type(model).__module__}.{type(model).__name__}",
            "config": json.loads(json.dumps(config, default=str))}

