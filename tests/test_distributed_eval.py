"""Distributed evaluation on a simulated 3-node Ray cluster: 1 and 2 worker actors give the same
perplexity to the last digit, equal to the in-process evaluation up to summation order; finished
shares are checkpointed and reused; a node removed mid-evaluation loses a worker, which is replaced,
and the figures do not change."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import serve, simulated_cluster

from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.data.tokenizer import train_tokenizer
from lm_worker.evaluation.batches import count_batches
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.distributed import EvalJob, WorkerPoolConfig, evaluate_distributed
from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
from lm_worker.evaluation.retro_eval import evaluate_retro
from lm_worker.evaluation.shares import holds_another_job, open_saved, plan_shares
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.service import ServiceRetriever
from lm_worker.sources.build import build_source
from lm_worker.sources.knnlm import encode_knnlm
from lm_worker.sources.retro import encode_retro

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = EvalConfig(context_len=32, stride=16, batch_size=2, lambdas=(0.0, 0.25, 0.5),
                    retrieval=RetrievalConfig(k=8, nprobe=4))
L = 4


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and two worker nodes with one each: every evaluation worker runs on a node
    that can be removed."""
    with simulated_cluster(workers=2, cpus=1, head_cpus=0) as c:
        yield c, [n for n in c.list_all_nodes() if n is not c.head_node]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A prepared-data folder: tokenizer.json, a train and a heldout store of stdlib text."""
    tmp = tmp_path_factory.mktemp("data")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("bisect.py", "heapq.py", "colorsys.py", "keyword.py")]
    tokenizer = train_tokenizer(texts[:2], vocab_size=300)
    tokenizer.save(tmp / "tokenizer.json")
    fp, eos = tokenizer.fingerprint, tokenizer.eos_id
    write_token_store(tmp / "train", [(f"t{i}", tokenizer.encode(t)[:700]) for i, t in enumerate(texts[:2])], eos, fp)
    write_token_store(tmp / "heldout", [(f"h{i}", tokenizer.encode(t)[:500]) for i, t in enumerate(texts[2:])], eos, fp)
    return tmp


@pytest.fixture(scope="module")
def knn(cluster, data, tmp_path_factory, aio):
    """A tiny LM checkpoint and its 2-shard kNN-LM datastore, served on loopback; yields (checkpoint, model,
    address, the folder holding the datastore's source)."""
    tmp = tmp_path_factory.mktemp("knn")
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(vocab_size=300, max_len=64)).eval()
    checkpoint = save_checkpoint(tmp / "lm" / "model.pt", kind="lm", model=lm, config=lm.config, step=0,
                                 tokenizer_fingerprint=TokenStore.open(data / "train").tokenizer_fingerprint, extra={})
    encode_knnlm(lm, TokenStore.open(data / "train"), tmp / "src", context_len=32, stride=16, progress=False)
    datastore = build_source(tmp / "src", tmp / "ds", shards=2, factory="IVF4,Flat", progress=False)
    with serve(aio, datastore, 2) as served:
        yield checkpoint, lm, served.address, tmp


def job(knn, data, config: EvalConfig = CONFIG) -> EvalJob:
    return EvalJob(kind="knnlm", checkpoint=knn[0], store=data / "heldout", target=knn[2], config=config)


def pool(**kwargs) -> WorkerPoolConfig:
    return WorkerPoolConfig(batches_per_share=3, progress=False, **kwargs)


def test_shares_cover_every_batch_once(data):
    n = count_batches(TokenStore.open(data / "heldout"), CONFIG)
    shares = plan_shares(n, 3)
    covered = [b for s in shares for b in range(s.start, s.stop)]
    assert covered == list(range(n)) and len(shares) == math.ceil(n / 3) >= 6


