"""Ray as users run it, on this machine and loopback: a command told to join a cluster that is not
there fails fast in one line; the processes a command starts end when it dies, however it dies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build, synthetic
from test_cli import one_line_error, run

from retriever_server.cluster.reaper import alive

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.npy"
    np.save(path, synthetic(2000, 8))
    return path


def test_a_cluster_that_is_not_there_fails_fast_in_one_line(keys_file, tmp_path):
    port = free_port()  # nothing listens here
    for args, env in (([f"--address=127.0.0.1:{port}"], None),
                      ([], {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"})):
        started = time.monotonic()
        result = run("build", str(keys_file), "--out", str(tmp_path / "ds"), *args, env=env, timeout=60)
        assert time.monotonic() - started < 30
        one_line_error(result, f"no Ray cluster answers at 127.0.0.1:{port}")
        assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("address, words", [
    ("http://127.0.0.1:8265", "--address 'http://127.0.0.1:8265' is a dashboard URL (what `ray job submit` takes)"),
    ("127.0.0.1:99999", "--address '127.0.0.1:99999' is not host:port with a port in [1, 65535]"),
    ("RAY_ADDRESS=127.0.0.1:99999", "RAY_ADDRESS '127.0.0.1:99999' is not host:port with a port in [1, 65535]"),
    ("RAY_ADDRESS=foo", "RAY_ADDRESS 'foo' is not host:port with a port in [1, 65535]"),
])
def test_an_address_that_names_no_cluster_is_refused_at_once(address, words):
    """The dashboard's URL (the one `ray job submit` takes) or a port past 65535, from --address or from
    RAY_ADDRESS: refused in one line naming where it came from, not tried for the connect timeout."""
    started = time.monotonic()
    if address.startswith("RAY_ADDRESS="):
        result = run("lookup", "any", timeout=60, env={**os.environ, "RAY_ADDRESS": address.split("=", 1)[1]})
    else:
        result = run("lookup", "any", f"--address={address}", timeout=60)
    assert time.monotonic() - started < 20
    one_line_error(result, words)


def test_a_head_whose_name_does_not_resolve_is_given_up_on_soon(keys_file, tmp_path):
    """A name that does not resolve (a typo, as a rule) is given the few seconds of a head that refuses,
    not the whole connect timeout (30 s by default)."""
    result = run("build", str(keys_file), "--out", str(tmp_path / "ds"), "--address=nosuch.invalid:6379",
                 env={**os.environ, "RETRIEVER_RAY_CONNECT_TIMEOUT": "20"}, timeout=60)
    one_line_error(result, "no Ray cluster answers at nosuch.invalid:6379 (nosuch.invalid:6379: no such host, for 3 s)")


def test_a_head_that_never_answers_is_given_up_on(keys_file, tmp_path):
    """A port that accepts connections and says nothing (a hung head): the join is given
    RETRIEVER_RAY_CONNECT_TIMEOUT seconds in all, the token probe's seconds among them (it used to
    take 3 s more), then the command says so in one line and exits."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = run("build", str(keys_file), "--out", str(tmp_path / "ds"), f"--address=127.0.0.1:{port}",
                     env={**os.environ, "RETRIEVER_RAY_CONNECT_TIMEOUT": "8"}, timeout=60)
    assert 8 <= time.monotonic() - started < 10.5
    one_line_error(result, "did not let this process join within 8 s")


@pytest.mark.parametrize("command, nohup", [(["undeploy", "--name", "x"], False), (["lookup", "x"], False),
                                            (["deploy", "--datastore"], False), (["deploy", "--datastore"], True)],
                         ids=["undeploy", "lookup", "deploy", "deploy-under-nohup"])
def test_sigterm_while_joining_a_cluster_is_an_interrupt(command, nohup, ray_cluster, tmp_path):
    """SIGTERM while a Ray command waits to join a cluster ends it as Ctrl-C does: "interrupted", status 130
    (it was killed by the signal, no word said; after the join, status 15). deploy takes SIGHUP so too (a
    closed terminal ended it with no stop), unless SIGHUP was ignored when it started (nohup)."""
    if command[0] == "deploy":
        command = [*command, str(build(tmp_path, synthetic(500, 8), "ds", shards=1, factory="IVF4,Flat")), "--host",
                   "127.0.0.1"]
    with socket.socket() as listener:  # a head that accepts and never answers: the join waits
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        process = subprocess.Popen([sys.executable, "-m", "retriever_server.cli", *command,
                                    f"--address=127.0.0.1:{listener.getsockname()[1]}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "RETRIEVER_RAY_CONNECT_TIMEOUT": "60"},
                                   preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None)
        try:
            lines = []
            for line in process.stderr:  # until it waits for the join
                lines.append(line)
                if "joining the Ray cluster" in line:
                    break
            process.send_signal(signal.SIGHUP if command[0] == "deploy" else signal.SIGTERM)
            if nohup:  # the hangup is ignored as nohup asked: still waiting to join; then SIGTERM
                with pytest.raises(subprocess.TimeoutExpired):
                    process.wait(timeout=2)
                process.send_signal(signal.SIGTERM)
            lines += process.stderr.readlines()
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = "".join(lines)
    assert process.returncode == 130, err
    assert f"retriever-server {command[0]}: interrupted\n" in err and "Traceback" not in err, err


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "soon"])
def test_a_connect_timeout_that_is_no_time_is_refused_in_one_line(keys_file, tmp_path, value):
    result = run("build", str(keys_file), "--out", str(tmp_path / "ds"), "--address=127.0.0.1:1",
                 env={**os.environ, "RETRIEVER_RAY_CONNECT_TIMEOUT": value}, timeout=60)
    one_line_error(result, f"RETRIEVER_RAY_CONNECT_TIMEOUT must be a number of seconds above 0, got {value!r}")


