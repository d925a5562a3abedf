"""The BPE tokenizer and tokenized splits: round trips, fingerprints, held-out split, document ranges."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lm_worker.data.corpus import is_heldout, read_jsonl
from lm_worker.data.prepare import (
    PrepareConfig,
    hashed_order,
    load_prepared,
    prepare_corpus,
    prepare_retro_split,
    read_corpus,
)
from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.data.tokenizer import Tokenizer, train_tokenizer

CODE = 'def f(x):\n    """Twice x."""\n    return 2 * x\n\n\tclass A:  # tab, unicode: é ✓\n        pass\n'


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer([CODE * 20, "import os\nprint(os.getcwd())\n" * 20], vocab_size=300)


def test_round_trip_keeps_whitespace_and_unicode(tokenizer):
    ids = tokenizer.encode(CODE)
    assert tokenizer.decode(ids) == CODE
    assert len(ids) < len(CODE.encode())  # merges were learnt
    assert tokenizer.vocab_size == 300 and 0 <= tokenizer.eos_id < 300


def test_save_load_keeps_fingerprint(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.encode(CODE) == tokenizer.encode(CODE)
    other = train_tokenizer(["something else entirely " * 50], vocab_size=300)
    assert other.fingerprint != tokenizer.fingerprint


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)


def test_write_token_store_ranges(tmp_path):
    store = write_token_store(tmp_path / "s", [("a", [5, 6, 7]), ("b", [8])], eos_id=1, tokenizer_fingerprint="t")
    assert store.tokens.tolist() == [5, 6, 7, 1, 8, 1]
    assert store.doc_ids.tolist() == [0, 0, 0, 0, 1, 1]
    assert [(d.name, d.start, d.end) for d in store.documents] == [("a", 0, 4), ("b", 4, 6)]
    for doc, span in enumerate(store.documents):  # every token's document range holds it
        assert (store.doc_ids[span.start:span.end] == doc).all()
    reopened = TokenStore.open(tmp_path / "s")
    assert reopened.tokenizer_fingerprint == "t" and len(reopened) == 6


def test_prepare_folder_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    for i in range(60):
        (corpus / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (corpus / f"pkg{i % 3}" / f"m{i}.py").write_text(f"# module {i}\n" + CODE * (1 + i % 4))
    report = prepare_corpus(PrepareConfig(out=tmp_path / "data", corpus=str(corpus), vocab_size=300,
                                          heldout_fraction=0.2, progress=False))
    tokenizer, train, heldout = load_prepared(tmp_path / "data")
    assert report.tokenizer_fingerprint == tokenizer.fingerprint
    assert report.documents == {"train": len(train.documents), "heldout": len(heldout.documents)}
    assert report.documents["train"] + report.documents["heldout"] == 60
    assert report.tokens == {"train": len(train), "heldout": len(heldout)}
    names = {d.name for d in heldout.documents}
    assert names == {f"pkg{i % 3}/m{i}.py" for i in range(60) if is_heldout(f"pkg{i % 3}/m{i}.py", 0.2)}
    for store in (train, heldout):  # each document decodes to its file, then EOS
        span = store.documents[0]
        ids = store.tokens[span.start:span.end]
        assert ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids[:-1]) == (corpus / span.name).read_text()


def test_prepare_token_budget(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": CODE * 3}) for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    full = prepare_corpus(PrepareConfig(out=tmp_path / "full", corpus=str(tmp_path / "c.jsonl"), vocab_size=300,
                                        heldout_fraction=0.25, id_field="id", progress=False))
    cut = prepare_corpus(PrepareConfig(out=tmp_path / "cut", corpus=str(tmp_path / "c.jsonl"), vocab_size=300,
                                       heldout_fraction=0.25, id_field="id", max_train_tokens=200, progress=False))
    per_doc = full.tokens["train"] // full.documents["train"]
    assert cut.tokens["train"] >= 200 and cut.tokens["train"] < 200 + per_doc
    assert cut.documents["heldout"] == full.documents["heldout"]


def test_prepare_errors(tmp_path):
    with pytest.raises(ValueError, match="not 'stdlib'"):
        prepare_corpus(PrepareConfig(out=tmp_path / "x", corpus=str(tmp_path / "nowhere")))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="split empty"):
        prepare_corpus(PrepareConfig(out=tmp_path / "x", corpus=str(tmp_path / "one"), progress=False))
    write_token_store(tmp_path / "y" / "train", [("a", [1])], 0, "other")
    write_token_store(tmp_path / "y" / "heldout", [("b", [1])], 0, "other")
    train_tokenizer(["abc " * 10], 300).save(tmp_path / "y" / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenized with other"):
        load_prepared(tmp_path / "y")
    assert np.asarray(TokenStore.open(tmp_path / "y" / "train").tokens).tolist() == [1, 0]


def test_retro_split_is_the_next_training_side_documents_the_train_split_left_out(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": f"# {i}\n" + CODE * (1 + i % 3)}) for i in range(60)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    config = PrepareConfig(out=tmp_path / "data", corpus=str(tmp_path / "c.jsonl"), vocab_size=300,
                           heldout_fraction=0.2, id_field="id", max_train_tokens=300, max_retro_tokens=400,
                           progress=False)
    report = prepare_corpus(config)
    _, train, heldout = load_prepared(config.out)
    retro = TokenStore.open(config.out / "retro")
    assert report.documents["retro"] == len(retro.documents) and report.tokens["retro"] == len(retro)
    names = {s: [d.name for d in store.documents] for s, store in (("train", train), ("heldout", heldout),
                                                                    ("retro", retro))}
    assert not set(names["retro"]) & (set(names["train"]) | set(names["heldout"]))
    side = [d.name for d in hashed_order([d for d in read_corpus(config.corpus, "id") if not is_heldout(d.name, 0.2)])]
    assert side[:len(names["train"]) + len(names["retro"])] == names["train"] + names["retro"]  # the next ones
    per_doc = len(retro) // len(retro.documents)
    assert 400 <= len(retro) < 400 + 3 * per_doc
    assert [TokenStore.open(config.out / s).max_tokens for s in ("train", "heldout", "retro")] == [300, 0, 400]
    again = prepare_retro_split(config)  # e.g. a folder prepared before the retro split existed: the same
    assert [d.name for d in again.documents] == names["retro"]
    assert np.array_equal(np.asarray(again.tokens), np.asarray(retro.tokens))
    other = prepare_retro_split(replace(config, heldout_fraction=0.05, max_retro_tokens=10_000))  # not OUT's
    assert not {d.name for d in other.documents} & set(names["heldout"])  # held-out text never trains


def test_retro_split_errors(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "text": CODE}) for i in range(20)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    config = PrepareConfig(out=tmp_path / "data", corpus=str(tmp_path / "c.jsonl"), vocab_size=300,
                           heldout_fraction=0.2, id_field="id", progress=False)
    prepare_corpus(config)  # every training-side document in train
    assert not (config.out / "retro").exists()
    with pytest.raises(ValueError, match="none are left"):
        prepare_retro_split(replace(config, max_retro_tokens=100))
    with pytest.raises(ValueError, match="max_retro_tokens must be at least 1"):
        prepare_retro_split(config)
    assert not (config.out / "retro").exists()


def test_a_store_fingerprint_changes_with_any_token_and_only_then(tmp_path):
    """What a saved evaluation share is checked against: same names and lengths, other tokens, another
    fingerprint; the same text written again, the same one."""
    from lm_worker.evaluation.shares import store_fingerprint

    a = store_fingerprint(write_token_store(tmp_path / "a", [("doc", [5, 6, 7, 8])], 0, "fp").directory)
    again = store_fingerprint(write_token_store(tmp_path / "again", [("doc", [5, 6, 7, 8])], 0, "fp").directory)
    other = store_fingerprint(write_token_store(tmp_path / "b", [("doc", [5, 6, 7, 9])], 0, "fp").directory)
    assert a == again != other


def test_eos_text_inside_a_document_is_text_not_a_document_end(tokenizer):
    """A document may hold EOS's own text ("<|endoftext|>" in a JSONL record): it stays text, so EOS ends
    documents alone, and it decodes back as it was."""
    text = 'before = "<|endoftext|>"\nafter'
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids and tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text]) == [ids]


@pytest.mark.parametrize("line, words", [
    (b'{"id": "x", "text": "caf\xe9"}', ":2 is not UTF-8: byte 0xe9 at column 25"),
    (b'{"id": "x", "text": null}', ":2: field 'text' is null, not a string"),
    (b'{"id": "x", "text": ["a", "b"]}', ":2: field 'text' is a JSON list, not a string"),
    (b'{"id": "x", "text": "a\\ud800b"}', ":2: field 'text' holds a lone surrogate '\\ud800' at character 1"),
    (b'{"id": "x", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ":2 is not JSON this reader takes: nested "
                                                                      "too deep"),
    (b'{"id": 1' + b"0" * 5000 + b', "text": "a"}', ":2 is not JSON this reader takes: Exceeds the limit"),
], ids=["latin-1", "null", "list", "surrogate", "nesting", "long-int"])
def test_a_jsonl_record_that_is_no_text_names_the_file_and_the_line(tmp_path, line, words):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(json.dumps({"id": "a", "text": "first"}).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{corpus}{words}")):
        list(read_jsonl(corpus, id_field="id"))


def test_jsonl_documents_without_ids_are_named_by_their_line_from_zero(tmp_path):
    """As every prepared run recorded them: the retro split tells the train split's documents by name."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [d.name for d in read_jsonl(corpus)] == ["c.jsonl:0", "c.jsonl:2"]


