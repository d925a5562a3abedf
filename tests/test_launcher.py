"""LocalDeployment and `retriever-server serve --datastore DIR`: every shard and a router as local
processes; replica failover, stopping when a shard is gone, flags reaching the children, clean-up,
and SIGTERM draining every child."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build, synthetic

from retriever_server.cluster.launcher import NO_DRAIN, LaunchError, LocalDeployment
from retriever_server.serving.client import RetrieverClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]
NO_DRAINS = {"extra_args": NO_DRAIN, "router_args": NO_DRAIN}  # servers stopped as soon as a test is done with them
N, D = 2000, 16


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return synthetic(N, D, seed=5)


@pytest.fixture(scope="module")
def datastore(ray_cluster, keys, tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("launcher"), keys, "ds", shards=2, factory="IVF8,PQ4")


def search_ids(address: str, keys: np.ndarray) -> np.ndarray:
    with RetrieverClient(address, timeout=20) as client:
        result = client.search(keys[:8], k=5, nprobe=8)
    assert not result.partial
    return result.ids


def test_without_restarts_wait_survives_one_replica_and_stops_when_a_shard_has_none(datastore, keys, caplog):
    deployment = LocalDeployment(datastore, replicas=2, restart=False, **NO_DRAINS).start()
    waited: list[str] = []
    waiter = threading.Thread(target=lambda: waited.append(deployment.wait(poll_s=0.1)), daemon=True)
    try:
        expected = search_ids(deployment.router_address, keys)
        deployment.kill(shard=0, replica=0)
        with caplog.at_level(logging.WARNING, logger="retriever_server.cluster.launcher"):
            waiter.start()
            waiter.join(2.0)
            assert waiter.is_alive(), f"wait() returned after one replica of two exited: {waited}"
            np.testing.assert_array_equal(search_ids(deployment.router_address, keys), expected)
            assert "shard-00000-r0 exited" in caplog.text
            deployment.kill(shard=0, replica=1)
            waiter.join(30)
        assert not waiter.is_alive() and len(waited) == 1
        assert waited[0].startswith("every replica of shard 0 exited (shard-00000-r0 was killed by SIGKILL; ")
        assert waited[0].endswith(f"; logs in {deployment.log_dir})")
        assert all(p.popen.poll() is not None for p in deployment.processes())
    finally:
        deployment.stop()
    assert (deployment.log_dir / "shard-00000-r0.log").is_file()  # kept: it says why the deployment stopped
    shutil.rmtree(deployment.log_dir)


def test_without_restarts_wait_stops_everything_when_the_router_exits(datastore):
    deployment = LocalDeployment(datastore, restart=False, **NO_DRAINS).start()
    try:
        deployment.router.popen.kill()
        assert deployment.wait(poll_s=0.1).startswith("router was killed by SIGKILL (logs in ")
        assert all(p.popen.poll() is not None for p in deployment.processes())
    finally:
        deployment.stop()
    assert (deployment.log_dir / "router.log").is_file()
    shutil.rmtree(deployment.log_dir)


def json_records(log_file: Path) -> list[dict]:
    """The JSON log records in a child's log (its stdout lines, such as "listening on", are not JSON)."""
    lines = [line for line in log_file.read_text().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def test_children_get_log_options_report_metrics_ports_and_logs_are_removed(datastore):
    deployment = LocalDeployment(datastore, log_level="info", log_format="json", **NO_DRAINS).start()
    try:
        log_dir = deployment.log_dir
        for process in deployment.processes():
            assert isinstance(process.metrics_port, int) and process.metrics_port > 0, process.name
            assert any(r["level"] == "INFO" for r in json_records(process.log_file)), process.name
    finally:
        deployment.stop()
    assert not log_dir.exists()


def test_metrics_off_in_children(datastore):
    off = ("--metrics-port", "-1")
    with LocalDeployment(datastore, extra_args=off + NO_DRAIN, router_args=off + NO_DRAIN) as deployment:
        assert all(p.metrics_port is None for p in deployment.processes())


def test_a_deployment_for_one_command_stops_its_servers_without_a_drain_delay(datastore):
    """No load balancer routes to the servers a command starts for itself: each gets --drain-delay 0 (the
    default, 1 s, gives balancers time to notice a server going away, twice over: router, then shards)."""
    with LocalDeployment.for_one_command(datastore) as deployment:
        for process in deployment.processes():
            args = list(process.popen.args)
            assert args.count("--drain-delay") == 1 and args[args.index("--drain-delay") + 1] == "0", args
    assert all(p.exited() for p in deployment.processes())


def threads_flag(process) -> str:
    """The one --threads value of a shard process's command line (a second one would be a defect)."""
    args = list(process.popen.args)
    assert args.count("--threads") == 1, args
    return args[args.index("--threads") + 1]


def affinities(pid: int) -> set[frozenset[int]]:
    """The cores each thread of process `pid` may run on."""
    return {frozenset(os.sched_getaffinity(int(t.name))) for t in Path(f"/proc/{pid}/task").iterdir()}


def test_shards_share_the_cores_unless_threads_are_given(datastore):
    # --threads 0: the default, a share
    with LocalDeployment(datastore, extra_args=("--threads", "0", *NO_DRAIN), router_args=NO_DRAIN) as deployment:
        shards = [p for replicas in deployment.shards for p in replicas]
        assert len(shards) == 2
        assert {threads_flag(p) for p in shards} == {str(max(1, len(os.sched_getaffinity(0)) // 2))}
    with LocalDeployment(datastore, extra_args=("--threads", "3", *NO_DRAIN), router_args=NO_DRAIN) as deployment:
        assert {threads_flag(p) for replicas in deployment.shards for p in replicas} == {"3"}


def test_placement_gives_each_shard_process_its_own_share_of_the_cores(datastore):
    deployment = LocalDeployment(datastore, cpus=(0, 1, 2, 3, 4))
    try:
        threads = ["--threads", "2"]  # chosen by the deployment
        assert deployment.placement(2, threads) == [(0, 1), (2, 3)]  # the fifth core is left to the router
        assert deployment.placement(5, threads) == [(0,), (1,), (2,), (3,), (4,)]
        assert deployment.placement(6, threads) == [(0, 1, 2, 3, 4)] * 6  # more processes than cores
        assert deployment.placement(2, []) == [(0, 1, 2, 3, 4)] * 2  # the caller set --threads
        deployment.pin_shards = False
        assert deployment.placement(2, threads) == [(0, 1, 2, 3, 4)] * 2
    finally:
        deployment.stop()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to give 2 shards one each")
def test_shard_processes_run_on_cores_of_their_own_and_the_router_on_any(datastore, keys):
    pool = frozenset(os.sched_getaffinity(0))
    with LocalDeployment(datastore, **NO_DRAINS) as deployment:
        shards = [p for replicas in deployment.shards for p in replicas]
        cores = [affinities(p.popen.pid) for p in shards]
        assert all(len(c) == 1 for c in cores), cores  # every thread of a shard on the same cores
        (first,), (second,) = cores
        assert first and second and not first & second and first | second <= pool
        assert affinities(deployment.router.popen.pid) == {pool}
        expected = search_ids(deployment.router_address, keys)
    with LocalDeployment(datastore, pin_shards=False, **NO_DRAINS) as deployment:
        assert {frozenset(a) for p in deployment.processes() for a in affinities(p.popen.pid)} == {pool}
        np.testing.assert_array_equal(search_ids(deployment.router_address, keys), expected)


def test_cpus_confine_every_process_and_set_the_threads(datastore, keys):
    with LocalDeployment(datastore, cpus=(0,), **NO_DRAINS) as deployment:
        assert {threads_flag(p) for replicas in deployment.shards for p in replicas} == {"1"}
        for process in deployment.processes():  # every thread of every server
            assert affinities(process.popen.pid) == {frozenset({0})}
        assert search_ids(deployment.router_address, keys).shape == (8, 5)


def test_failed_start_keeps_the_logs_and_names_them(datastore):
    deployment = LocalDeployment(datastore, extra_args=("--threads", "many"))
    with pytest.raises(LaunchError, match="argument --threads: expected an integer, got 'many'") as caught:
        deployment.start()
    assert f"logs in {deployment.log_dir}" in str(caught.value)
    assert (deployment.log_dir / "shard-00000-r0.log").is_file()
    assert all(p.popen.poll() is not None for p in deployment.processes())
    deployment.stop()  # stopping again keeps them too
    assert deployment.log_dir.is_dir()
    shutil.rmtree(deployment.log_dir)


def processes_naming(text: str) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if text in line and "ps -ww" not in line]


def written_by(path: Path) -> int | None:
    """The pid an address file names; None when it is gone (replaced or removed meanwhile)."""
    try:
        return json.loads(path.read_text()).get("pid")
    except (OSError, ValueError):
        return None


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float, pid: int | None = None) -> dict:
    """The address file's JSON once it is there (and, with `pid`, written by that process)."""
    deadline = time.monotonic() + timeout
    while not path.is_file() or (pid is not None and written_by(path) != pid):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} not written within {timeout}s"
        time.sleep(0.2)
    return json.loads(path.read_text())


def test_sigterm_on_serve_datastore_drains_every_child(datastore, keys, tmp_path):
    address_file = tmp_path / "router.json"
    command = [sys.executable, "-m", "retriever_server.cli", "--log-format", "json", "serve", "--datastore",
               str(datastore), "--replicas", "2", "--address-file", str(address_file), "--grace", "1",
               "--drain-delay", "0.2"]
    stopped = subprocess.Popen([sys.executable, "-c", "pass"])
    stopped.wait()
    address_file.write_text(json.dumps({"address": "127.0.0.1:1", "pid": stopped.pid}))  # a stopped server's
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        written = wait_for_file(address_file, serve, timeout=120, pid=serve.pid)
        assert len(written["shards"]) == 2 and all(len(r) == 2 for r in written["shards"])
        assert len(processes_naming(str(datastore))) == 1 + 4  # this command and the shard replicas
        search_ids(written["address"], keys)
        serve.send_signal(signal.SIGTERM)
        time.sleep(0.1)  # stopping now: a second SIGTERM and a Ctrl-C do not cut the drain short
        serve.send_signal(signal.SIGTERM)
        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=30)
    finally:
        if serve.poll() is None:  # the test failed early: stop it the way that also stops its children
            serve.terminate()
            serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    assert "router: " in out and out.count("(metrics on port ") == 5
    assert processes_naming(str(datastore)) == []
    assert not address_file.exists()  # a stopped deployment's address is nobody's


