"""The kNN-LM datastore-size benchmark on a tiny pipeline run (real stdlib code, a tiny LM trained for a
few steps): the train-split prefixes, the whole train split (the run's own datastore, reused) and the
train+retro union, encoded by the encode job and built by the build job. Its largest store against
an exact float64 search over keys encoded independently by the plain loop, and its values against
the token streams."""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_pipeline_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from knnlm_size import RETRO_ALONE, TRAIN, TRAIN_PREFIX, TRAIN_RETRO, SizeBenchConfig, run  # noqa: E402

from lm_worker.data.token_store import RETRO_SPLIT, TokenStore  # noqa: E402
from lm_worker.evaluation.config import EvalConfig  # noqa: E402
from lm_worker.evaluation.knnlm_eval import evaluate_knnlm, evaluate_lm  # noqa: E402
from lm_worker.models.checkpoint import load_checkpoint  # noqa: E402
from lm_worker.retrieval.config import KnnNeighbours, RetrievalConfig  # noqa: E402
from lm_worker.sources.build import build_source  # noqa: E402
from lm_worker.sources.knnlm import encode_knnlm  # noqa: E402
from lm_worker.sources.source import read_source  # noqa: E402
from retriever_server.datastore.manifest import read_manifest  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # about 15 s on 2 cores (40 s beside other work)

WINDOW, STRIDE, K, TOKENS = 64, 32, 16, 1024
PREFIXES = (1000, 3000)


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory) -> Path:
    """RUN as the pipeline lays it out: data (train, retro, heldout cut into valid and test), a tiny LM
    trained 40 steps, the train split's kNN-LM source and its 2-shard datastore."""
    run_dir = tiny_pipeline_run(tmp_path_factory.mktemp("knnlm-size") / "run", lm_steps=40, seq_len=WINDOW)
    data = run_dir / "data"
    lm = load_checkpoint(run_dir / "lm" / "checkpoint.pt").model
    encode_knnlm(lm, TokenStore.open(data / "train"), run_dir / "knnlm-source", WINDOW, STRIDE, progress=False)
    build_source(run_dir / "knnlm-source", run_dir / "knnlm-datastore", shards=2, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory) -> tuple[SizeBenchConfig, dict]:
    out = tmp_path_factory.mktemp("knnlm-size-out")
    config = SizeBenchConfig(run=tiny_run, out=out, tokens=TOKENS, prefixes=PREFIXES, k=K, nprobe=10 ** 6,
                             encode_workers=1, retro_alone=True, progress=False)
    return config, run(config)


