"""What the benchmarks reuse and how they reach their servers, without running a benchmark: a datastore kept
from an earlier run is reused only when this run would build the same one (search_service.py, scale.py,
knnlm_size.py), scale.py's shards search on the reference's one thread, retro_size.py plots another
benchmark's JSON only when it scored the same test text, and shard_ab.py waits for a shard's health and
takes answers past gRPC's default 4 MiB."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import knnlm_size  # noqa: E402
import retro_size  # noqa: E402
import scale  # noqa: E402
import search_service  # noqa: E402
import shard_ab  # noqa: E402

from retriever_server.datastore.index import resolve_factory, train_size_for  # noqa: E402
from retriever_server.datastore.manifest import FileEntry, Manifest, ShardEntry, shard_name, write_manifest  # noqa: E402


class Built(Exception):
    """Raised where a test stands in for a real build or deployment."""


def fake_datastore(directory: Path, n: int, d: int, factory: str, build: dict | None = None,
                   metadata: dict | None = None, metric: str = "l2", shards: int = 2) -> Path:
    """A manifest (and empty files) that reads as a finished datastore of `n` rows."""
    names = ("index.faiss", "keys.npy")
    edges = np.linspace(0, n, shards + 1).astype(int)
    entries = tuple(ShardEntry(shard_name(i), int(edges[i]), int(edges[i + 1]),
                               {name: FileEntry(0, "0" * 64) for name in names}) for i in range(shards))
    directory.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        (directory / entry.name).mkdir(exist_ok=True)
        for name in names:
            (directory / entry.name / name).touch()
    write_manifest(directory, Manifest(dimension=d, metric=metric, factory=factory, ntotal=n, nlist=4,
                                       default_nprobe=1, has_keys=True, payloads=(), shards=entries,
                                       build=build or {}, metadata=metadata or {}))
    return directory


# ---------------------------------------------------------------------------------------------
# search_service.py
# ---------------------------------------------------------------------------------------------

def test_search_service_reuses_the_datastore_its_build_recorded(tmp_path):
    """The build records the rows it trained on (not the 0 asked for): such a datastore is reused."""
    n, d = 20_000, 384
    factory = resolve_factory("auto", n, d)
    trained = min(train_size_for(factory, d, "l2"), n)
    kept = fake_datastore(tmp_path / "kept", n, d, factory, build={"seed": search_service.SEED, "train_size": trained})
    assert search_service.datastore_matches(kept, n)
    other = fake_datastore(tmp_path / "other", n, d, factory, build={"seed": search_service.SEED, "train_size": 5000})
    assert not search_service.datastore_matches(other, n)
    assert not search_service.datastore_matches(kept, n + 1)


# ---------------------------------------------------------------------------------------------
# scale.py
# ---------------------------------------------------------------------------------------------

FIGURES = {"build_s": 12.5, "train_s": 2.0, "add_s": 10.0, "add_rows_per_s_per_core": 500.0,
           "peak_build_anon_gib": 1.5, "peak_build_file_gib": 0.25}


def never_build(*args, **kwargs):
    raise Built("built again")


@pytest.mark.parametrize("kept, config", [
    ({"build_cpus": 2, "gpu": False}, {"build_cpus": 16}),
    ({"build_cpus": 2, "gpu": False}, {"gpu": True}),
    ({}, {}),  # figures of a version that did not record how it built: not known to match
])
def test_scale_builds_again_where_the_kept_build_ran_on_other_cpus_or_gpu(tmp_path, monkeypatch, kept, config):
    folder = tmp_path / "n100-real10"
    fake_datastore(folder / "ds", 100, 8, "IVF4,Flat")
    (folder / "build.json").write_text(json.dumps({**FIGURES, **kept}))
    monkeypatch.setattr(scale.subprocess, "Popen", never_build)
    with pytest.raises(Built):
        scale.build(scale.ScaleConfig(out=tmp_path, **config), folder / "keys", folder / "ds",
                    scale.SizeResult(100, 10))


def test_scale_reuses_a_build_made_with_the_same_cpus_and_gpu(tmp_path, monkeypatch):
    folder = tmp_path / "n100-real10"
    fake_datastore(folder / "ds", 100, 8, "IVF4,Flat")
    (folder / "build.json").write_text(json.dumps({**FIGURES, "build_cpus": 16, "gpu": True}))
    monkeypatch.setattr(scale.subprocess, "Popen", never_build)
    result = scale.SizeResult(100, 10)
    scale.build(scale.ScaleConfig(out=tmp_path, build_cpus=16, gpu=True), folder / "keys", folder / "ds", result)
    assert {name: getattr(result, name) for name in FIGURES} == FIGURES


def test_scale_serves_each_shard_on_the_one_thread_the_reference_searches_on(tmp_path, monkeypatch):
    """On 16 cores the launcher would give each of 2 shards 8 FAISS threads; the in-process reference has 1."""
    ds = fake_datastore(tmp_path / "ds", 100, 8, "IVF4,Flat")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    seen = {}

    def deployment(out, extra_args=()):
        seen["args"] = list(extra_args)
        raise Built("deployed")

    monkeypatch.setattr(scale, "LocalDeployment", deployment)
    queries = np.zeros((4, 8), np.float32)
    for gpu in (False, True):
        with pytest.raises(Built):
            scale.serve_and_query(scale.ScaleConfig(gpu=gpu), ds, queries, np.zeros((4, 10), int),
                                  scale.SizeResult(100, 10))
        assert seen["args"][-2:] == ["--threads", "1"] and ("--gpu" in seen["args"]) == gpu


# ---------------------------------------------------------------------------------------------
# knnlm_size.py and retro_size.py
# ---------------------------------------------------------------------------------------------

def test_a_kept_store_of_another_factory_is_built_again(tmp_path, monkeypatch):
    source = SimpleNamespace(rows=5000, encoder_fingerprint="enc-1", directory=tmp_path / "source")
    store = fake_datastore(tmp_path / "store", 5000, 16, "IVF4,Flat", metadata={"encoder": "enc-1"})
    monkeypatch.setattr(knnlm_size, "build_source", never_build)
    assert knnlm_size.ensure_datastore(source, store, 2, "IVF4,Flat", progress=False) == 0.0  # reused
    with pytest.raises(Built):
        knnlm_size.ensure_datastore(source, store, 2, "auto", progress=False)
    auto = fake_datastore(tmp_path / "auto", 5000, 16, resolve_factory("auto", 5000, 16), metadata={"encoder": "enc-1"})
    assert knnlm_size.built(auto, source, 2, "auto")
    assert not knnlm_size.built(auto, source, 2, "IVF4,Flat")
    assert not knnlm_size.built(auto, SimpleNamespace(rows=5000, encoder_fingerprint="enc-2"), 2, "auto")


def knnlm_json(path: Path, run: Path, test: int = 1000, tokens: int = 0) -> Path:
    path.write_text(json.dumps({"config": {"run": str(run), "tokens": tokens}, "splits": {"valid": 10, "test": test},
                                "rows": []}))
    return path


def test_retro_size_plots_knnlm_only_from_the_same_run_and_test_tokens(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    beside = retro_size.knnlm_beside
    with caplog.at_level(logging.WARNING, logger="retro_size"):
        assert beside(knnlm_json(tmp_path / "other.json", tmp_path / "other-run"), run_dir, 1000, 0) is None
        assert "other-run" in caplog.text
        caplog.clear()
        assert beside(knnlm_json(tmp_path / "split.json", run_dir, test=900), run_dir, 1000, 0) is None
        assert "test split" in caplog.text
        caplog.clear()
        assert beside(knnlm_json(tmp_path / "capped.json", run_dir, tokens=500), run_dir, 1000, 0) is None
        assert "first 500" in caplog.text
        caplog.clear()
        assert beside(knnlm_json(tmp_path / "same.json", run_dir, tokens=0), run_dir, 1000, 4000) is not None
        assert beside(knnlm_json(tmp_path / "same2.json", run_dir, tokens=500), run_dir, 1000, 500) is not None
        assert caplog.text == ""
    assert beside(tmp_path / "missing.json", run_dir, 1000, 0) is None and beside(None, run_dir, 1000, 0) is None


# ---------------------------------------------------------------------------------------------
# shard_ab.py
# ---------------------------------------------------------------------------------------------

SERVICE = "retrieval.v1.Retriever"  # what a shard serves and its health answers for


class FakeShard:
    """A `serve --shard` stand-in in this process: health NOT_SERVING until `ready()`, searches refused
    UNAVAILABLE until then, and answers of `answer_bytes` bytes."""

    def __init__(self, answer_bytes: int, serving: bool = True):
        self.answer, self.serving = b"\0" * answer_bytes, serving
        self.health = health.HealthServicer()
        self.server = grpc.server(ThreadPoolExecutor(4))
        search = grpc.unary_unary_rpc_method_handler(self.search)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE,
                                                                                   {"Search": search})])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.mark()
        self.server.start()

    def mark(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(SERVICE, status)

    def ready(self) -> None:
        self.serving = True
        self.mark()

    def search(self, request: bytes, context) -> bytes:
        if not self.serving:
            context.abort(grpc.StatusCode.UNAVAILABLE, "shard is loading; retry when health is SERVING")
        return self.answer


class FakeProcess:
    pid = os.getpid()

    def __init__(self, code: int | None = None):
        self.returncode = code

    def poll(self):
        return self.returncode

    def terminate(self) -> None:
        pass

    def wait(self, timeout=None) -> int:
        return 0


def compare_against(shard: FakeShard, tmp_path: Path, monkeypatch) -> dict:
    np.save(tmp_path / "queries.npy", np.zeros((8, 4), np.float32))
    monkeypatch.setattr(shard_ab, "start_shard", lambda *args, **kwargs: (FakeProcess(), f"127.0.0.1:{shard.port}"))
    config = shard_ab.AbConfig(datastore=tmp_path, before=tmp_path, after=tmp_path, queries=tmp_path / "queries.npy",
                               rounds=2, seconds_per_round=0.05)
    try:
        return shard_ab.compare(config)
    finally:
        shard.server.stop(None)


def test_shard_ab_takes_answers_past_grpcs_default_4_mib(tmp_path, monkeypatch):
    """nq 512 x k 1024 neighbours is about 6 MiB an answer."""
    result = compare_against(FakeShard(6 << 20), tmp_path, monkeypatch)
    assert result["before"]["calls"] > 0 and result["after"]["calls"] > 0


def test_shard_ab_waits_for_a_loading_shard_to_turn_serving(tmp_path, monkeypatch):
    shard = FakeShard(64, serving=False)
    threading.Timer(0.5, shard.ready).start()
    result = compare_against(shard, tmp_path, monkeypatch)
    assert result["before"]["calls"] > 0 and result["after"]["calls"] > 0


def test_shard_ab_names_a_shard_that_never_turns_serving(tmp_path):
    shard = FakeShard(64, serving=False)
    with grpc.insecure_channel(f"127.0.0.1:{shard.port}") as channel:
        with pytest.raises(RuntimeError, match="did not turn SERVING within 0.5 s .*NOT_SERVING"):
            shard_ab.wait_serving(channel, FakeProcess(), "the shard", timeout_s=0.5)
        with pytest.raises(RuntimeError, match=r"the shard exited \(1\)"):
            shard_ab.wait_serving(channel, FakeProcess(1), "the shard", timeout_s=5)
    shard.server.stop(None)
