"""Row-partitioned arrays: one (N, ...) array stored as several .npy files of consecutive rows.

A parts index `NAME.parts.json` lists the files in row order, by paths relative to itself:

    {"format": 1, "dtype": "<f4", "shape": [N, d],
     "parts": [{"path": "parts/00000/keys.npy", "rows": 4096}, {"path": "parts/00001/keys.npy", ...}]}

Writers that work in parallel (the encode job) write each part on its own and the index last.
`open_rows` opens either a plain .npy (memory-mapped) or a parts index (a read-only `PartedArray`
over memory-mapped parts), so readers that slice rows work on both without copying the whole array.

Example:
    >>> write_parts_index(Path("src/keys.parts.json"), [Path("src/parts/00000/keys.npy"), ...])
    >>> keys = open_rows(Path("src/keys.parts.json"))
    >>> keys.shape, keys[1000:2000], keys[np.array([5, 3, 70000])]
"""

from __future__ import annotations

import json
import math
import mmap
import numbers
import os
import tokenize
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from retriever_server.wire.untrusted import one_line

PARTS_SUFFIX = ".parts.json"
FORMAT = 1
NPY_MAGIC = b"\x93NUMPY"  # how every .npy file starts
ZIP_MAGIC = b"PK\x03\x04"  # how a .npz (a zip archive) starts
# what np.load raises for a file that is no readable .npy: numpy's header parser adds the last two
NPY_ERRORS = (ValueError, EOFError, OSError, SyntaxError, tokenize.TokenError)


def escaped(text: object, limit: int = 400) -> str:
    """Text from outside (a path a parts index lists, a library's error) for a one-line message (`one_line`:
    control characters escaped, the rest as it is, cut at `limit` characters); paths and bytes decoded."""
    return one_line(os.fsdecode(text) if isinstance(text, bytes | os.PathLike) else str(text), limit)


def is_parts_index(path: Path | str) -> bool:
    """Whether `path` names a parts index (by its `.parts.json` suffix)."""
    return str(path).endswith(PARTS_SUFFIX)


