"""The CPU-cost benchmark's arithmetic: CPU read per process and call, and its bars."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cpu_cost import CostConfig, bars, cpu_per_call  # noqa: E402
from decoding import ProcessGone  # noqa: E402


def test_cpu_per_call_counts_this_process_and_others_per_call():
    """A call that burns about 20 ms of this process's CPU is counted at about 20 ms per call; a process
    that only sleeps, at about 0."""
    def burn(_):
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass

    config = CostConfig(seconds_per_cell=0.3, min_calls=10, warmup_calls=1)
    cost = cpu_per_call(burn, [np.zeros((1, 4), np.float32)], {"idle": os.getppid()}, config)
    assert cost["calls"] >= 10
    assert 19 <= cost["client"] <= 30 and cost["idle"] < 5
    assert cost["total"] == cost["client"] + cost["idle"]


def test_a_server_that_exits_mid_measurement_stops_it_rather_than_count_negative_cpu():
    """A process gone during a tally (a crash, or a restart under another pid) lost its CPU seconds:
    the tally refuses to go on, where it used to count that process's earlier CPU as negative."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                              "while time.process_time() < end:\n    pass\ntime.sleep(0.5)"])
    try:
        config = CostConfig(seconds_per_cell=3.0, min_calls=1, warmup_calls=0, rounds=1)
        with pytest.raises(ProcessGone, match=f"process {child.pid} exited during the measurement"):
            cpu_per_call(lambda _: time.sleep(0.05), [np.zeros((1, 4), np.float32)], {"shard 0": child.pid}, config)
    finally:
        child.kill()
        child.wait()


def cell(nq: int, k: int, router_total: float, in_process: float, fan_out: float, floor: float, router: float) -> dict:
    return {"nq": nq, "k": k, "router": {"total": router_total, "router": router}, "fan_out": {"total": fan_out},
            "in_process_sharded": {"total": in_process}, "floor_fan_out": {"total": floor},
            "router_efficiency": in_process / router_total}


def test_bars_judge_efficiency_the_fan_out_floor_and_the_router():
    rows = [cell(64, 10, 10.0, 8.5, 9.0, 1.0, 1.0), cell(1, 10, 4.0, 0.5, 2.0, 1.2, 1.0),
            cell(64, 1024, 40.0, 20.0, 30.0, 2.0, 3.5)]
    got = {b["bar"].split(":")[0].split(" >=")[0].split(" <=")[0]: b["pass"] for b in bars(rows)}
    assert got == {"router efficiency at nq=64, k=10": True, "router efficiency at nq=64, k=1024": False,
                   "fan-out at nq=1, k=10": True, "router CPU at nq=64, k=1024": False}


THREADS = ("import threading, time\nfor _ in range(3):\n"
           "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\ntime.sleep(30)\n")


