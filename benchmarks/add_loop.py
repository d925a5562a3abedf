"""Where a shard task's add phase goes: the build's add loop alone in this process against FAISS's `add`.

On the keys and the trained codec of a datastore `scale.py` built (its first shard's index, emptied),
one thread, rows [0, N):

- **FAISS add**: the rows read into memory first (not timed), then one `add_with_ids` call;
- **build add loop**: `retriever_server.datastore.shard_fill.add_rows`, what each shard task of a build
  runs: read a block of keys from the parts (their pages dropped first, as a build finds them), add
  it, write its float16 copy, spill the lists, write the index file, hashing both files as written.

It prints wall seconds, user and system CPU seconds and rows/s of each, their ratio, and the build
loop's largest costs by function (cProfile, a second run): how much of the gap is FAISS and how much
is the reading and writing a build does and an in-memory `add` does not.

    python benchmarks/add_loop.py --datastore bench_out/scale-real/n10000000-real140370/ds [--rows 1000000]

The keys are read from the path the datastore's manifest records (`build.keys`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retriever_server.datastore.build_inputs import BuildConfig
from retriever_server.datastore.manifest import DatastoreError, read_manifest
from retriever_server.datastore.row_parts import files_of, open_rows
from retriever_server.datastore.shard_fill import add_rows


@dataclass(frozen=True)
class Timing:
    """One side's seconds."""

    wall: float
    user: float
    system: float
    rows: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall


def drop_pages(paths: list[Path]) -> None:
    """Drops the files' pages from the page cache (`posix_fadvise(DONTNEED)`)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(work) -> Timing:
    """Runs `work()` (which returns its row count) and measures it."""
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rows = work()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Timing(time.perf_counter() - started, after.ru_utime - before.ru_utime,
                  after.ru_stime - before.ru_stime, rows)


def empty_codec(datastore: Path, folder: Path) -> Path:
    """The datastore's trained codec: its first shard's index with every row removed, saved in `folder`."""
    manifest = read_manifest(datastore)
    index = faiss.read_index(str(datastore / manifest.shards[0].name / "index.faiss"))
    index.reset()
    path = folder / "trained.index"
    faiss.write_index(index, str(path))
    return path


def faiss_add(trained: Path, keys: Path, rows: int) -> Timing:
    x = np.ascontiguousarray(open_rows(keys)[0:rows], dtype=np.float32)  # (rows, d), read before timing
    index = faiss.read_index(str(trained))
    return timed(lambda: (index.add_with_ids(x, np.arange(rows, dtype=np.int64)), rows)[1])


def build_loop(trained: Path, keys: Path, rows: int, folder: Path) -> Timing:
    out = folder / "shard"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    drop_pages(files_of(keys))
    config = BuildConfig(keys=keys, out=folder / "unused", keep_keys=True)
    return timed(lambda: (add_rows(config, str(trained), 0, rows, out), rows)[1])


def profile_of(trained: Path, keys: Path, rows: int, folder: Path, top: int = 12) -> str:
    """The build loop's costliest functions by their own time."""
    profiler = cProfile.Profile()
    profiler.runcall(build_loop, trained, keys, rows, folder)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datastore", type=Path, required=True, help="a datastore scale.py built (keys recorded)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    try:
        keys = Path(read_manifest(args.datastore).build["keys"])
    except (DatastoreError, OSError, ValueError, KeyError) as err:  # no datastore there, or no recorded keys
        raise SystemExit(f"--datastore {args.datastore}: {err}") from None
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.datastore.parent) as tmp:
        folder = Path(tmp)
        trained = empty_codec(args.datastore, folder)
        reference = faiss_add(trained, keys, args.rows)
        loop = build_loop(trained, keys, args.rows, folder)
        profile = profile_of(trained, keys, args.rows, folder)
    print(f"{args.rows} rows of {keys}, one thread, the codec of {args.datastore}")
    print("| side | wall s | user s | system s | rows/s |")
    print("|---|---:|---:|---:|---:|")
    for name, t in (("FAISS add (rows in memory)", reference), ("build add loop", loop)):
        print(f"| {name} | {t.wall:.1f} | {t.user:.1f} | {t.system:.1f} | {t.rows_per_s:.0f} |")
    print(f"\nbuild loop / FAISS add: {loop.rows_per_s / reference.rows_per_s:.2f}\n")
    print("the build loop's costliest functions (cProfile, a second run):")
    print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
