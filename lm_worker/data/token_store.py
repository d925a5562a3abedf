"""A tokenized split on disk: one flat token stream with the document of every token.

    SPLIT/tokens.npy (N,) int32, SPLIT/doc_ids.npy (N,) int32, SPLIT/documents.json

Each document's tokens are followed by EOS. `doc_ids[i]` indexes `documents`, whose entries hold
the half-open token range [start, end) of the document, so a query's own document can be excluded
from retrieval by range. Arrays open memory-mapped.

Example:
    >>> train = TokenStore.open(Path("run/data/train"))
    >>> train.tokens[:10], train.documents[train.doc_ids[0]].name
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_worker.data.folders import swap_folders

SPLITS = ("train", "heldout")


RETRO_SPLIT = "retro"

CHECK_SLICE = 1 << 20  # doc_ids read this many at a time when a store is opened (8 MiB of int64 expected ids)

POSITION_LIMIT = 2**63  # token positions in documents.json lie in [0, POSITION_LIMIT): numpy's int64


@dataclass(frozen=True)
class DocumentSpan:
    """A document's name and its tokens' half-open range [start, end) in the split's stream."""

    name: str
    start: int
    end: int


class TokenStore:
    """One split of a tokenized corpus, memory-mapped.

    Attributes:
        tokens: int32 (N,) token ids, every document followed by EOS.
        doc_ids: int32 (N,) index into `documents` of each token's document.
        documents: the documents, in stream order.
        tokenizer_fingerprint: fingerprint of the tokenizer that made `tokens`.
        max_tokens: the token budget the documents were chosen within (0: none); None for a split
            written before budgets were recorded.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        meta_path = self.directory / "documents.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a token store (no documents.json)")
        meta = read_documents_json(meta_path)
        self.tokenizer_fingerprint: str = meta["tokenizer"]
        self.max_tokens: int | None = meta.get("max_tokens")
        self.documents = [DocumentSpan(d["name"], d["start"], d["end"]) for d in meta["documents"]]
        self.tokens = _open_ids(self.directory / "tokens.npy")
        self.doc_ids = _open_ids(self.directory / "doc_ids.npy")
        if len(self.doc_ids) != len(self.tokens):
            raise ValueError(f"{self.directory}: doc_ids.npy holds {len(self.doc_ids)} ids for "
                             f"{len(self.tokens)} tokens: not a whole token store")
        self._check_spans(meta_path)

    def _check_spans(self, meta_path: Path) -> None:
        """ValueError unless the documents tile the tokens in order, each non-empty, and doc_ids names each
        token's document: files of two writes side by side, or a damaged doc_ids.npy, are no token store."""
        starts = np.array([d.start for d in self.documents], dtype=np.int64)  # (D,)
        ends = np.array([d.end for d in self.documents], dtype=np.int64)  # (D,)
        if len(starts) == 0:
            tiled = len(self.tokens) == 0
        else:
            tiled = starts[0] == 0 and ends[-1] == len(self.tokens) and bool(np.all(starts[1:] == ends[:-1])) \
                and bool(np.all(ends > starts))
        if not tiled:
            raise ValueError(f"{meta_path}: its documents do not tile the {len(self.tokens)} tokens of tokens.npy "
                             "in order: not a whole token store")
        wrong = first_wrong_doc_id(self.doc_ids, starts, ends)
        if wrong is not None:
            raise ValueError(f"{self.directory / 'doc_ids.npy'} does not agree with {meta_path} on which document "
                             f"each token is in (token {wrong} is marked document {int(self.doc_ids[wrong])}): not a "
                             "whole token store")

    @classmethod
    def open(cls, directory: Path) -> TokenStore:
        """Opens a split written by `write_token_store` (raises FileNotFoundError if there is none)."""
        return cls(directory)

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_range(self, doc: int) -> tuple[int, int]:
        """Token range [start, end) of document `doc`."""
        span = self.documents[doc]
        return span.start, span.end


