"""One shard task's work: a block of rows added to a copy of the trained codec, its files written.

`add_rows` is the loop every shard task of a build runs (and `benchmarks/add_loop.py` times alone): read
a block of keys (ahead, on a thread), add it to the index, write its float16 copy (behind, on a
thread), spill the index's lists when they hold `spill_rows` rows, and finally write the index file. It
times each of those phases, so a build's manifest says where its shard tasks' seconds went.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore import index as ix
from retriever_server.datastore.build_inputs import BuildConfig, BuildError, check_key_rows
from retriever_server.datastore.coarse import graph_assignment
from retriever_server.datastore.row_parts import open_rows
from retriever_server.datastore.spill import ListSpill, spillable
from retriever_server.datastore.stream_io import RowBlocks, StreamWriter


def _keys_writer(path: Path, shape: tuple[int, int]) -> StreamWriter:
    """`keys.npy` (float16) opened for writing front to back: its header is written here."""
    out = StreamWriter(path, buffers=8)  # 32 MiB: a block of 32,768 rows of 384 dimensions waits for no write
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                               "fortran_order": False, "shape": shape})
    return out


@dataclass(frozen=True)
class FilledShard:
    """What `add_rows` did: the sha256 of the files it hashed while writing them, and its seconds by
    phase ("read": waiting for keys; "add": FAISS; "keys": their float16 copy; "spill"; "index": the
    index file written and every file closed)."""

    hashed: dict[str, str]
    seconds: dict[str, float]


class _Clock:
    """Seconds spent in each named phase, summed."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._phase, self._began = "", 0.0

    def __call__(self, phase: str) -> None:
        """Ends the current phase (if any) and starts `phase` ("" for none)."""
        now = time.perf_counter()
        if self._phase:
            self.seconds[self._phase] = self.seconds.get(self._phase, 0.0) + now - self._began
        self._phase, self._began = phase, now


def add_rows(config: BuildConfig, trained: str, start: int, end: int, folder: Path, progress=None,
             stopped: Callable[[], bool] = lambda: False) -> FilledShard:
    """One shard task's work: adds rows [start, end) under their global ids to a copy of the trained
    codec (saved at `trained`) and writes it to `folder/index.faiss`; with `keep_keys`, writes their
    float16 copy to `folder/keys.npy` in the same pass over the keys. An IVF index spills its lists
    every `spill_rows` rows (`spill`), so memory holds at most that many rows' codes. Keys are read
    ahead and files written behind on threads (`stream_io`). `progress` (a `_Progress` actor) is told
    of every block added. Raises BuildError before a block when `stopped()` says the build is ending."""
    index = faiss.read_index(trained)
    spill = ListSpill(index, folder / "spill") if spillable(index) else None
    blocks = RowBlocks(open_rows(config.keys), start, end, config.add_block)
    kept = _keys_writer(folder / "keys.npy", (end - start, blocks.rows.shape[1])) if config.keep_keys else None
    hashed, held, clock = {}, 0, _Clock()
    # Rows find their list on the GPU with `gpu`, else through a graph over the centroids (large indexes).
    with ix.gpu_assignment(index) if config.gpu else graph_assignment(index), kept or nullcontext():
        clock("read")
        for s, e, rows in blocks:
            if stopped():
                raise BuildError(f"stopped at row {s}: another shard failed")
            clock("add")
            block = np.ascontiguousarray(rows, dtype=np.float32)  # (e - s, d)
            ids = np.arange(s, e, dtype=np.int64)
            check_key_rows(block, ids, config.keep_keys)
            held = _add_spilling(index, spill, block, ids, held, config.spill_rows, clock)
            if kept is not None:
                clock("keys")
                kept.write_as(block, np.float16)  # converted into the writer's buffers
            if progress is not None:
                progress.add.remote(e - s)
            clock("read")
        clock("index")
        if kept is not None:
            hashed["keys.npy"] = kept.close()
    if spill is not None and held:  # the rows since the last spill
        spill.spill()
    _check_stored(spill.rows if spill is not None else _stored(index), start, end)
    if spill is None:
        ix.write_index(index, folder / "index.faiss")
    else:
        hashed["index.faiss"] = spill.write_index(folder / "index.faiss")
        (folder / "spill").rmdir()
    clock("")
    return FilledShard(hashed, {k: round(v, 3) for k, v in clock.seconds.items()})


def _add_spilling(index: faiss.Index, spill: ListSpill | None, block: np.ndarray, ids: np.ndarray, held: int,
                  spill_rows: int, clock: _Clock) -> int:
    """Adds the block's rows, spilling the lists whenever they hold `spill_rows` rows (a block larger than what
    is left of that is added in parts: FAISS adds each row alone, so the lists are the same); returns the rows
    held since the last spill."""
    done = 0
    while done < len(block):
        take = len(block) - done if spill is None else min(len(block) - done, spill_rows - held)
        index.add_with_ids(block[done:done + take], ids[done:done + take])
        done, held = done + take, held + take
        if spill is not None and held >= spill_rows:
            clock("spill")
            spill.spill()
            clock("add")
            held = 0
    return held


def _stored(index: faiss.Index) -> int:
    """The rows an index holds: for IVF, those in its lists (FAISS counts in ntotal a row it put in none)."""
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.invlists.compute_ntotal()) if ivf is not None else int(index.ntotal)


def _check_stored(stored: int, start: int, end: int) -> None:
    """BuildError unless the shard holds every one of its rows [start, end): nothing is published short."""
    if stored != end - start:
        raise BuildError(f"rows [{start}, {end}): the index holds {stored} of them; FAISS placed "
                         f"{end - start - stored} in no list (a key far from every centroid); nothing was published")
