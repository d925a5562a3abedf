"""`lm-worker eval` and the evaluation API, as reviewed: a ray:NAME target is found on the cluster --address
names (with or without --workers), a job's TLS and token files are named as workers in other folders see
them, RETRO's encoder and shares folder are checked before the kNN-LM evaluation, --encoder-lm without
--retro is refused, a serial kNN-LM evaluation counts its waits, and the pipeline says where it evaluates
and how long it takes only where that is known. Tiny artefacts, no servers, no Ray cluster."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stdlib_data

import retriever_server.cluster.connect as cluster_connect
import retriever_server.cluster.ray_serving as ray_serving
from lm_worker.cli import main
from lm_worker.data.token_store import TokenStore
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.evaluation import distributed
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.distributed import EvalJob, WorkerPoolConfig, evaluate_distributed
from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.pipeline.config import PipelineConfig
from lm_worker.retrieval.config import KnnNeighbours, RetrievalConfig
from lm_worker.retrieval.service import ClientSecurity

QUIET = ["--no-progress", "--log-level", "WARNING"]


class Stopped(ValueError):
    """Raised by the recording `connect`: the command stops there, in one line."""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN/data (real stdlib text, a 300-token BPE) and untrained tiny RUN/lm and RUN/retro checkpoints."""
    root = tmp_path_factory.mktemp("eval-review")
    stdlib_data(root / "data", vocab_size=300, chars=3000)
    tokenizer = Tokenizer.load(root / "data" / "tokenizer.json")
    torch.manual_seed(0)
    for kind, model in (("lm", TransformerLM(LMConfig.tiny(tokenizer.vocab_size))),
                        ("retro", Retro(RetroConfig.tiny(tokenizer.vocab_size)))):
        save_checkpoint(root / kind / "checkpoint.pt", kind=kind, model=model, config=model.config, step=0,
                        tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    return root


@pytest.fixture
def connects(monkeypatch) -> list[tuple]:
    """Every call to Ray's `connect` (the project's), recorded; the first stops the command."""
    calls: list[tuple] = []

    def recording(address=None, num_cpus=None, existing=False, **kwargs):
        calls.append((address, existing))
        raise Stopped("stopped at connect")

    for module in (cluster_connect, ray_serving, distributed):
        monkeypatch.setattr(module, "connect", recording)
    return calls


def one_line_error(capsys, *args: str) -> str:
    code = main([*QUIET, *args])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def fake_datastore(path: Path, metadata: dict) -> Path:
    """A folder whose manifest holds `metadata` and nothing else: serving it fails, so an error about
    anything else proves the command refused before it served the datastore."""
    path.mkdir(exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"metadata": metadata}))
    return path


# 1. --address finds a ray:NAME target's deployment

@pytest.mark.parametrize("workers", ["0", "1"])
def test_eval_looks_a_ray_target_up_on_the_cluster_address_names(run, tmp_path, capsys, connects, workers):
    err = one_line_error(capsys, "eval", "--data", str(run / "data"), "--out", str(tmp_path / "e"), "--lm",
                         str(run / "lm"), "--knnlm-target", "ray:wiki", "--address", "127.0.0.1:6390",
                         "--workers", workers)
    assert err == "lm-worker eval: error: stopped at connect"
    assert connects == [("127.0.0.1:6390", True)]  # joined there, the first time Ray is touched


def test_eval_refuses_an_address_without_workers_or_a_ray_target(run, tmp_path, capsys, connects):
    err = one_line_error(capsys, "eval", "--data", str(run / "data"), "--out", str(tmp_path / "e"), "--lm",
                         str(run / "lm"), "--knnlm-target", "127.0.0.1:1", "--address", "auto")
    assert err == ("lm-worker eval: error: --address applies with --workers N > 0 only (without, the evaluation "
                   "runs in this process; --address also finds a ray:NAME target's deployment): give --workers, or "
                   "leave it out")
    assert connects == []


