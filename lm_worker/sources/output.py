"""Where a source is written: the checks on its folder, a work folder beside it, and the swap.

A source is encoded into a work folder beside its output folder and moved into place only when it
is complete, so a failed or interrupted encode leaves an earlier source there as it was. The swap
keeps whatever else the output folder held (the user's files, a split's keys), and removes only
the earlier source's own files. An output folder that holds files but no source is refused: this
project never replaces files it did not write.

    OUT/                       the finished source (source.json last), as readers see it
    .OUT.encoding/             the encode job's work folder: its parts, resumed by a rerun of the job
    .OUT.encoding-XXXXXXXXXXXX/ an in-process encode's work folder, removed if the encode fails; one whose
                               encode was killed is removed by the next encode (or check) of OUT on its host

Example:
    >>> check_out(Path("run/retro-source"), "--out")
    >>> with new_source(Path("run/retro-source")) as work:
    ...     write_the_source_into(work)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from lm_worker.data.folders import swap_folders
from lm_worker.sources.source import KEYS, KEYS_PARTS, PAYLOAD_FILES, SOURCE_JSON
from retriever_server.datastore.publish import BuildError, held_lock
from retriever_server.datastore.row_parts import PARTS_SUFFIX

log = logging.getLogger(__name__)

PARTS = "parts"  # the encode job's parts folder
JOB_JSON = "job.json"  # in PARTS: what the parts were planned from
OWNER = ".encoding-owner"  # in an in-process encode's work folder: "PID HOST" of the process writing it
SOURCE_ENTRIES = frozenset({SOURCE_JSON, KEYS, KEYS_PARTS, PARTS, *(file for _, file in PAYLOAD_FILES.values()),
                            *(name + PARTS_SUFFIX for name, _ in PAYLOAD_FILES.values())})  # a source's own files


def place_of(out_dir: Path) -> Path:
    """The absolute path of `out_dir` with symbolic links resolved: where its files are swapped."""
    return Path(os.path.realpath(out_dir))


def job_work_dir(out_dir: Path) -> Path:
    """The encode job's work folder for the source at `out_dir` (beside it; a rerun resumes its parts)."""
    place = place_of(out_dir)
    return place.with_name(f".{place.name}.encoding")


def _names(names: list[str], shown: int = 4) -> str:
    """A few names, each escaped and cut, and how many more there are."""
    quoted = ", ".join(repr(name[:60]) for name in names[:shown])
    return quoted + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_out(out_dir: Path, flag: str = "") -> None:
    """Refuses a source folder that holds something other than a source of this project. First ends a
    replacement stopped part-way (`finish_replacing`) and removes killed encodes' work folders
    (`remove_abandoned`).

    Args:
        out_dir: where a source is to be written: absent, empty, a source (source.json) or an
            unfinished encode (parts/job.json) are taken.
        flag: the option that named it (e.g. "--out"), for the message.

    Raises:
        ValueError: `out_dir` is not a folder, or holds other files (one line naming a few of them).
    """
    finish_replacing(Path(out_dir))
    remove_abandoned(Path(out_dir))
    refuse_foreign(out_dir, flag)