def test_two_workers_equal_one_worker_and_the_in_process_evaluation(knn, data):
    nodes: list[set[str]] = [set(), set()]

    def on_two(body: dict) -> None:
        nodes[1].add(body["node"])
        if len(nodes[1]) < 2:  # the driver waits here: the second worker starts before the first does every share
            time.sleep(1.0)

    one = evaluate_distributed(job(knn, data), pool(workers=1), on_share=lambda b: nodes[0].add(b["node"]))
    two = evaluate_distributed(job(knn, data), pool(workers=2), on_share=on_two)
    assert one.tokens == two.tokens == len(TokenStore.open(data / "heldout")) - 1
    assert one.base_perplexity == two.base_perplexity
    assert one.perplexity == two.perplexity and one.nll == two.nll  # to the last digit
    assert len(nodes[1]) == 2  # the two workers ran on different nodes (one CPU each)
    with ServiceRetriever(knn[2], CONFIG.retrieval) as retriever:
        reference = evaluate_knnlm(knn[1], TokenStore.open(data / "heldout"), retriever, CONFIG, progress=False)
    assert reference.tokens == one.tokens
    for lam in CONFIG.lambdas:  # one process, one running sum: equal up to summation order
        assert one.perplexity[lam] == pytest.approx(reference.perplexity[lam], rel=1e-9)


def test_a_window_past_the_model_is_refused_before_any_worker_starts(knn, data, tmp_path):
    too_long = dataclasses.replace(CONFIG, context_len=128, stride=64)  # the tiny LM's max_len is 64
    with pytest.raises(ValueError, match="context_len 128 exceeds the model's max_len 64"):
        evaluate_distributed(job(knn, data, too_long), pool(workers=2, checkpoint_dir=tmp_path / "shares"))
    assert not (tmp_path / "shares").exists()


def test_workers_that_cannot_start_are_reported_while_the_pool_waits(knn, data, caplog, monkeypatch):
    """Workers asking for more CPUs than any node has: the pool says, while it waits, for how long and what
    the cluster has free, then gives up in one error."""
    import logging

    import ray

    from lm_worker.evaluation import distributed

    monkeypatch.setattr(distributed, "STALL_REPORT_S", 1.0)
    stuck = WorkerPoolConfig(workers=2, num_cpus=64, stall_timeout_s=3, progress=False, batches_per_share=3)
    with caplog.at_level(logging.WARNING, logger="lm_worker.evaluation.distributed"):
        with pytest.raises(RuntimeError, match="no evaluation worker could start for 3 s: does the cluster have 64 "
                                               "CPUs / 0.0 GPUs free"):
            evaluate_distributed(job(knn, data), stuck)
    waiting = [r.getMessage() for r in caplog.records if "no evaluation worker has started" in r.getMessage()]
    total = ray.cluster_resources()["CPU"]
    assert len(waiting) >= 2 and f"of {total:.1f} CPUs" in waiting[0] and "each worker takes 64 CPUs" in waiting[0]


def test_checkpointed_shares_are_reused_and_another_job_is_refused(knn, data, tmp_path):
    first = evaluate_distributed(job(knn, data), pool(workers=2, checkpoint_dir=tmp_path))
    saved = sorted(tmp_path.glob("share-*.json"))
    assert len(saved) == len(plan_shares(count_batches(TokenStore.open(data / "heldout"), CONFIG), 3))
    ran: list[int] = []
    unschedulable = WorkerPoolConfig(workers=2, num_cpus=64, stall_timeout_s=2, progress=False, batches_per_share=3,
                                     checkpoint_dir=tmp_path)  # a worker would never start: none is asked for
    again = evaluate_distributed(job(knn, data), unschedulable, on_share=ran.append)
    assert ran == [] and again.perplexity == first.perplexity  # nothing re-run, the same figures
    saved[1].unlink()  # a run interrupted before that share: only it is redone
    redo = evaluate_distributed(job(knn, data), pool(workers=1, checkpoint_dir=tmp_path),
                                on_share=lambda b: ran.append(b["share"]))
    assert ran == [1] and redo.perplexity == first.perplexity
    ran.clear()  # another share size: the saved shares cover other batches, and are computed again
    halves = WorkerPoolConfig(batches_per_share=2, workers=2, progress=False, checkpoint_dir=tmp_path)
    resized = evaluate_distributed(job(knn, data), halves, on_share=lambda b: ran.append(b["share"]))
    assert resized.tokens == first.tokens and resized.perplexity == pytest.approx(first.perplexity, rel=1e-12)
    assert sorted(ran) == list(range(len(plan_shares(count_batches(TokenStore.open(data / "heldout"), CONFIG), 2))))
    other = job(knn, data, dataclasses.replace(CONFIG, temperature=2.0))
    with pytest.raises(ValueError, match="different evaluation"):
        evaluate_distributed(other, pool(workers=1, checkpoint_dir=tmp_path))


