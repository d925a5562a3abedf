"""A build's streaming file I/O: rows read ahead and files written behind, on a thread, off the page cache.

A shard task reads every key once and writes every byte of its shard once. Through the page cache,
each of those bytes costs the task's core a kernel copy and a page allocation, and a 10^7-row build
pushes several times the machine's memory through the cache, evicting what serving shards hold.
Here the bytes move by DMA instead (`O_DIRECT`), on a thread, while the task adds rows to its index:

- `StreamWriter` copies what it is given into page-aligned buffers; its thread hashes each buffer
  (sha256, for the manifest) and writes it.
- `RowBlocks` reads the next block of rows while the task adds the current one;
- `SequentialReader` reads a file front to back, a window at a time (the build's spills, when it
  writes the index file from them), and can hand a long span on a window at a time.

Where a filesystem refuses `O_DIRECT` (tmpfs, some network filesystems), they use ordinary buffered
I/O instead. The bytes written and the rows read are the same either way.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retriever_server.datastore.row_parts import PartedArray, file_span, read_rows

log = logging.getLogger(__name__)
ALIGN = 4096  # O_DIRECT's alignment of buffer addresses, file offsets and lengths (a page covers every device)
DIRECT = getattr(os, "O_DIRECT", 0)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _without_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~DIRECT)


def _open_direct(path: Path, flags: int) -> tuple[int, bool]:
    """An fd for `path` opened with O_DIRECT where the filesystem allows it, and whether it was."""
    if DIRECT:
        try:
            return os.open(path, flags | DIRECT, 0o644), True
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


class StreamWriter:
    """A file written front to back on a thread, with O_DIRECT where allowed, and its sha256.

    `write` returns once the bytes are copied into one of `buffers` page-aligned buffers of
    `buffer_bytes` (it waits only when all of them are still being written). Use it as a context
    manager, or call `close`, which waits for the last write and returns the sha256 ("" without
    `checksum`); a write error on the thread is raised by the next `write` or by `close`.
    """

    def __init__(self, path: Path, buffer_bytes: int = 4 << 20, buffers: int = 3, checksum: bool = True):
        if buffer_bytes % ALIGN:
            raise ValueError(f"buffer_bytes must be a multiple of {ALIGN}, got {buffer_bytes}")
        self.path = Path(path)
        self.fd, self.direct = _open_direct(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self._free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self._free.put(mmap.mmap(-1, buffer_bytes))
        self._full: queue.Queue = queue.Queue()
        self._digest, self._error = (hashlib.sha256() if checksum else None), None
        self._buffer, self._filled = self._free.get(), 0
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path.name}", daemon=True)
        self._thread.start()

    def write(self, data) -> None:
        """Appends `data` (a C-contiguous buffer: bytes, a numpy array)."""
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        end = self._filled + len(view)
        if end < len(self._buffer):  # most writes: it fits in the buffer being filled
            self._buffer[self._filled:end] = view
            self._filled = end
            return
        while view:
            n = min(len(view), len(self._buffer) - self._filled)
            self._buffer[self._filled:self._filled + n] = view[:n]
            view = view[n:]
            self._advance(n)

    def write_as(self, array: np.ndarray, dtype: np.dtype | type) -> None:
        """Appends `array` (in C order) converted to `dtype` (a "same_kind" cast, such as float32 to
        float16), converting straight into the buffers (no converted copy of the whole array is made)."""
        flat, dtype = np.ascontiguousarray(array).reshape(-1), np.dtype(dtype)
        i = 0
        while i < len(flat):
            n = min((len(self._buffer) - self._filled) // dtype.itemsize, len(flat) - i)
            if n == 0:  # less than one value's room left: that value straddles two buffers
                self.write(flat[i:i + 1].astype(dtype))
                i += 1
                continue
            into = np.frombuffer(self._buffer, dtype=dtype, count=n, offset=self._filled)
            np.copyto(into, flat[i:i + n], casting="same_kind")
            del into  # no view of the buffer may outlive its hand-over
            self._advance(n * dtype.itemsize)
            i += n

    def close(self) -> str:
        """Writes what is left, closes the file and returns its sha256 (again, once closed).

        Raises:
            OSError: a write on the thread failed.
        """
        if self._filled:
            self._hand_over()
            self._filled = 0
        self._stop()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest() if self._digest is not None else ""

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._stop()  # the caller's error wins; the file is left as far as it got

    def _advance(self, n: int) -> None:
        """Counts `n` more bytes filled; a full buffer goes to the thread and the next free one is taken."""
        self._filled += n
        if self._filled == len(self._buffer):
            self._hand_over()
            self._buffer, self._filled = self._free.get(), 0

    def _hand_over(self) -> None:
        if self._error is not None:
            self._stop()
            raise self._error
        self._full.put((self._buffer, self._filled))

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
            os.close(self.fd)

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, n = item
            try:
                if self._error is None:
                    view = memoryview(buffer)[:n]
                    if self._digest is not None:
                        self._digest.update(view)
                    self._write_out(view)
            except OSError as err:
                self._error = err
            finally:
                self._free.put(buffer)

    def _write_out(self, view: memoryview) -> None:
        """Writes one buffer; only the last may be shorter than a buffer, and its unaligned tail is
        written without O_DIRECT."""
        if self.direct:
            aligned = len(view) - len(view) % ALIGN
            try:
                _write_all(self.fd, view[:aligned])
            except OSError as err:
                if err.errno != errno.EINVAL or os.lseek(self.fd, 0, os.SEEK_CUR) % ALIGN:
                    raise
                log.debug("%s: O_DIRECT writes refused; writing through the page cache", self.path)
                aligned = 0
            if aligned < len(view):
                _without_direct(self.fd)
                self.direct = False
            view = view[aligned:]
        _write_all(self.fd, view)


class RowBlocks:
    """Blocks of rows [start, end), `block` rows each, each read on a thread while the one before is in use.

    Iterating yields (s, e, rows[s:e]); the array is valid until the next block after it is asked for
    (two buffers take turns). A block that lies in one .npy file is read with O_DIRECT where allowed.
    """

    def __init__(self, rows: np.ndarray | PartedArray, start: int, end: int, block: int):
        self.rows, self.start, self.end, self.block = rows, start, end, block
        self.row_bytes = int(np.prod(rows.shape[1:])) * rows.dtype.itemsize
        self._size = min(block, max(end - start, 0)) * self.row_bytes + 2 * ALIGN

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        bounds = [(s, min(self.end, s + self.block)) for s in range(self.start, self.end, self.block)]
        if not bounds:
            return
        buffers = [mmap.mmap(-1, self._size), mmap.mmap(-1, self._size)]
        with ThreadPoolExecutor(1, thread_name_prefix="read rows") as pool:
            pending = pool.submit(self._read, *bounds[0], buffers[0])
            for i, (s, e) in enumerate(bounds):
                rows = pending.result()
                if i + 1 < len(bounds):
                    pending = pool.submit(self._read, *bounds[i + 1], buffers[(i + 1) % 2])
                yield s, e, rows

    def _read(self, s: int, e: int, buffer: mmap.mmap) -> np.ndarray:
        span, shape = file_span(self.rows, s, e), (e - s, *self.rows.shape[1:])
        if span is None:
            out = np.frombuffer(buffer, dtype=self.rows.dtype, count=int(np.prod(shape))).reshape(shape)
            read_rows(self.rows, s, out)
            return out
        path, offset = span
        first = offset - offset % ALIGN
        length = -(-(offset + (e - s) * self.row_bytes - first) // ALIGN) * ALIGN
        fd, direct = _open_direct(Path(path), os.O_RDONLY)
        try:
            got, _ = _read_at(fd, memoryview(buffer)[:length], first, direct)
        finally:
            os.close(fd)
        if got < offset - first + (e - s) * self.row_bytes:
            raise EOFError(f"{path} ended before row {e}")
        return np.frombuffer(buffer, dtype=self.rows.dtype, count=int(np.prod(shape)),
                             offset=offset - first).reshape(shape)


def _read_at(fd: int, view: memoryview, offset: int, direct: bool) -> tuple[int, bool]:
    """Reads into `view` from `offset` until it is full or the file ends; returns the bytes read and
    whether the fd still reads with O_DIRECT (a filesystem may take the flag but refuse the reads)."""
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as err:
            if not (direct and err.errno == errno.EINVAL):
                raise
            _without_direct(fd)  # the filesystem took the flag but refuses the reads
            direct = False
            continue
        if not n:
            break
        got += n
        if direct and got % ALIGN:
            break  # a short direct read ends at the end of the file
    return got, direct


class SequentialReader:
    """A file read front to back, `window` bytes at a time, with O_DIRECT where allowed.

    `take(n)` returns the next n bytes as a view into the reader's buffer, valid until the next `take`;
    `copy_to(write, n)` hands the next n bytes to `write` a window at most at a time. The reader keeps
    one window's buffer: a `take` larger than that reads into a buffer of its own, dropped by the next
    `take` or `copy_to`. Use it as a context manager, or call `close`.
    """

    def __init__(self, path: Path, start: int = 0, window: int = 2 << 20):
        if window <= 0 or window % ALIGN:
            raise ValueError(f"window must be a positive multiple of {ALIGN}, got {window}")
        self.path, self.window = Path(path), window
        self._window = mmap.mmap(-1, window)
        self._buffer = self._window  # what the last read filled: the window's, or a large take's
        self.fd, self.direct = _open_direct(self.path, os.O_RDONLY)
        self._base, self._have, self._at = 0, 0, start  # the buffer's file offset, its bytes, the next byte

    def take(self, n: int) -> memoryview:
        """The next `n` bytes of the file.

        Raises:
            EOFError: the file ends before them.
        """
        if self._at + n > self._base + self._have or self._at < self._base or self._buffer is not self._window:
            self._fill(n)  # after a large take, this reads its last page again rather than keep its buffer
        first = self._at - self._base
        self._at += n
        return memoryview(self._buffer)[first:first + n]

    def copy_to(self, write: Callable[[memoryview], object], n: int) -> None:
        """Hands the next `n` bytes to `write` in order, as views of at most a window each; a view is
        valid only during its call.

        Raises:
            EOFError: the file ends before them.
        """
        while n > 0:
            first = self._at - self._base
            if first < 0 or first >= self._have or self._buffer is not self._window:
                self._fill(min(n, self.window - self._at % ALIGN))  # one window from the next byte's page
                first = self._at - self._base
            k = min(n, self._have - first)
            self._at += k
            write(memoryview(self._buffer)[first:first + k])
            n -= k

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SequentialReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fill(self, n: int) -> None:
        """Reads from the page that holds the next byte: a window, or as much as `n` bytes need (into a
        buffer of that size, kept only until the next take)."""
        base = self._at - self._at % ALIGN
        need = self._at + n - base
        size = max(self.window, -(-need // ALIGN) * ALIGN)
        self._buffer = self._window if size == self.window else mmap.mmap(-1, size)
        self._have = 0  # the buffer is being overwritten
        got, self.direct = _read_at(self.fd, memoryview(self._buffer)[:size], base, self.direct)
        if got < need:
            raise EOFError(f"{self.path} ends at byte {base + got}, before byte {self._at + n}")
        self._base, self._have = base, got
