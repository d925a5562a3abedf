"""Cores a process runs on: `--cpus 2,3` or `--cpus 0-3` for servers that should not share the cores
an LM worker (or another server) computes on, as they would not on separate machines. Only cores this
process may run on (a container's cpuset narrows them) are accepted, so that a server sizing its threads
on them gets each a core. Linux only.

Example:
    >>> pin(parse_cpus("1"))          # this process, every thread of it, on core 1
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_ALLOWED = "give cores this container or cgroup allows (see /sys/fs/cgroup/cpuset.cpus.effective)"


def parse_cpus(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3).

    Raises:
        ValueError: `text` is not a list of cores, or names a core this process may not run on (see
            `usable_cores`), naming the cores it may run on.
    """
    spans = _spans_of(text)
    usable = usable_cores()
    outside = ValueError(f"cores {text!r}: this machine has cores {_spans(usable)} that this process may run on")
    # checked before any range is made: making 0-99999999999 took minutes
    if any(first < 0 or last > max(usable) for first, last in spans):
        raise outside
    cores = set().union(*(range(first, last + 1) for first, last in spans))
    if not cores <= usable:
        raise outside
    return tuple(sorted(cores))


def usable_cores() -> set[int]:
    """The cores this process may run on: those the system lets `pin` give it (a container's cpuset),
    which a process narrowed to fewer (`taskset`, or a parent's `pin` inherited) may widen to again.

    Found by widening the affinity of a short-lived thread: the kernel keeps the allowed cores of those
    asked for, and the process's own threads keep theirs.
    """
    found: list[set[int]] = []

    def probe() -> None:
        every = range(max(os.cpu_count() or 1, max(os.sched_getaffinity(0)) + 1))
        try:
            os.sched_setaffinity(0, every)
        except OSError:  # not allowed to change: what it has is what it may use
            pass
        found.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=probe, name="usable-cores")
    thread.start()
    thread.join()
    return found[0] if found else os.sched_getaffinity(0)


def _spans_of(text: str) -> list[tuple[int, int]]:
    """'0,2-3' -> [(0, 0), (2, 3)]; raises ValueError naming the text when it is not a list of cores."""
    try:
        spans = [(int(lo), int(hi or lo)) for lo, _, hi in
                 (part.strip().partition("-") for part in text.split(",") if part.strip())]
    except ValueError:
        spans = []
    if not spans or any(first > last for first, last in spans):
        raise ValueError(f"{text!r} is not a list of cores such as 0,2-3")
    return spans


def format_cpus(cpus: tuple[int, ...]) -> str:
    """(0, 2, 3) -> '0,2,3', as `parse_cpus` reads it."""
    return ",".join(str(c) for c in cpus)


def _spans(cores: set[int]) -> str:
    """{0, 1, 2, 3, 8} -> '0-3,8'."""
    spans: list[list[int]] = []
    for core in sorted(cores):
        if spans and spans[-1][1] == core - 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in spans)


def pin(cpus: tuple[int, ...], pid: int = 0) -> None:
    """Runs every thread of process `pid` (0: this one) on `cpus` only; threads started later inherit it.

    Raises:
        ValueError: the system does not let the process run on every one of the cores (some are outside
            a container's cpuset, say), naming them; the process's threads keep the cores they had.
    """
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    threads = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]
    done: list[tuple[int, set[int]]] = []  # each thread pinned so far, with the cores it had
    for thread in threads:
        try:
            done.append((thread, os.sched_getaffinity(thread)))
            os.sched_setaffinity(thread, cpus)
            given = os.sched_getaffinity(thread)
        except ProcessLookupError:  # a thread that has ended meanwhile
            continue
        except OSError as err:  # EINVAL: none of the cores is in this process's cpuset
            _restore(done)
            raise ValueError(f"cannot run on cores {format_cpus(cpus)} ({err.strerror}): {_ALLOWED}") from None
        if given != set(cpus):  # the kernel drops the cores outside the cpuset and keeps the others
            _restore(done)
            raise ValueError(f"cannot run on cores {format_cpus(cpus)}: the system gives cores {_spans(given)} "
                             f"only; {_ALLOWED}")


def _restore(done: list[tuple[int, set[int]]]) -> None:
    """Gives each thread the cores it had."""
    for thread, before in done:
        try:
            os.sched_setaffinity(thread, before)
        except OSError:  # a thread that has ended meanwhile
            pass