@pytest.mark.slow
def test_killing_serve_leaves_none_of_its_processes(ray_cluster, tmp_path):
    datastore = build(tmp_path, synthetic(2000, 8, seed=2), "ds", shards=2, factory="IVF8,Flat")
    address_file = tmp_path / "serve.json"
    serve = subprocess.Popen([sys.executable, "-m", "retriever_server.cli", "serve", "--datastore", str(datastore),
                              "--replicas", "2", "--address-file", str(address_file)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not address_file.is_file() and time.monotonic() < deadline and serve.poll() is None:
            time.sleep(0.2)
        assert address_file.is_file(), "serve did not start"
        children = children_of(serve.pid)
        assert len(children) == 5  # 2 shards x 2 replicas and the router
        os.kill(serve.pid, signal.SIGKILL)
        serve.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in children if alive(pid)] == []
    finally:
        for pid in children + [serve.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_killed_command_leaves_no_process_of_its_local_ray_cluster():
    """A driver that started a local cluster, killed with SIGKILL: within 10 s no process holds a file
    of that cluster's session any more (Ray ends most; the reaper ends the agents it leaves)."""
    from retriever_server.cluster.reaper import holding

    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, ray\nfrom retriever_server.cluster.connect import connect\n"
         "connect(num_cpus=1)\nprint(ray._private.worker.global_worker.node.get_session_dir_path(), flush=True)\n"
         "time.sleep(120)\n"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        session = driver.stdout.readline().strip() + "/"
        assert session.startswith("/") and holding(session), "no local cluster started"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while holding(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert holding(session) == []
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)


class RayHead:
    """`ray start --head` on loopback with ports, temp dir and address record of its own (RAY_TMPDIR),
    token authentication on; `kill()` ends every process of it with SIGKILL."""

    def __init__(self, tmp: Path):
        self.env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = tmp / "ray"
        self.gcs, self.dashboard = free_port(), free_port()
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus", "2",
                   "--node-ip-address", "127.0.0.1", "--port", str(self.gcs), "--dashboard-host", "127.0.0.1",
                   "--dashboard-port", str(self.dashboard), "--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        self.client = free_port()  # its Ray Client server (ray://)
        command += ["--ray-client-server-port", str(self.client)]
        for option in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                       "--metrics-export-port"):  # none shared with another cluster
            command += [option, str(free_port())]
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=120)
        self.session = str(next(self.temp_dir.glob("session_2*"))) + "/"

    def submit(self, entrypoint: str, timeout_s: float = 120) -> str:
        """Runs a job to its end with Ray's JobSubmissionClient; its logs (AssertionError if it failed)."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{self.dashboard}")
        deadline = time.monotonic() + timeout_s
        while True:  # a head just started has no job agent for a few seconds
            try:
                job = client.submit_job(entrypoint=entrypoint)
                break
            except RuntimeError as err:
                assert "No available agent" in str(err) and time.monotonic() < deadline, err
                time.sleep(1)
        while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, f"job {job} still running"
            time.sleep(0.5)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
        return logs

    def kill(self) -> None:
        from retriever_server.cluster.reaper import holding

        for pid in holding(self.session):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_jobs_on_a_ray_start_head_then_a_clear_error_once_it_is_killed(ray_cluster, keys_file, tmp_path,
                                                                       monkeypatch):
    """`ray start --head`, then `ray job submit` (by Ray's JobSubmissionClient, with token authentication
    as Ray ships it) of a datastore build: it equals the same command run here (a distributed evaluation
    as a submitted job is test_ray_jobs.py's). Then the head is killed with SIGKILL and its address record
    left behind: a build with no address runs on a new local cluster, and one with --address auto fails in
    one line within 30 s. Nothing of the head is left running."""
    from retriever_server.cluster.reaper import holding
    from retriever_server.datastore.manifest import read_manifest

    short = Path(tempfile.mkdtemp(prefix="rh-"))  # Ray's socket paths must stay short
    head = RayHead(short)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what the submitting shell needs (~/.ray/auth_token)
    try:
        python = f"{sys.executable} -m"
        head.submit(f"{python} retriever_server.cli build {keys_file} --out {tmp_path / 'job-ds'} --shards 2 "
                    f"--factory IVF8,Flat --no-progress")
        no_token = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
        for env, words in ((no_token, "takes token authentication, and this shell does not use it: set "
                                      "RAY_AUTH_MODE=token"),
                           ({**head.env, "RAY_AUTH_TOKEN": "not-its-token"}, "refuses this process's token "
                                                                             "(RAY_AUTH_TOKEN)")):
            started = time.monotonic()  # Ray's own join would retry for about 20 s, warning every second
            refused = run("build", str(keys_file), "--out", str(tmp_path / "no-ds"), "--address", "auto", env=env,
                          timeout=60)
            assert time.monotonic() - started < 10
            one_line_error(refused, f":{head.gcs}) {words}")
            assert "the Ray cluster that `ray start` last made on this machine (" in refused.stderr
            assert not (tmp_path / "no-ds").exists()
        started = time.monotonic()  # through its Ray Client server: the same at once
        client = f"ray://127.0.0.1:{head.client}"
        refused = run("build", str(keys_file), "--out", str(tmp_path / "no-ds"), "--address", client, env=no_token,
                      timeout=60)
        assert time.monotonic() - started < 10
        one_line_error(refused, f"the Ray cluster at {client} takes token authentication, and this shell does not "
                                "use it: set RAY_AUTH_MODE=token")
    finally:
        head.kill()
    started = time.monotonic()  # the dead head's address record is still there: a new local cluster
    local = run("build", str(keys_file), "--out", str(tmp_path / "local-ds"), "--shards", "2", "--factory",
                "IVF8,Flat", "--no-progress", env=head.env, timeout=120)
    assert local.returncode == 0, local.stderr
    assert time.monotonic() - started < 30
    assert read_manifest(tmp_path / "job-ds").checksum == read_manifest(tmp_path / "local-ds").checksum
    started = time.monotonic()
    auto = run("build", str(keys_file), "--out", str(tmp_path / "auto-ds"), "--address", "auto", env=head.env,
               timeout=60)
    assert time.monotonic() - started < 30
    one_line_error(auto, "no Ray cluster answers at the cluster `ray start` last made on this machine")
    assert "drop --address auto" in auto.stderr
    lookup = run("lookup", "demo", env=head.env, timeout=60)  # joins that cluster by default: no --address given
    one_line_error(lookup, "no Ray cluster answers at the cluster `ray start` last made on this machine")
    assert "start it again (ray start --head) and deploy there" in lookup.stderr and "drop" not in lookup.stderr
    asked = run("lookup", "demo", "--address", "auto", env=head.env, timeout=60)  # lookup starts no cluster of its
    one_line_error(asked, "no Ray cluster answers at the cluster `ray start` last made on this machine")
    assert "start it again (ray start --head)" in asked.stderr and "new local cluster" not in asked.stderr  # own
    assert holding(head.session) == []
    shutil.rmtree(short, ignore_errors=True)


def test_a_ctrl_c_while_ray_shuts_down_at_exit_is_ignored():
    """A command that started a local cluster, interrupted while Ray shuts it down at exit: the process
    ends as it would have, with no traceback (a KeyboardInterrupt inside Ray's shutdown used to print one,
    or abort, or crash)."""
    script = ("import os, signal, threading, time\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal, not a background job
              "from retriever_server.cluster.connect import connect\n"
              "connect(num_cpus=1)\n"
              "def interrupt():\n"
              "    time.sleep(0.2)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "threading.Thread(target=interrupt, daemon=True).start()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "KeyboardInterrupt" not in done.stderr and "Traceback" not in done.stderr, \
        done.stderr[-2000:]


def test_a_build_on_its_own_cluster_that_has_no_room_for_a_shard_task_fails_at_once(keys_file, tmp_path):
    """No node will join the local cluster a build starts for itself: a shard task larger than it fails
    the build at once (it used to wait STALL_S, 5 minutes, for a node that cannot come)."""
    started = time.monotonic()
    result = run("build", str(keys_file), "--out", str(tmp_path / "ds"), "--num-cpus", "1", "--cpus-per-shard", "4",
                 "--no-progress", env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, timeout=120)
    assert time.monotonic() - started < 60
    one_line_error(result, "no room for a shard task (--cpus-per-shard) on this build's own cluster: 1.0 of 1.0 CPUs")
    assert not (tmp_path / "ds").exists()