def test_empty_documents_are_counted_and_files_not_utf8_named(tmp_path, caplog):
    """Whitespace-only documents are left out, and the report counts them; a file that is not UTF-8 is read
    with U+FFFD for its other bytes and named in a warning."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"# module {i}\n" + CODE)
    (corpus / "empty.py").write_text("")
    (corpus / "blank.txt").write_text("  \n\t\n")
    (corpus / "latin.txt").write_bytes("# café\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="lm_worker.data.corpus"):
        report = prepare_corpus(PrepareConfig(out=tmp_path / "data", corpus=str(corpus), vocab_size=300,
                                              heldout_fraction=0.2, progress=False))
    assert report.empty == 2 and sum(report.documents.values()) == 41
    assert "1 of 43 files are not UTF-8 and were read with U+FFFD in place of their other bytes: 'latin.txt'" \
        in caplog.text


def test_the_current_folder_is_refused_as_the_output(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"# module {i}\n" + CODE)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for out in (".", ".."):
        with pytest.raises(ValueError, match=f"out '{re.escape(out)}' is the current folder or holds it"):
            prepare_corpus(PrepareConfig(out=Path(out), corpus=str(corpus), vocab_size=300, heldout_fraction=0.2,
                                         progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "here"] and not list(Path(".").iterdir())


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _as_npz(path: Path) -> None:
    array = np.load(path)
    with path.open("wb") as f:
        np.savez(f, array)


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "tokens.npy").write_bytes(b""), "tokens.npy is not a loadable .npy array (No data left in file)"),
    (lambda d: _cut(d / "tokens.npy"), "tokens.npy is not a loadable .npy array"),
    (lambda d: _as_npz(d / "doc_ids.npy"), "doc_ids.npy is a .npz archive, not a 1-D array of integer ids"),
    (lambda d: np.save(d / "tokens.npy", np.zeros((2, 3), np.float32)), "tokens.npy holds float32 (2, 3), not a 1-D"),
    (lambda d: np.save(d / "doc_ids.npy", np.zeros(3, np.int32)), "doc_ids.npy holds 3 ids for 7 tokens"),
    (lambda d: (d / "documents.json").write_text(json.dumps(
        {"tokenizer": "t", "documents": [{"name": "a", "start": 0, "end": 99}]})),
     "documents.json: its documents do not tile the 7 tokens of tokens.npy in order"),
    (lambda d: (d / "documents.json").write_text(json.dumps(  # the old documents of new arrays: same length
        {"tokenizer": "old", "documents": [{"name": "a", "start": 0, "end": 3}, {"name": "b", "start": 3, "end": 7}]})),
     "doc_ids.npy does not agree with"),
    (lambda d: (d / "documents.json").write_text(json.dumps(
        {"tokenizer": "t", "documents": [{"name": "a", "start": 0, "end": 4}, {"name": "b", "start": 5, "end": 7}]})),
     "documents.json: its documents do not tile the 7 tokens of tokens.npy in order"),
    (lambda d: (d / "documents.json").write_text(json.dumps(
        {"tokenizer": "t", "documents": [{"name": "a", "start": "0", "end": None}]})),
     "documents.json: document 0's 'start' and 'end' are not whole numbers"),
], ids=["empty", "cut-short", "npz", "2-d-floats", "doc-ids-short", "documents-past-the-end", "spans-out-of-step",
        "a-gap", "positions-not-numbers"])
def test_a_damaged_token_store_is_named_when_opened(tmp_path, damage, words):
    """A token store with a file damaged or out of step with the others: a ValueError naming the file, not a
    numpy EOFError or a store whose documents run past its tokens."""
    write_token_store(tmp_path / "split", [("a", [1, 2, 3]), ("b", [4, 5])], eos_id=0, tokenizer_fingerprint="t")
    damage(tmp_path / "split")
    with pytest.raises(ValueError, match=re.escape(words)) as refused:
        TokenStore.open(tmp_path / "split")
    assert str(tmp_path / "split") in str(refused.value)


def test_a_split_written_again_is_swapped_in_whole(tmp_path, monkeypatch):
    """A split is written beside its folder and swapped in: a write stopped half-way leaves the old split as
    it was (its files were overwritten in place, one after another), and a finished one leaves no other files."""
    split = tmp_path / "split"
    old = write_token_store(split, [("a", [1, 2, 3]), ("b", [4, 5])], eos_id=0, tokenizer_fingerprint="old")
    before = {p.name: p.read_bytes() for p in split.iterdir()}
    real_save, saved = np.save, []

    def stopped(path, array, *args, **kwargs):
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt
        real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_token_store(split, [("c", [6, 7, 8, 9])], eos_id=0, tokenizer_fingerprint="new")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in split.iterdir()} == before and [p.name for p in tmp_path.iterdir()] == [
        "split"]
    assert TokenStore.open(split).tokenizer_fingerprint == old.tokenizer_fingerprint
    real_rename = os.rename

    def stopped_between(src, dst):  # stopped as the new split was to take the old one's place
        if ".tmp-" in str(src):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", stopped_between)
    with pytest.raises(KeyboardInterrupt):
        write_token_store(split, [("c", [6, 7, 8, 9])], eos_id=0, tokenizer_fingerprint="new")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in split.iterdir()} == before  # the old split is put back
    assert [p.name for p in tmp_path.iterdir()] == ["split"]
    shutil.copytree(split, tmp_path / ".split.old-99999")  # what a write killed between its renames leaves
    shutil.rmtree(split)
    (tmp_path / ".split.tmp-99998").mkdir()  # and one killed while writing
    new = write_token_store(split, [("c", [6, 7, 8, 9])], eos_id=0, tokenizer_fingerprint="new")
    assert new.tokenizer_fingerprint == "new" and np.asarray(new.tokens).tolist() == [6, 7, 8, 9, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_a_file_name_that_is_not_utf8_is_named_by_its_escapes(tmp_path):
    """A folder corpus holding a file whose name's bytes are not UTF-8 prepares (it stopped prepare with
    UnicodeEncodeError), the document named by its escapes, held out or not by those bytes alone."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"f{i}.txt").write_text(CODE)
    with open(os.path.join(os.fsencode(folder), b"bad\xff.txt"), "w") as f:
        f.write(CODE)
    config = PrepareConfig(out=tmp_path / "data", corpus=str(folder), vocab_size=300, heldout_fraction=0.5,
                           progress=False)
    prepare_corpus(config)
    names = [d.name for s in ("train", "heldout") for d in TokenStore.open(config.out / s).documents]
    assert sorted(names) == sorted(["bad\\xff.txt", *(f"f{i}.txt" for i in range(12))])
    assert [d.name for d in read_corpus(str(folder))][0] == "bad\\xff.txt"
