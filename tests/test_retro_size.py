"""The RETRO datastore-size benchmark on a tiny run (real stdlib code, a tiny LM trained a few steps as
the chunk encoder, a RETRO model at its seeded initialisation): train-split prefixes, the run's own
store (reused) and the train+retro union, embedded by the encode job. The union against the chunks
embedded again by the plain loop, and its RETRO perplexity against an exact float64 search over those."""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from retro_size import TRAIN, TRAIN_PREFIX, TRAIN_RETRO, RetroSizeConfig, run  # noqa: E402

from lm_worker.data.token_store import RETRO_SPLIT, TokenStore  # noqa: E402
from lm_worker.data.tokenizer import Tokenizer  # noqa: E402
from lm_worker.encoders.registry import make_chunk_encoder  # noqa: E402
from lm_worker.evaluation.config import EvalConfig  # noqa: E402
from lm_worker.evaluation.retro_eval import evaluate_retro  # noqa: E402
from lm_worker.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lm_worker.models.retro import Retro, RetroConfig  # noqa: E402
from lm_worker.pipeline.config import PipelineConfig  # noqa: E402
from lm_worker.retrieval.config import RetrievalConfig  # noqa: E402
from lm_worker.sources.build import build_source  # noqa: E402
from lm_worker.sources.retro import encode_retro  # noqa: E402
from lm_worker.sources.source import read_source  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

L, WINDOW, STRIDE, TOKENS = 8, 64, 32, 1024
K = PipelineConfig().n_neighbours
PREFIXES = (100, 300)


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory) -> Path:
    """RUN as the pipeline lays it out: data, a tiny LM (the chunk encoder), the train split's RETRO
    source and 2-shard store, and a RETRO checkpoint at its seeded initialisation."""
    run_dir = tiny_pipeline_run(tmp_path_factory.mktemp("retro-size") / "run", lm_steps=10, seq_len=WINDOW)
    data = run_dir / "data"
    tokenizer = Tokenizer.load(data / "tokenizer.json")
    encoder = make_chunk_encoder("lm", tokenizer, run_dir / "lm" / "checkpoint.pt")
    encode_retro(TokenStore.open(data / "train"), encoder, L, run_dir / "retro-source", progress=False)
    build_source(run_dir / "retro-source", run_dir / "retro-datastore", shards=2, progress=False)
    torch.manual_seed(0)
    retro = Retro(RetroConfig.tiny(vocab_size=tokenizer.vocab_size, chunk_len=L, n_neighbours=K))
    save_checkpoint(run_dir / "retro" / "checkpoint.pt", kind="retro", model=retro, config=retro.config, step=0,
                    tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    return run_dir


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory) -> tuple[RetroSizeConfig, dict]:
    out = tmp_path_factory.mktemp("retro-size-out")
    config = RetroSizeConfig(run=tiny_run, out=out, tokens=TOKENS, prefixes=PREFIXES, knnlm=None, context_len=WINDOW,
                             stride=STRIDE, nprobe=10 ** 6, encode_workers=1, device="cpu", progress=False)
    return config, run(config)


class ExactChunks:
    """Exact float64 L2 search over given chunk keys, answering with their payload tokens: the reference."""

    def __init__(self, keys: np.ndarray, tokens: np.ndarray, k: int):
        self.keys, self.tokens = keys.astype(np.float64), tokens.astype(np.int64)
        self.config = RetrievalConfig(k=k)
        self.ntotal = len(keys)

    def submit_chunks(self, embeddings: np.ndarray, exclude=None) -> Future:
        q = embeddings.astype(np.float64)  # (n, d)
        d = (q ** 2).sum(1)[:, None] - 2 * q @ self.keys.T + (self.keys ** 2).sum(1)[None]  # (n, N)
        ids = np.argsort(d, axis=1, kind="stable")[:, :self.config.k]  # (n, k)
        future: Future = Future()
        future.set_result(self.tokens[ids])  # (n, k, 2L)
        return future


def test_sizes_grow_to_train_plus_retro_with_one_model(measured):
    config, results = measured
    rows = results["rows"]
    train = read_source(config.run / "retro-source")
    union = read_source(config.out / "stores" / TRAIN_RETRO / "source")
    assert [r["source"] for r in rows] == [TRAIN_PREFIX, TRAIN_PREFIX, TRAIN, TRAIN_RETRO]
    assert [r["chunks"] for r in rows] == [*PREFIXES, train.rows, union.rows]
    assert union.rows == train.rows + len(TokenStore.open(config.run / "data" / RETRO_SPLIT)) // L
    assert rows[2]["built_seconds"] == 0  # the run's own store of the train split, reused
    without = rows[0]["perplexity_without"]
    for r in rows:
        assert r["tokens"] == TOKENS and r["nprobe"] == r["nlist"]  # every list probed
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert math.isclose(r["perplexity_without"], without, rel_tol=1e-9)  # the same model and tokens
    saved = json.loads((config.out / "retro_size.json").read_text())
    assert saved["rows"] == rows
    assert (config.out / "quality_size.png").stat().st_size > 10_000


def test_the_union_equals_the_plain_loop_and_its_perplexity_exact_search(measured, tmp_path):
    config, results = measured
    encoder = make_chunk_encoder("lm", Tokenizer.load(config.run / "data" / "tokenizer.json"),
                                 config.run / "lm" / "checkpoint.pt")
    plain = encode_retro(TokenStore.open(config.run / "data" / RETRO_SPLIT), encoder, L, tmp_path / "retro",
                         progress=False)  # the loop, not the job
    train = read_source(config.run / "retro-source")
    union = read_source(config.out / "stores" / TRAIN_RETRO / "source")
    keys = np.concatenate([np.asarray(train.open_keys()), np.asarray(plain.open_keys())])
    tokens = np.concatenate([np.asarray(train.open_payload()), np.asarray(plain.open_payload())])
    np.testing.assert_allclose(np.asarray(union.open_keys()), keys, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(union.open_payload()), tokens)

    retro = load_checkpoint(config.run / "retro" / "checkpoint.pt").model.eval()
    evaluation = EvalConfig(context_len=WINDOW, stride=STRIDE, max_tokens=TOKENS, retrieval=RetrievalConfig(k=K))
    exact = evaluate_retro(retro, TokenStore.open(config.run / "data" / "test"), ExactChunks(keys, tokens, K),
                           encoder, evaluation, progress=False)
    largest = results["rows"][-1]
    assert math.isclose(largest["perplexity"], exact.perplexity, rel_tol=1e-6), (largest["perplexity"], exact)
    assert math.isclose(largest["perplexity_without"], exact.perplexity_without, rel_tol=1e-9)
