"""The datastore on disk: `manifest.json`, one directory per shard, checksums, atomic publishing.

Layout::

    DIR/manifest.json            format version, index, metric, shards, payloads, checksums
    DIR/shard-00000/index.faiss  the shard's FAISS index (global int64 ids)
    DIR/shard-00000/keys.npy     optional float16 keys for exact re-ranking
    DIR/shard-00000/payload.NAME.npy  one array per payload, rows in id order
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Metadata that says where something was on the machine that built the datastore, not what it holds.
LOCATION_METADATA = frozenset({"encoder_checkpoint"})


class DatastoreError(Exception):
    """A datastore that cannot be used as it is on disk; the message names the file."""


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardEntry:
    name: str
    id_start: int
    id_end: int
    files: dict[str, FileEntry]

    @property
    def ntotal(self) -> int:
        return self.id_end - self.id_start


@dataclass(frozen=True)
class PayloadSpec:
    name: str
    dtype: str
    row_shape: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """Everything a server needs to know about a datastore before it opens a shard.

    `checksum` and `version` depend on the contents alone (every file's sha256, the index and payload
    descriptions, the metadata): two builds of identical inputs have the same. `build` (seed, timing,
    Ray nodes, input paths) and the location entries of `metadata` are recorded outside the hash.
    """

    dimension: int
    metric: str
    factory: str
    ntotal: int
    nlist: int
    default_nprobe: int
    has_keys: bool
    payloads: tuple[PayloadSpec, ...]
    shards: tuple[ShardEntry, ...]
    build: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        body = asdict(self)
        body["checksum"] = self.checksum
        body["version"] = self.version
        return body

    @cached_property
    def checksum(self) -> str:
        """sha256 of the canonical JSON of the contents: every file's sha256 and the descriptions,
        without `build` or the location metadata."""
        body = asdict(self)
        del body["build"]
        body["metadata"] = {k: v for k, v in self.metadata.items() if k not in LOCATION_METADATA}
        return _sha256_json(body)

    @cached_property
    def whole_checksum(self) -> str:
        """The checksum of manifests written before it left out `build`: the sha256 of everything."""
        return _sha256_json(asdict(self))

    @cached_property
    def version(self) -> str:
        """Short identifier of this datastore's contents, shared by all of its shards."""
        return self.checksum[:16]

    def payload(self, name: str) -> PayloadSpec:
        return next(p for p in self.payloads if p.name == name)


def _sha256_json(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # becomes part of a file name: payload.NAME.npy
METRIC_NAMES = ("l2", "inner_product")
PAYLOAD_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64",
                            "uint8", "uint16", "uint32", "uint64", "bool"})  # what the wire format carries
MAX_ID = 2**63 - 1  # ids and row counts are int64 in FAISS and on the wire
MAX_DIMENSION = 2**31 - 1  # FAISS holds d in a C int
MAX_ROW_DIMS = 31  # numpy arrays have at most 32 dimensions (64 since numpy 2), the rows' one included
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _dtype_forms() -> frozenset[str]:
    """The strings a manifest may give as a payload's dtype: each of PAYLOAD_DTYPES by name, or as
    numpy's `dtype.str` (what the build writes), in either byte order."""
    forms = set(PAYLOAD_DTYPES)
    for name in PAYLOAD_DTYPES:
        dtype = np.dtype(name)
        forms.update(dtype.newbyteorder(order).str for order in "<>")
    return frozenset(forms)


PAYLOAD_DTYPE_FORMS = _dtype_forms()


class _FieldError(Exception):
    """A manifest field that is missing or holds what no build writes; read_manifest adds the file."""


def _get(body: dict, key: str, where: str = "") -> object:
    """body[key], or _FieldError naming it (`where` is the object's own place, e.g. "shards[0].")."""
    if key not in body:
        raise _FieldError(f"{where}{key} is missing")
    return body[key]


def _of_type(value: object, where: str, kind: type | tuple[type, ...], what: str) -> object:
    """`value`, or _FieldError unless it is a `kind` (`what` says it in words: "a string")."""
    if not isinstance(value, kind):
        raise _FieldError(f"{where} is {_shown(value)}, not {what}")
    return value


def _int(value: object, where: str, low: int, high: int = MAX_ID) -> int:
    """`value` if it is an integer (not a bool or a float) in [low, high], else _FieldError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _FieldError(f"{where} is {_shown(value)}, not an integer in [{low}, {high}]")
    return value


def _files(value: object, where: str) -> dict[str, FileEntry]:
    """A shard's `files`: each name mapped to {bytes, sha256}."""
    files = {}
    for name, entry in _of_type(value, where, dict, "an object").items():
        at = f"{where}[{_shown(name)}]"
        _of_type(entry, at, dict, "an object of bytes and sha256")
        sha256 = _get(entry, "sha256", at + ".")
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise _FieldError(f"{at}.sha256 is {_shown(sha256)}, not 64 lowercase hex digits")
        files[name] = FileEntry(_int(_get(entry, "bytes", at + "."), f"{at}.bytes", 0), sha256)
    return files


