"""`prepare` and its data kept safe: an empty --id-field refused, a split's leftovers told apart by exact name,
one prepare of a folder at a time, a replaced corpus put back, and neighbours that are no token ids refused."""

from __future__ import annotations

import fcntl
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import lm_worker.data.prepare as prepare_module
from lm_worker.cli import main
from lm_worker.data.corpus import read_jsonl
from lm_worker.data.prepare import PrepareConfig, load_prepared, prepare_corpus, read_corpus
from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.training.batches import load_neighbours

QUIET = ["--no-progress", "--log-level", "WARNING"]


def write_corpus(path: Path, word: str = "handler") -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "": f"e{i}", "text": f"def {word}_{i}(x):\n    return x\n" * 4})
                            + "\n" for i in range(12)))
    return path


def config(tmp_path: Path, corpus: Path, **kwargs) -> PrepareConfig:
    return PrepareConfig(out=tmp_path / "data", corpus=str(corpus), vocab_size=280, heldout_fraction=0.2,
                         progress=False, **kwargs)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *args) -> str:
    code = main([*QUIET, *[str(a) for a in args]])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# ------------------------------------------------------------------------------------------ 1. --id-field ""

EMPTY_ID = "id_field is empty: give the JSONL field that names each document, or leave it out to name them by line"


def test_an_empty_id_field_is_refused_not_taken_as_none(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    for call in (lambda: read_jsonl(corpus, id_field=""), lambda: read_corpus(str(corpus), ""),
                 lambda: config(tmp_path, corpus, id_field="")):
        with pytest.raises(ValueError, match="^" + re.escape(EMPTY_ID) + "$"):
            call()
    err = one_line_error(capsys, "prepare", "--corpus", corpus, "--id-field", "", "--out", tmp_path / "data")
    assert err == "lm-worker prepare: error: --" + EMPTY_ID.replace("id_field", "id-field", 1)
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------ 2. leftovers by name


def test_a_split_touches_only_its_own_leftovers_whatever_its_name(tmp_path):
    """A split named with glob characters (`s[1]`), or a prefix of another's leftover (`a` of `a.old-x`'s), neither
    takes another split's old folder as its own nor removes another write's work folder."""
    theirs = [tmp_path / ".s1.old-123", tmp_path / ".s1.tmp-5", tmp_path / ".a.old-x.tmp-7"]
    for folder in theirs:
        folder.mkdir()
        (folder / "keep").write_text(folder.name)
    (tmp_path / ".s[1].tmp-42").mkdir()  # its own, left by a write killed while writing
    store = write_token_store(tmp_path / "s[1]", [("d", [3, 4])], eos_id=0, tokenizer_fingerprint="t")
    write_token_store(tmp_path / "a", [("d", [5])], eos_id=0, tokenizer_fingerprint="t")
    assert np.asarray(store.tokens).tolist() == [3, 4, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s[1]", "a", *(f.name for f in theirs)])
    assert [(f / "keep").read_text() for f in theirs] == [f.name for f in theirs]


# ------------------------------------------------------------------------------------------ 3. one prepare at a time


def test_a_second_prepare_of_the_same_folder_is_refused_while_one_runs(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl")
    other = write_corpus(tmp_path / "o.jsonl", "other")
    real, calls, refusals = prepare_module.train_tokenizer, [], []

    def meanwhile(*args, **kwargs):  # a second prepare of the same --out starts while the first trains
        calls.append(1)
        if len(calls) == 1:
            try:
                prepare_corpus(config(tmp_path, other))
            except ValueError as err:
                refusals.append(str(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "train_tokenizer", meanwhile)
    report = prepare_corpus(config(tmp_path, corpus))
    out = (tmp_path / "data").resolve()
    assert refusals == [f"another prepare is writing {out}: wait for it to end, or choose another output folder"]
    names = {d.name for s in load_prepared(out)[1:] for d in s.documents}
    assert names == {f"c.jsonl:{i}" for i in range(12)} and report.out == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "data", "o.jsonl"]


def test_the_cli_refuses_a_prepare_while_another_holds_the_folder(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    with open(tmp_path / ".data.prepare.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = one_line_error(capsys, "prepare", "--corpus", corpus, "--out", tmp_path / "data", "--vocab-size", "280",
                             "--heldout-fraction", "0.2")
    assert err == (f"lm-worker prepare: error: another prepare is writing {tmp_path / 'data'}: wait for it to end, "
                   "or choose another output folder")
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------------------ 4. the old corpus put back


def test_a_corpus_left_aside_by_a_stopped_swap_is_put_back(tmp_path, monkeypatch):
    """Killed between its two renames, a prepare leaves the old corpus at .OUT.replaced and OUT missing: the next
    prepare puts it back first, so that it is still there when that prepare is stopped too."""
    data = tmp_path / "data"
    prepare_corpus(config(tmp_path, write_corpus(tmp_path / "c.jsonl")))
    before = contents(data)
    data.rename(tmp_path / ".data.replaced")  # the state a kill between the renames leaves
    shutil.copytree(tmp_path / ".data.replaced", tmp_path / ".data.preparing")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "train_tokenizer", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(config(tmp_path, write_corpus(tmp_path / "o.jsonl", "other")))
    assert contents(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "data", "o.jsonl"]


def test_a_stale_replaced_corpus_beside_a_whole_one_is_removed(tmp_path):
    data = tmp_path / "data"
    corpus = write_corpus(tmp_path / "c.jsonl")
    prepare_corpus(config(tmp_path, corpus))
    shutil.copytree(data, tmp_path / ".data.replaced")  # killed after both renames: the old one is stale
    prepare_corpus(config(tmp_path, write_corpus(tmp_path / "o.jsonl", "other")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "data", "o.jsonl"]
    assert {d.name for d in TokenStore.open(data / "train").documents} <= {f"o.jsonl:{i}" for i in range(12)}


# ------------------------------------------------------------------------------------------ 5. neighbours' dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_neighbours_that_are_not_integers_are_refused(tmp_path, dtype):
    path = tmp_path / "neighbours-train.npy"
    np.save(path, np.ones((3, 2, 8), dtype=dtype))
    with pytest.raises(ValueError, match="^" + re.escape(
            f"{path} holds {np.dtype(dtype)} neighbours, not integer token ids: run lm-worker neighbours again") + "$"):
        load_neighbours(path, chunk_len=4, vocab_size=300)
    np.save(path, np.ones((3, 2, 8), dtype=np.int32))
    assert load_neighbours(path, chunk_len=4, vocab_size=300).shape == (3, 2, 8)


def test_neighbours_in_an_npz_archive_are_refused(tmp_path):
    path = tmp_path / "neighbours-train.npy"
    with path.open("wb") as f:
        np.savez(f, np.ones((3, 2, 8), dtype=np.int32))
    with pytest.raises(ValueError, match="^" + re.escape(
            f"{path} is a .npz archive, not an array of neighbours: run lm-worker neighbours again") + "$"):
        load_neighbours(path, chunk_len=4, vocab_size=300)
