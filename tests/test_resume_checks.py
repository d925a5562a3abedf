"""A resume checks the extras its checkpoint holds (the losses so far, the training config, the base LM's
fingerprint) and refuses odd ones naming the file, before any training: `heldout: 3` was a TypeError
traceback deep in the training loop. Tiny preset, a tiny corpus made here."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from train_data import small_corpus

from lm_worker.models.checkpoint import load_checkpoint, save_checkpoint
from lm_worker.training.config import TrainConfig
from lm_worker.training.train import make_optimizer, train

BASE = TrainConfig(kind="lm", preset="tiny", seq_len=16, batch_size=4, steps=2, lr=3e-3, min_lr=3e-4, warmup=1,
                   eval_every=2, eval_batches=1, checkpoint_every=10, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm")
    train(BASE, data, out, progress=False)
    return out


def resave(run: Path, out: Path, change) -> Path:
    """`run`'s checkpoint saved again to `out` with its extras changed (a valid digest over them)."""
    loaded = load_checkpoint(run)
    optimizer = make_optimizer(loaded.model, BASE)
    optimizer.load_state_dict(loaded.optimizer_state)
    extra = dict(loaded.extra)
    change(extra)
    return save_checkpoint(out / "checkpoint.pt", kind=loaded.kind, model=loaded.model, config=loaded.config,
                           step=loaded.step, tokenizer_fingerprint=loaded.tokenizer_fingerprint, extra=extra,
                           optimizer=optimizer)


@pytest.mark.parametrize("change, words", [
    (lambda e: e.update(losses={"train": [], "heldout": 3}), "its extra 'losses'"),
    (lambda e: e.update(losses=[1, 2]), "its extra 'losses'"),
    (lambda e: e.update(losses={"train": [[1, "x"]], "heldout": []}), "its extra 'losses'"),
    (lambda e: e.update(losses={"train": [[1, 2.0, 3]], "heldout": []}), "its extra 'losses'"),
    (lambda e: e.update(losses={"train": []}), "its extra 'losses'"),
    (lambda e: e.update(train_config=[1]), "its extra 'train_config'"),
    (lambda e: e.update(base_fingerprint=3), "its extra 'base_fingerprint'"),
])
def test_a_resume_refuses_odd_extras_naming_the_file(data, run, tmp_path, change, words):
    path = resave(run, tmp_path, change)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="^" + re.escape(f"{path} cannot be resumed: {words}")):
        train(BASE, data, tmp_path, progress=False)
    assert path.read_bytes() == before


def test_a_resume_of_plain_extras_carries_on(data, run, tmp_path):
    resave(run, tmp_path, lambda e: None)
    report = train(replace(BASE, steps=3), data, tmp_path, progress=False)
    assert report.steps == 3 and [s for s, _ in load_checkpoint(tmp_path).extra["losses"]["train"]] == [1, 2, 3]
