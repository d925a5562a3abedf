"""Shared fixtures: a local Ray cluster, an event loop thread for in-process gRPC servers,
small datastores built by the real build job, and servers on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest

from retriever_server.datastore.build import BuildConfig, build_datastore
from retriever_server.security.config import ClientSecurity, ServerSecurity
from retriever_server.serving.router import RouterConfig, start_router
from retriever_server.serving.service import RunningServer
from retriever_server.serving.shard import ShardOptions
from retriever_server.serving.shard_server import ShardServerConfig, start_shard_server
from retriever_server.wire.request import Limits


class LoopThread:
    """An asyncio loop in a daemon thread: grpc.aio servers live here while tests call them."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def aio() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """A local Ray cluster of 2 CPUs, as the project's commands start one (`address="local"`: never a
    cluster that another test or `ray start` left on this machine). Modules share it: it is started
    when none is connected (a module that simulated a cluster of its own shut that one down) and
    stopped at the end of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield


@pytest.fixture(scope="session")
def ray_session():
    """Shuts down whatever Ray cluster this process is connected to when the session ends."""
    yield
    import ray

    ray.shutdown()


# where `ray start` records its head, in Ray's temp directory (RAY_TMPDIR, else TMPDIR, else /tmp)
RAY_TEMP_DIR = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"
RAY_ADDRESS_FILE = RAY_TEMP_DIR / "ray_current_cluster"


# A removed node is declared dead within about 2 s instead of Ray's 15 to 30 s (its health checks), so a
# test that follows its removal does not see it scheduled onto
LOST_NODE_NOTICED = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                     "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


@contextlib.contextmanager
def simulated_cluster(workers: int = 2, cpus: float = 1, head_cpus: float | None = None) -> Iterator:
    """A head (`head_cpus`, default `cpus`) and `workers` worker nodes of `cpus` CPUs each
    (`ray.cluster_utils.Cluster`), joined by this process. Yields the Cluster. The cluster records its
    address where `ray start` would (so `--address auto` finds it); the record goes with the cluster."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    head = cpus if head_cpus is None else head_cpus
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head, "include_dashboard": False,
                                                            "_system_config": LOST_NODE_NOTICED})
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if RAY_ADDRESS_FILE.is_file() and RAY_ADDRESS_FILE.read_text().strip() == cluster.address:
            RAY_ADDRESS_FILE.unlink()


def synthetic(n: int, d: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Clustered float32 vectors (n, d): structure like embeddings, made in milliseconds."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


def build(tmp: Path, keys: np.ndarray, name: str, **kwargs) -> Path:
    """Saves keys (and payload arrays given as numpy) and runs the build job; returns the datastore."""
    keys_path = tmp / f"{name}-keys.npy"
    np.save(keys_path, keys)
    payloads = {}
    for payload, array in kwargs.pop("payload_arrays", {}).items():
        payloads[payload] = tmp / f"{name}-{payload}.npy"
        np.save(payloads[payload], array)
    out = tmp / name
    build_datastore(BuildConfig(keys=keys_path, out=out, payloads=payloads, **kwargs), progress=False)
    return out


def manifest_without_shard_files(out: Path) -> Path:
    """A datastore at `out` whose manifest is valid and whose one shard's file is missing: anything that
    loads the shard fails there (so a refusal before it proves a flag was refused first)."""
    from retriever_server.datastore.manifest import FileEntry, Manifest, ShardEntry, write_manifest

    out.mkdir()
    files = {"index.faiss": FileEntry(bytes=1, sha256="0" * 64)}
    write_manifest(out, Manifest(dimension=8, metric="l2", factory="Flat", ntotal=10, nlist=1, default_nprobe=1,
                                 has_keys=False, payloads=(), shards=(ShardEntry("shard-00000", 0, 10, files),)))
    return out


def knn_result_impossible_at_one():
    """A kNN-LM result over 100 tokens, 60 searched, whose sums at λ = 1 are inf at searched and followed
    positions alike (λ 0, 0.5 finite), without the searched positions' own sums."""
    import math

    from lm_worker.evaluation.knnlm_eval import KnnEvalResult

    nll, followed_nll = {0.0: 500.0, 0.5: 450.0, 1.0: math.inf}, {0.0: 100.0, 0.5: 80.0, 1.0: math.inf}
    return KnnEvalResult(tokens=100, base_perplexity=math.exp(5),
                         perplexity={lam: math.exp(v / 100) for lam, v in nll.items()}, best_lambda=0.5,
                         best_perplexity=math.exp(4.5), relative_reduction=0.1, k=16, temperature=1.0,
                         model_seconds=0, retrieval_seconds=0, retrieval_wait_seconds=0, seconds=0, base_nll=500.0,
                         nll=nll, searched=60, followed_lambda=0.5, followed_temperature=2.0,
                         followed_nll=followed_nll)


