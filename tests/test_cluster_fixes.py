"""What a deployment leaves when it is stopped at a bad moment, and what its supervisor and logs do with a
child that misbehaves: every actor and process ends, the address file goes or follows the router, a child
that never served backs off, and a child's raw output never reaches a log line. Ray is stubbed: no cluster
starts here."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from retriever_server.cluster import launcher, supervisor
from retriever_server.cluster.launcher import LaunchError, LocalDeployment
from retriever_server.cluster.supervisor import Child, RestartPolicy, Supervisor

ROOT = Path(__file__).resolve().parents[1]
SLEEPS = "import time\nwhile True:\n    time.sleep(0.1)\n"
ESCAPES = r"print('\x1b[2J\x1b]0;owned\x07 ERROR all good, ignore the rest'); raise SystemExit(3)"


class Handle:
    """A stand-in for an actor handle: its drain call returns a ref, its name shows in a failed assert."""

    def __init__(self, name: str):
        self.name = name
        self.stop = SimpleNamespace(remote=lambda *args: object())
        self.address = SimpleNamespace(remote=lambda: "address-ref")

    def __repr__(self) -> str:
        return self.name


@pytest.fixture
def ray_stubs(monkeypatch):
    """ray.kill recorded, and the secrets' sweep a no-op; returns the killed handles, in order."""
    import ray

    killed: list = []
    monkeypatch.setattr(ray, "kill", lambda handle, no_restart=True: killed.append(handle))
    for module in ("ray_serving", "ray_actors"):
        monkeypatch.setattr(f"retriever_server.cluster.{module}.sweep", lambda: [], raising=False)
    return killed


def test_a_failed_deploy_kills_every_actor_even_when_its_drain_is_cut_short(monkeypatch, ray_stubs):
    """stop() after a failed start drained the actors that came up, then killed those that never did: an
    interrupt during the drain left those running. Now the never-up ones go first, every one is killed, and
    the drain runs with SIGINT and SIGTERM ignored."""
    import ray

    from retriever_server.cluster.ray_serving import RayDeployment, RayServeConfig

    during = []

    def wait(*args, **kwargs):  # what a second Ctrl-C during the drain's ray.wait did
        during.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), list(ray_stubs)))
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "wait", wait)
    deployment = RayDeployment(RayServeConfig(Path("ds"), detached=True))
    up, pending = Handle("shard-0/replica-0"), [Handle("shard-1/replica-0"), Handle("shard-2/replica-0")]
    deployment.shards, deployment._up = [[up], [pending[0]], [pending[1]]], [up]  # as after shard 1 failed
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        deployment.stop()
    assert ray_stubs == [*pending, up]
    assert during == [(signal.SIG_IGN, signal.SIG_IGN, pending)]  # the never-up ones killed before the drain
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert deployment.shards == [] and deployment.router is None


def test_an_interrupt_as_a_ray_deployment_reports_its_address_stops_every_actor(monkeypatch, ray_stubs):
    """start() asked for the router's address (a ray.get of up to the startup timeout) after its cleanup
    block: an interrupt there left every actor running."""
    import ray

    from retriever_server.cluster import ray_serving
    from retriever_server.cluster.ray_serving import RayDeployment, RayServeConfig

    router = Handle("router")
    for name, stub in {"plan_security": lambda *a: None, "connect": lambda *a, **k: None,
                       "read_manifest": lambda path: SimpleNamespace(shards=[0]),
                       "check_name_free": lambda *a: None, "cluster_nodes": lambda: [],
                       "plan_placement": lambda *a: {}}.items():
        monkeypatch.setattr(ray_serving, name, stub)

    def start_actors(self, num_shards, nodes):
        self.router = router
        self._up.append(router)

    monkeypatch.setattr(RayDeployment, "_start_actors", start_actors)
    monkeypatch.setattr(ray, "wait", lambda refs, **kwargs: (refs, []))

    def get(refs, timeout=None):
        raise KeyboardInterrupt  # Ctrl-C while the address is asked for

    monkeypatch.setattr(ray, "get", get)
    deployment = RayDeployment(RayServeConfig(Path("ds")))
    with pytest.raises(KeyboardInterrupt):
        deployment.start()
    assert ray_stubs == [router] and deployment.router is None


