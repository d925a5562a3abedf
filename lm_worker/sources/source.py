"""A datastore source on disk: the keys and payload of a kNN-LM or RETRO datastore, and source.json.

A source is a directory that `retriever_server build` turns into a datastore (`lm_worker.sources.build`):

    kNN-LM: keys.npy float32 (N-1, d)  the LM's last-FFN input at stream position i (row i)
            values.npy int32 (N-1,)    tokens[i + 1], the next token
    RETRO:  keys.npy float32 (C, dim)  the frozen encoder's embedding of chunk c, tokens[c*L:(c+1)*L]
            tokens.npy int32 (C, 2L)   tokens[c*L : c*L + 2L], chunk + continuation, EOS-padded at the end
    both:   source.json                kind, rows, dimension, tokenizer and encoder fingerprints, parameters

A source written in parts by the encode job (`lm_worker.jobs.encode_job`) holds the same arrays as
`parts/NNNNN/keys.npy` and `parts/NNNNN/values.npy` (or `tokens.npy`), indexed in row order by
`keys.parts.json` and `values.parts.json` (`retriever_server.datastore.row_parts`), and says so in
source.json (`details["layout"] == "parts"`). `SourceInfo.keys_path` and `.payload` name the
right files for either layout; `open_keys()` and `open_payload()` open them memory-mapped.

Rows are datastore ids: row i of a kNN-LM source is token position i of the train stream, row c of
a RETRO source is chunk c.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from lm_worker.data.token_store import read_json_object
from retriever_server.datastore.row_parts import PARTS_SUFFIX, PartedArray, open_rows

SOURCE_JSON = "source.json"


KEYS = "keys.npy"


KEYS_PARTS = "keys" + PARTS_SUFFIX


PAYLOAD_FILES = {"knnlm": ("values", "values.npy"), "retro": ("tokens", "tokens.npy")}


PARTS_LAYOUT = "parts"  # details["layout"] of a source written in parts


KIND_NAMES = {"knnlm": "a kNN-LM", "retro": "a RETRO"}


class Encoder(Protocol):
    """What `encode_retro` needs of a chunk encoder (`ChunkEncoder` is one)."""

    dimension: int
    fingerprint: str

    def embed(self, chunks: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class SourceInfo:
    """What source.json records. `encoder_fingerprint` is the LM's fingerprint for kNN-LM sources
    and the chunk encoder's for RETRO; `chunk_len` is 0 for kNN-LM; `details` holds the rest."""

    directory: Path
    kind: str
    rows: int
    dimension: int
    tokenizer_fingerprint: str
    encoder_fingerprint: str
    chunk_len: int = 0
    details: dict = field(default_factory=dict)

    @property
    def parted(self) -> bool:
        """Whether the arrays are written in parts, with parts indexes (see the module doc)."""
        return self.details.get("layout") == PARTS_LAYOUT

    @property
    def encoder_metadata(self) -> dict[str, str]:
        """The encoder fields a datastore's metadata takes from its source: "encoder" (the
        fingerprint) and, for an LM-encoded RETRO source, "encoder_checkpoint"."""
        meta = {"encoder": self.encoder_fingerprint}
        if self.details.get("encoder_checkpoint"):
            meta["encoder_checkpoint"] = str(self.details["encoder_checkpoint"])
        return meta

    @property
    def keys_path(self) -> Path:
        """keys.npy, or keys.parts.json for a source written in parts."""
        return self.directory / (KEYS_PARTS if self.parted else KEYS)

    @property
    def payload(self) -> tuple[str, Path]:
        """(payload name, path) of the source's payload array: NAME.npy or NAME.parts.json."""
        name, file = PAYLOAD_FILES[self.kind]
        return name, self.directory / (f"{name}{PARTS_SUFFIX}" if self.parted else file)

    def open_keys(self) -> np.ndarray | PartedArray:
        """The keys (rows, dimension), memory-mapped, whichever the layout."""
        return open_rows(self.keys_path)

    def open_payload(self) -> np.ndarray | PartedArray:
        """The payload rows (values or tokens), memory-mapped, whichever the layout."""
        return open_rows(self.payload[1])

    def write(self) -> None:
        body = {k: v for k, v in dataclasses.asdict(self).items() if k != "directory"}
        (self.directory / SOURCE_JSON).write_text(json.dumps(body, indent=2))


def read_source(directory: Path, kinds: tuple[str, ...] = (), flag: str = "") -> SourceInfo:
    """The SourceInfo of a finished source.

    Args:
        directory: the source folder.
        kinds: the kinds of source the caller takes ("knnlm", "retro"); () takes either.
        flag: the option that named `directory`, for the message about its kind (e.g. "--source").

    Raises:
        FileNotFoundError: there is no source.json.
        ValueError: source.json is not JSON, not an object, lacks a field or has one SourceInfo does not
            know, records a field of the wrong type or range, names an unknown kind, or the source is of a
            kind not in `kinds` (each names the file).
    """
    path = Path(directory) / SOURCE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a finished datastore source (no {SOURCE_JSON})")
    body = read_json_object(path)
    known = [f.name for f in dataclasses.fields(SourceInfo) if f.name != "directory"]
    required = [f.name for f in dataclasses.fields(SourceInfo)
                if f.name != "directory" and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in body]
    unknown = sorted(set(body) - set(known))
    if missing or unknown:
        what = [f"lacks {', '.join(map(repr, missing))}"] if missing else []
        what += [f"has unknown {', '.join(map(repr, unknown))}"] if unknown else []
        raise ValueError(f"{path} is not a datastore source's record: it {' and '.join(what)} "
                         f"(fields: {', '.join(known)})")
    _check_fields(path, body)
    if kinds and body["kind"] not in kinds:
        raise ValueError(f"{flag + ' ' if flag else ''}{directory} is {KIND_NAMES[body['kind']]} source, not "
                         f"{' or '.join(KIND_NAMES[k] for k in kinds)} one")
    return SourceInfo(directory=Path(directory), **body)


def _check_fields(path: Path, body: dict) -> None:
    """A ValueError naming `path` and the first field of `body` (source.json's) of the wrong type or range."""
    def bad(name: str, need: str) -> ValueError:
        return ValueError(f"{path} records {name} {repr(body[name])[:60]}, {need}")

    if not isinstance(body["kind"], str) or body["kind"] not in PAYLOAD_FILES:
        raise bad("kind", f"not one of {', '.join(map(repr, PAYLOAD_FILES))}")
    for name in ("rows", "dimension", "chunk_len"):
        value = body.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(name, "not an integer >= 0")
    for name in ("tokenizer_fingerprint", "encoder_fingerprint"):
        if not isinstance(body[name], str):
            raise bad(name, "not a string")
    if not isinstance(body.get("details", {}), dict):
        raise bad("details", "not an object")


def start_source(out_dir: Path) -> Path:
    """Creates `out_dir` and removes an old source.json, so a half-rewritten source never looks finished."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SOURCE_JSON).unlink(missing_ok=True)
    return out_dir



@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """Yields the name to write `path` under (PATH.partial); renamed to `path` once the block ends, removed
    if it raises: an interrupted writer leaves what was at `path` before."""
    partial = Path(path).with_name(Path(path).name + ".partial")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
