"""Ending a local Ray cluster with the command that started it, however the command ends.

`ray.init()` starts a local cluster's processes (GCS, raylet, dashboard and runtime-env agents,
workers) as children of the command. A command that exits or is stopped shuts them down; one that is
killed (SIGKILL, the OOM killer) leaves some of them running, re-parented and named `ray::...`. So
a command that starts a local cluster also starts a reaper: a small process in a session of its own
that waits for the command to die, then ends every process that still has a file open in that
cluster's session directory (SIGTERM, then SIGKILL). It exits with the command when there is
nothing left to end.

    python -m retriever_server.cluster.reaper --parent PID --session DIR
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 2.0  # after SIGTERM, before SIGKILL


def start_reaper(session_dir: str) -> subprocess.Popen:
    """Starts the reaper of this process's local Ray cluster (its session directory)."""
    return subprocess.Popen([sys.executable, "-m", "retriever_server.cluster.reaper", "--parent", str(os.getpid()),
                             "--session", session_dir], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet collected, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def holding(session_dir: str) -> list[int]:
    """The processes, other than this one, with a file open under `session_dir`."""
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
    parser.add_argument("--session", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the command's terminal is the command's
    while alive(args.parent):
        time.sleep(POLL_S)
    time.sleep(POLL_S)  # what Ray ends by itself
    end(holding(args.session.rstrip("/") + "/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