def refuse_foreign(out_dir: Path, flag: str = "") -> None:
    """`check_out`'s refusal alone, reading only (a caller without the encode lock): ValueError where
    `out_dir` is not a folder, or holds files but no source of this project."""
    out = Path(out_dir)
    where = f"{flag} {out}" if flag else str(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ValueError(f"{where} exists and is not a folder")
    names = sorted(p.name for p in out.iterdir())
    if names and SOURCE_JSON not in names and not (out / PARTS / JOB_JSON).is_file():
        raise ValueError(f"{where} holds {_names(names)} but no datastore source: encoding there would replace "
                         "files this project did not write; give an empty or new folder")


def is_running(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_of(work: Path) -> tuple[int, str] | None:
    """The (pid, host) an in-process encode recorded in its work folder; None where it recorded none."""
    try:
        pid, host = (work / OWNER).read_text().split(" ", 1)
        return int(pid), host
    except (OSError, ValueError):
        return None


def _beside(place: Path, pattern: str) -> list[Path]:
    """The entries beside `place` named `.NAME.` and then a whole match of `pattern`, where NAME is `place`'s
    own name taken literally (never as a glob), in name order. `pattern` matches no dot, so the leftovers of
    another output whose name begins with NAME (`NAME.replaced-1`) are never `place`'s."""
    if not place.parent.is_dir():
        return []
    own = re.compile(re.escape(f".{place.name}.") + pattern)
    return sorted(entry for entry in place.parent.iterdir() if own.fullmatch(entry.name))


def remove_abandoned(out_dir: Path) -> None:
    """Removes the work folders of in-process encodes of `out_dir` (`.NAME.encoding-*`) whose encode was
    killed: recorded by a process of this host that no longer runs. Those of another host, of a process
    still running, or that record no owner are left, and named in the log."""
    place = place_of(out_dir)
    removed, running, unknown = [], [], []
    for work in _beside(place, r"encoding-[^.]+"):  # any suffix without a dot: those of older encodes too
        owner = owner_of(work)
        if owner is None or owner[1] != socket.gethostname():
            unknown.append(work.name)
        elif is_running(owner[0]):
            running.append(work.name)
        else:
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work.name)
    if removed:
        log.warning("removed %s beside %s: the work of encodes that were killed", _names(removed), out_dir)
    if running:
        log.info("left %s beside %s: encodes still running", _names(running), out_dir)
    if unknown:
        log.warning("left %s beside %s: encodes of another host or of no recorded owner; remove one by hand "
                    "once no encode writes it", _names(unknown), out_dir)


def _remove_source_files(folder: Path) -> None:
    """Removes a source's own files from `folder`, then the folder if nothing else is left in it."""
    for name in SOURCE_ENTRIES:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        log.warning("left %s: it holds files that are not the replaced source's", folder)


def finish_replacing(out_dir: Path) -> None:
    """Ends what a `replace_source` killed part-way left beside `out_dir` (`.NAME.replaced-*`): killed
    between its two renames, the old source goes back to its place (there is no other); killed after them,
    the old folder's other files join the new source and its own files are removed."""
    place = place_of(out_dir)
    for old in _beside(place, r"replaced-[0-9a-f]{8}"):  # the names replace_source gives, and no others
        if not place.exists():
            os.rename(old, place)
            log.warning("put back the source at %s: a replacement of it was stopped between its renames", out_dir)
            continue
        _move_others(old, place)
        _remove_source_files(old)


def _move_others(old: Path, place: Path) -> None:
    """Moves the entries of the replaced source's folder `old` that are not a source's own into `place`."""
    for entry in sorted(old.iterdir()):
        if entry.name not in SOURCE_ENTRIES and not (place / entry.name).exists():
            os.rename(entry, place / entry.name)


def replace_source(work: Path, out_dir: Path) -> None:
    """Moves the finished source in `work` into the place of `out_dir`.

    An earlier source there stays whole until the swap (two renames); afterwards the files that
    were not its own are moved into the new folder, and its own files are removed.
    """
    place = place_of(out_dir)
    if not place.exists():
        place.parent.mkdir(parents=True, exist_ok=True)
        os.rename(work, place)
        return
    old = place.with_name(f".{place.name}.replaced-{uuid.uuid4().hex[:8]}")
    swap_folders(work, place, old)
    _move_others(old, place)
    _remove_source_files(old)
    log.info("replaced the earlier source at %s", out_dir)


@contextlib.contextmanager
def new_source(out_dir: Path) -> Iterator[Path]:
    """Yields a new work folder beside `out_dir` to write a whole source into; once the block ends it
    replaces the source at `out_dir` (`replace_source`); if the block raises, it is removed and
    `out_dir` stays as it was.

    Raises:
        ValueError: `out_dir` holds files but no source (`check_out`), before anything is written.
    """
    with encode_lock(out_dir):  # no other encode of out_dir, job or in-process, swaps it meanwhile
        check_out(out_dir)
        place = place_of(out_dir)
        work = place.parent / f".{place.name}.encoding-{uuid.uuid4().hex[:12]}"
        work.mkdir()  # with the umask's mode, as the source had: mkdtemp's 0700 would hide it from other users
        try:
            (work / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}")  # a killed encode's is reaped
            yield work
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        try:
            (work / OWNER).unlink(missing_ok=True)  # not part of the source
            replace_source(work, out_dir)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # not swapped in: the old source is back in its place
            raise


@contextlib.contextmanager
def encode_lock(out_dir: Path, error: type[Exception] = ValueError) -> Iterator[None]:
    """The lock of the encodes of `out_dir` (OUT_PARENT/.NAME.encode.lock), held by an encode job for its
    whole run and by an in-process encode while it writes and swaps in its source: `error` (naming the
    output) where another encode holds it. A link and its target share one lock."""
    place = place_of(out_dir)
    path = place.parent / f".{place.name}.encode.lock"
    with contextlib.ExitStack() as stack:
        try:  # the errors of taking the lock alone: the block's own go as they are
            stack.enter_context(held_lock(path, place, f"another encode is writing {place}: wait for it to "
                                                       "end, or choose another output folder"))
        except BuildError as err:
            raise error(str(err)) from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # before the lock goes: an encode that opened it meanwhile tries again
