"""Corpus readers: the CPython standard library (the built-in real corpus), text folders, JSONL.

Every document has a stable id (its path) and a held-out flag from a fixed hash of that id, so the
same files are held out on every machine and in every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


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
    yield from _read_files(root, stdlib_files(root))


def read_text_folder(folder: Path, suffixes: tuple[str, ...] = (".txt", ".md", ".py")) -> Iterator[Document]:
    """Every file under `folder` with one of `suffixes`, named by relative path."""
    folder = Path(folder)
    yield from _read_files(folder, [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in suffixes])


def _read_files(root: Path, paths: list[Path]) -> Iterator[Document]:
    """The files as UTF-8 text (newlines as "\n"); bytes that are not UTF-8 read as U+FFFD, and the files
    that hold any are named in one warning once all are read. A file name's bytes that are not UTF-8 are
    named by their escapes (`bad\\xff.txt`)."""
    mangled = []
    for path in paths:
        name = _shown(path.relative_to(root).as_posix())
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            mangled.append(name)
        yield Document(name, text.replace("\r\n", "\n").replace("\r", "\n"))
    if mangled:
        log.warning("%d of %d files are not UTF-8 and were read with U+FFFD in place of their other bytes: %s%s",
                    len(mangled), len(paths), ", ".join(repr(m) for m in mangled[:5]), " ..." * (len(mangled) > 5))


def read_jsonl(path: Path, text_field: str = "text", id_field: str | None = None) -> Iterator[Document]:
    """One document per JSON line; named by `id_field` when given, else by line number.

    Raises:
        ValueError: `id_field` is "" (at once), or a line that is not a JSON object, or lacks a field, named as
            PATH:LINE (as it is read).
    """
    check_id_field(id_field)
    return _jsonl_documents(path, text_field, id_field)


def check_id_field(id_field: str | None) -> None:
    """ValueError for an empty `id_field`: "" names no field, and is not "not given" either."""
    if id_field == "":
        raise ValueError("id_field is empty: give the JSONL field that names each document, or leave it out to "
                         "name them by line")


def _jsonl_documents(path: Path, text_field: str, id_field: str | None) -> Iterator[Document]:
    """`read_jsonl`'s documents, read as they are asked for."""
    seen: dict[str, int] = {}  # id -> the line that gave it
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record = _record(path, number, raw)
            for needed in (text_field, id_field) if id_field is not None else (text_field,):
                if needed not in record:
                    raise ValueError(f"{path}:{number} has no field {needed!r}")
            text = record[text_field]
            if not isinstance(text, str):
                what = "null" if text is None else f"a JSON {type(text).__name__}"
                raise ValueError(f"{path}:{number}: field {text_field!r} is {what}, not a string")
            if id_field is None:
                name = f"{Path(path).name}:{number - 1}"
            else:
                name = _id_of(path, number, record, id_field, seen)
            for field, value in ((text_field, text), (id_field, name)):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as err:  # JSON's "\ud800": a lone surrogate, no character
                    raise ValueError(f"{path}:{number}: field {field!r} holds a lone surrogate "
                                     f"{value[err.start]!r} at character {err.start}, not text") from None
            yield Document(name, text)


def _id_of(path: Path, number: int, record: dict, id_field: str, seen: dict[str, int]) -> str:
    """A document's name from its `id_field`: a string or an integer, given once in the file (splits, the
    retro split and evaluation shares tell documents apart by name); ValueError naming the lines otherwise."""
    value = record[id_field]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        what = "null" if value is None else f"a JSON {type(value).__name__}"
        raise ValueError(f"{path}:{number}: field {id_field!r} is {what}, not a string or an integer")
    name = str(value)
    if name in seen:
        raise ValueError(f"{path}:{number}: {id_field} {name[:80]!r} was given on line {seen[name]} too: each "
                         "document needs an id of its own")
    seen[name] = number
    return name


def _record(path: Path, line_number: int, raw: bytes) -> dict:
    """The JSON object on line `line_number` of `path`; a ValueError naming the file and line otherwise."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{line_number} is not UTF-8: byte 0x{raw[err.start]:02x} at column "
                         f"{err.start + 1}") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_number} is not valid JSON: {err.msg} (column {err.colno})") from None
    except (RecursionError, ValueError) as err:  # nested too deep; an integer past Python's digit limit
        reason = "nested too deep" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise ValueError(f"{path}:{line_number} is not JSON this reader takes: {reason}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number} holds a JSON {type(record).__name__}, not an object")
    return record


def _shown(name: str) -> str:
    """A file name that is text: the bytes of a name that are not UTF-8 (which Python holds as lone
    surrogates, refused by every encoder) as backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