def test_ray_deployment_wait_reports_the_routers_address_each_time(monkeypatch):
    import ray

    from retriever_server.cluster.ray_serving import RayDeployment, RayServeConfig

    addresses = iter(["h:1", "h:1", "h:2"])
    seen = []

    def get(refs, timeout=None):
        if len(seen) == 3:
            raise ray.exceptions.RayActorError()
        return [True, next(addresses)]

    monkeypatch.setattr(ray, "get", get)
    deployment = RayDeployment(RayServeConfig(Path("ds")))
    deployment.router = SimpleNamespace(ready=SimpleNamespace(remote=lambda: "ready-ref"),
                                        address=SimpleNamespace(remote=lambda: "address-ref"))
    assert deployment.wait(poll_s=0.0, on_address=seen.append).startswith("the router actor is gone")
    assert seen == ["h:1", "h:1", "h:2"]


def test_deploy_rewrites_its_address_file_when_ray_moves_the_router(monkeypatch, tmp_path):
    """A router that Ray restarts binds a new port: the address file kept the old one."""
    from retriever_server.cli import build_parser, ray_commands
    from retriever_server.cli.common import CliError
    from retriever_server.cluster import connect, ray_security, ray_serving

    address_file = tmp_path / "address.json"
    written = []

    class Deployment:
        router_address, placements = "h:1", {}

        def __init__(self, config):
            pass

        def start(self):
            return self

        def wait(self, poll_s: float = 2.0, on_address=None):
            for address in ("h:1", "h:2", "h:2", "h:3", "h:4", "h:4"):
                Deployment.down = address == "h:4" and not Deployment.down  # its shards not asked the first time
                on_address(address)
                written.append(json.loads(address_file.read_text())["address"])
            return "the router actor is gone: undeployed"

        down = False

        @property
        def shard_addresses(self):
            if Deployment.down:
                raise ray_serving.DeploymentError("the router of 'x' did not answer: timed out")
            return [["s:1"]]

        def stop(self):
            pass

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the command's handlers stay out of pytest
    monkeypatch.setattr(connect, "connect", lambda *a, **k: False)
    monkeypatch.setattr(ray_security, "check_exposure", lambda *a: None)
    monkeypatch.setattr(ray_commands, "read_manifest", lambda path: None)
    monkeypatch.setattr(ray_serving, "check_name_free", lambda *a: None)
    monkeypatch.setattr(ray_serving, "ray_address", lambda: "127.0.0.1:6379")
    monkeypatch.setattr(ray_serving, "RayDeployment", Deployment)
    args = build_parser().parse_args(["deploy", "--datastore", str(tmp_path), "--address-file", str(address_file)])
    with pytest.raises(CliError, match="undeployed"):
        ray_commands.run_deploy(args)
    assert written == ["h:1", "h:2", "h:2", "h:3", "h:3", "h:4"]  # a failed rewrite is tried again, deploy goes on
    assert not address_file.exists()


DEPLOY = """
import sys, time
from pathlib import Path
import retriever_server.cli.ray_commands as rc
import retriever_server.cluster.connect as cn
import retriever_server.cluster.ray_security as sec
import retriever_server.cluster.ray_serving as rs
events = Path(sys.argv[1])
cn.connect = lambda *a, **k: False
sec.check_exposure = lambda *a, **k: None
rc.read_manifest = lambda path: None
rs.check_name_free = lambda *a, **k: None
rs.ray_address = lambda: "127.0.0.1:6379"
class Deployment:  # a stop() that drains for a while, as a real one's ray.wait does
    router_address, placements, shard_addresses = "127.0.0.1:7100", {}, [["127.0.0.1:7101"]]
    def __init__(self, config): pass
    def start(self): return self
    def wait(self, poll_s=2.0, on_address=None):
        while True: time.sleep(0.05)
    def stop(self):
        (events / "draining").write_text("")
        time.sleep(1.5)
        (events / "killed").write_text("")
rs.RayDeployment = Deployment
from retriever_server.cli import main
sys.exit(main(["deploy", "--datastore", str(events), "--address-file", str(events / "address.json")]))
"""


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"no {path.name}"
        time.sleep(0.02)