def test_a_distributed_evaluation_of_a_ray_target_joins_the_running_cluster(run, connects):
    """A ray:NAME deployment runs on a cluster already up: without an address the evaluation joins
    RAY_ADDRESS's or the one `ray start` made, never a new local cluster where no deployment can be."""
    job = EvalJob(kind="knnlm", checkpoint=run / "lm", store=run / "data" / "heldout", target="ray:wiki",
                  config=EvalConfig(context_len=32, stride=16))
    for address in (None, "10.0.0.1:6379"):
        with pytest.raises(Stopped):
            evaluate_distributed(job, WorkerPoolConfig(workers=1, address=address, num_cpus_local=2, progress=False))
    assert connects == [(None, True), ("10.0.0.1:6379", True)]


# 2. TLS and token files as workers in other folders see them

def test_a_jobs_tls_and_token_files_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    security = ClientSecurity(tls_ca=Path("secrets/ca.pem"), tls_cert=Path("secrets/client.pem"),
                              tls_key=Path("secrets/client.key"), token_file=Path("secrets/token"),
                              server_name="retriever")
    job = EvalJob(kind="knnlm", checkpoint=Path("lm"), store=Path("data/heldout"), target="127.0.0.1:1",
                  security=security)
    assert job.security == replace(security, tls_ca=tmp_path / "secrets/ca.pem",
                                   tls_cert=tmp_path / "secrets/client.pem", tls_key=tmp_path / "secrets/client.key",
                                   token_file=tmp_path / "secrets/token")
    assert EvalJob(kind="knnlm", checkpoint=Path("lm"), store=Path("s"), target="x").security is None
    partial = EvalJob(kind="knnlm", checkpoint=Path("lm"), store=Path("s"), target="x",
                      security=ClientSecurity(token_file=Path("t")))
    assert (partial.security.token_file, partial.security.tls_ca) == (tmp_path / "t", None)


# 3. RETRO's errors before the kNN-LM evaluation

def test_a_retro_encoder_that_cannot_be_made_is_refused_before_the_knnlm_evaluation(run, tmp_path, capsys):
    knn = fake_datastore(tmp_path / "kds", {"kind": "knnlm"})
    moved = str(tmp_path / "moved-lm")
    rds = fake_datastore(tmp_path / "rds", {"kind": "retro", "encoder": "lm-last:lm:0123abcd",
                                            "encoder_checkpoint": moved})
    err = one_line_error(capsys, "eval", "--data", str(run / "data"), "--out", str(tmp_path / "e"), "--lm",
                         str(run / "lm"), "--knnlm-datastore", str(knn), "--retro", str(run / "retro"),
                         "--retro-datastore", str(rds), "--context-len", "32", "--stride", "16")
    assert err == (f"lm-worker eval: error: the datastore's keys were made by the LM 'lm-last:lm:0123abcd' from the "
                   f"checkpoint {moved!r}, which is not here: pass the base LM's checkpoint with --encoder-lm "
                   "(lm_checkpoint=)")


def test_a_retro_shares_folder_of_another_job_is_refused_before_the_knnlm_evaluation(run, tmp_path, capsys):
    knn = fake_datastore(tmp_path / "kds", {"kind": "knnlm"})
    rds = fake_datastore(tmp_path / "rds", {"kind": "retro"})
    shares = tmp_path / "e" / "shares" / "retro"
    shares.mkdir(parents=True)
    (shares / "job.json").write_text(json.dumps({"kind": "retro", "config": {"stride": 999}}))
    err = one_line_error(capsys, "eval", "--data", str(run / "data"), "--out", str(tmp_path / "e"), "--lm",
                         str(run / "lm"), "--knnlm-datastore", str(knn), "--retro", str(run / "retro"),
                         "--retro-datastore", str(rds), "--context-len", "32", "--stride", "16", "--workers", "1")
    assert err == (f"lm-worker eval: error: {shares} holds the shares of a different evaluation ({shares / 'job.json'} "
                   "differs): remove it or choose another checkpoint folder")
    assert not (tmp_path / "e" / "shares" / "knnlm").exists()


# 5. --encoder-lm without --retro