def _shard(value: object, where: str) -> ShardEntry:
    """One shard's {name, id_start, id_end, files}, with 0 <= id_start <= id_end <= MAX_ID."""
    _of_type(value, where, dict, "an object")
    start = _int(_get(value, "id_start", where + "."), f"{where}.id_start", 0)
    end = _int(_get(value, "id_end", where + "."), f"{where}.id_end", start)
    name = _of_type(_get(value, "name", where + "."), f"{where}.name", str, "a string")
    return ShardEntry(name, start, end, _files(_get(value, "files", where + "."), f"{where}.files"))


def _check_ranges(path: Path, manifest: Manifest) -> None:
    """DatastoreError unless the shards' id ranges cover [0, ntotal) in order, each starting where the one
    before it ends (a server sizes its answers and a router its fan-out by them)."""
    edge = 0
    for i, shard in enumerate(manifest.shards):
        if shard.id_start != edge:
            raise DatastoreError(f"{path}: shards[{i}].id_start is {shard.id_start}, not {edge}, where the shard "
                                 "before it ends: the shards' ranges must cover [0, ntotal) in order")
        edge = shard.id_end
    if edge != manifest.ntotal:
        raise DatastoreError(f"{path}: ntotal is {manifest.ntotal}, but the shards' ranges end at {edge}")


def _payload(value: object, where: str) -> PayloadSpec:
    """One payload's {name, dtype, row_shape}."""
    _of_type(value, where, dict, "an object")
    name = _of_type(_get(value, "name", where + "."), f"{where}.name", str, "a string")
    dtype = _get(value, "dtype", where + ".")
    if not isinstance(dtype, str) or dtype not in PAYLOAD_DTYPE_FORMS:
        raise _FieldError(f"{where}.dtype is {_shown(dtype)}, not one the wire carries "
                          f"({', '.join(sorted(PAYLOAD_DTYPES))})")
    shape = _of_type(_get(value, "row_shape", where + "."), f"{where}.row_shape", list, "a list")
    if len(shape) > MAX_ROW_DIMS:
        raise _FieldError(f"{where}.row_shape has {len(shape)} dimensions; at most {MAX_ROW_DIMS}")
    return PayloadSpec(name, dtype, tuple(_int(n, f"{where}.row_shape[{j}]", 0) for j, n in enumerate(shape)))


def _metadata(value: object) -> dict[str, str]:
    """The free-form metadata: strings by strings."""
    for key, item in _of_type(value, "metadata", dict, "an object").items():
        _of_type(item, f"metadata[{_shown(key)}]", str, "a string")
    return value


def _from_json(body: dict) -> Manifest:
    """The manifest of a JSON object, every field checked for type and range (_FieldError naming it)."""
    nlist = _int(_get(body, "nlist"), "nlist", 0)
    payloads = _of_type(_get(body, "payloads"), "payloads", list, "a list")
    shards = _of_type(_get(body, "shards"), "shards", list, "a list")
    return Manifest(
        dimension=_int(_get(body, "dimension"), "dimension", 1, MAX_DIMENSION),
        metric=_of_type(_get(body, "metric"), "metric", str, "a string"),
        factory=_of_type(_get(body, "factory"), "factory", str, "a string"),
        ntotal=_int(_get(body, "ntotal"), "ntotal", 0), nlist=nlist,
        default_nprobe=_int(_get(body, "default_nprobe"), "default_nprobe", 1, max(nlist, 1)),  # as a request's
        has_keys=_of_type(_get(body, "has_keys"), "has_keys", bool, "true or false"),
        payloads=tuple(_payload(p, f"payloads[{i}]") for i, p in enumerate(payloads)),
        shards=tuple(_shard(s, f"shards[{i}]") for i, s in enumerate(shards)),
        build=_of_type(_get(body, "build"), "build", dict, "an object"),
        metadata=_metadata(_get(body, "metadata")),
        format_version=body["format_version"],
    )


def _shown(value: object, limit: int = 60) -> str:
    """A value from the file for a message: as JSON (control characters escaped: one line), cut at `limit`."""
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):
        text = f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[:limit] + "..."


