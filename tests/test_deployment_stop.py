"""How a local deployment stops, and what it leaves: the router drains before the shards, each given
its grace; secrets go with their process however it dies (the reaper)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from retriever_server.cluster.launcher import LocalDeployment
from retriever_server.cluster.supervisor import Child

DRAINS = """
import signal, sys, time
from pathlib import Path
name, events, drain_s = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
def log(what):
    with open(events, "a") as out:
        out.write(f"{name} {what} {time.monotonic()}\\n")
def drain(*_):
    log("term")
    time.sleep(drain_s)
    log("exit")
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
log("ready")
while True:
    time.sleep(0.1)
"""


STARTS = """
import json, signal, sys, time
from pathlib import Path
name, events, address_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def log(what):
    with open(events, "a") as out:
        out.write(f"{name} {what} {time.monotonic()}\\n")
time.sleep(1.0)  # as a server starting: imports, loading, binding; SIGHUP's default action (exit) until here
signal.signal(signal.SIGHUP, lambda *_: log("hup"))
address_file.write_text(json.dumps({"address": "127.0.0.1:1"}))  # as a server does once its handlers are in
log("ready")
while True:
    time.sleep(0.1)
"""


def child(tmp_path: Path, name: str, drain_s: float) -> Child:
    """A process that, on SIGTERM, takes `drain_s` seconds to drain, logging when to tmp_path/events."""
    process = Child(name, [sys.executable, "-c", DRAINS, name, str(tmp_path / "events"), str(drain_s)],
                    tmp_path / f"{name}.log", tmp_path / f"{name}.json")
    process.spawn()
    return process


def events(tmp_path: Path, expected: int) -> list[tuple[str, str]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = (tmp_path / "events").read_text().splitlines() if (tmp_path / "events").exists() else []
        if len(lines) >= expected:
            break
        time.sleep(0.05)  # polling, with a deadline
    return [tuple(line.split()[:2]) for line in sorted(lines, key=lambda line: float(line.split()[2]))]


def test_the_router_drains_before_the_shards_each_within_the_stop_timeout(tmp_path):
    """The router gets SIGTERM first, and the shards only once it has exited (they used to drain at the
    same moment, failing requests the router had accepted); each has `stop_timeout_s`, not a fixed 10 s."""
    deployment = LocalDeployment(tmp_path / "unused", stop_timeout_s=4.0)
    deployment.router = child(tmp_path, "router", drain_s=1.0)
    deployment.shards = [[child(tmp_path, "shard-0", drain_s=0.5)], [child(tmp_path, "shard-1", drain_s=0.5)]]
    assert len(events(tmp_path, 3)) == 3  # every one ready
    deployment.stop()
    order = events(tmp_path, 9)[3:]
    assert order[:2] == [("router", "term"), ("router", "exit")]
    assert sorted(order[2:4]) == [("shard-0", "term"), ("shard-1", "term")]
    assert all(p.popen.returncode == 0 for p in deployment.processes())  # drained, not killed
    deployment.stop()  # a second stop does nothing


def test_a_process_that_outlasts_the_stop_timeout_is_killed(tmp_path):
    deployment = LocalDeployment(tmp_path / "unused", stop_timeout_s=0.5)
    deployment.router = child(tmp_path, "router", drain_s=30.0)
    assert len(events(tmp_path, 1)) == 1
    began = time.monotonic()
    deployment.stop()
    assert time.monotonic() - began < 5 and deployment.router.popen.returncode == -signal.SIGKILL


def test_a_folder_of_secrets_goes_with_its_process_however_it_dies(tmp_path):
    """A process that hands its secrets' folder to the reaper and is then killed (SIGKILL: it removes
    nothing itself) leaves no such folder behind."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "hop-token").write_text("secret\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from retriever_server.cluster.reaper import remove_when_gone\n"
                               "remove_when_gone(Path(sys.argv[1]))\nprint('ready', flush=True)\ntime.sleep(60)\n",
                               str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # the folder stays while its process lives
        assert folder.is_dir()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 10
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # polling, with a deadline
        assert not folder.exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_sweep_removes_the_secrets_of_actors_whose_process_has_ended(tmp_path):
    """A Ray actor that is killed removes nothing, and Ray ends whatever it could leave to do so: its
    folder names its process, and a sweep (each actor's start, a deployment's driver) removes it once that
    process has ended, and only then."""
    from retriever_server.cluster.ray_secrets import PREFIX, sweep

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead, live = tmp_path / f"{PREFIX}{ended.pid}-abc", tmp_path / f"{PREFIX}{os.getpid()}-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "hop-token").write_text("secret\n")
    assert sweep(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir()


def test_a_reload_spares_a_process_still_starting(tmp_path):
    """SIGHUP (serve's reload of its TLS and token files) went to every child, one still starting too,
    which it ended (its handler not yet in place); now only to those that wrote their address file."""
    deployment = LocalDeployment(tmp_path / "unused", stop_timeout_s=2.0)
    address_file = tmp_path / "router.json"
    deployment.router = Child("router", [sys.executable, "-c", STARTS, "router", str(tmp_path / "events"),
                                         str(address_file)], tmp_path / "router.log", address_file)
    deployment.router.spawn()
    try:
        deployment.reload_security()  # while it starts (its interpreter has not even begun the script)
        assert events(tmp_path, 1) == [("router", "ready")]
        deployment.reload_security()  # once it is up: it reads its files again
        assert events(tmp_path, 2) == [("router", "ready"), ("router", "hup")]
        assert not deployment.router.exited()
    finally:
        deployment.stop()


class Interrupted(Exception):
    pass


def test_a_signal_during_a_stop_cuts_no_drain_short(tmp_path):
    """A stop that no signal began (a child exited under --no-restart, a failed start) ran with serve's
    handlers armed: a Ctrl-C then broke out of it, the drains cut short and the processes left running,
    and a second stop() did nothing. Now SIGINT and SIGTERM wait until every process has ended."""
    deployment = LocalDeployment(tmp_path / "unused", stop_timeout_s=5.0)
    deployment.router = child(tmp_path, "router", drain_s=1.0)
    deployment.shards = [[child(tmp_path, "shard-0", drain_s=1.0)]]
    assert len(events(tmp_path, 2)) == 2

    def interrupted(*_):
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupted)  # as serve's handler, which raises
    signals = threading.Timer(0.3, lambda: [os.kill(os.getpid(), sig) for sig in (signal.SIGINT, signal.SIGTERM)])
    previous_term = signal.signal(signal.SIGTERM, interrupted)
    try:
        signals.start()
        deployment.stop()  # ends, the router drained, then the shard
    finally:
        signals.join()
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    assert events(tmp_path, 6)[2:] == [("router", "term"), ("router", "exit"), ("shard-0", "term"), ("shard-0", "exit")]
    assert all(p.popen.returncode == 0 for p in deployment.processes())
    assert signal.getsignal(signal.SIGINT) is previous  # the handlers are back