def test_each_process_gets_cores_of_its_own_and_every_thread_is_pinned():
    import subprocess

    import pytest
    from pinning import core_plan, pin_process, threads_on

    plan = core_plan(list(range(16)), shards=2)
    assert plan == {"client": (0, 1), "router": (2, 3), "shard 0": (4, 5), "shard 1": (6, 7)}
    with pytest.raises(ValueError, match="needs 8 cores"):
        core_plan([0, 1], shards=2)
    child = subprocess.Popen([sys.executable, "-c", THREADS])
    try:
        deadline = time.monotonic() + 10
        while len(list(Path(f"/proc/{child.pid}/task").iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        mine = sorted(os.sched_getaffinity(0))
        pin_process(child.pid, (mine[-1],))
        assert threads_on(child.pid) == {(mine[-1],)}  # the main thread and the three it started
    finally:
        child.kill()
        child.wait()


def cost_row(nq: int, k: int) -> dict:
    """A cpu_cost.json row of made-up figures (CPU ms per request)."""
    router = {"client": 0.5, "router": 1.5, "shard 0": 6.0, "shard 1": 7.0}
    fan_out = {"client": 1.0, "shard 0": 6.5, "shard 1": 6.5}
    return {"nq": nq, "k": k, "in_process_sharded": {"total": 11.0},
            "router": {**router, "total": sum(router.values())}, "fan_out": {**fan_out, "total": sum(fan_out.values())},
            "floor_router": {"total": 1.7}, "floor_fan_out": {"total": 1.5},
            "router_efficiency": 11.0 / 15.0, "fan_out_efficiency": 11.0 / 14.0}


def test_the_figure_stacks_each_path_by_process_to_its_total_and_marks_its_floor(tmp_path):
    import json

    import pytest
    from cpu_cost_plot import ceilings, main, stacks

    row = cost_row(64, 10)
    bars = stacks(row)
    assert list(bars) == ["in-process", "router", "fan-out"]
    assert bars["in-process"] == {"in-process": 11.0}
    assert bars["router"] == {"shards": 13.0, "router": 1.5, "client": 0.5}
    assert bars["fan-out"] == {"shards": 13.0, "router": 0.0, "client": 1.0}
    for key, label in (("router", "router"), ("fan_out", "fan-out")):
        assert sum(bars[label].values()) == pytest.approx(row[key]["total"])
    assert ceilings(row) == pytest.approx({"router": 12.7, "fan-out": 12.5})

    results = tmp_path / "cpu_cost.json"  # two cells of a 2 x 2 grid: the missing ones are left blank
    results.write_text(json.dumps({"rows": [cost_row(1, 10), cost_row(64, 1024)]}))
    main([str(results)])
    png = (tmp_path / "cpu_cost.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(SystemExit, match="cannot read the rows of"):
        main([str(tmp_path / "broken.json")])


def test_shards_that_share_cores_stop_the_run():
    """The judged configuration is `serve`'s: on 2 cores each shard on a core of its own. A run whose shards
    shared both cores (an explicit --threads turned the launcher's pinning off) measured another service;
    it now stops. Where serve pins by itself, the benchmark passes it no --threads."""
    from cpu_cost import check_placement, serve_args

    shared = {"router": [0, 1], "shard 0": [0, 1], "shard 1": [0, 1]}
    with pytest.raises(RuntimeError, match="not each placed on cores of their own"):
        check_placement(shared, pinned=True)
    check_placement({"router": [0, 1], "shard 0": [0], "shard 1": [1]}, pinned=True)
    if len(os.sched_getaffinity(0)) == 2:
        assert serve_args() == ()
        with pytest.raises(RuntimeError):
            check_placement(shared, pinned=False)


@pytest.mark.parametrize("nprobe", ["0", "-1", "257", "300"])
def test_an_nprobe_outside_the_datastores_lists_is_refused_before_anything_runs(nprobe, tmp_path, monkeypatch):
    """In-process FAISS fails on nprobe 0, overflows on -1 and caps 300 at nlist where the service answers
    INVALID_ARGUMENT: the benchmark refuses them in one line, before it encodes or builds anything."""
    import cpu_cost

    def never(config):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(cpu_cost, "run", never)
    with pytest.raises(SystemExit) as exited:
        cpu_cost.main(["--out", str(tmp_path), "--nprobe", nprobe])
    assert str(exited.value) == (f"cpu_cost.py: --nprobe must be between 1 and 256 (the lists of IVF256,PQ32), "
                                 f"got {nprobe}")
    assert not any(tmp_path.iterdir())


def test_a_failure_during_the_run_is_one_line(monkeypatch, tmp_path):
    """A run that stops (shards without cores of their own, a server that did not start, the service refusing
    a search, a FAISS error) ends in one line and a nonzero exit, not a traceback."""
    import cpu_cost
    import grpc

    from retriever_server.cluster.launcher import LaunchError
    from retriever_server.serving.client import RetrieverError

    for err in (RuntimeError("the shards were not each placed on cores of their own: {}"),
                LaunchError("shard 0 did not start"), RetrieverError(grpc.StatusCode.INVALID_ARGUMENT, "nprobe")):
        def fail(config, err=err):
            raise err

        monkeypatch.setattr(cpu_cost, "run", fail)
        with pytest.raises(SystemExit) as exited:
            cpu_cost.main(["--out", str(tmp_path)])
        assert str(exited.value) == f"cpu_cost.py: {err}"


def test_pin_reads_the_shards_flags_before_it_pins_the_client(monkeypatch):
    """On 16 cores `--pin` pins the client to 2; read after that, `serve_args` saw 2 cores and left the shards
    to the launcher, which put one on each of the client's cores (and would restart them there). Read
    before, the shards ask for one FAISS thread each, as the reference searches, and `pin_all` places them."""
    import cpu_cost

    cores = {0: set(range(16))}  # this process's cores, as the fake pinning leaves them
    pinned = []

    def pin(pid, to):
        pinned.append((pid, to))
        cores[0] = set(to)

    monkeypatch.setattr(cpu_cost.os, "sched_getaffinity", lambda pid: cores[0])
    monkeypatch.setattr(cpu_cost, "pin_process", pin)
    plan, shard_args = cpu_cost.pin_client(CostConfig(pin=True))
    assert plan == {"client": (0, 1), "router": (2, 3), "shard 0": (4, 5), "shard 1": (6, 7)}
    assert pinned == [(os.getpid(), (0, 1))]
    assert shard_args == ("--threads", "1")
    cores[0], pinned[:] = {0, 1}, []
    assert cpu_cost.pin_client(CostConfig()) == (None, ())  # unpinned on 2 cores: `serve` gives each shard one
    assert pinned == []