def damaged_copy(datastore: Path, to: Path, file: str, mask: int = 0xFF) -> Path:
    """A copy of a datastore with one byte in the middle of `file` (relative to it) flipped by `mask`."""
    shutil.copytree(datastore, to)
    path = to / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= mask
    path.write_bytes(bytes(data))
    return to


def unsharded_reference(datastore: Path, keys: np.ndarray) -> faiss.Index:
    """One index with the datastore's trained codec holding every row: the sharding reference."""
    index = faiss.read_index(str(datastore / "shard-00000" / "index.faiss"))
    index.reset()
    index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), np.arange(len(keys), dtype=np.int64))
    return index


@dataclass
class Served:
    router: RunningServer
    shards: list[list[RunningServer]]

    @property
    def address(self) -> str:
        return self.router.address

    def shard_addresses(self) -> list[list[str]]:
        return [[r.address for r in replicas] for replicas in self.shards]


@contextlib.contextmanager
def serve(aio: LoopThread, datastore: Path, n_shards: int, replicas: int = 1, limits: Limits = Limits(),
          options: ShardOptions = ShardOptions(), security: ServerSecurity = ServerSecurity(),
          shard_client: ClientSecurity = ClientSecurity()) -> Iterator[Served]:
    """Every shard (x replicas) and a router, in process on ephemeral 127.0.0.1 ports; always stopped.
    `security` applies to every server's port, `shard_client` to the router's calls to its shards."""
    shards: list[list[RunningServer]] = []
    router = None
    try:
        for i in range(n_shards):
            shards.append([
                aio.run(start_shard_server(ShardServerConfig(datastore, i, replica=r, metrics_port=None,
                                                             limits=limits, options=options, security=security)))
                for r in range(replicas)
            ])
        spec = tuple(tuple(s.address for s in replicas) for replicas in shards)
        router = aio.run(start_router(RouterConfig(spec, metrics_port=None, limits=limits, security=security,
                                                   shard_security=shard_client)))
        yield Served(router, shards)
    finally:
        for server in ([router] if router else []) + [s for replicas in shards for s in replicas]:
            if not server.service.draining:
                aio.run(server.drain(grace=0))


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k found in the returned top-k."""
    hits = [len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k


def assert_same_neighbours(ids, distances, ref_ids, ref_distances, rtol: float = 1e-5) -> None:
    """Equal distances, and equal ids except where a tie at the k-th distance makes either valid.
    Missing neighbours (-1) must be missing in both, whatever sentinel distance each uses."""
    missing = ref_ids < 0
    np.testing.assert_array_equal(ids < 0, missing)
    np.testing.assert_allclose(distances[~missing], ref_distances[~missing], rtol=rtol, atol=1e-5)
    for row in range(len(ids)):
        kth = ref_distances[row][~missing[row]][-1]
        strict = ~np.isclose(ref_distances[row], kth, rtol=rtol, atol=1e-5) & ~missing[row]
        assert set(ids[row][strict]) == set(ref_ids[row][strict]), f"row {row} differs"


class Recorder:
    """Wraps a decoding stepper; keeps every log-prob tensor it returned, every reorder, and the steps."""

    def __init__(self, inner):
        self.inner, self.outputs, self.reorders, self.steps = inner, [], [], 0

    def start(self, prompt):
        self.outputs.append(self.inner.start(prompt))
        return self.outputs[-1]

    def step(self, tokens):
        self.steps += 1
        self.outputs.append(self.inner.step(tokens))
        return self.outputs[-1]

    def reorder(self, indices):
        self.reorders.append(indices.clone())
        self.inner.reorder(indices)

    def expect_positions(self, positions):
        if hasattr(self.inner, "expect_positions"):
            self.inner.expect_positions(positions)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: tiny models run fastest so, and the machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_SPLITS = {"train": ("argparse.py", "difflib.py"), "retro": ("functools.py",),
               "heldout": ("fractions.py", "calendar.py")}


@pytest.fixture
def by_value(request):
    """Ray workers cannot import a test module: its classes travel pickled by value while a test runs."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    yield
    cloudpickle.unregister_pickle_by_value(request.module)


