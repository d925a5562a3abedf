"""The address file a server writes once it serves (`--address-file`): its address, metrics port, pid and
host as JSON, written whole; removed when it stops, and, stale, before a server starts, unless a live
server's. A file of another host (shared storage), or of a detached deployment (no pid), is taken as stale:
this machine cannot tell whether its writer runs. Only a regular file is read, replaced or removed, never
a link, a pipe, a socket or a device, and no more of it than an address file holds (MAX_BYTES); an empty
one made in advance (`ADDR=$(mktemp)`) is replaced too. The address goes through a new temporary file
beside it, named as the start-up check's: a name that check accepts is one the address can be written to."""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import stat
from pathlib import Path

from retriever_server.cli.common import CliError
from retriever_server.cluster.reaper import alive

TEMPORARY_TRIES = 100  # names drawn for a temporary file before giving up (each is 32 random bits)
MAX_BYTES = 1 << 20  # far more than an address file holds (a deployment's shard addresses too): a larger one is not
KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a directory"}


def prepare_address_file(path: Path | None, remove_stale: bool = True) -> None:
    """Before a server starts: removes a stale address file (a waiter must not take a stopped server's
    address for its own), and checks one can be written there (CliError if not, before anything binds).
    `remove_stale=False` checks alone, for a caller that removes it once it knows the file is stale."""
    if path is None:
        return
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
    except FileNotFoundError:
        kind = None
    except OSError as err:
        raise CliError(f"--address-file {path}: cannot look at it ({err.strerror})") from None
    if kind in (stat.S_IFDIR, stat.S_IFLNK):
        raise CliError(f"--address-file {path} is {KINDS[kind]}: give the name of a file to write")
    if kind is not None and kind != stat.S_IFREG:
        raise CliError(f"--address-file {path} is {KINDS.get(kind, 'a special file')}, not a regular file: give the "
                       "name of a file to write")
    if kind is not None and not is_address_file(path):
        raise CliError(f"--address-file {path} holds something other than a server's address: refusing to "
                       "replace it; give the name of a new file")
    if (pid := _writer(path)) is not None and pid != os.getpid() and _wrote_it(pid, path):
        raise CliError(f"--address-file {path} is the address of a server still running (pid {pid}): give "
                       "another file, or stop that server first")
    if remove_stale:
        remove_address(path, stale=True)
    try:
        fd, probe = _temporary(path)  # as `write_address` will make it: the same name, the same length
    except OSError as err:
        raise CliError(f"--address-file {path}: cannot write there ({err.strerror})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def _temporary(path: Path) -> tuple[int, Path]:
    """A new file `.NAME.XXXXXXXX.tmp` beside `path`, open for writing, and its path. Created with O_EXCL
    (never a file or a link planted there, nor followed), mode 0o666 less the umask, as an address file."""
    for _ in range(TEMPORARY_TRIES):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside it in {TEMPORARY_TRIES} tries")


def _wrote_it(pid: int, path: Path) -> bool:
    """Whether process `pid` runs and started before `path` was last written (a pid reused since is not the
    file's writer)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        return alive(pid) and started <= os.lstat(path).st_mtime + 1.0  # btime is whole seconds
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def _writer(path: Path) -> int | None:
    """The pid of the process on this host that wrote the address file at `path`; None for none (no pid, not
    an int, or another host's: a file from before hosts were written is taken as this host's)."""
    body = _address_json(path)
    if body is None:
        return None
    pid, host = body.get("pid"), body.get("host", socket.gethostname())
    mine = host == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
    return pid if mine else None


def _read_regular(path: Path) -> bytes | None:
    """The bytes of the regular file at `path` (not a link to one), or None: not there, not a regular file,
    unreadable, or over MAX_BYTES. Opened without following a link or waiting on a pipe, read no further."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since the lstat
                return None
            data = f.read(MAX_BYTES + 1)
    except OSError:
        return None
    return data if len(data) <= MAX_BYTES else None


def _address_json(path: Path) -> dict | None:
    """The JSON object of an address file at `path` (it has `address` and `pid`, as `write_address` writes),
    or None for anything else (an empty file too)."""
    return _parsed(_read_regular(path))


def _parsed(data: bytes | None) -> dict | None:
    try:
        body = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return body if isinstance(body, dict) and {"address", "pid"} <= body.keys() else None


def is_address_file(path: Path) -> bool:
    """Whether `path` is a regular file holding an address file's JSON (one a server wrote, or stale), or an
    empty or blank one (made in advance, as `mktemp` does: replacing it loses nothing)."""
    data = _read_regular(path)
    return data is not None and (not data.strip() or _parsed(data) is not None)


def remove_address(path: Path | None, stale: bool = False) -> None:
    """Removes the address file: one this process wrote, when it stops, or with `stale` whatever is there
    (a server starting), so that whoever waits for the file never reads a stopped server's address."""
    if path is None:
        return
    body = _address_json(path)
    if body is None or (not stale and body.get("pid") != os.getpid()):
        return  # gone already, not an address file, or another process's now: left as it is
    try:
        path.unlink()
    except OSError:
        pass


def write_address(path: Path | None, address: str, metrics_port: int | None, **more) -> None:
    """Writes the address JSON atomically, so a reader never sees half of it."""
    if path is None:
        return
    body = json.dumps({"address": address, "metrics_port": metrics_port, "pid": os.getpid(),
                       "host": socket.gethostname(), **more})
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
