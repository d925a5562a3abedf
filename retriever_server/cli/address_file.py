"""The address file a server writes once it serves (`--address-file`): its address, metrics port, pid and
host as JSON, written whole; removed when it stops, and, stale, before a server starts, unless a live
server's. A file of another host (shared storage), or of a detached deployment (no pid), is taken as stale:
this machine cannot tell whether its writer runs."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

from retriever_server.cli.common import CliError
from retriever_server.cluster.reaper import alive


def prepare_address_file(path: Path | None, remove_stale: bool = True) -> None:
    """Before a server starts: removes a stale address file (a waiter must not take a stopped server's
    address for its own), and checks one can be written there (CliError if not, before anything binds).
    `remove_stale=False` checks alone, for a caller that removes it once it knows the file is stale."""
    if path is None:
        return
    if path.is_dir():
        raise CliError(f"--address-file {path} is a directory: give the name of a file to write")
    if path.exists() and not is_address_file(path):
        raise CliError(f"--address-file {path} holds something other than a server's address: refusing to "
                       "replace it; give the name of a new file")
    if (pid := _writer(path)) is not None and pid != os.getpid() and _wrote_it(pid, path):
        raise CliError(f"--address-file {path} is the address of a server still running (pid {pid}): give "
                       "another file, or stop that server first")
    if remove_stale:
        remove_address(path, stale=True)
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise CliError(f"--address-file {path}: cannot write there ({err.strerror})") from None


def _wrote_it(pid: int, path: Path) -> bool:
    """Whether process `pid` runs and started before `path` was last written (a pid reused since is not the
    file's writer)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        return alive(pid) and started <= path.stat().st_mtime + 1.0  # btime is whole seconds
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def _writer(path: Path) -> int | None:
    """The pid of the process on this host that wrote the address file at `path`; None for none (no pid, not
    an int, or another host's: a file from before hosts were written is taken as this host's)."""
    try:
        body = json.loads(path.read_text())
        pid, host = body.get("pid"), body.get("host", socket.gethostname())
    except (OSError, ValueError, AttributeError):
        return None
    mine = host == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
    return pid if mine else None


def is_address_file(path: Path) -> bool:
    """Whether `path` is empty or holds an address file's JSON (one a server wrote, or stale)."""
    try:
        text = path.read_text()
        return not text.strip() or {"address", "pid"} <= set(json.loads(text))
    except (OSError, ValueError, TypeError):
        return False


def remove_address(path: Path | None, stale: bool = False) -> None:
    """Removes the address file: one this process wrote, when it stops, or with `stale` whatever is there
    (a server starting), so that whoever waits for the file never reads a stopped server's address."""
    if path is None:
        return
    try:
        if not stale and json.loads(path.read_text()).get("pid") != os.getpid():
            return  # another process's now
        path.unlink()
    except (OSError, ValueError, AttributeError):
        pass  # gone already, or not an address file of ours: left as it is


def write_address(path: Path | None, address: str, metrics_port: int | None, **more) -> None:
    """Writes the address JSON atomically, so a reader never sees half of it."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"address": address, "metrics_port": metrics_port, "pid": os.getpid(),
                               "host": socket.gethostname(), **more}))
    os.replace(tmp, path)
