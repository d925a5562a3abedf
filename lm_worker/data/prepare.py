"""Preparing a corpus: split it, train the tokenizer, write the token streams.

`prepare_corpus` reads a corpus, holds documents out by a fixed hash of their names, trains the
BPE tokenizer on the training split, and writes

    OUT/tokenizer.json
    OUT/train/   the training split (`lm_worker.data.token_store`)
    OUT/heldout/ the same for the held-out documents
    OUT/retro/   with `max_retro_tokens`: training-side documents the train split left out, the next
                 ones in the same hashed order: text the base LM never trains on, which RETRO's new
                 layers train on when RETRO is retro-fitted onto that LM (`prepare_retro_split`)

Example:
    >>> report = prepare_corpus(PrepareConfig(corpus="stdlib", out=Path("run/data")))
    >>> tokenizer, train, heldout = load_prepared(Path("run/data"))
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from lm_worker.data.corpus import Document, check_id_field, is_heldout, read_jsonl, read_stdlib, read_text_folder
from lm_worker.data.folders import exclusive_lock, swap_folders
from lm_worker.data.token_store import RETRO_SPLIT, SPLITS, TokenStore, write_token_store
from lm_worker.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)
PREPARED_ENTRIES = frozenset({"tokenizer.json", *SPLITS, RETRO_SPLIT})  # all that `prepare_corpus` writes in OUT
SPLIT_FILES = frozenset({"tokens.npy", "doc_ids.npy", "documents.json"})  # all `write_token_store` writes in a split


@dataclass(frozen=True)
class PrepareConfig:
    """What `prepare_corpus` reads and how much of it it keeps.

    `corpus` is "stdlib", a folder of text files, or a .jsonl file (field `text`, optional `id_field`).
    Documents are taken in a fixed hashed order until a split's token budget (0: no limit) is spent.
    `max_retro_tokens` > 0 also writes the "retro" split (`prepare_retro_split`); 0 writes none.
    """

    out: Path
    corpus: str = "stdlib"
    vocab_size: int = 4096
    heldout_fraction: float = 0.05
    max_train_tokens: int = 0
    max_heldout_tokens: int = 0
    max_retro_tokens: int = 0
    id_field: str | None = None
    progress: bool = True  # taken for the callers' sake: nothing here draws a bar (`train_tokenizer` says why)

    def __post_init__(self):
        for name in ("max_train_tokens", "max_heldout_tokens", "max_retro_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size {self.vocab_size} must exceed the 256 byte tokens")
        check_id_field(self.id_field)


@dataclass(frozen=True)
class PrepareReport:
    """Documents and tokens written per split."""

    out: Path
    tokenizer_fingerprint: str
    vocab_size: int
    documents: dict[str, int]
    tokens: dict[str, int]
    empty: int = 0  # documents of the corpus left out for holding no text but whitespace


def read_corpus(corpus: str, id_field: str | None = None) -> Iterator[Document]:
    """Documents of the built-in stdlib corpus, a text folder or a JSONL file (`id_field`: the JSONL field
    naming each document; ValueError for any other corpus, which it would not name)."""
    check_id_field(id_field)
    jsonl = corpus != "stdlib" and Path(corpus).is_file() and Path(corpus).suffix == ".jsonl"
    if id_field is not None and not jsonl:
        raise ValueError(f"id_field names a field of a .jsonl corpus; corpus {corpus!r} is not one")
    if corpus == "stdlib":
        return read_stdlib()
    path = Path(corpus)
    if path.is_dir():
        return read_text_folder(path)
    if path.is_file() and path.suffix == ".jsonl":
        return read_jsonl(path, id_field=id_field)
    raise ValueError(f"corpus {corpus!r} is not 'stdlib', a folder or a .jsonl file")


def hashed_order(docs: list[Document]) -> list[Document]:
    return sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).digest())


def _char_sample(docs: list[Document], token_budget: int) -> list[str]:
    """Texts for tokenizer training: the documents a token budget keeps (about 3 bytes a token)."""
    texts, chars = [], 0
    for doc in docs:
        if token_budget and chars >= 3 * token_budget:
            break
        texts.append(doc.text)
        chars += len(doc.text)
    return texts


def _tokenize_within(docs: list[Document], tokenizer: Tokenizer, budget: int, batch: int = 64
                     ) -> list[tuple[str, list[int]]]:
    """(name, ids) of documents in order until `budget` tokens (EOS included; 0: all) are kept."""
    kept, total = [], 0
    for start in range(0, len(docs), batch):
        group = docs[start:start + batch]
        for doc, ids in zip(group, tokenizer.encode_batch([d.text for d in group])):
            if budget and total >= budget:
                return kept
            kept.append((doc.name, ids))
            total += len(ids) + 1
    return kept


def _split_documents(config: PrepareConfig) -> tuple[dict[str, list[Document]], int]:
    """The corpus's non-empty documents by side, "train" and "heldout", each in the fixed hashed order, and
    how many documents were left out as empty."""
    every = list(read_corpus(config.corpus, config.id_field))
    docs = [d for d in every if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus {config.corpus!r} has no non-empty documents")
    if len(docs) < len(every):
        log.info("left out %d of the corpus's %d documents: empty, or whitespace alone", len(every) - len(docs),
                 len(every))
    split = {s: hashed_order([d for d in docs if is_heldout(d.name, config.heldout_fraction) == (s == "heldout")])
             for s in SPLITS}
    return split, len(every) - len(docs)


def prepare_corpus(config: PrepareConfig) -> PrepareReport:
    """Splits, trains the tokenizer on the training split, and writes the splits (see module doc) into a
    sibling folder, which replaces OUT whole once complete: stopped midway, OUT stays as it was.

    Raises:
        ValueError: a corpus or settings that cannot be prepared, OUT the current folder, or another prepare
            (`prepare_corpus`, `prepare_retro_split`) writing OUT now.
    """
    out = Path(config.out).resolve()  # "." names its folder: the work folder is its sibling
    if out == Path.cwd() or out in Path.cwd().parents:
        raise ValueError(f"out {str(config.out)!r} is the current folder or holds it: prepare replaces its output "
                         "whole; give a folder of its own, e.g. data")
    with _prepare_lock(config.out, out):
        return _prepare_held(config, out)


def _prepare_held(config: PrepareConfig, out: Path) -> PrepareReport:
    """`prepare_corpus` into the resolved `out`, whose prepare lock the caller holds."""
    _finish_replacing(out)
    split, empty = _split_documents(config)
    if not split["train"] or not split["heldout"]:
        count = len(split["train"]) + len(split["heldout"])
        raise ValueError(f"{count} documents leave a split empty at heldout_fraction {config.heldout_fraction}")
    work = out.parent / f".{out.name}.preparing"  # a sibling: moved into place only when whole
    if work.exists():
        shutil.rmtree(work)  # left by a prepare that was stopped (no other runs: we hold the lock)
    try:
        report = _write_prepared(replace(config, out=work), split)
    except ValueError as err:  # told of the folder it was to be
        shutil.rmtree(work, ignore_errors=True)
        raise ValueError(str(err).replace(str(work), str(out))) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _move_into_place(work, out)
    return replace(report, out=out, empty=empty)


def foreign_entries(out: Path) -> list[str]:
    """The paths (relative to `out`, sorted; [] where `out` is not a folder) in an existing folder `out` that
    `prepare_corpus` does not write, its splits' contents included: replacing `out` whole would delete them.
    An entry of the wrong type (a folder named tokenizer.json, a file or a link named as a split) is one; a
    foreign folder is named, not what it holds."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for entry in sorted(out.iterdir()):
        if entry.name == "tokenizer.json" and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name in PREPARED_ENTRIES - {"tokenizer.json"} and entry.is_dir() and not entry.is_symlink():
            found += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir())
                      if p.name not in SPLIT_FILES or not p.is_file() or p.is_symlink()]
            continue
        found.append(entry.name)
    return found


