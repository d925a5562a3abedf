"""Shards and a router as named Ray actors on a simulated 3-node cluster: the placement plan, search
through the router equal to one in-process index, lookup by name, the command line with a detached
deployment, and a removed node's replica restarted elsewhere and found again by the router."""

import base64
import dataclasses
import itertools
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_neighbours, build, damaged_copy, simulated_cluster, synthetic, unsharded_reference

from retriever_server import cli
from retriever_server.cluster.placement import NodeSlot, PlacementError, plan_placement
from retriever_server.datastore import index as ix
from retriever_server.datastore.manifest import shard_name
from retriever_server.serving.client import RetrieverClient, RetrieverError
from retriever_server.serving.router import FORWARD_SLACK
from retriever_server.wire.request import Limits

N, D = 2000, 16
NODES = [NodeSlot("w1", 4.0), NodeSlot("w2", 4.0), NodeSlot("w3", 4.0), NodeSlot("head", 4.0, head=True)]


def nodes_of(plan: dict, shard: int) -> list[str]:
    return [node for (s, _), node in sorted(plan.items()) if s == shard]


def test_plan_puts_shards_on_different_nodes_and_the_head_last():
    plan = plan_placement(NODES, shards=3, replicas=1, cpus_per_shard=1)
    assert sorted(plan.values()) == ["w1", "w2", "w3"]


def test_plan_puts_replicas_of_a_shard_on_different_nodes_and_balances():
    plan = plan_placement(NODES, shards=3, replicas=4, cpus_per_shard=1)
    for shard in range(3):
        assert sorted(nodes_of(plan, shard)) == ["head", "w1", "w2", "w3"]
    assert sorted(list(plan.values()).count(n.node_id) for n in NODES) == [3, 3, 3, 3]


def test_plan_shares_nodes_with_a_warning_when_replicas_outnumber_nodes(caplog):
    with caplog.at_level(logging.WARNING, logger="retriever_server.cluster.placement"):
        plan = plan_placement(NODES[:2], shards=1, replicas=3, cpus_per_shard=1)
    assert sorted(plan.values()) == ["w1", "w1", "w2"]
    assert "shard-00000 replica 2 shares node w1" in caplog.text


def most_spread(cpus: list[int], shards: int, replicas: int) -> int:
    """Brute force: the most (shard, node) pairs of any placement that fits the nodes' CPUs (1 a replica);
    shards x replicas means every shard's replicas on different nodes."""
    options = [(len(set(c)), [c.count(i) for i in range(len(cpus))])
               for c in itertools.combinations_with_replacement(range(len(cpus)), replicas)]
    return max(sum(distinct for distinct, _ in choice) for choice in itertools.product(options, repeat=shards)
               if all(sum(used) <= c for c, used in zip(cpus, zip(*(used for _, used in choice)))))


def test_plan_shares_a_node_only_where_no_spread_exists(caplog):
    """One round's choice must not take the only nodes a later round needs: nodes of 1, 2, 1 CPUs and a
    head of 2 hold 2 shards x 3 replicas apart (shard 0 on w1, w2, head; shard 1 on w2, w3, head). Over
    random small clusters, every plan fits the nodes and keeps as many replicas apart as any placement
    does (brute force): a replica shares a node with its shard's only where no placement avoids it."""
    repro = [NodeSlot("w1", 1.0), NodeSlot("w2", 2.0), NodeSlot("w3", 1.0), NodeSlot("head", 2.0, head=True)]
    with caplog.at_level(logging.WARNING, logger="retriever_server.cluster.placement"):
        plan = plan_placement(repro, shards=2, replicas=3, cpus_per_shard=1)
    assert all(len(set(nodes_of(plan, shard))) == 3 for shard in range(2)), plan
    assert "shares node" not in caplog.text
    plan = plan_placement([NodeSlot("a", 1.0), NodeSlot("b", 3.0), NodeSlot("c", 1.0)], shards=2, replicas=2,
                          cpus_per_shard=1)
    assert all(len(set(nodes_of(plan, shard))) == 2 for shard in range(2))
    rng, kinds = np.random.default_rng(0), {"spread": 0, "shared": 0}
    for _ in range(3000):
        cpus = rng.integers(1, 4, size=rng.integers(1, 5)).tolist()
        shards, replicas = int(rng.integers(1, 4)), int(rng.integers(2, 4))
        if shards * replicas > 6 or shards * replicas > sum(cpus):
            continue
        head = bool(rng.integers(2))
        nodes = [NodeSlot(f"n{i}", float(c), head and i == len(cpus) - 1) for i, c in enumerate(cpus)]
        plan = plan_placement(nodes, shards, replicas, 1)
        assert sorted(plan) == [(s, r) for s in range(shards) for r in range(replicas)]
        assert all(list(plan.values()).count(n.node_id) <= n.cpus for n in nodes), (cpus, plan)
        best = most_spread(cpus, shards, replicas)
        assert sum(len(set(nodes_of(plan, s))) for s in range(shards)) == best, (cpus, shards, replicas, plan)
        kinds["spread" if best == shards * replicas else "shared"] += 1
    assert min(kinds.values()) > 100, kinds


