"""Cores a process may run on: `--cpus` checked against the cores the system lets this process run on
(a container's cpuset, fewer than the machine's), not the machine's core count, and `pin` refusing a
set of cores it cannot give in full instead of running on the rest."""

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from retriever_server.cli import build_parser
from retriever_server.cluster.cpus import format_cpus, parse_cpus, pin, usable_cores

MASK = sorted(os.sched_getaffinity(0))
BEYOND = max(os.cpu_count() or 1, MASK[-1]) + 1  # a core number no process here can run on
REFUSED = r"^cores '(.*)': this machine has cores ([\d,-]+) that this process may run on$"


def on_cores(cores: set[int], work: Callable[[], object]) -> object:
    """`work()` (or what it raised) in a thread that runs on `cores` only: affinity is per thread on
    Linux, so the rest of the test process keeps its own."""
    result: list[object] = []

    def run() -> None:
        os.sched_setaffinity(0, cores)
        try:
            result.append(work())
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            result.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture
def sleeper():
    """A child process to pin, so that this one keeps its cores."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def test_cores_this_process_cannot_run_on_are_refused_naming_those_it_can(capsys, sleeper):
    """The usable cores are those a process pinned to them really runs on: every core of this process's
    affinity, and no core the kernel drops (a sleeping child pinned to all of them and one beyond)."""
    usable = usable_cores()
    assert set(MASK) <= usable
    with pytest.raises(ValueError) as refused:
        pin((*sorted(usable), BEYOND), sleeper)
    assert os.sched_getaffinity(sleeper) == set(MASK)  # as it was
    pin(tuple(sorted(usable)), sleeper)
    assert os.sched_getaffinity(sleeper) == usable
    for text in (str(BEYOND), f"{MASK[0]},{BEYOND}", f"0-{BEYOND}", "0-99999999999"):
        with pytest.raises(ValueError) as refused:
            parse_cpus(text)
        match = re.match(REFUSED, str(refused.value))
        assert match and match[1] == text, str(refused.value)
        assert set(parse_cpus(match[2])) == usable  # the cores named, as --cpus takes them
    exited = on_cores(usable, lambda: build_parser().parse_args(["serve", "--datastore", "ds", "--shard", "0",
                                                                 "--cpus", f"{MASK[0]},{BEYOND}"]))
    assert isinstance(exited, SystemExit) and exited.code == 2
    assert f"argument --cpus: cores '{MASK[0]},{BEYOND}': this machine has cores" in capsys.readouterr().err
    assert parse_cpus(format_cpus(tuple(MASK))) == tuple(MASK)


@pytest.mark.skipif(len(MASK) < 2, reason="needs 2 cores to narrow a process to one of them")
def test_a_process_narrowed_to_fewer_cores_may_widen_again_to_those_given(sleeper):
    """A parent pinned to some cores (the decoding benchmark's model) starts servers with --cpus on
    others: they inherit its cores and pin themselves to theirs."""
    first, second = MASK[:2]
    assert on_cores({first}, usable_cores) == usable_cores()
    assert on_cores({first}, lambda: parse_cpus(f"{first},{second}")) == (first, second)
    pin((first,), sleeper)
    assert os.sched_getaffinity(sleeper) == {first}
    pin((first, second), sleeper)
    assert os.sched_getaffinity(sleeper) == {first, second}


def test_pin_refuses_cores_it_cannot_give_in_full_and_leaves_the_process_as_it_was(sleeper):
    """The kernel drops the cores a process may not use and keeps the others: (first, BEYOND) became
    (first,) with no error."""
    first = MASK[0]
    with pytest.raises(ValueError, match=rf"^cannot run on cores {first},{BEYOND}: the system gives cores "
                                         rf"{first} only; give cores"):
        pin((first, BEYOND), sleeper)
    assert sorted(os.sched_getaffinity(sleeper)) == MASK
    with pytest.raises(ValueError, match=rf"^cannot run on cores {BEYOND} \(Invalid argument\): give cores"):
        pin((BEYOND,), sleeper)
    assert sorted(os.sched_getaffinity(sleeper)) == MASK
    pin((first,), sleeper)
    assert os.sched_getaffinity(sleeper) == {first}
