"""Publishing a directory atomically: whoever reads `out` sees the old whole or the new whole.

Linux's renameat2(RENAME_EXCHANGE) swaps two directories in one step; elsewhere (or on a
filesystem without it) two renames leave `out` briefly absent, and that is logged.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # an old kernel, or a filesystem without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_directory(work: Path, out: Path) -> Path | None:
    """Moves `work` to `out`, which always names a whole datastore, the old one or the new one.

    Returns where the replaced datastore now is, for the caller to remove, or None.
    """
    if not out.exists():
        os.replace(work, out)
        return None
    if exchange(work, out):
        return work
    log.warning("renameat2(RENAME_EXCHANGE) is unavailable here; replacing %s by two renames, so it "
                "is briefly absent", out)
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(work, out)
    return old
