"""Ray-side defects found in review, each pinned: a deployment's servers never send (or hold) the deploying
user's RETRIEVER_AUTH_TOKEN; a detached deployment is refused where the command would start a cluster of its
own, which dies with it; Ray's record of the last `ray start` cluster is trusted only as this user's own file;
an IPv6 head is dialled in brackets. One end-to-end deploy on a local Ray cluster (slow); the rest start none."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build, manifest_without_shard_files, synthetic

from retriever_server.cluster.connect import GCS_PROBE_METHOD, ClusterUnreachable, connect, dial_target
from retriever_server.cluster.ray_secrets import materialize, relocated
from retriever_server.cluster.ray_security import plan_security
from retriever_server.security.client_files import WatchedClientSecurity
from retriever_server.security.config import TOKEN_ENV, ServerSecurity

USERS_TOKEN = "users-client-token"


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retriever_server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch):
    """This process is not connected to Ray, and must not start or join a cluster."""
    import ray

    def init(*args, **kwargs):
        raise AssertionError(f"ray.init({args}, {kwargs}) was called")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)


@pytest.fixture
def ray_tmp(tmp_path, monkeypatch) -> Path:
    """Ray's temp directory for this test (RAY_TMPDIR): the record of the last `ray start` cluster goes in it."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray"


@pytest.fixture
def manifest_only(tmp_path) -> Path:
    """A datastore whose manifest is valid and whose shard files are missing (anything that loads a shard fails)."""
    return manifest_without_shard_files(tmp_path / "ds")


# 1. the deploying user's RETRIEVER_AUTH_TOKEN stays out of the servers

def test_an_unsecured_deployments_router_sends_the_shards_no_token_from_the_environment(monkeypatch):
    """`deploy --insecure`: the router's calls to the shards carry no token; the user's RETRIEVER_AUTH_TOKEN (which
    the actors inherit) used to go to every shard, in plaintext, or stop the router on node IPs."""
    monkeypatch.setenv(TOKEN_ENV, USERS_TOKEN)
    for host in (None, "127.0.0.1"):
        hop = plan_security(host, ServerSecurity(insecure=True), None).router_to_shards
        assert hop.bearer_token() is None and not hop.tls
        hop.check_channel("192.0.2.7:5000")  # a node's IP without TLS: nothing to refuse, no token goes
        assert WatchedClientSecurity(hop).metadata == ()  # what the router sends with each call: nothing


def test_a_secured_deployments_router_sends_the_shards_its_hop_token_whatever_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, USERS_TOKEN)
    plan = plan_security("127.0.0.1", ServerSecurity(), tmp_path / "own")
    folder = materialize(plan.router_secrets)  # as the router actor does
    try:
        hop = relocated(plan.router_to_shards, folder)
        assert hop.bearer_token() == base64.b64decode(plan.router_secrets["hop-token"]).decode().strip()
        assert hop.tls and hop.bearer_token() != USERS_TOKEN
    finally:
        shutil.rmtree(folder)


def test_a_deployment_that_secures_itself_keeps_the_reflection_asked_for(tmp_path):
    for reflection in (False, True):
        plan = plan_security("127.0.0.1", ServerSecurity(reflection=reflection), tmp_path / f"own-{reflection}")
        assert plan.router.reflection is reflection and plan.router.tls and plan.router.token_file is not None


def test_a_server_actor_drops_the_callers_token_from_its_environment(monkeypatch):
    """Whatever else runs in a shard's or the router's process never finds the user's token there either."""
    from retriever_server.cluster import ray_actors

    monkeypatch.setenv(TOKEN_ENV, USERS_TOKEN)
    monkeypatch.setattr(ray_actors, "configure_logging", lambda *a: None)  # the test session's logging stays
    actor = ray_actors._ServerActor("127.0.0.1", "WARNING", None)  # what ShardReplica and RouterActor start with
    try:
        assert TOKEN_ENV not in os.environ
    finally:
        actor.loop.close()