def test_starting_twice_is_refused_and_starts_nothing_more(datastore):
    deployment = LocalDeployment(datastore).start()
    try:
        before = [p.popen.pid for p in deployment.processes()]
        with pytest.raises(RuntimeError, match="started already"):
            with deployment:  # `with` starts it again
                pass
        assert [p.popen.pid for p in deployment.processes()] == before
        assert all(not p.exited() for p in deployment.processes())
    finally:
        deployment.stop()


def shard_cores_under_serve(datastore: Path, tmp_path: Path, *flags: str) -> list[set[frozenset[int]]]:
    """The cores of each shard process that `serve --datastore` (with `flags`) starts."""
    address_file = tmp_path / f"router{len(flags)}.json"
    command = [sys.executable, "-m", "retriever_server.cli", "serve", "--datastore", str(datastore),
               "--address-file", str(address_file), "--grace", "1", "--drain-delay", "0", *flags]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(address_file, serve, timeout=120)
        shards = [line for line in processes_naming(str(datastore)) if "--shard " in line]
        return [affinities(int(line.split()[0])) for line in shards]
    finally:
        serve.terminate()
        serve.communicate(timeout=30)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to give 2 shards one each")
def test_serve_pins_each_shard_to_its_own_cores_unless_told_not_to(datastore, tmp_path):
    pool = frozenset(os.sched_getaffinity(0))
    pinned = shard_cores_under_serve(datastore, tmp_path)
    assert len(pinned) == 2 and all(len(c) == 1 for c in pinned)
    (first,), (second,) = pinned
    assert not first & second and first | second <= pool
    assert shard_cores_under_serve(datastore, tmp_path, "--no-pin-shards") == [{pool}, {pool}]


