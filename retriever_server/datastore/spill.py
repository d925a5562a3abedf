"""One shard's IVF index filled in bounded memory.

FAISS holds an IVF index's inverted lists in memory until `write_index`: at 10^7 rows of 392-byte
codes that is 2 GiB a shard, and every shard task of a build holds its own at once. Here rows are added
a chunk at a time; after each chunk the lists are spilled to two files (codes and ids, list by list) and
the index is given fresh, empty lists. At the end the index file is written from the spills, list by
list, in the layout `faiss.write_index` uses for array inverted lists ("ilar"), so the file is the same,
byte for byte, as FAISS's own of the index filled in one go (the tests compare them).

Only IVF indexes whose lists are plain arrays spill (`spillable`); others (flat, HNSW, FastScan's block
lists) are filled in memory as before.
"""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore.stream_io import StreamWriter

log = logging.getLogger(__name__)
EMPTY_LISTS_TAIL = b"sprs" + struct.pack("<Q", 0)  # how write_index ends an index whose lists are all empty


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

    Chunk c is `codes-c.bin` (every list's codes, list 0 first) and `ids-c.bin` (int64, the same order);
    its list sizes stay in memory (nlist int64 a chunk).
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
        """Writes the index's lists as the next chunk and gives the index fresh, empty lists."""
        lists = self.ivf.invlists
        sizes = np.array([lists.list_size(i) for i in range(self.nlist)], dtype=np.int64)
        c = len(self.sizes)
        with (StreamWriter(self.folder / f"codes-{c}.bin", checksum=False) as codes,
              StreamWriter(self.folder / f"ids-{c}.bin", checksum=False) as ids):
            for i in np.flatnonzero(sizes):
                n = int(sizes[i])
                codes.write(faiss.rev_swig_ptr(lists.get_codes(int(i)), n * self.code_size))
                ids.write(faiss.rev_swig_ptr(lists.get_ids(int(i)), n))
            codes.close()
            ids.close()
        self.sizes.append(sizes)
        fresh = faiss.ArrayInvertedLists(self.nlist, self.code_size)
        fresh.this.disown()  # the index owns (and frees) it
        self.ivf.replace_invlists(fresh, True)  # frees the filled lists
        self.index.ntotal = self.ivf.ntotal = 0
        log.debug("spilled chunk %d (%d rows) to %s", c, int(sizes.sum()), self.folder)

    def write_index(self, path: Path) -> str:
        """Writes the index holding every spilled row to `path` (through a temporary name), removes the
        spills and returns the file's sha256."""
        total = np.sum(self.sizes, axis=0) if self.sizes else np.zeros(self.nlist, dtype=np.int64)
        # per chunk, where each list's rows begin, and its files' bytes
        starts = [np.concatenate([[0], np.cumsum(s)]).tolist() for s in self.sizes]  # nlist + 1 each
        codes = [self._bytes(f"codes-{c}.bin") for c in range(len(self.sizes))]
        ids = [self._bytes(f"ids-{c}.bin") for c in range(len(self.sizes))]
        tmp, cs = path.with_name(path.name + ".tmp"), self.code_size
        with StreamWriter(tmp) as out:
            out.write(_empty_header(self.index, int(total.sum())))
            out.write(sizes_block(total))
            for i in np.flatnonzero(total).tolist():
                for c, s in enumerate(starts):
                    out.write(codes[c][s[i] * cs:s[i + 1] * cs])
                for c, s in enumerate(starts):
                    out.write(ids[c][s[i] * 8:s[i + 1] * 8])
            sha256 = out.close()
        for view in codes + ids:
            view.release()
        tmp.replace(path)
        for f in self.folder.glob("*.bin"):
            f.unlink()
        return sha256

    def _bytes(self, name: str) -> memoryview:
        """A spill file's bytes, mapped and read ahead (written with O_DIRECT, they are not in the page cache)."""
        path = self.folder / name
        if not path.stat().st_size:
            return memoryview(b"")
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            mapped.madvise(mmap.MADV_SEQUENTIAL)
        return memoryview(mapped)
