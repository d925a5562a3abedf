"""Publishing a directory atomically: whoever reads `out` sees the old whole or the new whole.

Linux's renameat2(RENAME_EXCHANGE) swaps two directories in one step; elsewhere (or on a
filesystem without it) two renames leave `out` briefly absent, and that is logged. A new `out` is
moved in with RENAME_NOREPLACE, so a path that appeared there meanwhile is never replaced; and one
build at a time writes an output (`output_held`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from retriever_server.datastore.build_inputs import BuildError
from retriever_server.datastore.manifest import MANIFEST, DatastoreError, Manifest, fsync_directory, read_manifest
from retriever_server.datastore.resume import DONE, is_leftover

log = logging.getLogger(__name__)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2(a, b, flags); False where that is unavailable (another system, an old kernel, a
    filesystem without the flag), OSError where it refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    return _renameat2(a, b, RENAME_EXCHANGE)


def move_new(work: Path, out: Path) -> None:
    """Moves `work` to `out` where nothing is: FileExistsError if something is there, even if it
    appeared a moment ago (renameat2 RENAME_NOREPLACE where there is one)."""
    if _renameat2(work, out, RENAME_NOREPLACE):
        return
    if out.exists() or out.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(out))
    os.rename(work, out)


def fsync_tree(root: Path) -> None:
    """fsyncs every file and folder under `root` (and `root`), so that what a build wrote survives a crash
    once the manifest that names it is written: the shards' files are written without fsync."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(folder))


def check_output(out: Path, overwrite: bool) -> None:
    """BuildError for an existing `out` unless `overwrite`, and for one that is not a readable datastore
    (a folder that merely holds a manifest.json is not): it is never replaced. A symbolic link is refused
    whatever it points to: the build renames its new folder into the output's place, which would replace
    the link itself and leave the folder it points to behind."""
    if out.is_symlink():
        raise BuildError(f"{out} is a symbolic link (to {os.readlink(out)!r}); give the folder it points to, "
                         f"{str(out.resolve())!r}, or another output path, and point the link there afterwards")
    if not out.exists():
        return
    try:
        manifest = read_manifest(out)
    except (DatastoreError, OSError, ValueError) as err:
        raise BuildError(f"{out} exists and is not a datastore; refusing to replace it: choose another output "
                         f"path ({err})") from None
    if not overwrite:
        raise BuildError(f"{out} already exists; pass --overwrite to replace it")
    try:
        others = foreign_entries(out, manifest)
    except OSError as err:
        raise BuildError(f"cannot list {out} to check that it holds only its datastore: {err.strerror or err}; "
                         "refusing to replace it") from None
    if others:  # --overwrite replaces the whole folder: what is not the datastore's would go with it
        shown = ", ".join(repr(name) for name in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                                                 else "")
        raise BuildError(f"{out} holds {shown} besides its datastore, which --overwrite would delete with it: "
                         "move them out first, or choose another output path")


def foreign_entries(out: Path, manifest: Manifest) -> list[str]:
    """What is in the datastore folder `out` besides its datastore, which replacing the folder would delete:
    names beside the manifest and the shard folders other than a build's leftovers (one stopped as it
    tidied), and in each shard folder anything but the files the manifest lists for it and the build's
    `.done.json` (as `shard-00000/NAME`). A shard folder that is a symbolic link is left out: removing the
    folder removes the link, not what it points to."""
    listed = {MANIFEST, *(shard.name for shard in manifest.shards)}
    found = sorted(entry.name for entry in out.iterdir() if entry.name not in listed and not is_leftover(entry.name))
    for shard in manifest.shards:
        folder = out / shard.name
        if folder.is_dir() and not folder.is_symlink():
            own = {*shard.files, DONE}
            found += sorted(f"{shard.name}/{entry.name}" for entry in folder.iterdir() if entry.name not in own)
    return found


@contextlib.contextmanager
def output_held(out: Path, overwrite: bool) -> Iterator[None]:
    """`check_output`, then holds the lock of the builds of `out` (flock on OUT_PARENT/.NAME.lock) for the
    duration: BuildError where another build holds it. The kernel releases a killed build's lock."""
    check_output(out, overwrite)
    path = out.parent / f".{out.name}.lock"
    with held_lock(path, out, f"another build is writing {out}: wait for it to end, or choose another output path"):
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # before the lock goes: a build that opened it meanwhile tries again


@contextlib.contextmanager
def held_lock(path: Path, out: Path, busy: str) -> Iterator[object]:
    """The lock file at `path` (beside `out`), open and flocked: BuildError(`busy`) where another process
    holds it. A file that a finishing writer unlinked between our open and our flock is no lock any more:
    take the one at `path` now instead. The kernel releases a killed process's lock."""
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a")
        except OSError as err:
            raise BuildError(f"cannot write in {out.parent}: {err.strerror or err}") from None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BuildError(busy) from None
            if _same_file(f, path):
                yield f
                return


def _same_file(f, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path` (not unlinked or replaced since it was opened)."""
    try:
        here, there = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def replace_directory(work: Path, out: Path, overwrite: bool = True) -> Path | None:
    """Moves `work` to `out`, which always names a whole datastore, the old one or the new one; without
    `overwrite` only where nothing is at `out` (FileExistsError otherwise).

    Returns where the replaced datastore now is, for the caller to remove, or None.
    """
    if not overwrite or not out.exists():
        move_new(work, out)
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
