"""What a build is asked to do, and the checks on its inputs that run before any work starts."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore import index as ix
from retriever_server.datastore.manifest import PAYLOAD_DTYPES, PAYLOAD_NAME, PayloadSpec
from retriever_server.datastore.row_parts import (
    NPY_ERRORS,
    PartedArray,
    escaped,
    files_of,
    is_parts_index,
    open_rows,
    stored_dtype,
)

MAX_SEED = 2**31 - 2  # FAISS takes a seed as a C int, and the PQ codebooks seed + 1


class BuildError(Exception):
    """The build cannot run with these inputs or failed; the message says which and why."""


@dataclass(frozen=True)
class BuildConfig:
    """What to build. `keys` is an (N, d) float matrix, each payload an array of N rows: each a .npy
    file or a `.parts.json` index of .npy parts (`retriever_server.datastore.row_parts`)."""

    keys: Path
    out: Path
    payloads: dict[str, Path] = field(default_factory=dict)
    factory: str = "auto"
    metric: str = "l2"
    shards: int = 2
    seed: int = 0
    train_size: int = 0  # 0: as many as the factory needs
    keep_keys: bool = False
    add_block: int = 32768
    spill_rows: int = 1 << 18  # an IVF shard task holds at most about this many rows' codes in memory
    cpus_per_shard: int = 1
    gpu: bool = False  # k-means and the rows' list assignment on the GPU (faiss GPU build); codes on CPU
    overwrite: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildInputs:
    """The checked inputs: rows, dimension, the concrete factory, training rows, payload specs, and each input
    file's stamp (`input_stamps`) taken before they were read, which the build publishes only if unchanged."""

    n: int
    d: int
    factory: str
    train_rows: int
    payloads: tuple[PayloadSpec, ...]
    stamps: dict[str, list[int]]


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error's message (what Ray reports of a failed task ends with the task's
    own error), control characters escaped."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return escaped(lines[-1]) if lines else type(err).__name__


@contextlib.contextmanager
def as_build_error(what: str, path: Path, also_written: Path | None = None) -> Iterator[None]:
    """Turns a FAISS RuntimeError or an OSError (permissions, disk full, an input gone) in `what` into a
    one-line BuildError; a file under `path` or `also_written` (what is being written) could not be
    written, any other read."""
    try:
        yield
    except RuntimeError as err:
        raise BuildError(f"{what} failed: {ix.faiss_reason(err)}") from None
    except OSError as err:
        if err.filename is None and isinstance(err, FileNotFoundError):  # it names its file (an input's part)
            raise BuildError(f"{what} failed: {err.strerror or err}") from None
        name = os.fsdecode(err.filename) if err.filename is not None else str(path)
        written = any(Path(name).is_relative_to(p) for p in (path, also_written) if p is not None)
        verb = "write" if written else "read"
        raise BuildError(f"{what} failed: cannot {verb} {name}: {err.strerror or err}") from None


def _open_rows(path: Path, what: str) -> np.ndarray | PartedArray:
    """Opens a .npy (memory-mapped) or a parts index; raises a one-line BuildError naming `what` when it cannot."""
    if not path.is_file():
        raise BuildError(f"{what} file {path} is a directory, not a .npy array or a parts index" if path.is_dir()
                         else f"{what} file {path} not found")
    kind = "parts index" if is_parts_index(path) else ".npy array"
    try:
        return open_rows(path)
    except FileNotFoundError as err:  # a part of a parts index
        raise BuildError(f"{what}: {escaped(err)}") from None
    except NPY_ERRORS as err:  # the whole message, on one line: it may name a part whose name holds a newline
        raise BuildError(f"{what} file {path} is not a loadable {kind}: {escaped(err)}") from None


def _stored_dtype(path: Path) -> np.dtype | None:
    """The dtype in a .npy header or a parts index without loading the array (object arrays do not memory-map)."""
    try:
        return stored_dtype(path)
    except (*NPY_ERRORS, TypeError):
        return None  # _open_rows says what is wrong


def _check_keys(config: BuildConfig) -> tuple[int, int]:
    """(N, d) of the keys matrix, which must be a non-empty float .npy or parts index."""
    keys = _open_rows(config.keys, "keys")
    if keys.ndim != 2 or keys.dtype.kind != "f" or keys.shape[0] == 0 or keys.shape[1] == 0:
        raise BuildError(f"keys file {config.keys} must be a non-empty float (N, d) matrix with d >= 1, "
                         f"got {keys.dtype} {keys.shape}")
    return keys.shape


FLOAT16_MAX = float(np.finfo(np.float16).max)  # the largest key `--keep-keys` stores as it is
MAX_KEY_ABS = 1e15  # as a query's: d * (1e15)^2 stays far inside float32, so no distance overflows


