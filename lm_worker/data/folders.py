"""Replacing a folder whole: the new one takes the old one's place by two renames, and a stop between them
puts the old one back, so that the place always holds one whole folder (for a moment, none); and one writer
of a folder at a time (`exclusive_lock`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from retriever_server.datastore.publish import BuildError, held_lock


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
    """Holds the lock file at `path` (an flock, as a build holds its output's) for the block and removes it at
    the end: ValueError(`busy`) where another process, or another block of this one, holds it. The kernel
    releases a killed process's lock."""
    with contextlib.ExitStack() as stack:
        try:  # the errors of taking the lock alone: the block's own go as they are
            stack.enter_context(held_lock(path, path, busy))
        except BuildError as err:
            raise ValueError(str(err)) from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # before the lock goes: one that opened it meanwhile tries again
