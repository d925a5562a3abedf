"""LocalDeployment names the process that failed, and how it ended: a shard killed while the router
starts (it was missed until the start-up timeout, which then blamed the router), a process killed by a
signal (its last INFO line was quoted as the reason; stub children, no servers), and its hop keys are
never on disk before the reaper that removes them runs. The datastore here is two tiny Flat shards
written by hand (no Ray)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from retriever_server.cluster import launcher
from retriever_server.cluster.launcher import LaunchError, LocalDeployment
from retriever_server.cluster.supervisor import Child
from retriever_server.datastore.manifest import FileEntry, Manifest, ShardEntry, write_manifest
from retriever_server.security.config import ServerSecurity

NO_DRAINS = {"extra_args": ("--drain-delay", "0"), "router_args": ("--drain-delay", "0")}


@pytest.fixture(scope="module")
def datastore(tmp_path_factory) -> Path:
    """Two shards of 10 rows of 8 dimensions each, exact search: what a server loads in milliseconds."""
    out = tmp_path_factory.mktemp("faults") / "ds"
    out.mkdir()
    rng = np.random.default_rng(0)
    shards = []
    for i in range(2):
        index = faiss.IndexFlatL2(8)
        index.add(rng.standard_normal((10, 8)).astype(np.float32))
        (out / f"shard-{i:05d}").mkdir()
        path = out / f"shard-{i:05d}" / "index.faiss"
        faiss.write_index(index, str(path))
        data = path.read_bytes()
        entry = FileEntry(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        shards.append(ShardEntry(f"shard-{i:05d}", 10 * i, 10 * i + 10, {"index.faiss": entry}))
    write_manifest(out, Manifest(dimension=8, metric="l2", factory="Flat", ntotal=20, nlist=0, default_nprobe=1,
                                 has_keys=False, payloads=(), shards=tuple(shards)))
    return out


def all_ended(deployment: LocalDeployment) -> bool:
    return all(p.popen.poll() is not None for p in deployment.processes())


def test_a_shard_killed_while_the_router_starts_is_named_at_once(datastore):
    deployment = LocalDeployment(datastore, startup_timeout_s=15, restart=False, **NO_DRAINS)
    done = threading.Event()

    def kill_shard_once_the_router_starts() -> None:
        while deployment.router is None and not done.wait(0.005):
            pass
        if deployment.router is not None:
            os.kill(deployment.shards[0][0].popen.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_shard_once_the_router_starts, daemon=True)
    killer.start()
    try:
        with pytest.raises(LaunchError) as failed:
            deployment.start()
    finally:
        done.set()
        killer.join(5)
        deployment.stop()
    # the shard, by its signal: the code before waited out the start-up timeout and blamed the router
    assert str(failed.value) == f"shard-00000-r0 was killed by SIGKILL (logs in {deployment.log_dir})"
    assert all_ended(deployment)
    shutil.rmtree(deployment.log_dir)


def stub(name: str, folder: Path) -> Child:
    """A child that only sleeps (no server), started: what `wait` judges by its exit and its log."""
    child = Child(name, ["sleep", "60"], folder / f"{name}.log", folder / f"{name}.json")
    child.spawn()
    return child


@pytest.mark.parametrize("error_line", [False, True], ids=["info-last", "error-last"])
@pytest.mark.parametrize("who", ["router", "shard"])
def test_without_restarts_a_killed_process_is_reported_by_its_signal(tmp_path, who, error_line):
    """Its last log line (an INFO line) was the reason given; an error line is still quoted. Stub children
    stand for the servers (tests/test_launcher.py kills real ones)."""
    deployment = LocalDeployment(tmp_path, restart=False, **NO_DRAINS)
    deployment.shards = [[stub("shard-00000-r0", tmp_path)]]
    deployment.router = stub("router", tmp_path)
    killed = deployment.router if who == "router" else deployment.shards[0][0]
    try:
        killed.popen.kill()
        killed.popen.wait(10)
        line = "2026-01-01 00:00:00,000 ERROR retriever_server.serving.router: out of file descriptors"
        with open(killed.log_file, "a") as log_file:
            log_file.write(line + "\n" if error_line else "2026-01-01 00:00:00,000 INFO listening\n")
        why = deployment.wait(poll_s=0.01)
    finally:
        deployment.stop()
    ended = "was killed by SIGKILL" + (f"; its last error line: {line}" if error_line else "")
    assert why == (f"router {ended} (logs in {deployment.log_dir})" if who == "router" else
                   f"every replica of shard 0 exited (shard-00000-r0 {ended}; logs in {deployment.log_dir})")
    assert all_ended(deployment)
    shutil.rmtree(deployment.log_dir)


class Reaper:
    """A stand-in for the reaper process."""

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_the_reaper_of_the_hop_keys_runs_before_they_are_written(monkeypatch, datastore, tmp_path):
    """The keys were written first: a SIGKILL between the two left them on disk."""
    calls: list[str] = []

    def make_hop_credentials(directory: Path):
        calls.append("keys")
        raise RuntimeError("stop here")

    def remove_when_gone(folder: Path) -> Reaper:
        calls.append("reaper")
        return Reaper()

    monkeypatch.setattr(launcher, "make_hop_credentials", make_hop_credentials)
    monkeypatch.setattr(launcher, "remove_when_gone", remove_when_gone)
    token = tmp_path / "tokens"
    token.write_text("a-token-of-the-clients\n")
    deployment = LocalDeployment(datastore, security=ServerSecurity(token_file=token))
    with pytest.raises(RuntimeError, match="stop here"):
        deployment.start()
    assert calls == ["reaper", "keys"]
    assert not deployment.log_dir.exists()
