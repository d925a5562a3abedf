"""Which weights made a datastore's keys: a model's fingerprint and a JSON description of it."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """"lm:" + a hash of the model's class and state dict: which weights made a kNN-LM source's keys."""
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