def test_eval_refuses_an_encoder_lm_without_retro(run, tmp_path, capsys):
    err = one_line_error(capsys, "eval", "--data", str(run / "data"), "--out", str(tmp_path / "e"), "--lm",
                         str(run / "lm"), "--knnlm-target", "127.0.0.1:1", "--encoder-lm", str(run / "lm"))
    assert err == ("lm-worker eval: error: --encoder-lm applies to the RETRO evaluation only: give --retro, or "
                   "leave it out")


# 6. a serial kNN-LM evaluation waits for every search

class SlowRetriever:
    """Neighbours at random, each search taking `delay` seconds."""

    def __init__(self, dimension: int, delay: float, k: int = 4):
        self.dimension, self.ntotal, self.delay = dimension, 1000, delay
        self.config, self.metadata = RetrievalConfig(k=k), {}

    def knn(self, queries: np.ndarray, exclude=None) -> KnnNeighbours:
        time.sleep(self.delay)
        rng = np.random.default_rng(len(queries))
        n, k = len(queries), self.config.k
        return KnnNeighbours(rng.random((n, k), dtype=np.float32), rng.integers(0, 300, (n, k)),
                             rng.integers(0, 1000, (n, k)))

    def submit_knn(self, queries: np.ndarray, exclude=None) -> Future:
        future: Future = Future()
        future.set_result(self.knn(queries, exclude))
        return future


def test_a_serial_knnlm_evaluation_counts_its_searches_as_waits(run):
    store = TokenStore.open(run / "data" / "heldout")
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(300)).eval()
    delay = 0.02
    config = EvalConfig(context_len=32, stride=16, batch_size=4, max_tokens=200, overlap=False)
    result = evaluate_knnlm(lm, store, SlowRetriever(32, delay), config, progress=False)
    searches = result.retrieval_seconds / delay  # each search's time counted once
    assert searches >= 2
    assert result.retrieval_wait_seconds >= result.retrieval_seconds * 0.99  # the driver blocked on every one


# 4. the pipeline's announcement

def test_the_pipeline_says_where_it_evaluates():
    assert "evaluate both in this process;" in PipelineConfig(eval_workers=0).describe()
    assert "evaluate both on 3 LM worker actors;" in PipelineConfig(eval_workers=3).describe()
    assert "0 LM worker actors" not in PipelineConfig.quick(eval_workers=0).describe()


@pytest.mark.parametrize("flags, minutes", [
    ([], "About 51 minutes"), (["--lm-steps", "5000"], None), (["--retro-steps", "10"], None),
    (["--preset", "tiny"], None), (["--workers", "0"], None)])
def test_the_pipeline_gives_its_time_for_its_stock_sizes_alone(tmp_path, monkeypatch, capsys, flags, minutes):
    import lm_worker.pipeline.run as pipeline_run

    def stop(config):
        raise ValueError("stopped before the work")

    monkeypatch.setattr(pipeline_run, "run_pipeline", stop)
    assert main([*QUIET, "pipeline", "--run", str(tmp_path / "run"), *flags]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"pipeline into {tmp_path / 'run'}: prepare the corpus;")
    if minutes:
        assert f"{minutes} on 2 CPU cores from an empty run folder" in out
    else:
        assert "minute" not in out and "the report. A rerun reuses what is there." in out


@pytest.mark.parametrize("quick, minutes", [(False, "About 5 minutes"), (True, "About 1 minute ")])
def test_the_demo_gives_its_time_for_its_stock_sizes_alone(tmp_path, monkeypatch, capsys, quick, minutes):
    import lm_worker.pipeline.run as pipeline_run

    monkeypatch.setattr(pipeline_run, "run_pipeline", lambda config: (_ for _ in ()).throw(ValueError("stop")))
    extra = ["--quick"] if quick else []
    assert main([*QUIET, "demo", "--run", str(tmp_path / "a"), *extra]) == 1
    assert minutes in capsys.readouterr().out
    assert main([*QUIET, "demo", "--run", str(tmp_path / "b"), "--retro-encoder", "minilm", *extra]) == 1
    assert "minute" not in capsys.readouterr().out
