"""Replacing a folder whole: the new one takes the old one's place by two renames, and a stop between them
puts the old one back, so that the place always holds one whole folder (for a moment, none)."""

from __future__ import annotations

import os
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