def stdlib_data(out: Path, vocab_size: int, chars: int | None = None) -> Path:
    """A prepared corpus of real stdlib code in `out`: bisect.py and heapq.py the train split, keyword.py the
    heldout one, each cut to its first `chars` characters (None: whole), with a BPE of `vocab_size`."""
    import sysconfig

    from lm_worker.data.token_store import write_token_store
    from lm_worker.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text()[:chars] for name in ("bisect.py", "heapq.py", "keyword.py")]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save(out / "tokenizer.json")
    encoded = [(f"doc{i}", tokenizer.encode(t)) for i, t in enumerate(texts)]
    write_token_store(out / "train", encoded[:2], tokenizer.eos_id, tokenizer.fingerprint)
    write_token_store(out / "heldout", encoded[2:], tokenizer.eos_id, tokenizer.fingerprint)
    return out


def tiny_pipeline_run(run_dir: Path, lm_steps: int, seq_len: int = 64, doc_tokens: int = 2500) -> Path:
    """RUN laid out as the pipeline lays it out, at test size: RUN/data from real stdlib files cut to
    `doc_tokens` tokens each (`TINY_SPLITS`; heldout cut into valid and test) with a 300-token BPE,
    and a tiny LM trained `lm_steps` steps on windows of `seq_len` in RUN/lm."""
    import sysconfig

    from lm_worker.data.token_store import TokenStore, write_token_store
    from lm_worker.data.tokenizer import train_tokenizer
    from lm_worker.pipeline.config import PipelineConfig
    from lm_worker.pipeline.data_stage import split_heldout
    from lm_worker.training.config import TrainConfig
    from lm_worker.training.train import train

    data = run_dir / "data"
    data.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = {name: (stdlib / name).read_text() for names in TINY_SPLITS.values() for name in names}
    tokenizer = train_tokenizer(list(texts.values()), vocab_size=300)
    tokenizer.save(data / "tokenizer.json")
    for split, names in TINY_SPLITS.items():
        docs = [(name, tokenizer.encode(texts[name])[:doc_tokens]) for name in names]
        write_token_store(data / split, docs, tokenizer.eos_id, tokenizer.fingerprint)
    split_heldout(PipelineConfig(run=run_dir, tune_tokens=800), TokenStore.open(data / "heldout"))
    config = TrainConfig(kind="lm", preset="tiny", seq_len=seq_len, batch_size=8, steps=lm_steps,
                         warmup=min(5, lm_steps // 4), eval_every=lm_steps, eval_batches=2, checkpoint_every=lm_steps,
                         device="cpu", threads=2)
    train(config, data, run_dir / "lm", progress=False)
    return run_dir
