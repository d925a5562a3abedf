"""Checkpoint files: a model, its config, optimizer state and extras round-trip; what loading would refuse
is not saved; a file damaged, foreign or edited by hand is refused with its path named."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_worker.models.checkpoint import load_checkpoint, save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

L = 4  # RetroConfig.tiny's chunk length


@pytest.mark.parametrize("kind", ["lm", "retro"])
def test_checkpoint_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(LMConfig.tiny(50)) if kind == "lm" else Retro(RetroConfig.tiny(50, n_neighbours=3))
    optimizer = torch.optim.AdamW(model.parameters())
    ones = torch.ones(1, 8, dtype=torch.long)
    (model.loss(ones, ones) if kind == "lm" else model.loss(ones, None, ones)).backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "m" / "checkpoint.pt", kind=kind, model=model, config=model.config, step=7,
                           tokenizer_fingerprint="bpe:x", extra={"note": [1, 2]}, optimizer=optimizer)
    loaded = load_checkpoint(path)
    assert (loaded.kind, loaded.step, loaded.tokenizer_fingerprint) == (kind, 7, "bpe:x")
    assert loaded.extra == {"note": [1, 2]}
    assert loaded.config == model.config and type(loaded.config) is type(model.config)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    neighbours = torch.randint(0, 50, (2, 3, 3, 2 * L), generator=torch.Generator().manual_seed(2))
    inputs = (tokens,) if kind == "lm" else (tokens, neighbours)
    with torch.no_grad():
        assert torch.equal(loaded.model(*inputs), model.eval()(*inputs))
    fresh = torch.optim.AdamW(loaded.model.parameters())
    fresh.load_state_dict(loaded.optimizer_state)
    assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert list(path.parent.iterdir()) == [path]  # the temporary file is gone


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="neither checkpoint.pt nor a Hugging Face config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="is not a torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="is not an lm_worker checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    model = TransformerLM(LMConfig.tiny(10))
    with pytest.raises(ValueError, match="cannot save kind 'hf'"):
        save_checkpoint(tmp_path / "x.pt", kind="hf", model=model, config=model.config, step=0,
                        tokenizer_fingerprint="", extra={})
    other = LMConfig.tiny(10, n_head=4 if model.config.n_head != 4 else 2)  # same tensors, another model
    with pytest.raises(ValueError, match="config does not describe the model"):
        save_checkpoint(tmp_path / "y.pt", kind="lm", model=model, config=other, step=0, tokenizer_fingerprint="",
                        extra={})
    assert not (tmp_path / "y.pt").exists()


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("n_head"), "its LMConfig lacks the fields ['n_head']"),  # it loaded as the default 4 heads
    (lambda c: c.update(max_len="abc"), "max_len must be a positive integer, got 'abc'"),
    (lambda c: c.update(n_head=0), "n_head must be a positive integer, got 0"),  # a ZeroDivisionError
    (lambda c: c.update(n_head=3), "d_model 32 must split into 3 heads of even size"),  # named no file
    (lambda c: c.update(dropout="0.1"), "dropout must lie in [0, 1), got '0.1'"),
])
def test_a_checkpoint_config_edited_by_hand_is_refused_naming_the_file(tmp_path, change, words):
    """Every config field is saved, so every one must be there when loading (a missing one took its default,
    here another number of heads over the same tensors: another model, silently), and each error names
    the file."""
    model = TransformerLM(LMConfig.tiny(10))
    path = save_checkpoint(tmp_path / "lm.pt", kind="lm", model=model, config=model.config, step=0,
                           tokenizer_fingerprint="", extra={})
    payload = torch.load(path, weights_only=True)
    change(payload["config"])
    torch.save(payload, path)
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    assert str(refused.value).startswith(f"{path} does not hold a loadable lm model: ") and words in str(refused.value)


def test_a_checkpoint_that_could_not_be_loaded_is_not_saved(tmp_path):
    """`save_checkpoint` refuses what `load_checkpoint` would refuse later: extras that are not plain data (a
    numpy scalar, a Path: loading reads plain data only) and a model of another kind than the one named."""
    model, retro = TransformerLM(LMConfig.tiny(10)), Retro(RetroConfig.tiny(10))
    for extra, words in (({"loss": np.float32(1.5)}, "extra['loss'] is a numpy.float32"),
                         ({"runs": [{"out": Path("/x")}]}, "extra['runs'][0]['out'] is a pathlib.PosixPath")):
        with pytest.raises(ValueError, match=re.escape(words)):
            save_checkpoint(tmp_path / "x.pt", kind="lm", model=model, config=model.config, step=0,
                            tokenizer_fingerprint="", extra=extra)
    with pytest.raises(ValueError, match="kind 'lm' holds TransformerLM models, not Retro"):
        save_checkpoint(tmp_path / "x.pt", kind="lm", model=retro, config=retro.config, step=0,
                        tokenizer_fingerprint="", extra={})
    assert not list(tmp_path.iterdir())
    plain = {"losses": {"train": [[1, 2.5]]}, "layers": (1, 2), "none": None, "flag": True}
    path = save_checkpoint(tmp_path / "x.pt", kind="lm", model=model, config=model.config, step=0,
                           tokenizer_fingerprint="", extra=plain)
    assert load_checkpoint(path).extra == plain


def test_a_checkpoint_is_on_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """The file is fsynced before the rename that publishes it, and the folder after: a crash leaves the
    old checkpoint or the new one, never an empty file under the name (the rename was not ordered)."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    model = TransformerLM(LMConfig.tiny(10))
    path = save_checkpoint(tmp_path / "lm.pt", kind="lm", model=model, config=model.config, step=0,
                           tokenizer_fingerprint="", extra={})
    monkeypatch.undo()
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert ".lm.pt.tmp-" in events[0][1] and events[1][1] == str(path) and events[2][1] == str(tmp_path)
    assert load_checkpoint(path).step == 0