def test_saved_shares_of_other_weights_or_another_datastore_are_computed_again(knn, data, tmp_path, aio):
    """The job is the same by its paths and config, but a share is reused only when the model, the
    datastore's version and the token store are the ones it was computed with."""
    first = evaluate_distributed(job(knn, data), pool(workers=1, checkpoint_dir=tmp_path))
    saved = sorted(tmp_path.glob("share-*.json"))
    body = json.loads(saved[2].read_text())
    assert set(body["identity"]) == {"model", "datastore_version", "store"}
    body["identity"]["model"] = "lm:0000000000000000"  # as if a retrained model had been saved over it
    saved[2].write_text(json.dumps(body))
    ran: list[int] = []
    again = evaluate_distributed(job(knn, data), pool(workers=1, checkpoint_dir=tmp_path),
                                 on_share=lambda b: ran.append(b["share"]))
    assert ran == [2] and again.perplexity == first.perplexity
    ran.clear()  # the same source built again with another index: another datastore version, every share again
    rebuilt = build_source(knn[3] / "src", tmp_path / "rebuilt", shards=2, factory="IVF4,SQ8", progress=False)
    with serve(aio, rebuilt, 2) as served:
        moved = dataclasses.replace(job(knn, data), target=served.address)
        evaluate_distributed(moved, pool(workers=1, checkpoint_dir=tmp_path), on_share=lambda b: ran.append(b["share"]))
    assert sorted(ran) == list(range(len(saved)))
    versions = {json.loads(path.read_text())["identity"]["datastore_version"] for path in saved}
    assert len(versions) == 1 and body["identity"]["datastore_version"] not in versions  # all saved again


def test_saved_shares_follow_their_files_not_the_paths_that_named_them(knn, data, tmp_path):
    """The same model and token store under other paths (a run folder moved, a path spelled otherwise):
    the saved shares are theirs, and nothing is computed again."""
    first = evaluate_distributed(job(knn, data), pool(workers=1, checkpoint_dir=tmp_path / "shares"))
    moved = tmp_path / "moved"
    shutil.copytree(data / "heldout", moved / "heldout")
    shutil.copy(knn[0], moved / "model.pt")
    elsewhere = dataclasses.replace(job(knn, data), checkpoint=moved / "model.pt", store=moved / "heldout")
    ran: list[int] = []
    again = evaluate_distributed(elsewhere, pool(workers=1, checkpoint_dir=tmp_path / "shares"), on_share=ran.append)
    assert ran == [] and again.perplexity == first.perplexity


def test_a_store_with_nothing_to_evaluate_is_refused_clearly(knn, data, tmp_path):
    heldout = TokenStore.open(data / "heldout")
    write_token_store(tmp_path / "tiny", [("one", [])], eos_id=0, tokenizer_fingerprint=heldout.tokenizer_fingerprint)
    tiny = dataclasses.replace(job(knn, data), store=tmp_path / "tiny")
    with pytest.raises(ValueError, match="tiny: nothing to evaluate: the store holds 1 tokens, too few to score"):
        evaluate_distributed(tiny, pool(workers=1))


