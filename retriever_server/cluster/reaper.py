"""Ending a local Ray cluster with the command that started it, and removing a process's secrets when
it dies, however it ends.

`ray.init()` starts a local cluster's processes (GCS, raylet, dashboard and runtime-env agents,
workers) as children of the command. A command that exits or is stopped shuts them down; one that is
killed (SIGKILL, the OOM killer) leaves some of them running, re-parented and named `ray::...`. So
a command that starts a local cluster also starts a reaper: a small process in a session of its own
that waits for the command to die, then ends every process that still has a file open in that
cluster's session directory (SIGTERM, then SIGKILL). It exits with the command when there is
nothing left to end.

The same reaper removes folders of secrets (a Ray actor's copies of its certificates and token, the
keys of `serve`'s hops) once their process has died: a process that is killed removes nothing itself.

    python -m retriever_server.cluster.reaper --parent PID [--session DIR] [--remove DIR ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 2.0  # after SIGTERM, before SIGKILL


def start_reaper(session_dir: str) -> subprocess.Popen:
    """Starts the reaper of this process's local Ray cluster (its session directory)."""
    return _start(["--session", session_dir])


def remove_when_gone(folder: Path) -> subprocess.Popen:
    """Starts a reaper that removes `folder` (this process's secrets) once this process has died."""
    return _start(["--remove", str(folder)])


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retriever_server.cluster.reaper", "--parent", str(os.getpid()),
                             *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet collected, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def holding(session_dir: str) -> list[int]:
    """The processes, other than this one, with a file open under the folder `session_dir` (resolved, as
    /proc gives each open file's real path: RAY_TMPDIR may go through a symbolic link)."""
    session_dir = os.path.realpath(session_dir).rstrip("/") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # gone, or not ours to look at
            continue
        if any(t.startswith(session_dir) for t in targets):
            found.append(int(entry.name))
    return found


def end(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL for those still running after GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while sig == signal.SIGTERM and any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [p for p in pids if alive(p)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--session", help="a local Ray cluster's session directory: its processes are ended")
    parser.add_argument("--remove", action="append", default=[], help="a folder to remove")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the command's terminal is the command's
    while alive(args.parent):
        time.sleep(POLL_S)
    for folder in args.remove:
        shutil.rmtree(folder, ignore_errors=True)
    if args.session:
        time.sleep(POLL_S)  # what Ray ends by itself
        end(holding(args.session))
    return 0


if __name__ == "__main__":
    sys.exit(main())