def test_a_folder_that_is_not_a_datastore_is_refused_and_leaves_no_log_folder(tmp_path):
    from retriever_server.datastore.manifest import DatastoreError

    deployment = LocalDeployment(tmp_path / "nothing-here")
    with pytest.raises(DatastoreError):
        deployment.start()
    assert not deployment.log_dir.exists()


def test_serve_gives_its_processes_the_startup_time_it_is_told(datastore, tmp_path):
    """serve's start-up deadline was a fixed 300 s (a large datastore's sha256 check takes longer); it is
    --startup-timeout now. Too short a time stops every process it started, with a one-line error."""
    done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "serve", "--datastore", str(datastore),
                           "--startup-timeout", "0.01"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "did not turn SERVING within 0.01s" in done.stderr.strip().splitlines()[-1], done.stderr
    assert processes_naming(str(datastore)) == []


def test_serve_whose_output_reader_is_gone_stops_every_process_before_it_ends(datastore):
    """stdout's reader gone before serve prints its addresses (`serve | head -0`): the print raised and serve
    ended at once, its children left to notice their parent's death; it now stops them first."""
    serve = subprocess.Popen([sys.executable, "-m", "retriever_server.cli", "serve", "--datastore", str(datastore)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    serve.stdout.close()  # no reader: the first flush of its output fails
    try:
        _, err = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, err
    assert processes_naming(str(datastore)) == []  # none left when it ended, drained and stopped
