"""Replacing a folder whole: the new one takes the old one's place by two renames, and a stop between them
puts the old one back, so that the place always holds one whole folder (for a moment, none); and one writer
of a folder at a time (`exclusive_lock`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def swap_folders(new: Path, place: Path, old: Path) -> None:
    """Moves the folder at `place` to `old` and `new` to `place`. Stopped between the two renames (an
    exception, Ctrl-C), it moves `old` back and raises."""
    os.rename(place, old)
    try:
        os.rename(new, place)
    except BaseException:
        if not place.exists():
            os.rename(old, place)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[None]:
    """Holds the lock file at `path` (an flock) for the block and removes it at the end: ValueError(`busy`)
    where another process, or another block of this one, holds it. A file that a finishing holder removed
    between our open and our flock is no lock any more: the one at `path` now is taken instead. The kernel
    releases a killed process's lock. (The service's build lock works alike; the data room imports nothing
    of the service, whose datastore modules load FAISS.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(busy) from None
            if _same_file(f, path):
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)  # before the lock goes: one that opened it meanwhile tries again
                return


def _same_file(f, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path` (not removed or replaced since it was opened)."""
    try:
        here, there = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