def _read_json(path: Path) -> dict:
    """The JSON object in the manifest file at `path`; DatastoreError when there is none."""
    if not path.is_file():
        raise DatastoreError(f"{path} not found: not a datastore directory (or its build has not finished)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatastoreError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        body = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: a JSONDecodeError, an int of too many digits
        raise DatastoreError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise DatastoreError(f"{path} is not a manifest: its JSON is nested too deeply to read") from None
    if not isinstance(body, dict):
        raise DatastoreError(f"{path} holds a JSON {type(body).__name__}, not an object")
    return body


def read_manifest(directory: Path) -> Manifest:
    """Reads and checks `DIR/manifest.json`: its format version, each field's type and range, the shards'
    names, files and id ranges (tiling [0, ntotal)), and its checksum; raises DatastoreError naming the
    file and what is wrong."""
    path = Path(directory) / MANIFEST
    body = _read_json(path)
    version = body.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:
        raise DatastoreError(
            f"{path} has format version {_shown(version)}; this server reads version {FORMAT_VERSION}"
        )
    try:
        manifest = _from_json(body)
        checksums = (manifest.checksum, manifest.whole_checksum)
    except _FieldError as err:
        raise DatastoreError(f"{path}: {err}") from None
    except RecursionError:
        raise DatastoreError(f"{path}: a field is nested too deeply to read") from None
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as err:
        raise DatastoreError(f"{path} is missing or has a malformed field: {type(err).__name__}: "
                             f"{_shown(str(err))}") from None
    for i, shard in enumerate(manifest.shards):
        if shard.name != shard_name(i):  # names reach logs and statuses: only the form the build writes
            raise DatastoreError(f"{path}: shards[{i}].name is {_shown(shard.name)}, not {shard_name(i)!r}")
    _check_files(path, manifest)
    if body.get("checksum") not in checksums:
        raise DatastoreError(f"{path} checksum does not match its contents (edited or corrupted)")
    _check_ranges(path, manifest)  # after the checksum: an edited manifest is reported as edited
    return manifest


def shard_files(manifest: Manifest) -> set[str]:
    """The files of every shard of `manifest`, as a server opens them: its index, keys, payloads."""
    return {"index.faiss", *(["keys.npy"] if manifest.has_keys else []),
            *(f"payload.{p.name}.npy" for p in manifest.payloads)}


def _check_files(path: Path, manifest: Manifest) -> None:
    """DatastoreError unless the metric is one FAISS is built with, payload names are plain file-name
    parts, and each shard lists the files a server opens, no more: a file left out was served unchecked,
    and a name such as /etc/hostname was read from outside the datastore."""
    if manifest.metric not in METRIC_NAMES:
        raise DatastoreError(f"{path}: metric is {_shown(manifest.metric)}, not one of {list(METRIC_NAMES)}")
    for i, p in enumerate(manifest.payloads):
        if not PAYLOAD_NAME.fullmatch(p.name):
            raise DatastoreError(f"{path}: payload name {_shown(p.name)} is not a plain name ({PAYLOAD_NAME.pattern})")
        if p.name in (q.name for q in manifest.payloads[:i]):
            raise DatastoreError(f"{path}: payloads[{i}].name {_shown(p.name)} names an earlier payload too")
    expected = shard_files(manifest)
    for i, shard in enumerate(manifest.shards):
        if set(shard.files) != expected:
            raise DatastoreError(f"{path}: shards[{i}].files lists {_shown(sorted(shard.files))}, not the shard's "
                                 f"files {sorted(expected)}")


def fsync_directory(directory: Path) -> None:
    """fsyncs a directory, so that the names just created or renamed in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Writes the manifest through a temporary file, fsyncing the file and then its directory."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(shard_dir: Path, known: dict[str, str] | None = None) -> dict[str, FileEntry]:
    """Size and sha256 of every file in a shard directory, by name; `known` gives the sha256 of files
    hashed as they were written (`stream_io.StreamWriter`), which are not read again."""
    known = known or {}
    return {
        p.name: FileEntry(p.stat().st_size, known.get(p.name) or file_sha256(p))
        for p in sorted(Path(shard_dir).iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def verify_shard(directory: Path, shard: ShardEntry, full: bool = True) -> None:
    """Checks a shard's files against the manifest (size always, sha256 when full)."""
    for name, entry in shard.files.items():
        path = Path(directory) / shard.name / name
        if not path.is_file():
            raise DatastoreError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != entry.bytes:
            raise DatastoreError(f"{path} has {path.stat().st_size} bytes; the manifest says {entry.bytes}")
        if full and file_sha256(path) != entry.sha256:
            raise DatastoreError(f"{path} checksum does not match the manifest")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"
