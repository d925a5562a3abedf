"""The checkpoint digest covers everything a checkpoint holds (weights, config, kind, step, tokenizer
fingerprint, optimizer state and extras), a file of this version without it is refused, it is checked before
the model is built, and the readers that build no model check what they read as loading does. A version-1
file (saved before the digest covered more) still loads, as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_worker.models.checkpoint import (
    checkpoint_config,
    checkpoint_kind,
    checkpoint_max_len,
    checkpoint_tokenizer,
    load_checkpoint,
    save_checkpoint,
)
from lm_worker.models.checkpoint_checks import payload_digest
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

CHEAP = (checkpoint_kind, checkpoint_max_len, checkpoint_config, checkpoint_tokenizer)


def save(path: Path, kind: str = "lm", extra: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = TransformerLM(LMConfig.tiny(10)) if kind == "lm" else Retro(RetroConfig.tiny(10))
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(path, kind=kind, model=model, config=model.config, step=3, tokenizer_fingerprint="bpe:x",
                           extra={"note": [1, 2]} if extra is None else extra, optimizer=optimizer)


def edit(path: Path, change) -> dict:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return payload


@pytest.mark.parametrize("kind, field, value, words", [
    ("lm", "max_len", "abc", "max_len must be a positive integer, got 'abc'"),
    ("retro", "chunk_len", "x", "chunk_len must be a positive integer, got 'x'"),
])
def test_readers_that_build_no_model_refuse_a_config_as_loading_does(tmp_path, kind, field, value, words):
    """checkpoint_max_len returned "abc" (a TypeError in `lm-worker eval`), checkpoint_config named no file."""
    path = save(tmp_path / "m.pt", kind)
    edit(path, lambda p: p["config"].update({field: value}))  # the digest left in place
    for read in (load_checkpoint, *CHEAP):
        with pytest.raises(ValueError) as refused:
            read(path)
        assert str(refused.value) == f"{path} does not hold a loadable {kind} model: {words}", read.__name__


@pytest.mark.parametrize("field, value", [("step", 9), ("tokenizer_fingerprint", "bpe:y"), ("extra", {"note": 1}),
                                          ("extra", {"note": [1, 3]})])
def test_fields_besides_the_weights_edited_are_refused(tmp_path, field, value):
    """The tokenizer fingerprint pairs a model with its data and datastore: an edited one loaded silently."""
    path = save(tmp_path / "m.pt")
    edit(path, lambda p: p.update({field: value}))
    for read in (load_checkpoint, *CHEAP):
        with pytest.raises(ValueError, match=f"^{path} is damaged or edited"):
            read(path)


def test_edited_optimizer_state_is_refused(tmp_path):
    path = save(tmp_path / "m.pt")
    edit(path, lambda p: p["optimizer"]["param_groups"][0].update(lr=1.0))
    with pytest.raises(ValueError, match=f"^{path} is damaged or edited"):
        load_checkpoint(path)


@pytest.mark.parametrize("strip", ["digest", "meta_digest"])
def test_a_file_of_this_version_without_its_digest_is_refused(tmp_path, strip):
    """A stripped digest could not be told from an older file's missing one: an edited chunk_len loaded."""
    path = save(tmp_path / "m.pt", "retro")

    def change(payload):
        payload.pop(strip, None)
        payload["config"]["chunk_len"] = 2

    edit(path, change)
    for read in (load_checkpoint, *CHEAP):
        with pytest.raises(ValueError, match=f"^{path} is damaged or edited: it lacks the field '{strip}'"):
            read(path)


def test_a_version_1_file_still_loads_its_digest_checked_where_it_has_one(tmp_path):
    """Version 1 digested the config and weights, and a file saved before that had no digest: both load."""
    path = save(tmp_path / "m.pt")

    def as_version_1(payload):
        payload.update(version=1, step=9, digest=payload_digest(payload["config"], payload["model"]))
        payload.pop("meta_digest")

    edit(path, as_version_1)
    loaded = load_checkpoint(path)
    assert (loaded.step, loaded.tokenizer_fingerprint, loaded.extra) == (9, "bpe:x", {"note": [1, 2]})
    assert [read(path) for read in (checkpoint_kind, checkpoint_max_len, checkpoint_tokenizer)] == ["lm", 128, "bpe:x"]
    edit(path, lambda p: p["config"].update(n_head=4))
    with pytest.raises(ValueError, match=f"^{path} is damaged or edited"):
        load_checkpoint(path)
    edit(path, lambda p: p.pop("digest"))
    assert load_checkpoint(path).config.n_head == 4
    edit(path, lambda p: p.update(version=3))
    with pytest.raises(ValueError, match=f"^{path} has checkpoint version 3; this code reads 1 and 2"):
        load_checkpoint(path)


@pytest.mark.parametrize("field, value, words", [
    ("d_ff", 1 << 40, "does not hold a loadable lm model: Error(s) in loading state_dict for TransformerLM: size "
                      "mismatch"),
    ("vocab_size", 1 << 40, "does not hold a loadable lm model: Error(s) in loading state_dict for TransformerLM: "
                            "size mismatch"),
    ("n_head", 4, "is damaged or edited"),  # the same tensors
])
def test_no_model_is_built_before_the_weights_fit_and_the_digest_holds(tmp_path, monkeypatch, field, value, words):
    """A config edited to a huge d_ff or vocabulary allocated the model before the digest refused it: now only
    one on the meta device is built first, which allocates nothing."""
    path = save(tmp_path / "m.pt")
    edit(path, lambda p: p["config"].update({field: value}))
    real_init, devices = TransformerLM.__init__, []

    def init(self, config):
        devices.append(torch.empty(0).device.type)
        assert devices[-1] == "meta", "a model was built before the checks"
        real_init(self, config)

    monkeypatch.setattr(TransformerLM, "__init__", init)
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    assert str(refused.value).startswith(f"{path} {words}") and devices == ["meta"]


def test_what_the_current_code_saves_loads_everywhere(tmp_path):
    path = save(tmp_path / "m.pt", "retro", extra={"losses": {"train": [[1, 2.5]]}, "t": (1, "a"), 3: None})
    loaded = load_checkpoint(path)
    assert loaded.extra == {"losses": {"train": [[1, 2.5]]}, "t": (1, "a"), 3: None} and loaded.step == 3
    assert [read(path) for read in CHEAP] == ["retro", None, loaded.config, "bpe:x"]