def check_key_rows(block: np.ndarray, rows: np.ndarray, keep_keys: bool) -> None:
    """Raises BuildError naming the first key of `block` (n, d), the keys' rows `rows` (n,), that holds NaN
    or Inf, or a value over MAX_KEY_ABS (FAISS would train on it and abort, or leave it out of every list)
    or, with `keep_keys`, a value past float16's range."""
    limit = FLOAT16_MAX if keep_keys else MAX_KEY_ABS
    if np.abs(block).max(initial=0.0) <= limit:  # a NaN makes the max NaN, which fails this
        return
    bad = np.isnan(block).any(axis=1) | ~(np.abs(block) <= limit).all(axis=1)
    first = np.flatnonzero(bad)[0]
    row = int(rows[first])
    if not np.isfinite(block[first]).all():
        raise BuildError(f"keys row {row} holds NaN or Inf, or a value past float32's range (3.4e38), which the "
                         "index stores keys in; every key must be finite")
    if keep_keys:
        raise BuildError(f"keys row {row} holds a value over {FLOAT16_MAX:.0f} in absolute value, which "
                         "--keep-keys cannot store as float16: scale the keys, or build without --keep-keys")
    raise BuildError(f"keys row {row} holds a value over {MAX_KEY_ABS:.0e} in absolute value, whose squared "
                     "distances would overflow float32: scale the keys")


def _training_minimum(factory: str, d: int, metric: str) -> int:
    """Fewest training rows the factory's k-means steps accept: nlist for IVF, ksub (2**nbits) for PQ."""
    index = faiss.index_factory(d, factory, ix.METRICS[metric])
    ivf = faiss.try_extract_index_ivf(index)
    core = faiss.downcast_index(ivf if ivf is not None else index)
    if isinstance(core, faiss.IndexPreTransform | faiss.IndexIDMap | faiss.IndexIDMap2):
        core = faiss.downcast_index(core.index)
    pq = getattr(core, "pq", None)
    return max(int(ivf.nlist) if ivf is not None else 1, int(pq.ksub) if pq is not None else 1)


def _check_factory(config: BuildConfig, n: int, d: int) -> tuple[str, int]:
    """The concrete factory string and how many rows train it; BuildError when FAISS cannot."""
    try:
        metric = ix.canonical_metric(config.metric)
        factory = ix.resolve_factory(config.factory, n, d)
        ix.check_factory(factory, d, metric)
    except ValueError as err:
        raise BuildError(str(err)) from None
    rows = min(config.train_size or ix.train_size_for(factory, d, metric), n)
    need = _training_minimum(factory, d, metric)
    if rows < need:
        have = f"train_size (--train-size) is {config.train_size}" if rows < n else f"the keys have {n}"
        raise BuildError(f"factory {factory} needs at least {need} training rows; {have}")
    return factory, rows


def _check_payload(name: str, path: Path, n: int) -> PayloadSpec:
    """The spec of a payload with N rows of a dtype the wire format carries."""
    what = f"payload {name!r}"
    if not PAYLOAD_NAME.fullmatch(name):
        raise BuildError(f"{what}: a payload name is 1 to 64 letters, digits, '_', '-' or '.' (it names a file)")
    dtype = _stored_dtype(path)
    if dtype is not None and dtype.name not in PAYLOAD_DTYPES:
        raise BuildError(f"{what} ({path}) has dtype {dtype}, which cannot be served; "
                         f"supported: {', '.join(sorted(PAYLOAD_DTYPES))}")
    arr = _open_rows(path, what)
    if arr.ndim < 1 or arr.shape[0] != n:
        raise BuildError(f"{what} ({path}) has shape {arr.shape}; its first dimension must be {n}")
    return PayloadSpec(name, arr.dtype.str, tuple(int(s) for s in arr.shape[1:]))


def _index_bytes_per_row(inputs: BuildInputs) -> tuple[int, bool]:
    """Bytes a row takes in the index (its code, and its id in an IVF list), and whether it is IVF."""
    index = faiss.index_factory(inputs.d, inputs.factory, ix.METRICS["l2"])
    ivf = faiss.try_extract_index_ivf(index)
    return (int(ivf.code_size) + 8, True) if ivf is not None else (int(index.sa_code_size()), False)


def bytes_per_row(inputs: BuildInputs, keep_keys: bool) -> int:
    """Disk bytes a built row takes: its code and id in the index, its float16 key when kept, its payloads."""
    payloads = sum(int(np.dtype(p.dtype).itemsize * np.prod(p.row_shape, dtype=np.int64)) for p in inputs.payloads)
    return _index_bytes_per_row(inputs)[0] + (2 * inputs.d if keep_keys else 0) + payloads


