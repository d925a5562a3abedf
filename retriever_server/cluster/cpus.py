"""Cores a process runs on: `--cpus 2,3` or `--cpus 0-3` for servers that should not share the cores
an LM worker (or another server) computes on, as they would not on separate machines. Linux only.

Example:
    >>> pin(parse_cpus("1"))          # this process, every thread of it, on core 1
"""

from __future__ import annotations

import os
from pathlib import Path


def parse_cpus(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3); raises ValueError naming the text when it is not a list of this machine's cores."""
    cores: set[int] = set()
    count = os.cpu_count() or 1
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first > last:
                raise ValueError
            if first < 0 or last >= count:  # checked before the range is made: 0-99999999999 took minutes
                raise LookupError
            cores.update(range(first, last + 1))
    except ValueError:
        cores = set()
    except LookupError:
        raise ValueError(f"cores {text!r}: this machine has cores {list(range(count))}") from None
    if not cores:
        raise ValueError(f"{text!r} is not a list of cores such as 0,2-3")
    return tuple(sorted(cores))


def format_cpus(cpus: tuple[int, ...]) -> str:
    """(0, 2, 3) -> '0,2,3', as `parse_cpus` reads it."""
    return ",".join(str(c) for c in cpus)


def pin(cpus: tuple[int, ...], pid: int = 0) -> None:
    """Runs every thread of process `pid` (0: this one) on `cpus` only; threads started later inherit it.

    Raises:
        ValueError: the cores are not among those the system lets this process run on (a container's
            cpuset, say), naming them.
    """
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    threads = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except ProcessLookupError:  # a thread that has ended meanwhile
            pass
        except OSError as err:  # EINVAL: none of the cores is in this process's cpuset
            raise ValueError(f"cannot run on cores {format_cpus(cpus)} ({err.strerror}): give cores this "
                             f"container or cgroup allows (see /sys/fs/cgroup/cpuset.cpus.effective)") from None