def first_wrong_doc_id(doc_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int | None:
    """The first position whose id in `doc_ids` (N,) is not the number of the document [starts[d], ends[d])
    holding it, or None; the documents tile [0, N). Read `CHECK_SLICE` ids at a time (the array may be
    memory-mapped and larger than memory), O(N) in all."""
    for low in range(0, len(doc_ids), CHECK_SLICE):
        high = min(low + CHECK_SLICE, len(doc_ids))
        first, last = np.searchsorted(ends, low, side="right"), np.searchsorted(starts, high, side="left")
        lengths = np.minimum(ends[first:last], high) - np.maximum(starts[first:last], low)  # within [low, high)
        expected = np.repeat(np.arange(first, last, dtype=np.int64), lengths)  # (high - low,)
        wrong = np.flatnonzero(np.asarray(doc_ids[low:high]) != expected)
        if len(wrong):
            return low + int(wrong[0])
    return None


def _open_ids(path: Path) -> np.ndarray:
    """A token store's 1-D integer array, memory-mapped; ValueError naming the file when it is not one
    (empty, cut short, an archive, another shape or dtype), FileNotFoundError when it is missing."""
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, SyntaxError, tokenize.TokenError) as err:  # the last two: a damaged header
        raise ValueError(f"{path} is not a loadable .npy array ({str(err)[:200]}): not a whole token "
                         "store") from None
    if not isinstance(ids, np.ndarray):
        ids.close()
        raise ValueError(f"{path} is a .npz archive, not a 1-D array of integer ids: not a whole token store")
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"{path} holds {ids.dtype} {ids.shape}, not a 1-D array of integer ids: not a whole "
                         "token store")
    return ids


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; ValueError naming the file when it is not JSON or not an object."""
    try:
        body = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ValueError(f"{path} holds a JSON {type(body).__name__}, not an object")
    return body


def write_text_atomically(path: Path, text: str) -> None:
    """Writes `path` through a temporary name beside it, so that it is whole or absent."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_documents_json(path: Path) -> dict:
    """A split's documents.json, checked: a ValueError naming the file when it is not JSON, not an object,
    or lacks "tokenizer" or "documents", or a document lacks its "name", "start" or "end", or they are not
    whole numbers with 0 <= start <= end < 2**63."""
    meta = read_json_object(path)
    missing = [key for key in ("tokenizer", "documents") if key not in meta]
    if missing:
        raise ValueError(f"{path} has no field {' or '.join(map(repr, missing))}: not a token store's documents.json")
    if not isinstance(meta["documents"], list):
        raise ValueError(f"{path}: 'documents' is a JSON {type(meta['documents']).__name__}, not a list")
    for number, doc in enumerate(meta["documents"]):
        if not isinstance(doc, dict) or not {"name", "start", "end"} <= set(doc):
            raise ValueError(f"{path}: document {number} is not an object with 'name', 'start' and 'end'")
        if not all(type(doc[key]) is int for key in ("start", "end")):  # bool is no token position either
            raise ValueError(f"{path}: document {number}'s 'start' and 'end' are not whole numbers")
        if not 0 <= doc["start"] <= doc["end"] < POSITION_LIMIT:
            raise ValueError(f"{path}: document {number}'s 'start' and 'end' ({str(doc['start'])[:30]}, "
                             f"{str(doc['end'])[:30]}) are not positions 0 <= start <= end < 2**63")
    return meta


def write_token_store(directory: Path, docs: Iterable[tuple[str, list[int]]], eos_id: int,
                      tokenizer_fingerprint: str, max_tokens: int = 0) -> TokenStore:
    """Writes (name, token ids) documents as one split, each followed by `eos_id`; `max_tokens`, the
    token budget the documents were chosen within (0: none), is recorded (`TokenStore.max_tokens`)."""
    directory = Path(directory)
    pieces, doc_pieces, spans, start = [], [], [], 0
    for number, (name, ids) in enumerate(docs):
        ids = np.asarray([*ids, eos_id], dtype=np.int32)
        pieces.append(ids)
        doc_pieces.append(np.full(len(ids), number, dtype=np.int32))
        spans.append({"name": name, "start": start, "end": start + len(ids)})
        start += len(ids)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    doc_ids = np.concatenate(doc_pieces) if doc_pieces else np.zeros(0, np.int32)
    meta = {"tokenizer": tokenizer_fingerprint, "max_tokens": max_tokens, "documents": spans}
    _clear_leftovers(directory)
    work = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")  # the split whole or not at all
    work.mkdir(parents=True)
    try:
        np.save(work / "tokens.npy", tokens)
        np.save(work / "doc_ids.npy", doc_ids)
        (work / "documents.json").write_text(json.dumps(meta))
        _swap_in(work, directory)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return TokenStore(directory)


def _clear_leftovers(directory: Path) -> None:
    """Removes what a write of this split killed before it ended left beside it (`.NAME.tmp-PID` and
    `.NAME.old-PID`, these names exactly: never another split's), putting an old split back where the split
    itself is missing."""
    if not directory.parent.is_dir():
        return
    for old in _leftovers(directory, "old"):
        if not directory.exists():
            os.replace(old, directory)  # killed between its two renames: the old split is the whole one
        else:
            shutil.rmtree(old, ignore_errors=True)
    for work in _leftovers(directory, "tmp"):
        shutil.rmtree(work, ignore_errors=True)


def _leftovers(directory: Path, kind: str) -> list[Path]:
    """The entries beside `directory` named `.NAME.KIND-PID` for its own NAME (sorted): a glob would take a
    NAME's `[`, `*` or `?` as a pattern, and another split's leftovers for its own."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.{kind}-\d+")
    return sorted(p for p in directory.parent.iterdir() if pattern.fullmatch(p.name))


def _swap_in(work: Path, directory: Path) -> None:
    """Puts the folder `work` at `directory`, replacing the split there: never the files of two writes.
    Between the two renames the split is missing for a moment; stopped there, the old one goes back."""
    if not directory.exists():
        os.replace(work, directory)
        return
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    swap_folders(work, directory, old)
    shutil.rmtree(old, ignore_errors=True)

