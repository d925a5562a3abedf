"""`lm-worker` refuses flags out of range or given together to no effect in its parser (exit 2, one line
naming the flag, nothing written); `prepare` replaces a prepared folder whole and never another kind of
folder; `train` stops without a checkpoint once its loss is no number. Tiny artefacts made here: no
servers, no Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import lm_worker.data.prepare
from lm_worker.cli import main

QUIET = ["--no-progress", "--log-level", "WARNING"]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its path relative to it, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A JSONL corpus of 10 small documents, and PREPARED (its split, at 300 tokens) beside it."""
    root = tmp_path_factory.mktemp("refusals")
    texts = [f"class Item{n}:\n    size = {n}\n    def grow(self):\n        return self.size * {n}\n" * 3
             for n in range(10)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": f"item{n}", "text": t}) + "\n"
                                               for n, t in enumerate(texts)))
    assert main([*QUIET, "prepare", "--corpus", str(root / "corpus.jsonl"), "--out", str(root / "prepared"),
                 "--vocab-size", "300", "--heldout-fraction", "0.2"]) == 0
    return root / "corpus.jsonl"


@pytest.mark.parametrize("args, words", [
    (["prepare", "--out", "{tmp}/p", "--vocab-size", "99999999999"],
     "argument --vocab-size: must be in [257, 1000000], got 99999999999"),
    *((["train", "--data", "{tmp}/d", "--out", "{tmp}/p", "--lr", lr],
       f"argument --lr: must be > 0 and finite, got {lr}") for lr in ("inf", "nan", "0", "-0.5")),
    (["train", "--data", "{tmp}/d", "--out", "{tmp}/p", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["train", "--kind", "retro", "--data", "{tmp}/d", "--out", "{tmp}/p", "--train-base"],
     "--train-base applies with --init-from only: give --init-from, or leave it out"),
    (["train", "--data", "{tmp}/d", "--out", "{tmp}/p", "--neighbours", "{tmp}/n"],
     "--neighbours applies to --kind retro only: the LM reads no neighbours"),
    (["build", "{tmp}/s", "--out", "{tmp}/p", "--num-cpus", "0"], "argument --num-cpus: must be >= 1, got 0"),
    (["build", "{tmp}/s", "--out", "{tmp}/p", "--num-cpus", "-1"], "argument --num-cpus: must be >= 1, got -1"),
    (["build", "{tmp}/s", "--out", "{tmp}/p", "--cpus-per-shard", "0"],
     "argument --cpus-per-shard: must be >= 1, got 0"),
    (["build", "{tmp}/s", "--out", "{tmp}/p", "--address", "x:y"],
     "argument --address: expected auto, host:port or ray://host:port with a port in [1, 65535], got 'x:y'"),
    (["generate", "--checkpoint", "{tmp}/c", "--data", "{tmp}/d", "--prompt", "hi", "--strategy", "beam", "--beams",
      "100000"], "argument --beams: must be in [1, 64], got 100000"),
    (["retrieval-demo", "--out", "{tmp}/p", "--keys", "500"], "argument --keys: must be >= 624, got 500"),
    (["retrieval-demo", "--out", "{tmp}/p", "--keys", "1"], "argument --keys: must be >= 624, got 1"),
    (["demo", "--quick", "--run", "{tmp}/p", "--address", "x:y"],
     "argument --address: expected auto, host:port or ray://host:port with a port in [1, 65535], got 'x:y'"),
    (["encode", "knnlm", "--data", "{tmp}/d", "--out", "{tmp}/p", "--address", "host:0"],
     "argument --address: expected auto, host:port or ray://host:port with a port in [1, 65535], got 'host:0'"),
])
def test_the_parser_refuses_what_no_run_could_use(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exited:
        main([*QUIET, *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err == f"lm-worker {args[0]}: error: {words} (see --help)\n", err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("marks, words", [({"manifest.json": "{}"}, "is a datastore"),
                                          ({"source.json": '{"kind": "retro"}'}, "is a RETRO source"),
                                          ({"notes.txt": "mine"}, "holds other files")])
def test_prepare_refuses_an_out_of_another_kind(corpus, tmp_path, capsys, marks, words):
    for name, text in marks.items():
        (tmp_path / name).write_text(text)
    code = main([*QUIET, "prepare", "--corpus", str(corpus), "--out", str(tmp_path), "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert code == 1 and err == (f"lm-worker prepare: error: --out {tmp_path} {words}, not a folder that `prepare` "
                                 "wrote: give another folder\n")
    assert files_of(tmp_path) == {name: text.encode() for name, text in marks.items()}


def test_an_interrupted_prepare_leaves_the_prepared_folder_as_it_was(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the token streams are written: the old tokenizer and streams stay together, and no
    half-written folder is left beside them; a whole prepare then replaces them."""
    data = tmp_path / "data"
    args = [*QUIET, "prepare", "--corpus", str(corpus), "--out", str(data), "--heldout-fraction", "0.2"]
    assert main([*args, "--vocab-size", "300"]) == 0
    before = files_of(data)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(lm_worker.data.prepare, "write_token_store", interrupted)
        assert main([*args, "--vocab-size", "320"]) == 130
    assert files_of(data) == before and [p.name for p in tmp_path.iterdir()] == ["data"]
    real_rename = os.rename  # stopped between the swap's two renames: the old folder is put back

    def second_stopped(source, target):
        if Path(target) == data and Path(source).name != ".data.replaced":  # the new folder's move, not the undo
            raise KeyboardInterrupt
        real_rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", second_stopped)
        assert main([*args, "--vocab-size", "320"]) == 130
    assert files_of(data) == before
    assert main([*args, "--vocab-size", "320"]) == 0
    assert files_of(data)["tokenizer.json"] != before["tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    capsys.readouterr()


def test_train_stops_without_a_checkpoint_once_the_loss_is_no_number(corpus, tmp_path, capsys):
    code = main([*QUIET, "train", "--data", str(corpus.parent / "prepared"), "--out", str(tmp_path / "lm"),
                 "--preset", "tiny", "--steps", "6", "--seq-len", "16", "--batch-size", "2", "--warmup", "0",
                 "--eval-every", "3", "--checkpoint-every", "100", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("lm-worker train: error: the training loss became ") and err.endswith(
        ": training diverged (try a lower --lr than 1e+30); stopped without saving a checkpoint\n"), err
    assert not list((tmp_path / "lm").glob("*"))


def test_train_refuses_neighbours_fetched_for_another_window(corpus, tmp_path, capsys, caplog):
    """RETRO's train neighbours leave out the documents of each chunk's window (`neighbours --seq-len`): a
    training window longer than that one would predict text its chunks retrieved, so `train` refuses it,
    names both, and writes nothing; a shorter one (more left out than needed) and an unrecorded window are
    trained on with a warning."""
    prepared, neighbours = corpus.parent / "prepared", tmp_path / "source"
    neighbours.mkdir()
    np.save(neighbours / "neighbours-train.npy", np.zeros((1, 2, 16), dtype=np.int32))
    (neighbours / "neighbours-train.json").write_text(json.dumps({"window": 32}))
    args = [*QUIET, "train", "--kind", "retro", "--preset", "tiny", "--chunk-len", "8", "--data", str(prepared),
            "--neighbours", str(neighbours), "--steps", "1", "--batch-size", "1"]
    code = main([*args, "--out", str(tmp_path / "retro"), "--seq-len", "64"])
    err = capsys.readouterr().err
    assert code == 1 and err == (f"lm-worker train: error: --neighbours {neighbours}: neighbours-train.npy left out "
                                 "each chunk's documents for a window of 32 tokens, --seq-len is 64: train with "
                                 "--seq-len 32, or fetch them again with `lm-worker neighbours --seq-len 64`\n"), err
    assert not (tmp_path / "retro").exists()
    with caplog.at_level("WARNING"):
        main([*args, "--out", str(tmp_path / "retro"), "--seq-len", "16"])
    assert "for a window of 32 tokens, longer than --seq-len 16: more than needed" in caplog.text
    (neighbours / "neighbours-train.json").unlink()
    with caplog.at_level("WARNING"):
        main([*args, "--out", str(tmp_path / "retro"), "--seq-len", "64"])
    assert "the window its own-document exclusions were made for is unknown" in caplog.text
