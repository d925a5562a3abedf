"""The A/B shard benchmark: two shard servers from two source trees, taking turns on the same requests."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build, synthetic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from shard_ab import ROOT, AbConfig, compare, requests, take_turns  # noqa: E402

from retrieval.v1 import retriever_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_both_sides_answer_requests_of_the_shards_own_keys(ray_cluster, tmp_path):
    keys = synthetic(2000, 16, seed=5)
    datastore = build(tmp_path, keys, "ds", shards=2, factory="IVF16,Flat", keep_keys=True)
    config = AbConfig(datastore, before=ROOT, shard=1, nq=3, k=4, nprobe=2, rounds=2, seconds_per_round=0.3,
                      after_cpus="0")
    batch = [pb.SearchRequest.FromString(raw) for raw in requests(config)]
    stored = np.load(datastore / "shard-00001" / "keys.npy").astype(np.float32)
    for request in batch:  # rows of the shard's own keys, nq at a time
        queries = np.frombuffer(request.queries.data, np.float32).reshape(3, 16)
        assert request.k == 4 and request.nprobe == 2
        assert any(np.array_equal(queries, stored[s:s + 3]) for s in range(len(stored) - 2))
    result = compare(config)
    assert set(result) == {"before", "after"}
    for side in result.values():
        assert side["calls"] > 0 and side["ms"] > 0
    assert result["after"]["cores"] == [0]  # --after-cpus 0: that side's server on core 0 alone
    assert result["before"]["cores"] == sorted(os.sched_getaffinity(0))


def test_the_router_benchmark_compares_two_whole_deployments(ray_cluster, tmp_path):
    from router_ab import RouterAbConfig
    from router_ab import compare as compare_routers

    keys = synthetic(2000, 16, seed=6)
    datastore = build(tmp_path, keys, "ds", shards=2, factory="IVF16,Flat", keep_keys=True)
    config = RouterAbConfig(datastore, before=ROOT, replicas=2, nq=2, k=5, nprobe=2, rounds=2, seconds_per_round=0.3)
    result = compare_routers(config)
    assert set(result) == {"before", "after"}
    for side in result.values():
        assert side["calls"] > 0 and side["ms"] > 0


def test_each_side_of_the_router_benchmark_runs_its_own_tree(ray_cluster, tmp_path, monkeypatch):
    """A copy of this checkout whose router calls itself another role: started from the checkout's root
    (as the docs run it), the copy's deployment runs the copy's code and this one's runs this code."""
    from router_ab import RouterAbConfig, deployment_from
    from test_readme import copy_of_repository

    from retrieval.v1 import retriever_pb2_grpc as pb_grpc

    other = copy_of_repository(tmp_path / "other")
    router = other / "retriever_server" / "serving" / "router.py"
    changed = router.read_text().replace('info.role, info.shard, info.replica = "router",',
                                         'info.role, info.shard, info.replica = "router-of-the-copy",', 1)
    assert "router-of-the-copy" in changed
    router.write_text(changed)
    datastore = build(tmp_path, synthetic(1000, 8, seed=7), "ds", shards=2, factory="IVF4,Flat")
    monkeypatch.chdir(ROOT)
    config = RouterAbConfig(datastore, before=other, replicas=1)
    roles = {}
    for name, tree in (("before", other), ("after", ROOT)):
        deployment = deployment_from(tree, config)
        try:
            with grpc.insecure_channel(deployment.router_address) as channel:
                roles[name] = pb_grpc.RetrieverStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30).role
        finally:
            deployment.stop()
    assert roles == {"before": "router-of-the-copy", "after": "router"}


def test_the_router_benchmark_refuses_a_tree_that_is_not_a_source_tree(tmp_path):
    from router_ab import main as router_ab

    with pytest.raises(SystemExit, match="is not a source tree of this project"):
        router_ab(["--datastore", str(tmp_path), "--before", str(tmp_path / "nowhere")])


def test_the_sides_take_turns_first_in_alternate_rounds():
    order = []

    def call_of(name: str):
        def call(request, timeout):  # longer than a turn: one call per turn
            order.append(name)
            time.sleep(0.01)
        return call

    sides = {name: (os.getpid(), call_of(name)) for name in ("before", "after")}
    found = take_turns(sides, [b""], rounds=4, seconds_per_round=0.005)
    assert order == ["before", "after", "after", "before", "before", "after", "after", "before"]
    assert found["before"]["calls"] == found["after"]["calls"] == 4
