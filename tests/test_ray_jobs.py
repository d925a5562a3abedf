"""The jobs as `ray job submit -- python -m ...` runs them: each entry point is started as its own
process with RAY_ADDRESS naming a running cluster (what the job agent sets), here a simulated 2-node
one; it builds a datastore and evaluates it on 2 LM worker actors, and the figures are checked against
an in-process evaluation of the same model and datastore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import simulated_cluster

from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.data.tokenizer import train_tokenizer
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.sources.knnlm import encode_knnlm

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(workers=1, cpus=2) as c:
        yield c


def run_job(cluster, *args: str, timeout_s: float = 240) -> str:
    """Runs `python -m ARGS` as a submitted job's entry point (RAY_ADDRESS set, from the repository root);
    returns its output, failing with it unless the job succeeds."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """data/ (tokenizer, train, heldout), lm/ (a tiny LM) and knnlm-source/ (its keys, in one process)."""
    tmp = tmp_path_factory.mktemp("run")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("bisect.py", "heapq.py", "colorsys.py")]
    tokenizer = train_tokenizer(texts[:2], vocab_size=300)
    tokenizer.save(tmp / "data" / "tokenizer.json")
    fp, eos = tokenizer.fingerprint, tokenizer.eos_id
    train = write_token_store(tmp / "data" / "train", [(f"t{i}", tokenizer.encode(t)[:1500])
                                                       for i, t in enumerate(texts[:2])], eos, fp)
    write_token_store(tmp / "data" / "heldout", [("h0", tokenizer.encode(texts[2])[:600])], eos, fp)
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(vocab_size=300, max_len=64)).eval()
    save_checkpoint(tmp / "lm" / "checkpoint.pt", kind="lm", model=lm, config=lm.config, step=0,
                    tokenizer_fingerprint=fp, extra={})
    encode_knnlm(lm, train, tmp / "knnlm-source", context_len=32, stride=16, progress=False)
    return tmp


def test_build_and_distributed_eval_as_submitted_jobs(cluster, run):
    run_job(cluster, "lm_worker.cli", "--no-progress", "build", str(run / "knnlm-source"), "--out", str(run / "ds"),
            "--shards", "2", "--factory", "IVF8,Flat")
    rows = len(TokenStore.open(run / "data" / "train")) - 1
    assert json.loads((run / "ds" / "manifest.json").read_text())["ntotal"] == rows
    out = run_job(cluster, "lm_worker.cli", "--no-progress", "eval", "--data", str(run / "data"), "--out",
                  str(run / "eval"), "--lm", str(run / "lm"), "--knnlm-datastore", str(run / "ds"), "--knnlm-k", "16",
                  "--knnlm-nprobe", "8", "--context-len", "32", "--stride", "16", "--lambdas", "0,0.25,0.5",
                  "--workers", "2", "--worker-cpus", "0.5")
    assert "kNN-LM" in out
    body = json.loads((run / "eval" / "eval.json").read_text())
    shares = [json.loads(p.read_text()) for p in (run / "eval" / "shares" / "knnlm").glob("share-*.json")]
    assert shares and {s["node"] for s in shares} <= {n.node_id for n in cluster.list_all_nodes()}  # on the cluster
    config = EvalConfig(context_len=32, stride=16, lambdas=(0.0, 0.25, 0.5), retrieval=RetrievalConfig(k=16, nprobe=8))
    lm = TransformerLM(LMConfig.tiny(vocab_size=300, max_len=64))
    lm.load_state_dict(torch.load(run / "lm" / "checkpoint.pt", weights_only=False)["model"])
    with InProcessRetriever(run / "ds", config.retrieval) as retriever:
        reference = evaluate_knnlm(lm.eval(), TokenStore.open(run / "data" / "heldout"), retriever, config, False)
    assert body["knnlm"]["tokens"] == reference.tokens
    for lam in config.lambdas:
        assert body["knnlm"]["perplexity"][str(lam)] == pytest.approx(reference.perplexity[lam], rel=1e-6)