@pytest.mark.parametrize("settings", [dict(cpus_per_shard=0), dict(cpus_per_shard=float("nan")),
                                      dict(cpus_per_shard=float("inf")), dict(router_cpus=-1),
                                      dict(startup_timeout_s=float("inf")), dict(startup_timeout_s=-5),
                                      dict(grace_s=float("nan"))])
def test_impossible_deployment_settings_are_refused_naming_them(settings):
    from retriever_server.cluster.ray_serving import RayServeConfig

    with pytest.raises(ValueError, match=next(iter(settings))):
        RayServeConfig(Path("ds"), **settings)


def test_a_lookup_or_undeploy_with_impossible_seconds_and_a_stopped_deployment_say_so():
    """Refused before any cluster is joined (an infinite timeout was an OverflowError in Ray, a nan grace
    drained the router and then failed); a deployment not running has no router address to give."""
    from retriever_server.cluster.ray_serving import DeploymentError, RayDeployment, RayServeConfig, lookup, undeploy

    with pytest.raises(ValueError, match="timeout_s must be a finite number of seconds > 0, got inf"):
        lookup("x", timeout_s=float("inf"))
    with pytest.raises(ValueError, match="grace_s must be a finite number of seconds >= 0, got nan"):
        undeploy("x", grace_s=float("nan"))
    with pytest.raises(DeploymentError, match="the deployment 'retrieval' is not running"):
        _ = RayDeployment(RayServeConfig(Path("ds"))).router_address


def test_plan_respects_cpus_and_refuses_what_does_not_fit():
    small = [NodeSlot("w1", 1.0), NodeSlot("w2", 1.0), NodeSlot("head", 0.0, head=True)]
    plan = plan_placement(small, shards=2, replicas=2, cpus_per_shard=0.5)
    assert sorted(plan.values()) == ["w1", "w1", "w2", "w2"]
    with pytest.raises(PlacementError, match=r"2 shards x 2 replicas of 1 CPUs each \(4 CPUs\).*3 live nodes have 2"):
        plan_placement(small, shards=2, replicas=2, cpus_per_shard=1)


@pytest.fixture(scope="module")
def cluster():
    """A head and two workers of 1 CPU each, this module's alone."""
    with simulated_cluster(workers=2, cpus=1) as simulated:
        yield simulated


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return synthetic(N, D, seed=21)


@pytest.fixture(scope="module")
def datastore(cluster, keys, tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("ray-serving"), keys, "ds", shards=2, factory="IVF8,PQ4",
                 payload_arrays={"values": np.arange(N, dtype=np.int32) * 3})


@pytest.fixture(scope="module")
def reference(datastore, keys):
    return unsharded_reference(datastore, keys)


def config(datastore: Path, name: str, replicas: int):
    from retriever_server.cluster.ray_serving import RayServeConfig

    return RayServeConfig(datastore, name=name, replicas=replicas, cpus_per_shard=0.5, host="127.0.0.1",
                          metrics=False, grace_s=0.5, startup_timeout_s=120)


def assert_answers_like_one_index(address: str, keys: np.ndarray, reference, security=None) -> None:
    from retriever_server.security.config import ClientSecurity

    queries = keys[:40]
    with RetrieverClient(address, timeout=30, security=security or ClientSecurity()) as client:
        for k, nprobe in ((1, 1), (10, 4), (25, 8)):
            got = client.search(queries, k=k, nprobe=nprobe, payloads=["values"])
            ref_d, ref_i = ix.search(reference, queries, k, nprobe)
            assert not got.partial
            assert_same_neighbours(got.ids, got.distances, ref_i, ref_d)
            np.testing.assert_array_equal(got.payloads["values"], got.ids * 3)


