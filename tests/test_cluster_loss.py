"""When the Ray cluster goes away under a deployment, `deploy` says so in one line (Ray's system errors
were left to print a traceback); and the reaper finds a killed local cluster's processes when Ray's
temporary folder is reached through a symbolic link. Ray is stubbed: no cluster starts here."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from retriever_server.cluster.ray_serving import DeploymentError, RayDeployment, RayServeConfig
from retriever_server.cluster.reaper import holding


def lost(*args, **kwargs):
    import ray

    raise ray.exceptions.RaySystemError("Failed to get the GCS address: the head is gone")


def test_wait_reports_a_cluster_that_went_away_in_one_line(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get", lost)
    deployment = RayDeployment(RayServeConfig(Path("ds"), name="wiki"))
    deployment.router = SimpleNamespace(ready=SimpleNamespace(remote=lambda: "ready-ref"))
    assert deployment.wait(poll_s=0.0) == "lost touch with the Ray cluster: System error: Failed to get the GCS " \
                                          "address: the head is gone"


def raising(err: Exception):
    def get(*args, **kwargs):
        raise err
    return get


def waiting(monkeypatch, get) -> RayDeployment:
    import ray

    monkeypatch.setattr(ray, "get", get)
    deployment = RayDeployment(RayServeConfig(Path("ds"), name="wiki"))
    deployment.router = SimpleNamespace(ready=SimpleNamespace(remote=lambda: "ready-ref"))
    return deployment


@pytest.mark.parametrize("name", ["RpcError", "LocalRayletDiedError"])
def test_wait_reports_other_connection_losses_as_such(monkeypatch, name):
    import ray

    deployment = waiting(monkeypatch, raising(getattr(ray.exceptions, name)("the head is gone")))
    assert deployment.wait(poll_s=0.0).startswith("lost touch with the Ray cluster: ")


def test_wait_reports_an_error_of_the_router_as_the_router_failing_in_one_line(monkeypatch):
    """Every Ray error was "lost touch with the Ray cluster": a router call that raised, an OOM kill too."""
    import ray

    raised = ray.exceptions.RayTaskError("address", "Traceback ...", ValueError("router not started\n\x1b[31myet"))
    assert waiting(monkeypatch, raising(raised)).wait(poll_s=0.0) == \
        "the router of 'wiki' failed: RayTaskError: \\x1b[31myet"
    oom = ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")
    assert waiting(monkeypatch, raising(oom)).wait(poll_s=0.0) == \
        "the router of 'wiki' failed: OutOfMemoryError: Task was killed due to the node running low on memory."
    cancelled = waiting(monkeypatch, raising(ray.exceptions.TaskCancelledError())).wait(poll_s=0.0)
    assert cancelled == "the router of 'wiki' failed: TaskCancelledError"


def test_stopping_on_a_cluster_that_went_away_is_a_deployment_error(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "kill", lost)
    monkeypatch.setattr("retriever_server.cluster.ray_actors.sweep", lambda: [])
    deployment = RayDeployment(RayServeConfig(Path("ds"), name="wiki"))
    deployment.router = object()  # never came up: killed at once
    why = r"could not stop the actors of 'wiki' \(lost touch with the Ray cluster: System error: Failed to get"
    with pytest.raises(DeploymentError, match=why + r" the GCS address: the head is gone\)"):
        deployment.stop()
    assert deployment.router is None


def test_the_reaper_finds_a_sessions_processes_through_a_linked_temporary_folder(tmp_path):
    """RAY_TMPDIR through a link: /proc gives the files' real paths, which never began with the link."""
    session = tmp_path / "real" / "session_1"
    session.mkdir(parents=True)
    (session / "held").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with open(session / "held") as held:
        holder = subprocess.Popen(["sleep", "20"], stdin=held)
    try:
        assert holder.pid in holding(str(tmp_path / "link" / "session_1"))
        assert holder.pid in holding(str(tmp_path / "link" / "session_1") + "/")
        assert holder.pid not in holding(str(tmp_path / "link" / "session_"))  # a folder, not a prefix of a name
    finally:
        holder.kill()
        holder.wait()
