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


def _from_json(body: dict) -> Manifest:
    shards = tuple(
        ShardEntry(s["name"], int(s["id_start"]), int(s["id_end"]),
                   {k: FileEntry(**v) for k, v in s["files"].items()})
        for s in body["shards"]
    )
    payloads = tuple(PayloadSpec(p["name"], p["dtype"], tuple(p["row_shape"])) for p in body["payloads"])
    fields = {k: body[k] for k in ("dimension", "metric", "factory", "ntotal", "nlist", "default_nprobe",
                                   "has_keys", "build", "metadata", "format_version")}
    return Manifest(payloads=payloads, shards=shards, **fields)


def _shown(value: object, limit: int = 60) -> str:
    """A value from the file for a message: as JSON (control characters escaped: one line), cut at `limit`."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def read_manifest(directory: Path) -> Manifest:
    """Reads and checks `DIR/manifest.json`; raises DatastoreError naming what is wrong."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DatastoreError(f"{path} not found: not a datastore directory (or its build has not finished)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatastoreError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        body = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatastoreError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise DatastoreError(f"{path} holds a JSON {type(body).__name__}, not an object")
    if body.get("format_version") != FORMAT_VERSION:
        raise DatastoreError(
            f"{path} has format version {_shown(body.get('format_version'))}; this server reads version "
            f"{FORMAT_VERSION}"
        )
    try:
        manifest = _from_json(body)
        checksums = (manifest.checksum, manifest.whole_checksum)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise DatastoreError(f"{path} is missing or has a malformed field: {type(err).__name__}: "
                             f"{_shown(str(err))}") from None
    for i, shard in enumerate(manifest.shards):
        if shard.name != shard_name(i):  # names reach logs and statuses: only the form the build writes
            raise DatastoreError(f"{path}: shards[{i}].name is {_shown(shard.name)}, not {shard_name(i)!r}")
    _check_files(path, manifest)
    if body.get("checksum") not in checksums:
        raise DatastoreError(f"{path} checksum does not match its contents (edited or corrupted)")
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
    for p in manifest.payloads:
        if not PAYLOAD_NAME.fullmatch(p.name):
            raise DatastoreError(f"{path}: payload name {_shown(p.name)} is not a plain name ({PAYLOAD_NAME.pattern})")
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