def actors_named(prefix: str, timeout_s: float = 10.0) -> list[str]:
    """Named actors of the test namespace starting with `prefix`, after waiting for them to go."""
    import ray

    from retriever_server.cluster.ray_serving import DEFAULT_NAMESPACE

    deadline = time.monotonic() + timeout_s
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == DEFAULT_NAMESPACE and a["name"].startswith(prefix)]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.2)  # polling, with a deadline


@pytest.mark.ray
@pytest.mark.slow
def test_two_shards_on_different_nodes_found_by_name_answer_like_one_index(cluster, datastore, keys, reference):
    import ray

    from retriever_server.cluster.ray_serving import DeploymentError, RayDeployment, lookup

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    with RayDeployment(config(datastore, "two", replicas=1)) as deployment:
        placements = deployment.placements
        assert placements == deployment.plan
        assert placements[0, 0] != placements[1, 0] and set(placements.values()) <= alive
        assert lookup("two") == deployment.router_address
        for shard, (address,) in enumerate(deployment.shard_addresses):
            with RetrieverClient(address) as client:
                assert client.info().shard == shard_name(shard)
                # the shards take every request the router forwards (it may add FORWARD_SLACK bytes)
                assert client.info().max_request_bytes == Limits().max_request_bytes + FORWARD_SLACK
        assert_answers_like_one_index(lookup("two"), keys, reference)
        with pytest.raises(DeploymentError, match="'two' already runs"):
            RayDeployment(config(datastore, "two", replicas=1)).start()
        with pytest.raises(DeploymentError, match="no deployment named 'nope'.*running there: two"):
            lookup("nope")
        ray.kill(deployment.router, no_restart=True)  # Ray's error, as a deployment's (a traceback in the CLI)
        killed_by = time.monotonic() + 30  # ray.kill returns before the actor is gone: a call may still land
        with pytest.raises(DeploymentError, match="the router of 'two' is gone: "):
            while time.monotonic() < killed_by:
                assert deployment.router_address
                time.sleep(0.1)
    assert actors_named("two/") == []
    with pytest.raises(DeploymentError, match="no deployment named 'two'"):
        lookup("two")


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_that_cannot_load_its_shard_is_named_and_nothing_is_left_running(cluster, datastore, tmp_path):
    import tempfile
    from dataclasses import replace

    from retriever_server.cluster.ray_secrets import sweep
    from retriever_server.cluster.ray_serving import DeploymentError, RayDeployment

    damaged = damaged_copy(datastore, tmp_path / "damaged", "shard-00001/payload.values.npy")
    copies = set(Path(tempfile.gettempdir()).glob("retriever-secrets-*"))  # actors' copies of their secrets
    with pytest.raises(DeploymentError, match=r"bad/shard-1/replica-0 did not start: .*shard-00001/payload.values.npy "
                                              r"checksum does not match"):
        RayDeployment(replace(config(damaged, "bad", replicas=1), secrets_dir=tmp_path / "own")).start()
    assert actors_named("bad/") == []
    deadline = time.monotonic() + 10  # a killed actor's copies go at a sweep once its process has ended
    while not set(Path(tempfile.gettempdir()).glob("retriever-secrets-*")) <= copies and time.monotonic() < deadline:
        sweep()  # as the next actor to start on this node, or the next deployment's driver, does
        time.sleep(0.2)  # polling, with a deadline
    assert set(Path(tempfile.gettempdir()).glob("retriever-secrets-*")) <= copies  # the failed one's went too


