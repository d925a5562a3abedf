"""One shard's IVF index filled in bounded memory.

FAISS holds an IVF index's inverted lists in memory until `write_index`: at 10^7 rows of 392-byte
codes that is 2 GiB a shard, and every shard task of a build holds its own at once. Here rows are added
a chunk at a time; after each chunk FAISS writes the lists to a spill file (as it serialises array
inverted lists, "ilar": the list sizes, then each list's codes and ids) and the index is given fresh,
empty lists. At the end the index file is written from the spills, list by list, in the layout
`faiss.write_index` uses, so the file is the same, byte for byte, as FAISS's own of the index filled in
one go (the tests compare them). The pieces go from the spills to the file a window at a time, never
joined, so however many rows one list holds (duplicate keys put most of a shard in one), the task holds
no more than the spills' read windows and the file's write buffers.

Spills are written and read back with O_DIRECT (`stream_io`): through the page cache each of their
bytes would cost the task's core a kernel copy and a page allocation, twice.

Only IVF indexes whose lists are plain arrays spill (`spillable`); others (flat, HNSW, FastScan's block
lists) are filled in memory as before.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore.stream_io import SequentialReader, StreamWriter

log = logging.getLogger(__name__)
EMPTY_LISTS_TAIL = b"sprs" + struct.pack("<Q", 0)  # how write_index ends an index whose lists are all empty
CALLBACK_BYTES = 4 << 20  # the most FAISS hands a spill's writer at once


def _ivf(index: faiss.Index):
    """The IVF part of the index, downcast, or None."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def _empty_header(index: faiss.Index, ntotal: int) -> bytes:
    """The serialised index with empty lists and `ntotal` rows, up to where the list sizes begin."""
    ivf = _ivf(index)
    saved = index.ntotal, ivf.ntotal
    index.ntotal = ivf.ntotal = ntotal
    try:
        body = faiss.serialize_index(index).tobytes()
    finally:
        index.ntotal, ivf.ntotal = saved
    head = body[:-len(EMPTY_LISTS_TAIL)]
    if not body.endswith(EMPTY_LISTS_TAIL) or not head.endswith(_lists_prefix(ivf)):
        raise ValueError(f"{type(ivf).__name__} does not serialise its lists last")
    return head


def _lists_prefix(ivf) -> bytes:
    return b"ilar" + struct.pack("<QQ", ivf.nlist, ivf.code_size)


def spillable(index: faiss.Index) -> bool:
    """Whether the index is an empty IVF index with array lists that serialise last (see the module doc)."""
    ivf = _ivf(index)
    if ivf is None or index.ntotal or not isinstance(faiss.downcast_InvertedLists(ivf.invlists),
                                                     faiss.ArrayInvertedLists):
        return False
    try:
        _empty_header(index, 0)
    except ValueError:
        return False
    return True


def sizes_block(sizes: np.ndarray) -> bytes:
    """The list sizes as write_index stores them: all of them ("full") when more than half the lists
    hold rows, else (list, size) pairs of the non-empty ones ("sprs")."""
    nonzero = np.flatnonzero(sizes)
    if len(nonzero) > len(sizes) // 2:
        return b"full" + struct.pack("<Q", len(sizes)) + sizes.astype("<u8").tobytes()
    pairs = np.stack([nonzero, sizes[nonzero]], axis=1).astype("<u8")
    return b"sprs" + struct.pack("<Q", pairs.size) + pairs.tobytes()


class ListSpill:
    """The spilled chunks of one index's inverted lists, in `folder`.

    Chunk c is `lists-c.bin`, the lists as `faiss.write_InvertedLists` writes them; its list sizes
    stay in memory (nlist int64 a chunk).
    """

    def __init__(self, index: faiss.Index, folder: Path):
        self.index, self.ivf, self.folder = index, _ivf(index), folder
        self.nlist, self.code_size = int(self.ivf.nlist), int(self.ivf.code_size)
        self.sizes: list[np.ndarray] = []  # per chunk: (nlist,) int64
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def rows(self) -> int:
        return int(sum(s.sum() for s in self.sizes))

    def spill(self) -> None:
        """Writes the index's lists as the next chunk and gives the index fresh, empty lists.

        Raises:
            OSError: the spill file could not be written (a full disk), or FAISS wrote other than the
                lists' sizes say (a layout `write_index` does not use); the index keeps its rows.
        """
        lists = self.ivf.invlists
        sizes = np.array([lists.list_size(i) for i in range(self.nlist)], dtype=np.int64)
        path = self._chunk(len(self.sizes))
        with StreamWriter(path, checksum=False) as out:
            writer = faiss.PyCallbackIOWriter(lambda data: (out.write(data), len(data))[1], CALLBACK_BYTES)
            faiss.write_InvertedLists(lists, writer)
            del writer
            out.close()
        expected = self._body_start(sizes) + int(sizes.sum()) * (self.code_size + 8)
        if path.stat().st_size != expected:  # FAISS's layout is what the merge reads: check it held
            raise OSError(f"spill file {path} holds {path.stat().st_size} bytes, not {expected}")
        self.sizes.append(sizes)
        fresh = faiss.ArrayInvertedLists(self.nlist, self.code_size)
        fresh.this.disown()  # the index owns (and frees) it
        self.ivf.replace_invlists(fresh, True)  # frees the filled lists
        self.index.ntotal = self.ivf.ntotal = 0
        log.debug("spilled chunk %d (%d rows) to %s", len(self.sizes) - 1, int(sizes.sum()), path)

    def write_index(self, path: Path) -> str:
        """Writes the index holding every spilled row to `path` (through a temporary name), removes the
        spills and returns the file's sha256."""
        total = np.sum(self.sizes, axis=0) if self.sizes else np.zeros(self.nlist, dtype=np.int64)
        cs = self.code_size
        tmp = path.with_name(path.name + ".tmp")
        with StreamWriter(tmp) as out, contextlib.ExitStack() as stack:
            chunks = [(stack.enter_context(SequentialReader(self._chunk(c), self._body_start(s))), s.tolist())
                      for c, s in enumerate(self.sizes)]  # each read front to back, list by list
            write = out.write
            write(_empty_header(self.index, int(total.sum())))
            write(sizes_block(total))
            # List i is every chunk's codes of it, then every chunk's ids of it. A chunk holds its codes
            # of list i just before its ids, so each reader still goes front to back; the bytes pass
            # from a reader's window to the writer's buffers, a window at most at a time.
            for i in np.flatnonzero(total).tolist():
                pieces = [(reader, sizes[i]) for reader, sizes in chunks if sizes[i]]
                for reader, rows in pieces:
                    reader.copy_to(write, rows * cs)
                for reader, rows in pieces:
                    reader.copy_to(write, rows * 8)
            sha256 = out.close()
        tmp.replace(path)
        for f in self.folder.glob("lists-*.bin"):
            f.unlink()
        return sha256

    def _chunk(self, c: int) -> Path:
        return self.folder / f"lists-{c}.bin"

    def _body_start(self, sizes: np.ndarray) -> int:
        """Where a chunk file's first list begins: after its "ilar" header and list sizes."""
        return len(_lists_prefix(self.ivf)) + len(sizes_block(sizes))
