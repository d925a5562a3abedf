"""Corpus readers: the CPython standard library (the built-in real corpus), text folders, JSONL.

Every document has a stable id (its path) and a held-out flag from a fixed hash of that id, so the
same files are held out on every machine and in every run.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Document:
    """One document: `name` is its stable id (a relative path or a JSONL id)."""

    name: str
    text: str


def is_heldout(name: str, fraction: float = 0.05) -> bool:
    """True for the fixed `fraction` of documents held out, chosen by a sha256 of the name."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def stdlib_root() -> Path:
    """Where this interpreter's standard library source lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's .py files, sorted, without site-packages or caches."""
    root = root or stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def read_stdlib(root: Path | None = None) -> Iterator[Document]:
    """Documents of the CPython standard library, named by path relative to the stdlib root."""
    root = root or stdlib_root()
    for path in stdlib_files(root):
        yield Document(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace"))


def read_text_folder(folder: Path, suffixes: tuple[str, ...] = (".txt", ".md", ".py")) -> Iterator[Document]:
    """Every file under `folder` with one of `suffixes`, named by relative path."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in suffixes:
            yield Document(path.relative_to(folder).as_posix(), path.read_text(encoding="utf-8", errors="replace"))


def read_jsonl(path: Path, text_field: str = "text", id_field: str | None = None) -> Iterator[Document]:
    """One document per JSON line; named by `id_field` when given, else by line number.

    Raises:
        ValueError: a line that is not a JSON object, or lacks a field, named as PATH:LINE.
    """
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            record = _record(path, number + 1, line)
            for needed in (text_field, id_field) if id_field else (text_field,):
                if needed not in record:
                    raise ValueError(f"{path}:{number + 1} has no field {needed!r}")
            name = str(record[id_field]) if id_field else f"{Path(path).name}:{number}"
            yield Document(name, str(record[text_field]))


def _record(path: Path, line_number: int, line: str) -> dict:
    """The JSON object on line `line_number` of `path`; a ValueError naming the file and line otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_number} is not valid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number} holds a JSON {type(record).__name__}, not an object")
    return record