class ExactRetriever:
    """Exact float64 L2 search over given keys and values: the reference the datastores must equal."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, k: int):
        self.keys, self.values, self.k = keys.astype(np.float64), values.astype(np.int64), k
        self.dimension, self.ntotal = keys.shape[1], len(keys)
        self.config = RetrievalConfig(k=k)  # a retriever's config sets its k

    def knn(self, queries: np.ndarray, exclude=None) -> KnnNeighbours:
        q = queries.astype(np.float64)  # (n, d)
        d = (q ** 2).sum(1)[:, None] - 2 * q @ self.keys.T + (self.keys ** 2).sum(1)[None]  # (n, N)
        ids = np.argsort(d, axis=1, kind="stable")[:, :self.k]  # (n, k)
        return KnnNeighbours(np.take_along_axis(d, ids, 1).astype(np.float32), self.values[ids], ids)

    def submit_knn(self, queries: np.ndarray, exclude=None) -> Future:
        future: Future = Future()
        future.set_result(self.knn(queries, exclude))
        return future


def streams(run_dir: Path) -> list[TokenStore]:
    return [TokenStore.open(run_dir / "data" / split) for split in ("train", RETRO_SPLIT)]


def test_sizes_grow_to_train_plus_retro_and_every_perplexity_is_finite(measured):
    config, results = measured
    rows = results["rows"]
    train, retro = streams(config.run)
    assert [r["source"] for r in rows] == [TRAIN_PREFIX, TRAIN_PREFIX, TRAIN, RETRO_ALONE, TRAIN_RETRO]
    alone, rows = rows[3], rows[:3] + rows[4:]
    keys = [r["keys"] for r in rows]
    assert keys == sorted(set(keys)) and keys[:2] == list(PREFIXES)
    assert keys[2] == len(train) - 1 and keys[3] == (len(train) - 1) + (len(retro) - 1)
    assert read_manifest(config.out / "stores" / TRAIN_RETRO / "datastore").ntotal == keys[3]
    assert alone["keys"] == len(retro) - 1  # the retro split's source, as encoded, built on its own
    assert read_manifest(config.out / "stores" / "retro-alone" / "datastore").ntotal == alone["keys"]
    assert math.isfinite(alone["knn_perplexity"]) and alone["base_perplexity"] == rows[0]["base_perplexity"]
    for r in rows:
        for name in ("knn_perplexity", "base_perplexity", "test_perplexity_at_valid_lambda", "valid_perplexity"):
            assert math.isfinite(r[name]) and r[name] > 1, (r["name"], name)
        assert r["test_tokens"] == TOKENS and r["nprobe"] == r["nlist"]  # every list probed: exact search
    assert rows[2]["built_seconds"] == 0  # the run's own datastore of the train split, reused
    saved = json.loads((config.out / "knnlm_size.json").read_text())
    assert saved["rows"] == results["rows"]
    assert (config.out / "knnlm_size.png").stat().st_size > 10_000


def test_the_union_lines_up_keys_and_values_with_an_independent_encoding(measured, tmp_path):
    config, _ = measured
    train, retro = streams(config.run)
    lm = load_checkpoint(config.run / "lm" / "checkpoint.pt").model
    plain = encode_knnlm(lm, retro, tmp_path / "retro", WINDOW, STRIDE, progress=False)  # the loop, not the job
    union = read_source(config.out / "stores" / TRAIN_RETRO / "source")
    want_keys = np.concatenate([np.load(config.run / "knnlm-source" / "keys.npy"), np.load(plain.keys_path)])
    np.testing.assert_allclose(np.asarray(union.open_keys()), want_keys, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(union.open_payload()),
                                  np.concatenate([np.asarray(train.tokens[1:]), np.asarray(retro.tokens[1:])]))


def test_the_largest_store_equals_exact_search_and_helps(measured, tmp_path):
    config, results = measured
    largest = results["rows"][-1]
    train, retro = streams(config.run)
    lm = load_checkpoint(config.run / "lm" / "checkpoint.pt").model
    plain = encode_knnlm(lm, retro, tmp_path / "retro", WINDOW, STRIDE, progress=False)
    keys = np.concatenate([np.load(config.run / "knnlm-source" / "keys.npy"), np.load(plain.keys_path)])
    values = np.concatenate([np.asarray(train.tokens[1:]), np.asarray(retro.tokens[1:])])
    evaluation = EvalConfig(context_len=WINDOW, stride=STRIDE, max_tokens=TOKENS, temperature=largest["temperature"],
                            retrieval=RetrievalConfig(k=K))
    test = TokenStore.open(config.run / "data" / "test")
    want = evaluate_knnlm(lm, test, ExactRetriever(keys, values, K), evaluation, progress=False)
    got = {float(lam): p for lam, p in largest["perplexity_by_lambda"].items()}
    assert got.keys() == want.perplexity.keys()
    for lam, p in want.perplexity.items():
        assert got[lam] == pytest.approx(p, rel=1e-6), lam  # float32 FAISS vs float64 distances: ~1e-9 seen
    base, tokens = evaluate_lm(lm, test, evaluation, progress=False)
    assert tokens == TOKENS and all(r["base_perplexity"] == base for r in results["rows"])
    # λ = 0 is in the sweep, so the best λ never loses to the LM; the λ chosen on validation text may,
    # by as much as the validation and test text differ: here retrieval over code the tiny LM barely
    # learned gains far more than that, so it must not lose either
    assert largest["knn_perplexity"] <= base
    assert largest["test_perplexity_at_valid_lambda"] < base
    # 7.5 times the smallest prefix's keys: more of the test text's patterns are in the store (seen: 64.9 against 90.9)
    assert largest["knn_perplexity"] < results["rows"][0]["knn_perplexity"]