class PartedArray:
    """A read-only array whose rows are spread over .npy parts, in order.

    Indexing by an integer, a slice or an integer/boolean array along the first axis returns an
    ordinary ndarray (a copy); `np.asarray(a)` reads every row. Parts are memory-mapped when first
    read, and at most `max_open` stay mapped (each holds a file descriptor), so an array of
    thousands of parts opens no more files than that. It pickles as its paths, not its rows.
    """

    def __init__(self, paths: Sequence[Path], rows: Sequence[int], dtype: np.dtype, row_shape: tuple[int, ...],
                 max_open: int = 32):
        self.paths = [Path(p) for p in paths]
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.offsets = np.cumsum([0, *rows]).astype(np.int64)  # (P + 1,)
        self.max_open = max_open
        self._mapped: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mapped": OrderedDict()}

    def _part(self, p: int) -> np.ndarray:
        """Part p, memory-mapped (the least recently read part is unmapped beyond `max_open`)."""
        part = self._mapped.pop(p, None)
        if part is None:
            part = np.load(self.paths[p], mmap_mode="r")
            while len(self._mapped) >= self.max_open:
                self._mapped.popitem(last=False)
        self._mapped[p] = part
        return part

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.offsets[-1]), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"PartedArray(shape={self.shape}, dtype={self.dtype}, parts={len(self.paths)})"

    def __iter__(self) -> Iterator[np.ndarray]:
        for p in range(len(self.paths)):
            yield from np.array(self._part(p))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key or key[0] is Ellipsis:
                return np.asarray(self)[key]
            rows = self[key[0]]
            return rows[key[1:]] if isinstance(key[0], numbers.Integral) else rows[(slice(None), *key[1:])]
        if isinstance(key, numbers.Integral):
            return self._row(int(key))
        if isinstance(key, slice):
            return self._slice(*key.indices(len(self)))
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"boolean index of shape {index.shape} for {len(self)} rows")
            index = np.flatnonzero(index)
        return self._take(index)

    def _row(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of bounds for {n} rows")
        i %= n
        p = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return np.array(self._part(p)[i - self.offsets[p]])

    def _slice(self, start: int, stop: int, step: int) -> np.ndarray:
        if step != 1:
            return self._take(np.arange(start, stop, step, dtype=np.int64))
        out = np.empty((max(0, stop - start), *self.row_shape), dtype=self.dtype)
        self.read_into(out, start)
        return out

    def locate(self, start: int, end: int) -> tuple[np.ndarray, int] | None:
        """(the part's mapping, the row within it) where rows [start, end) lie in one part, else None."""
        p = int(np.searchsorted(self.offsets, start, side="right")) - 1
        if p < 0 or end > self.offsets[p + 1]:
            return None
        return self._part(p), start - int(self.offsets[p])

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Fills `out` with rows [start, start + len(out)), read from the part files (see `read_rows`)."""
        stop = start + len(out)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for p in range(max(first, 0), len(self.paths)):
            lo, hi = max(start, self.offsets[p]), min(stop, self.offsets[p + 1])
            if lo >= stop:
                break
            if lo < hi:
                read_rows(self._part(p), lo - self.offsets[p], out[lo - start:hi - start])

    def _take(self, index: np.ndarray) -> np.ndarray:
        if index.dtype.kind not in "iu":
            raise IndexError(f"rows must be indexed by integers, slices or booleans, got {index.dtype}")
        n = len(self)
        flat = index.astype(np.int64).ravel()
        bad = (flat < -n) | (flat >= n)
        if bad.any():
            raise IndexError(f"row {flat[bad][0]} is out of bounds for {n} rows")
        flat = flat % max(n, 1)
        out = np.empty((len(flat), *self.row_shape), dtype=self.dtype)
        part_of = np.searchsorted(self.offsets, flat, side="right") - 1  # (m,)
        for p in np.unique(part_of):
            mask = part_of == p
            out[mask] = self._part(int(p))[flat[mask] - self.offsets[p]]
        return out.reshape(*index.shape, *self.row_shape)


def read_rows(rows: np.ndarray | PartedArray, start: int, out: np.ndarray) -> None:
    """Fills `out` with rows [start, start + len(out)) of `rows` (an `open_rows` result).

    A C-ordered .npy mapping of `out`'s dtype is read with `readinto` from its file rather than copied
    through the mapping: the same bytes for about a third of the CPU on a cold page cache (no page
    faults), which a build's add loop spends once per row.

    Raises:
        IndexError: the rows run past the end.
    """
    if start < 0 or start + len(out) > len(rows):
        raise IndexError(f"rows [{start}, {start + len(out)}) are out of bounds for {len(rows)} rows")
    if isinstance(rows, PartedArray):
        rows.read_into(out, start)
        return
    span = file_span(rows, start, start + len(out))
    if span is None or rows.dtype != out.dtype or not out.flags.c_contiguous or rows.shape[1:] != out.shape[1:]:
        out[...] = rows[start:start + len(out)]
        return
    path, offset = span
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, got = memoryview(out).cast("B"), 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise IndexError(f"{path} ended before row {start + len(out)}")
            got += n


def file_span(rows: np.ndarray | PartedArray, start: int, end: int) -> tuple[str, int] | None:
    """(path, byte offset) of rows [start, end) of an `open_rows` result where they lie in one C-ordered
    .npy file (a whole mapping, or one part), else None."""
    if isinstance(rows, PartedArray):
        located = rows.locate(start, end)
        if located is None:
            return None  # the rows cross into the next part
        rows, start = located
    if not (isinstance(rows, np.memmap) and rows.filename is not None and isinstance(rows.base, mmap.mmap)
            and rows.flags.c_contiguous):
        return None
    return rows.filename, rows.offset + start * rows.strides[0]


def _read_index(index_path: Path) -> dict:
    """The checked JSON body of a parts index."""
    if not index_path.is_file():
        raise FileNotFoundError(f"parts index {index_path} not found")
    try:
        body = json.loads(index_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"parts index {index_path} is not readable JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"parts index {index_path} is not readable JSON: nested too deeply") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"parts index {index_path} is not format {FORMAT} (got {body.get('format')!r})"
                         if isinstance(body, dict) else f"parts index {index_path} is not a JSON object")
    for name, kind in (("dtype", str), ("shape", list), ("parts", list)):
        if not isinstance(body.get(name), kind):
            raise ValueError(f"parts index {index_path}: field {name!r} must be a {kind.__name__}")
    return body


def _npy_header(path: Path, whole: bool = False) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy file's header, without mapping its data.

    Raises:
        ValueError: not a .npy file; with `whole`, also one shorter than its header says.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        need = f.tell() + math.prod(int(s) for s in shape) * dtype.itemsize  # Python ints: no wrapping
    if whole and path.stat().st_size < need:
        raise ValueError(f"{escaped(path)} is truncated: {path.stat().st_size} bytes, its header needs {need}")
    return tuple(shape), dtype


def _check_part(index_path: Path, entry, dtype: np.dtype, row_shape: tuple[int, ...]) -> Path:
    """The path of one part, checked (from its header) against the index's dtype, row shape and row count."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("rows"), int):
        raise ValueError(f"parts index {index_path}: each part needs a 'path' and a 'rows' count, got {entry!r}")
    path = index_path.parent / entry["path"]
    if not path.is_file():
        raise FileNotFoundError(f"part {escaped(path)} listed in {escaped(index_path)} not found")
    try:
        shape, part_dtype = _npy_header(path, whole=True)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"part {escaped(path)} listed in {escaped(index_path)} is not a loadable .npy: "
                         f"{escaped(err)}") from None
    if part_dtype != dtype or shape[1:] != row_shape or not shape or shape[0] != entry["rows"]:
        raise ValueError(f"part {escaped(path)} is {part_dtype} {shape}; parts index {escaped(index_path)} says "
                         f"{dtype} ({entry['rows']}, {', '.join(map(str, row_shape))})")
    return path