@pytest.fixture(scope="module")
def retro(cluster, knn, data, tmp_path_factory, aio):
    """A tiny RETRO checkpoint and its 2-shard datastore keyed by the LM's chunk encoder (which each
    worker finds from the datastore's metadata, as it would MiniLM), served; yields (checkpoint, model,
    encoder, address)."""
    from lm_worker.encoders.lm_chunks import LMChunkEncoder

    tmp = tmp_path_factory.mktemp("retro")
    torch.manual_seed(1)
    model = Retro(RetroConfig.tiny(vocab_size=300, chunk_len=L, n_neighbours=2)).eval()
    train = TokenStore.open(data / "train")
    checkpoint = save_checkpoint(tmp / "retro" / "model.pt", kind="retro", model=model, config=model.config, step=0,
                                 tokenizer_fingerprint=train.tokenizer_fingerprint, extra={})
    encoder = LMChunkEncoder.load(knn[0])
    encode_retro(train, encoder, L, tmp / "src", progress=False)
    datastore = build_source(tmp / "src", tmp / "ds", shards=2, factory="IVF4,Flat", progress=False)
    with serve(aio, datastore, 2) as served:
        yield checkpoint, model, encoder, served.address


def test_retro_two_workers_equal_one_worker(retro, data):
    config = dataclasses.replace(CONFIG, retrieval=RetrievalConfig(k=2, nprobe=4))
    retro_job = EvalJob(kind="retro", checkpoint=retro[0], store=data / "heldout", target=retro[3], config=config)
    one = evaluate_distributed(retro_job, pool(workers=1))
    two = evaluate_distributed(retro_job, pool(workers=2))
    assert (one.perplexity, one.perplexity_without, one.tokens) == (two.perplexity, two.perplexity_without, two.tokens)
    with ServiceRetriever(retro[3], config.retrieval) as retriever:
        torch.set_num_threads(1)
        reference = evaluate_retro(retro[1], TokenStore.open(data / "heldout"), retriever, retro[2], config, False)
    assert one.tokens == reference.tokens
    assert one.perplexity == pytest.approx(reference.perplexity, rel=1e-6)
    assert one.perplexity_without == pytest.approx(reference.perplexity_without, rel=1e-9)
    assert np.isfinite(one.perplexity) and one.perplexity != one.perplexity_without


def test_a_node_removed_mid_evaluation_changes_nothing(cluster, knn, data, tmp_path, caplog):
    c, workers = cluster
    one_batch_shares = dict(batches_per_share=1, progress=False)
    reference = evaluate_distributed(job(knn, data), WorkerPoolConfig(workers=1, **one_batch_shares))
    total = len(plan_shares(count_batches(TokenStore.open(data / "heldout"), CONFIG), 1))
    by_id = {w.node_id: w for w in workers}
    seen: dict[int, str] = {}  # worker pid -> node
    removed: list[str] = []
    counted: list[int] = []
    counted_replaced: list[int] = []

    def remove_a_worker_node(body: dict) -> None:
        counted.append(body["share"])
        counted_replaced.append(body["replaced"])
        seen[body["pid"]] = body["node"]
        if removed:
            return
        busy = [n for pid, n in seen.items() if pid != body["pid"]]  # the other worker, in the middle of a share
        if busy or len(counted) == 4:  # else this worker's node, just before it is handed its next share
            removed.append(busy[0] if busy else body["node"])
            c.remove_node(by_id[removed[0]], allow_graceful=False)
            for pid in [p for p, n in seen.items() if n == removed[0]]:  # a lost machine takes its processes
                with contextlib.suppress(ProcessLookupError):  # (an orphaned worker may not notice for a while)
                    os.kill(pid, signal.SIGKILL)

    with caplog.at_level(logging.WARNING, logger="lm_worker.evaluation.distributed"):
        result = evaluate_distributed(job(knn, data), WorkerPoolConfig(workers=2, checkpoint_dir=tmp_path,
                                                                        **one_batch_shares),
                                      on_share=remove_a_worker_node)
    assert removed
    assert counted_replaced[-1] >= 1, caplog.text  # the lost worker was noticed and replaced
    assert sorted(counted) == list(range(total))  # every share counted once
    assert result.perplexity == reference.perplexity and result.tokens == reference.tokens
    gone = time.monotonic() + 30  # the cluster knows the node lost before the module's next tests use it
    while any(n["NodeID"] == removed[0] and n["Alive"] for n in ray.nodes()) and time.monotonic() < gone:
        time.sleep(0.2)


