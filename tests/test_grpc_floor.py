"""The search benchmark's transport floor: the service's processes and bytes, with no work in them."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from grpc_floor import HEADER, FloorDeployment, request_bytes  # noqa: E402

from retriever_server.serving.client import make_request  # noqa: E402


def test_a_floor_request_has_the_real_requests_size_and_names_the_answer_sizes():
    real = make_request(np.zeros((64, 384), np.float32), k=1024, nprobe=16).ByteSize()
    request = request_bytes(real, 786_500, 786_600)
    assert len(request) == real
    assert HEADER.unpack_from(request) == (786_500, 786_600)
    assert len(request_bytes(3, 1, 2)) == HEADER.size  # never shorter than its header


def test_the_floor_answers_through_its_relay_with_the_size_asked_and_stops_its_processes():
    with FloorDeployment() as floor:
        processes = list(floor._processes)
        assert len(processes) == 3  # two shards and the relay
        for relay_answer in (0, 130, 786_600):
            answer = floor.call(request_bytes(1600, 4_000, relay_answer), timeout=10)
            assert answer == bytes(relay_answer)
        assert floor.fan_out(request_bytes(1600, 4_000, 0)) == [bytes(4_000)] * 2  # each shard, called directly
        assert sorted(floor.pids) == ["relay", "shard 0", "shard 1"] and len(set(floor.pids.values())) == 3
        directory = floor._dir
    assert all(p.poll() is not None for p in processes)
    assert not directory.exists()


def minor_faults(pid: int) -> int:
    """Minor page faults of process `pid` so far (/proc/PID/stat field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_the_relay_reuses_its_heap_for_large_answers():
    """The floor's servers keep freed memory as the service's do: relaying two 786 KB answers into a
    third faults in a few pages a call, not the ~800 of a heap that returns each buffer to the kernel."""
    with FloorDeployment() as floor:
        request = request_bytes(100_000, 786_500, 786_600)
        for _ in range(10):
            floor.call(request, timeout=10)
        before = minor_faults(floor.pids["relay"])
        for _ in range(30):
            floor.call(request, timeout=10)
        assert (minor_faults(floor.pids["relay"]) - before) / 30 < 200


OWNER = ("import sys, time\nsys.path.insert(0, {bench!r})\nfrom grpc_floor import FloorDeployment\n"
         "floor = FloorDeployment().__enter__()\n"
         "print(floor._dir, *floor.pids.values(), flush=True)\ntime.sleep(60)\n")


def exited(pid: int) -> bool:
    """Whether process `pid` has exited (gone, or a zombie no one reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_the_floors_processes_stop_when_the_process_that_started_them_is_killed():
    """A benchmark killed by a signal never reaches `__exit__`: its floor's shards and relay stop by
    themselves once their parent is gone, and the last one removes the floor's folder."""
    import signal
    import subprocess

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(bench=bench)], stdout=subprocess.PIPE, text=True)
    try:
        directory, *pids = owner.stdout.readline().split()
        assert len(pids) == 3, pids
        owner.send_signal(signal.SIGTERM)
        owner.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not all(exited(int(pid)) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in pids if not exited(int(pid))]
        for pid in left:  # never leave them running, even when the test fails
            os.kill(int(pid), signal.SIGKILL)
        assert not left, f"still running after their parent died: {left}"
        while Path(directory).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(directory).exists()
    finally:
        owner.kill()
        owner.wait()