def open_parts(index_path: Path) -> PartedArray:
    """Opens a parts index, checking every part's file, dtype and shape against it.

    Raises:
        FileNotFoundError: the index or one of its parts is missing.
        ValueError: a malformed index, a part listed twice, or a part whose dtype, shape or row count
            differs from it.
    """
    index_path = Path(index_path)
    body = _read_index(index_path)
    try:
        dtype, shape = np.dtype(body["dtype"]), tuple(int(s) for s in body["shape"])
    except (TypeError, ValueError, OverflowError) as err:  # OverflowError: a shape of 1e400 (inf)
        raise ValueError(f"parts index {escaped(index_path)}: its dtype {str(body['dtype'])[:40]!r} and shape "
                         f"{str(body['shape'])[:80]!r} do not make an array ({err})") from None
    if not shape:
        raise ValueError(f"parts index {index_path}: shape must have at least one dimension")
    paths = [_check_part(index_path, e, dtype, shape[1:]) for e in body["parts"]]
    seen = [path.resolve() for path in paths]
    if len(set(seen)) != len(seen):  # its rows would be read twice, as rows of their own
        twice = next(path for path, where in zip(paths, seen) if seen.count(where) > 1)
        raise ValueError(f"parts index {escaped(index_path)} lists the part {escaped(twice)} more than once")
    rows = [e["rows"] for e in body["parts"]]
    if sum(rows) != shape[0]:
        raise ValueError(f"parts index {index_path} says {shape[0]} rows; its parts hold {sum(rows)}")
    return PartedArray(paths, rows, dtype, shape[1:])


def check_npy_start(path: Path) -> None:
    """ValueError unless the file at `path` starts as np.save (or np.savez) writes one: for any other file
    numpy's own message speaks of pickled data."""
    with open(path, "rb") as f:
        magic = f.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC and not magic.startswith(ZIP_MAGIC):
        raise ValueError(f"{path} is not a .npy file (it does not start as np.save writes one): save the array "
                         "with np.save")


def open_rows(path: Path) -> np.ndarray | PartedArray:
    """A row-indexable read-only view of a .npy file (np.memmap) or a parts index (PartedArray).

    Raises:
        FileNotFoundError: the file (or a part) is missing.
        ValueError: not a loadable .npy, or a bad parts index (see `open_parts`).
    """
    path = Path(path)
    if is_parts_index(path):
        return open_parts(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    check_npy_start(path)
    rows = np.load(path, mmap_mode="r")
    if not isinstance(rows, np.ndarray):  # a .npz archive (np.load opens those too, whatever the name)
        rows.close()
        raise ValueError(f"{path} is a .npz archive of arrays, not one .npy array: save the array with np.save")
    return rows


def stored_dtype(path: Path) -> np.dtype:
    """The dtype of a .npy (from its header) or of a parts index, without opening the data."""
    path = Path(path)
    if is_parts_index(path):
        return np.dtype(_read_index(path)["dtype"])
    return _npy_header(path)[1]


def files_of(path: Path) -> list[Path]:
    """The files holding an array: the .npy itself, or a parts index followed by its parts."""
    path = Path(path)
    if not is_parts_index(path):
        return [path]
    return [path, *(path.parent / e["path"] for e in _read_index(path)["parts"])]


def write_parts_index(index_path: Path, parts: Sequence[Path]) -> Path:
    """Writes (atomically) the parts index of .npy files that hold consecutive rows, in order.

    Args:
        index_path: where to write; its name must end in `.parts.json`.
        parts: the part files, each an (n_i, ...) .npy with the same dtype and row shape.

    Returns:
        `index_path`.

    Raises:
        ValueError: no parts, a name without the suffix, or parts whose dtype or row shape differ.
        FileNotFoundError: a part is missing.

    Example:
        >>> write_parts_index(Path("out/values.parts.json"), sorted(Path("out").glob("parts/*/values.npy")))
    """
    index_path = Path(index_path)
    if not is_parts_index(index_path):
        raise ValueError(f"a parts index name must end in {PARTS_SUFFIX}, got {index_path.name}")
    if not parts:
        raise ValueError(f"parts index {index_path} needs at least one part")
    headers = []
    for path in map(Path, parts):
        if not path.is_file():
            raise FileNotFoundError(f"part {path} not found")
        headers.append(_npy_header(path, whole=True))
    (shape0, dtype0) = headers[0]
    for path, (shape, dtype) in zip(parts, headers):
        if not shape or dtype != dtype0 or shape[1:] != shape0[1:]:
            raise ValueError(f"part {path} is {dtype} {shape}; part {parts[0]} is {dtype0} {shape0}")
    body = {"format": FORMAT, "dtype": dtype0.str, "shape": [sum(h[0][0] for h in headers), *shape0[1:]],
            "parts": [{"path": Path(os.path.relpath(p, index_path.parent)).as_posix(), "rows": shape[0]}
                      for p, (shape, _) in zip(parts, headers)]}
    tmp = index_path.with_name(f".{index_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, index_path)
    return index_path