def test_a_job_without_pointers_is_described_as_before_the_pointer_fields_existed():
    """Checkpointed shares of a job without pointers still match after `pointer_agreement` and
    `pointer_crowd` were added; a job with pointers is marked with how its chains run (each window a
    run of its own), so shares from when a batch was one run are refused."""
    plain = EvalJob(kind="knnlm", checkpoint=Path("lm.pt"), store=Path("heldout"), target="127.0.0.1:1")
    assert not {"pointer_agreement", "pointer_crowd", "pointer_runs"} & set(plain.describe()["config"])
    assert plain.describe()["config"]["pointer_steps"] == 0
    pointers = dataclasses.replace(plain, config=EvalConfig(pointer_steps=4, pointer_agreement=0.9, pointer_crowd=3))
    described = pointers.describe()["config"]
    assert (described["pointer_runs"], described["pointer_crowd"], described["pointer_agreement"]) == ("window", 3, 0.9)
    assert pointers.describe() != plain.describe()


def test_a_job_names_its_files_as_workers_in_other_folders_see_them(tmp_path, monkeypatch):
    """Workers run in folders of Ray's: a job's relative paths are made absolute (they named files there)."""
    monkeypatch.chdir(tmp_path)
    job = EvalJob(kind="retro", checkpoint=Path("retro"), store=Path("data/heldout"), target="127.0.0.1:1",
                  tokenizer=Path("data/tokenizer.json"), encoder_lm=Path("lm"))
    assert (job.checkpoint, job.store, job.tokenizer, job.encoder_lm) == (
        tmp_path / "retro", tmp_path / "data/heldout", tmp_path / "data/tokenizer.json", tmp_path / "lm")
    assert dataclasses.replace(job, tokenizer=None).tokenizer is None


def test_a_service_down_or_of_another_kind_is_refused_before_any_worker_starts(knn, retro, data, tmp_path):
    """The driver asks the service first, as an evaluation in one process does: its error in one line
    (a RetrieverError, a ValueError naming the kind), not a worker's traceback from Ray."""
    from retriever_server.client import RetrieverError

    shares = pool(workers=1, checkpoint_dir=tmp_path / "shares")
    with pytest.raises(RetrieverError, match="UNAVAILABLE"):
        evaluate_distributed(dataclasses.replace(job(knn, data), target="127.0.0.1:1"), shares)
    with pytest.raises(ValueError, match="a 'retro' datastore .*, not a kNN-LM one"):
        evaluate_distributed(dataclasses.replace(job(knn, data), target=retro[3]), shares)
    retro_job = EvalJob(kind="retro", checkpoint=retro[0], store=data / "heldout", target=knn[2], config=CONFIG)
    with pytest.raises(ValueError, match="a 'knnlm' datastore .*, not a RETRO one"):
        evaluate_distributed(retro_job, shares)
    foreign = write_token_store(tmp_path / "foreign", [("f", list(range(1, 200)))], 0, "bpe:another-tokenizer")
    with pytest.raises(ValueError, match=r"foreign was tokenized with bpe:another-tokenizer, but the datastore at "
                                         r".* holds tokens of tokenizer 'bpe:"):
        evaluate_distributed(dataclasses.replace(job(knn, data), store=foreign.directory), shares)
    assert not (tmp_path / "shares").exists()  # nothing written


def test_a_share_that_fails_in_a_worker_raises_the_workers_own_error(retro, data):
    """An error raised while a worker evaluates a share reaches the caller as that error (its type and
    message), not wrapped in Ray's task error with the remote traceback."""
    def failing_encoder():
        class Failing:
            def embed(self, windows):
                raise ValueError("the chunk encoder failed on purpose")

        return Failing()

    config = dataclasses.replace(CONFIG, retrieval=RetrievalConfig(k=2, nprobe=4))
    retro_job = EvalJob(kind="retro", checkpoint=retro[0], store=data / "heldout", target=retro[3], config=config,
                        encoder_factory=failing_encoder)
    with pytest.raises(ValueError, match="^the chunk encoder failed on purpose$"):
        evaluate_distributed(retro_job, pool(workers=1))