def _prepare_lock(given: Path, out: Path):
    """The lock of the prepares of the resolved `out` (OUT_PARENT/.NAME.prepare.lock), held for a whole
    prepare: ValueError naming `given` (OUT as the caller named it) where another prepare holds it."""
    return exclusive_lock(out.parent / f".{out.name}.prepare.lock",
                          f"another prepare is writing {given}: wait for it to end, or choose another output folder")


def _finish_replacing(out: Path) -> None:
    """Ends what a prepare stopped as it moved its folder into place left (`.NAME.replaced`): stopped between
    its two renames, OUT is missing and the old corpus goes back to its place (there is no other); stopped
    after them, the old one is removed."""
    old = out.parent / f".{out.name}.replaced"
    if not old.exists():
        return
    if out.exists():
        shutil.rmtree(old)
        return
    os.rename(old, out)
    log.warning("put back the prepared corpus at %s: a prepare that was replacing it was stopped between its "
                "renames", out)


def _move_into_place(work: Path, out: Path) -> None:
    """Replaces `out` (if there) with the complete folder `work`: `out` stays as it was until the swap,
    and is put back if the swap is stopped between its two renames."""
    old = out.parent / f".{out.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if not out.exists():
        work.rename(out)
        return
    swap_folders(work, out, old)
    shutil.rmtree(old)
    log.info("replaced the earlier prepared corpus at %s", out)