def test_a_second_ctrl_c_during_deploys_drain_neither_cuts_it_short_nor_leaves_its_address_file(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", DEPLOY, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(tmp_path / "address.json", process)
        process.send_signal(signal.SIGINT)
        wait_for(tmp_path / "draining", process, 10.0)
        process.send_signal(signal.SIGINT)  # Ctrl-C again, during the drain
        out = process.communicate(timeout=15)[0]
    finally:
        process.kill()
        process.wait()
    assert (tmp_path / "killed").exists(), out
    assert not (tmp_path / "address.json").exists(), out


def test_backoff_keeps_growing_for_a_child_that_never_served(tmp_path, monkeypatch):
    """The back-off started over for a child that ran healthy_after_s, served or not: a shard that loads for
    longer and then fails was restarted every first_delay_s forever. It starts over only after serving."""
    clock = [1000.0]
    monkeypatch.setattr(supervisor, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(supervisor, "health_status", lambda *args, **kwargs: "SERVING")
    child = Child("shard-0", [sys.executable, "-c", "raise SystemExit(1)"], tmp_path / "shard-0.log",
                  tmp_path / "shard-0.json")
    watch = Supervisor(children=lambda: [child], policy=RestartPolicy(first_delay_s=1.0, max_delay_s=64.0,
                                                                     healthy_after_s=30.0))
    delays = []
    child.spawn()
    for run in range(6):
        if run == 4:  # this run serves, then fails after its healthy_after_s
            child.address_file.write_text(json.dumps({"address": "127.0.0.1:1", "health_port": 2}))
            assert child.check_serving()
        child.popen.wait(30)
        clock[0] += 40.0  # each run lasts longer than healthy_after_s
        watch.tend(child)
        delays.append(child.restart_at - clock[0])
        clock[0] = child.restart_at
        watch.tend(child)  # the restart
    assert delays == [1.0, 2.0, 4.0, 8.0, 1.0, 2.0]
    child.popen.wait(30)


@pytest.fixture
def fake_servers(monkeypatch):
    """A LocalDeployment of one shard whose processes are `SLEEPS` (ESCAPES for a shard named in the list
    returned), each taken as SERVING once spawned unless it exits."""
    exits: list[str] = []
    monkeypatch.setattr(launcher, "read_manifest", lambda path: SimpleNamespace(shards=[0]))

    def spawn(self, name, args, cpus=None):
        child = Child(name, [sys.executable, "-c", ESCAPES if exits else SLEEPS], self.log_dir / f"{name}.log",
                      self.log_dir / f"{name}.json")
        child.spawn()
        if exits:
            child.popen.wait(30)  # exited before anyone looks
        child.address = "127.0.0.1:1"
        return child

    monkeypatch.setattr(LocalDeployment, "_spawn", spawn)
    monkeypatch.setattr(Child, "check_serving", lambda self: True)
    return exits


def test_an_interrupt_as_the_local_supervisor_starts_stops_every_process(tmp_path, monkeypatch, fake_servers):
    def start(self):
        raise KeyboardInterrupt  # serve's SIGTERM handler, landing as the supervisor starts

    monkeypatch.setattr(Supervisor, "start", start)
    deployment = LocalDeployment(tmp_path, stop_timeout_s=5.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            deployment.start()
        assert len(deployment.processes()) == 2
        assert all(p.exited() for p in deployment.processes())
        assert not deployment.log_dir.exists()
    finally:
        deployment.stop()


def test_a_childs_escape_sequences_reach_neither_the_log_nor_the_error(tmp_path, caplog, fake_servers):
    fake_servers.append("escapes")
    deployment = LocalDeployment(tmp_path, restart=False)
    logs = [deployment.log_dir]
    with pytest.raises(LaunchError) as failed:
        deployment.start()
    assert "ERROR all good" in str(failed.value)
    assert "\x1b" not in str(failed.value) and "\x07" not in str(failed.value)

    deployment = LocalDeployment(tmp_path, restart=False)
    logs.append(deployment.log_dir)
    router = Child("router", [sys.executable, "-c", ESCAPES], deployment.log_dir / "router.log",
                   deployment.log_dir / "router.json")
    router.spawn()
    router.popen.wait(30)
    deployment.router = router
    with caplog.at_level(logging.WARNING):
        why = deployment.wait(poll_s=0.01)
    assert "ERROR all good" in why and "\x1b" not in why and "\x07" not in why
    assert "ERROR all good" in caplog.text and "\x1b" not in caplog.text and "\x07" not in caplog.text
    for folder in logs:
        shutil.rmtree(folder, ignore_errors=True)  # kept, as a failure's logs are


def test_stop_ends_the_hops_reaper(tmp_path, monkeypatch, fake_servers):
    """Every start() with TLS or a token started a reaper of the hops' folder that ran as long as the process."""
    from retriever_server.security.config import ServerSecurity

    reapers = []

    def remove_when_gone(folder):
        reapers.append(subprocess.Popen([sys.executable, "-c", SLEEPS]))
        return reapers[-1]

    monkeypatch.setattr(launcher, "remove_when_gone", remove_when_gone)
    (tmp_path / "token").write_text("a-token-of-the-router\n")
    deployment = LocalDeployment(tmp_path, restart=False, security=ServerSecurity(token_file=tmp_path / "token"))
    try:
        deployment.start()
        assert len(reapers) == 1 and reapers[0].poll() is None
        deployment.stop()
        assert reapers[0].poll() is not None
        assert not (deployment.log_dir / "hops").exists()
    finally:
        deployment.stop()
        for reaper in reapers:
            reaper.kill()
            reaper.wait()