def test_a_restart_that_cannot_start_backs_off(tmp_path, monkeypatch, caplog):
    """A restart whose start fails (its log folder gone, no fork) counts as a quick exit: it was tried again
    every poll after the first delay, forever, a traceback each time (19 tries in 20 s here); it now backs off."""
    from types import SimpleNamespace

    from retriever_server.cluster import supervisor
    from retriever_server.cluster.supervisor import RestartPolicy, Supervisor

    logs = tmp_path / "logs"
    logs.mkdir()
    child = Child("shard-0", [sys.executable, "-c", "pass"], logs / "shard-0.log", tmp_path / "shard-0.json")
    child.spawn()
    child.popen.wait(30)
    clock = [child.started_at + 100.0]  # it served 100 s, then exited
    monkeypatch.setattr(supervisor, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    for log_file in logs.iterdir():
        log_file.unlink()
    logs.rmdir()  # a tmp cleaner took the log folder: every start now fails
    tries = []
    real_spawn = Child.spawn
    monkeypatch.setattr(Child, "spawn", lambda self: (tries.append(clock[0]), real_spawn(self)))
    watch = Supervisor(children=lambda: [child], policy=RestartPolicy(first_delay_s=1.0, max_delay_s=8.0))
    start = clock[0]
    for _ in range(200):  # 20 s, a look every 0.1 s
        clock[0] += 0.1
        try:
            watch.tend(child)
        except Exception:  # noqa: BLE001 - as the supervisor's own loop takes it
            pass
    assert [round(t - start) for t in tries] == [1, 3, 7, 15]  # 1 s, then 2, 4, 8: backed off
    assert caplog.text.count("could not start (FileNotFoundError") == 4