def _write_prepared(config: PrepareConfig, split: dict[str, list[Document]]) -> PrepareReport:
    """Trains the tokenizer and writes every split into `config.out`."""
    budget = {"train": config.max_train_tokens, "heldout": config.max_heldout_tokens}
    tokenizer = train_tokenizer(_char_sample(split["train"], budget["train"]), config.vocab_size)
    out = Path(config.out)
    out.mkdir(parents=True)
    tokenizer.save(out / "tokenizer.json")
    counts_docs, counts_tokens = {}, {}
    for name in SPLITS:
        kept = _tokenize_within(split[name], tokenizer, budget[name])
        store = write_token_store(out / name, kept, tokenizer.eos_id, tokenizer.fingerprint, budget[name])
        counts_docs[name], counts_tokens[name] = len(store.documents), len(store)
        log.info("%s: %d documents, %d tokens", name, len(store.documents), len(store))
    if config.max_retro_tokens:
        store = _write_retro_split(config, split["train"])
        counts_docs[RETRO_SPLIT], counts_tokens[RETRO_SPLIT] = len(store.documents), len(store)
    return PrepareReport(out, tokenizer.fingerprint, tokenizer.vocab_size, counts_docs, counts_tokens)


def prepare_retro_split(config: PrepareConfig, train_side: list[Document] | None = None) -> TokenStore:
    """Writes OUT/retro: up to `config.max_retro_tokens` tokens of training-side documents that OUT/train
    does not hold, the next ones in hashed order, tokenized with OUT/tokenizer.json. Also for a folder
    prepared before (with the same corpus and heldout_fraction; a document OUT/heldout holds is never
    taken, whatever they were).

    A frozen base LM has memorised much of its own training text, so on that text the neighbours
    have little left to add and RETRO's new layers learn to ignore them; on this text they have not.

    Args:
        config: the `prepare_corpus` settings of OUT (`config.out`), with `max_retro_tokens` > 0.
        train_side: the training-side documents in hashed order, when the caller has them already.

    Raises:
        ValueError: max_retro_tokens < 1, OUT/train holds every training-side document, or another prepare
            is writing OUT now.
        FileNotFoundError: OUT has no tokenizer or train split.
    """
    if config.max_retro_tokens < 1:
        raise ValueError(f"max_retro_tokens must be at least 1 to write a {RETRO_SPLIT!r} split, "
                         f"got {config.max_retro_tokens}")
    out = Path(config.out).resolve()
    with _prepare_lock(config.out, out):
        _finish_replacing(out)
        return _write_retro_split(config, train_side)


def _write_retro_split(config: PrepareConfig, train_side: list[Document] | None) -> TokenStore:
    """`prepare_retro_split` into `config.out`, which no other prepare writes meanwhile."""
    out = Path(config.out)
    tokenizer = Tokenizer.load(out / "tokenizer.json")
    in_train = {d.name for d in TokenStore.open(out / "train").documents}
    held_out = {d.name for d in TokenStore.open(out / "heldout").documents}
    side = _split_documents(config)[0]["train"] if train_side is None else train_side
    if crossing := sum(d.name in held_out for d in side):  # OUT was prepared with another fraction or corpus
        log.warning("%d of the corpus's training-side documents are held out in %s (prepared with another "
                    "heldout_fraction or corpus?): left out of the %r split", crossing, out / "heldout", RETRO_SPLIT)
    left = [d for d in side if d.name not in in_train and d.name not in held_out]
    if not left:
        raise ValueError(f"{out / 'train'} holds all {len(side)} training-side documents of {config.corpus!r}: "
                         f"none are left for the {RETRO_SPLIT!r} split (lower max_train_tokens)")
    kept = _tokenize_within(left, tokenizer, config.max_retro_tokens)
    store = write_token_store(out / RETRO_SPLIT, kept, tokenizer.eos_id, tokenizer.fingerprint,
                              config.max_retro_tokens)
    log.info("%s: %d documents, %d tokens (of %d training-side documents not in train)", RETRO_SPLIT,
             len(store.documents), len(store), len(left))
    return store


def load_prepared(out: Path) -> tuple[Tokenizer, TokenStore, TokenStore]:
    """The tokenizer and both splits written by `prepare_corpus` at `out`.

    Raises:
        FileNotFoundError: something is missing.
        ValueError: a split was tokenized by a different tokenizer.
    """
    tokenizer = Tokenizer.load(Path(out) / "tokenizer.json")
    stores = [TokenStore.open(Path(out) / s) for s in SPLITS]
    for s in stores:
        if s.tokenizer_fingerprint != tokenizer.fingerprint:
            raise ValueError(f"{s.directory} was tokenized with {s.tokenizer_fingerprint}, not {tokenizer.fingerprint}")
    return tokenizer, stores[0], stores[1]