@pytest.mark.ray
@pytest.mark.slow
def test_cli_deploys_detached_then_looks_up_and_undeploys(cluster, datastore, keys, reference, capsys, tmp_path):
    """A detached deployment serves after its command ends; a second deploy of its name is refused and
    leaves the first one's address file as it was; lookup finds it, undeploy stops it."""
    def deploy() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "retriever_server.cli", "--log-level", "warning", "deploy", "--datastore",
             str(datastore), "--name", "cli", "--address", cluster.address, "--detached", "--host", "127.0.0.1",
             "--cpus-per-shard", "0.25", "--no-metrics", "--address-file", str(tmp_path / "cli.json")],
            capture_output=True, text=True, timeout=120)

    deployed = deploy()
    assert deployed.returncode == 0, deployed.stderr
    router = next(line.split()[2] for line in deployed.stdout.splitlines() if line.startswith("cli: router "))
    again = deploy()
    assert again.returncode == 1 and "a deployment named 'cli' already runs in namespace" in again.stderr
    assert json.loads((tmp_path / "cli.json").read_text())["address"] == router  # it used to be removed
    assert cli.main(["lookup", "cli", "--address", cluster.address]) == 0  # its driver is gone; the actors serve
    assert capsys.readouterr().out.strip() == router
    assert_answers_like_one_index(router, keys, reference)
    assert cli.main(["undeploy", "--name", "cli"]) == 0
    assert "stopped cli: 3 actors" in capsys.readouterr().out
    assert actors_named("cli/") == []
    assert cli.main(["lookup", "cli"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["retriever-server lookup: error: no deployment named 'cli' in namespace 'retrieval-datastore'; "
                   "running there: none"]


@pytest.mark.ray
@pytest.mark.slow
def test_cli_deploy_serves_until_sigterm_then_stops_its_actors(cluster, datastore, tmp_path):
    from retriever_server.cluster.ray_serving import lookup

    address_file = tmp_path / "router.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "retriever_server.cli", "--log-level", "warning", "deploy", "--datastore",
         str(datastore), "--name", "fg", "--address", cluster.address, "--host", "127.0.0.1", "--cpus-per-shard",
         "0.25", "--no-metrics", "--address-file", str(address_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not address_file.is_file():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        assert json.loads(address_file.read_text())["address"] == lookup("fg")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert actors_named("fg/") == []


@pytest.mark.ray
@pytest.mark.slow
def test_replicas_on_different_nodes_and_a_removed_node_is_survived_then_replaced(cluster, datastore, keys,
                                                                                   reference):
    import ray

    from retriever_server.cluster.ray_serving import RayDeployment

    with RayDeployment(config(datastore, "pairs", replicas=2)) as deployment:
        placements = deployment.placements
        for shard in range(2):
            assert len(set(nodes_of(placements, shard))) == 2, placements
        assert_answers_like_one_index(deployment.router_address, keys, reference)
        before = deployment.shard_addresses
        workers = {node.node_id: node for node in cluster.worker_nodes}
        held = {w: [key for key, node in placements.items() if node == w] for w in workers}
        victim = min((w for w in held if held[w]), key=lambda w: len(held[w]))
        cluster.remove_node(workers[victim])
        assert_answers_like_one_index(deployment.router_address, keys, reference)  # the other replicas answer

        moved = held[victim]
        deadline = time.monotonic() + 60
        while any(deployment.shard_addresses[s][r] == before[s][r] for s, r in moved):
            assert time.monotonic() < deadline, f"the router did not learn the new addresses of {moved}"
            time.sleep(0.2)
        now = deployment.placements
        assert all(now[key] != victim for key in moved)
        for s, r in moved:  # the restarted replicas alone serve their shards now
            for other in set(range(2)) - {r}:
                ray.kill(deployment.shards[s][other], no_restart=True)
        assert_answers_like_one_index(deployment.router_address, keys, reference)
    assert actors_named("pairs/") == []


@pytest.mark.ray
@pytest.mark.slow
def test_a_secured_deployment_secures_every_hop(cluster, datastore, keys, reference, tmp_path):
    """With the user's certificate and tokens the router's port needs them; the shards need the
    deployment's own certificate and token, which reach each actor as a constructor argument, so that
    none of them is in Ray's logs (its runtime-env agent logs every environment it makes). With
    `secrets_dir` instead, the deployment secures the router itself and says how to reach it; a node's
    IP with neither is refused before anything starts."""
    from dataclasses import replace

    from retriever_server.cluster.ray_serving import RayDeployment
    from retriever_server.security.certs import make_ca, make_leaf, write_private
    from retriever_server.security.config import ClientSecurity, SecurityError, ServerSecurity

    ca = make_ca()
    server = make_leaf(ca, "router", ["127.0.0.1", "localhost"])
    files = {name: write_private(tmp_path / name, data) for name, data in
             (("ca.pem", ca.cert_pem), ("router.pem", server.cert_pem), ("router.key", server.key_pem),
              ("tokens", b"user-token\n"))}
    users = ServerSecurity(tls_cert=files["router.pem"], tls_key=files["router.key"], token_file=files["tokens"])
    with RayDeployment(replace(config(datastore, "secured", replicas=1), security=users)) as deployment:
        user = ClientSecurity(tls_ca=files["ca.pem"], token="user-token")
        with RetrieverClient(deployment.router_address, security=user, timeout=30) as client:
            assert client.info().ntotal == N
        for outsider in (ClientSecurity(), ClientSecurity(tls_ca=files["ca.pem"])):
            with RetrieverClient(deployment.router_address, security=outsider, timeout=10) as client:
                with pytest.raises(RetrieverError):
                    client.info()
        for (address,) in deployment.shard_addresses:  # the shards answer the router's certificate alone
            with RetrieverClient(address, security=user, timeout=10) as client, pytest.raises(RetrieverError):
                client.info()
    secrets = [b"user-token", base64.b64encode(b"user-token\n"), b"BEGIN PRIVATE KEY",
               base64.b64encode(b"-----BEGIN PRIVATE KEY-----")[:24]]  # any key's PEM, as base64 packs it
    logs = Path(cluster.head_node.get_logs_dir_path())
    leaked = [(f.name, s) for f in logs.rglob("*") if f.is_file() for s in secrets if s in f.read_bytes()]
    assert logs.is_dir() and leaked == []
    with RayDeployment(replace(config(datastore, "itself", replicas=1), secrets_dir=tmp_path / "own")) as deployment:
        assert_answers_like_one_index(deployment.router_address, keys, reference, deployment.client_security)
        assert oct((tmp_path / "own").stat().st_mode)[-3:] == "700"
    with pytest.raises(SecurityError, match="refusing to serve a node's IP"):
        RayDeployment(replace(config(datastore, "open", replicas=1), host=None)).start()


@pytest.mark.ray
@pytest.mark.slow
def test_a_deployment_waiting_for_cpus_says_so_and_a_failed_replica_ends_the_wait(cluster, datastore, tmp_path,
                                                                                   caplog, monkeypatch):
    """Shard 1's node held by another actor. A deployment logs while it waits which replicas are not up
    and what the cluster has free, then gives up naming them; with shard 0's files damaged it fails at
    once naming shard 0, not when shard 1's wait runs out. Nothing is left running."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from retriever_server.cluster import ray_serving
    from retriever_server.cluster.placement import cluster_nodes, plan_placement

    monkeypatch.setattr(ray_serving, "WAIT_REPORT_S", 1.0)

    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self) -> int:
            return 1

    damaged = damaged_copy(datastore, tmp_path / "damaged", "shard-00000/payload.values.npy")
    busy = plan_placement(cluster_nodes(), shards=2, replicas=1, cpus_per_shard=0.5)[(1, 0)]  # as start() plans
    holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(busy, soft=False)).remote()
    try:
        assert ray.get(holder.ping.remote(), timeout=60) == 1
        started = time.monotonic()
        with pytest.raises(ray_serving.DeploymentError,
                           match=r"^late/shard-0/replica-0 did not start: .*shard-00000/payload"):
            ray_serving.RayDeployment(dataclasses.replace(config(damaged, "late", replicas=1),
                                                          startup_timeout_s=120)).start()
        assert time.monotonic() - started < 20
        full = dataclasses.replace(config(datastore, "full", replicas=1), startup_timeout_s=3)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="retriever_server.cluster.ray_serving"):
            with pytest.raises(ray_serving.DeploymentError,
                               match=r"^full/shard-1/replica-0 not up within 3s \(the cluster has [\d.]+ of "
                                     r"[\d.]+ CPUs, 0.0 of 0.0 GPUs free; each takes 0.5 CPUs\)$"):
                ray_serving.RayDeployment(full).start()
        assert time.monotonic() - started < 3 + 6  # the replica that never started is not waited for again
        waiting = [m for m in (r.getMessage() for r in caplog.records)  # the first deployment's may come
                   if m.startswith("full/") and "not up after" in m]  # too, where its start took over 1 s
        assert len(waiting) >= 2 and "full/shard-1/replica-0 not up after 1 s (gives up after 3 s)" in waiting[0]
        assert actors_named("late/") == [] and actors_named("full/") == []
    finally:
        ray.kill(holder)