@pytest.mark.ray
@pytest.mark.slow
def test_an_insecure_deploy_on_node_ips_serves_with_the_users_token_in_its_environment(ray_cluster, tmp_path):
    """`deploy --insecure` with the shards on node IPs, on a cluster of its own (whose actors inherit the
    command's environment): the router refused to start, the user's token about to go to the shards without TLS."""
    datastore = build(tmp_path, synthetic(1000, 8, seed=3), "ds", shards=1, factory="IVF4,Flat")  # on ray_cluster
    address_file = tmp_path / "router.json"
    env = {**os.environ, TOKEN_ENV: USERS_TOKEN, "RAY_ADDRESS": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "retriever_server.cli", "--log-level", "warning", "deploy", "--datastore",
         str(datastore), "--name", "envtoken", "--insecure", "--num-cpus", "2", "--cpus-per-shard", "0.25",
         "--no-metrics", "--grace", "0", "--address-file", str(address_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not address_file.is_file() or not address_file.read_text():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the deployment did not serve in time"
            time.sleep(0.2)  # polling, with a deadline
        router = json.loads(address_file.read_text())["address"]
        from retriever_server.serving.client import RetrieverClient

        with RetrieverClient(router) as client:  # no token: the router's port takes none
            found = client.search(np.zeros((1, 8), dtype=np.float32), k=3)
        assert found.ids.shape == (1, 3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# 2. a detached deployment needs a cluster that outlives the command

@pytest.mark.parametrize("where", ["--address", "RAY_ADDRESS"])
def test_deploy_detached_on_a_cluster_of_its_own_is_refused_before_anything_starts(manifest_only, tmp_path, where):
    env = {**os.environ, "TMPDIR": str(tmp_path), "RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": ""}
    args = ["deploy", "--datastore", str(manifest_only), "--host", "127.0.0.1", "--detached",
            "--address-file", str(tmp_path / "router.json")]
    if where == "--address":
        args += ["--address", "local"]
    else:
        env["RAY_ADDRESS"] = "local"
    line = one_error_line(cli(*args, env=env))
    given = "--address local" if where == "--address" else "RAY_ADDRESS=local"
    assert line.startswith(f"retriever-server deploy: error: --detached leaves the deployment serving after this "
                           f"command, but with {given} the command starts a Ray cluster of its own"), line
    assert "ray start --head" in line and "--address HOST:PORT" in line
    assert not (tmp_path / "ray").exists() and not (tmp_path / "router.json").exists()  # no cluster, no file


def test_num_cpus_is_taken_with_address_local_as_the_cluster_it_sizes_is_started(manifest_only, no_ray,
                                                                                monkeypatch, capsys):
    """The old refusal said that with --address local deploy joins a running cluster: it starts one, of
    --num-cpus CPUs."""
    import ray

    from retriever_server import cli as cli_module

    asked = []

    def init(**kwargs):
        asked.append((kwargs["address"], kwargs["num_cpus"]))
        raise OSError("stopped here")

    monkeypatch.setattr(cli_module, "configure_logging", lambda *a: None)
    monkeypatch.setattr(ray, "init", init)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = cli_module.main(["deploy", "--datastore", str(manifest_only), "--host", "127.0.0.1", "--address",
                                "local", "--num-cpus", "2"])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert code == 1 and "stopped here" in capsys.readouterr().err
    assert asked == [("local", 2)]


def test_a_detached_ray_deployment_never_starts_a_cluster_of_its_own(manifest_only, no_ray, ray_tmp, monkeypatch):
    """RayDeployment(detached=True).start() used to start a local cluster and leave "detached" actors in it."""
    from retriever_server.cluster.ray_serving import RayDeployment, RayServeConfig

    config = RayServeConfig(manifest_only, host="127.0.0.1", detached=True)
    with pytest.raises(ClusterUnreachable, match="no Ray cluster runs on this machine"):
        RayDeployment(config).start()  # no address: the cluster `ray start` made here, and there is none
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(ValueError, match=r"RAY_ADDRESS=local, this process would start a new local Ray cluster"):
        RayDeployment(config).start()
    with pytest.raises(ValueError, match="address 'local'.*ray start --head"):
        connect("local", lasting=True)


# 3. Ray's record of the last `ray start` cluster: this user's own file alone

def test_a_record_of_the_last_cluster_that_others_may_write_is_refused(ray_tmp, no_ray):
    record = ray_tmp / "ray_current_cluster"
    record.write_text("127.0.0.1:1")  # a port nothing listens on
    record.chmod(0o666)
    with pytest.raises(ClusterUnreachable, match=r"not to be trusted \(writable by other users \(mode 666"):
        connect(existing=True)
    for mode in (0o644, 0o664):  # this user's own (its group this user's, as a umask of 002 leaves it): taken,
        record.chmod(mode)        # and the cluster there is asked (it is not there)
        with pytest.raises(ClusterUnreachable, match="no Ray cluster answers at the cluster `ray start` last made"):
            connect(existing=True, timeout_s=5)


def test_a_record_of_the_last_cluster_that_is_a_link_or_a_fifo_is_refused(ray_tmp, tmp_path, no_ray):
    record = ray_tmp / "ray_current_cluster"
    elsewhere = tmp_path / "theirs"
    elsewhere.write_text("127.0.0.1:1")
    elsewhere.chmod(0o644)
    record.symlink_to(elsewhere)
    with pytest.raises(ClusterUnreachable, match=r"not to be trusted \(a symbolic link\)"):
        connect(existing=True)
    record.unlink()
    os.mkfifo(record)  # opened for reading, a FIFO would wait for a writer
    with pytest.raises(ClusterUnreachable, match=r"not to be trusted \(not a regular file\)"):
        connect(address="auto")


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user takes root")
def test_a_record_of_the_last_cluster_owned_by_another_user_is_refused(ray_tmp, no_ray):
    record = ray_tmp / "ray_current_cluster"
    record.write_text("127.0.0.1:1")
    record.chmod(0o644)
    os.chown(record, 65534, -1)
    with pytest.raises(ClusterUnreachable, match=r"owned by uid 65534, not by this user"):
        connect(existing=True)
    os.chown(record, os.getuid(), 65534)
    record.chmod(0o664)  # this user's, but another group may write it
    with pytest.raises(ClusterUnreachable, match=r"writable by other users \(mode 664"):
        connect(existing=True)


def test_lookup_refuses_a_record_others_may_write_in_one_line(ray_tmp):
    record = ray_tmp / "ray_current_cluster"
    record.write_text("127.0.0.1:1")
    record.chmod(0o666)
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp.parent), "RAY_ADDRESS": ""}
    line = one_error_line(cli("lookup", "retrieval", env=env))
    assert line.startswith(f"retriever-server lookup: error: {record}, Ray's record of the last `ray start` cluster "
                           "on this machine, is not to be trusted"), line
    assert "give the cluster's address" in line


# 4. an IPv6 head

def test_an_ipv6_head_is_dialled_in_brackets():
    assert dial_target("::1", 6379) == "[::1]:6379"
    assert dial_target("10.0.0.1", 6379) == "10.0.0.1:6379"
    assert dial_target("head.example", 6379) == "head.example:6379"


def test_the_token_check_reaches_an_ipv6_head(no_ray, monkeypatch):
    """The check of the head's token authentication dialled "::1:PORT", which gRPC cannot parse, so it never
    reached an IPv6 head; it does now, and a head that wants a token is named at once."""
    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

    service, method = GCS_PROBE_METHOD.strip("/").split("/")
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(refuse)}),))
    try:
        port = server.add_insecure_port("[::1]:0")
    except RuntimeError:
        port = 0
    if not port:
        pytest.skip("no IPv6 loopback here")
    server.start()
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    try:
        with pytest.raises(ClusterUnreachable, match=r"the Ray cluster at \[::1\]:\d+ takes token authentication"):
            connect(address=f"[::1]:{port}", timeout_s=5)
    finally:
        server.stop(0)