def disk_needed(config: BuildConfig, inputs: BuildInputs, done_bytes: int = 0) -> int:
    """Bytes the build still writes: every row (`bytes_per_row`), an IVF index's spilled lists (which
    stand beside the index files while those are written, `spill`), the trained codec, 10% to spare,
    less what an unfinished build already wrote (`done_bytes`)."""
    index_bytes, ivf = _index_bytes_per_row(inputs)
    spills = inputs.n * index_bytes if ivf else 0
    trained = inputs.train_rows and 4 * inputs.d * 65_536  # centroids and codebooks: a bound
    rows = inputs.n * bytes_per_row(inputs, config.keep_keys)
    return max(0, int(1.1 * (rows + spills + trained)) - done_bytes)


def check_disk(config: BuildConfig, inputs: BuildInputs, work: Path) -> int:
    """Raises BuildError when the file system of `config.out` has less free space than the build still
    needs; returns the bytes needed."""
    done = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) if work.is_dir() else 0
    need = disk_needed(config, inputs, done)
    parent = config.out.resolve().parent
    while not parent.exists():  # the output's folder may not be made yet
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need > free:
        raise BuildError(f"the build needs about {need / 2**30:.1f} GiB of disk at {parent} "
                         f"({bytes_per_row(inputs, config.keep_keys)} bytes per row); {free / 2**30:.1f} GiB is free")
    return need


def absolute_paths(config: BuildConfig, *fields: str) -> BuildConfig:
    """The config with these path fields ("keys", "payloads", "out") absolute: a shard task opens its
    inputs from the folder its Ray worker runs in. They are joined to this process's folder as they are
    (a `..` after a link is the link's target's parent, as when the path was checked); an output that
    ends in `.` or `..` is resolved, so that it has a name to put its work and lock beside."""
    def absolute(path: Path) -> Path:
        joined = Path.cwd() / path
        return joined.resolve() if joined.name in ("", "..") else joined
    changed = {name: ({k: absolute(v) for k, v in config.payloads.items()} if name == "payloads"
                      else absolute(getattr(config, name))) for name in fields}
    return replace(config, **changed)


def file_stamp(path: Path) -> list[int]:
    """[size, modification time in ns] of a file: what an input replaced (an encode run again) changes."""
    found = path.stat()
    return [found.st_size, found.st_mtime_ns]


def input_stamps(config: BuildConfig) -> dict[str, list[int]]:
    """The `file_stamp` of each input file (a parts index and its parts), by path joined to this folder."""
    files = [f for path in (config.keys, *config.payloads.values()) for f in files_of(path)]
    return {str(Path.cwd() / f): file_stamp(f) for f in files}


def check_inputs_outside(config: BuildConfig) -> None:
    """BuildError for an input file inside the output folder: replacing the folder would delete it."""
    if not config.out.is_dir() or config.out.is_symlink():
        return
    out = config.out.resolve()
    for path in (config.keys, *config.payloads.values()):
        try:
            inside = [f for f in files_of(path) if f.resolve().is_relative_to(out)]
        except (OSError, ValueError):
            continue  # unreadable: check_inputs names it
        if inside:
            raise BuildError(f"{inside[0]} is inside the output {config.out}, which the build replaces whole: "
                             "move the input out of it first")


def check_inputs(config: BuildConfig) -> BuildInputs:
    """Checks everything about the inputs that can be checked before any work starts."""
    try:
        stamps = input_stamps(config)  # before they are read: an input replaced after this differs from it
    except (*NPY_ERRORS, KeyError, TypeError):
        stamps = None  # missing or unreadable: named below
    n, d = _check_keys(config)
    if not 1 <= config.shards <= n:
        raise BuildError(f"--shards must be in [1, {n}] for {n} rows, got {config.shards}")
    if config.cpus_per_shard < 1:
        raise BuildError(f"--cpus-per-shard must be >= 1, got {config.cpus_per_shard}")
    odd = [key for key, value in config.metadata.items() if type(key) is not str or type(value) is not str]
    if odd:  # what read_manifest takes: else the build would publish a datastore no server reads
        raise BuildError(f"BuildConfig.metadata maps names to text: {str(odd[0])[:60]!r} is given "
                         f"{type(config.metadata[odd[0]]).__name__}")
    for name in ("add_block", "spill_rows"):  # rows a shard task adds, and holds in memory, at a time
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BuildError(f"BuildConfig.{name} must be an integer >= 1, got {value!r}")
    if not 0 <= config.seed <= MAX_SEED:
        raise BuildError(f"--seed must be in [0, {MAX_SEED}], got {config.seed} (FAISS seeds are C ints)")
    factory, train_rows = _check_factory(config, n, d)
    if config.gpu:
        try:
            ix.require_gpu()
        except RuntimeError as err:
            raise BuildError(str(err)) from None
    specs = tuple(_check_payload(name, path, n) for name, path in sorted(config.payloads.items()))
    return BuildInputs(n, d, factory, train_rows, specs, input_stamps(config) if stamps is None else stamps)