def _refusing_encoder():
    raise RuntimeError("no encoder on this worker")


def test_a_worker_that_fails_to_start_fails_the_evaluation_at_once(retro, data, caplog, by_value):
    """An error in a worker's own start (here its encoder) would fail every replacement alike: the evaluation
    stops at the first, naming it, instead of replacing workers until `max_replacements`."""
    config = dataclasses.replace(CONFIG, retrieval=RetrievalConfig(k=2, nprobe=4))
    retro_job = EvalJob(kind="retro", checkpoint=retro[0], store=data / "heldout", target=retro[3], config=config,
                        encoder_factory=_refusing_encoder)
    with pytest.raises(RuntimeError, match="an evaluation worker failed to start: .*no encoder on this worker"):
        evaluate_distributed(retro_job, pool(workers=1))
    assert "starting a replacement" not in caplog.text


def test_a_job_is_described_by_what_changes_its_results_alone(tmp_path):
    """How long a search may take and when it is sent change no result, nor do kNN-LM's mixing and pointers a
    RETRO evaluation: shares saved under other such settings, or by a marker that still records them, are
    reused; a setting that changes the results is refused."""
    knn = EvalJob(kind="knnlm", checkpoint=Path("lm.pt"), store=Path("heldout"), target="127.0.0.1:1")
    retro = dataclasses.replace(knn, kind="retro")
    patient = EvalConfig(overlap=False, retrieval=RetrievalConfig(timeout_s=5.0))
    mixing = EvalConfig(temperature=2.0, lambdas=(0.5,), pointer_steps=4)
    assert dataclasses.replace(knn, config=patient).describe() == knn.describe()
    assert dataclasses.replace(retro, config=patient).describe() == retro.describe()
    assert dataclasses.replace(retro, config=mixing).describe() == retro.describe()
    assert dataclasses.replace(knn, config=mixing).describe() != knn.describe()
    older = knn.describe()  # a marker written when the timeout and overlap were part of the job
    older["config"] = {**older["config"], "overlap": True, "retrieval": {**older["config"]["retrieval"],
                                                                          "timeout_s": 300.0}}
    (tmp_path / "job.json").write_text(json.dumps(older))
    assert not holds_another_job(knn.describe(), tmp_path)
    assert holds_another_job(dataclasses.replace(knn, config=EvalConfig(stride=64)).describe(), tmp_path)


def test_damaged_share_files_are_computed_again_and_a_damaged_marker_is_named(tmp_path, caplog):
    description = EvalJob(kind="knnlm", checkpoint=Path("lm.pt"), store=Path("heldout"), target="x").describe()
    assert open_saved(description, tmp_path) == {}  # writes the marker
    (tmp_path / "share-00000.json").write_text(json.dumps({"share": 0, "nll": 1.0}))
    (tmp_path / "share-00001.json").write_text("")  # cut short by a crash
    with caplog.at_level(logging.WARNING):
        assert list(open_saved(description, tmp_path)) == [0]
    assert "share-00001.json cannot be read" in caplog.text and "computed again" in caplog.text
    (tmp_path / "job.json").write_text('{"kind": "kn')
    with pytest.raises(ValueError, match=r"job.json cannot be read .*: remove .* or choose another checkpoint folder"):
        open_saved(description, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_service_retriever_that_finds_no_service_leaves_no_thread_or_socket():
    from retriever_server.client import RetrieverError

    before = threading.active_count()
    for _ in range(5):
        with pytest.raises(RetrieverError):
            ServiceRetriever(["127.0.0.1:1", "127.0.0.1:2"], RetrievalConfig(timeout_s=2.0))
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)  # polling, with a deadline: closed threads end
    assert threading.active_count() == before
