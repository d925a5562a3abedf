"""kNN-LM at the edges of λ and of the neighbours' distances, against float64 references computed
position by position: λ = 1 at searched positions while followed ones are impossible there; neighbours
so far that exp(-d / T) underflows in float32."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import knn_result_impossible_at_one

import lm_worker.evaluation.knnlm_eval as knnlm_eval
from lm_worker.data.token_store import write_token_store
from lm_worker.evaluation.batches import count_batches
from lm_worker.evaluation.combine import combine_knn, knn_result
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.knnlm import interpolate, knn_log_probs, knn_target_log_prob, mix_log_probs
from lm_worker.evaluation.knnlm_eval import at_lambdas, evaluate_knnlm
from lm_worker.evaluation.report import write_report
from lm_worker.evaluation.shares import current
from lm_worker.retrieval.config import KnnNeighbours, RetrievalConfig

V, DIM = 16, 4  # vocabulary, key dimension
LAMBDAS = (0.0, 0.5, 1.0)


class UniformLM(torch.nn.Module):
    """p_LM = 1 / V for every token: the float64 reference needs no model."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor, return_keys: bool = False):
        B, T = tokens.shape
        return torch.zeros(B, T, V) + 0 * self.anchor, torch.zeros(B, T, DIM)  # (B, T, V), (B, T, d)


class NoSearch:
    """A retriever every neighbour of which comes from the patched pointer follower."""

    dimension, config = DIM, RetrievalConfig(k=2)

    def knn(self, *args, **kwargs):
        raise AssertionError("not searched: the pointer follower gives every neighbour")


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    docs = [(f"doc{i}", rng.integers(1, V, n).tolist()) for i, n in enumerate((23, 17))]
    return write_token_store(tmp_path / "store", docs, 0, "test")


def pointed(keys, targets, positions, search, steps, min_pointers, **options):
    """Every third position followed, its one chain on another token than its target (impossible at λ = 1);
    every other one searched, its nearer neighbour on its target (certain at λ = 1)."""
    followed = positions % 3 == 0  # (n,)
    values = np.stack([np.where(followed, (targets + 1) % V, targets), (targets + 2) % V], axis=1)  # (n, 2)
    distances = np.tile(np.array([0.0, 1.0], np.float32), (len(targets), 1))  # (n, 2)
    return KnnNeighbours(distances, values.astype(np.int64), np.zeros_like(values, dtype=np.int64)), followed


def reference_nll(positions: np.ndarray, temperature: float) -> dict:
    """float64 NLL per position and λ: searched positions' p_kNN(target) is 1 / (1 + exp(-1 / T)), the
    followed ones' 0, p_LM = 1 / V everywhere."""
    followed = positions % 3 == 0
    p_knn = np.where(followed, 0.0, 1.0 / (1.0 + math.exp(-1.0 / temperature)))
    with np.errstate(divide="ignore"):
        return {lam: -np.log(lam * p_knn + (1 - lam) / V) for lam in LAMBDAS}


def test_lambda_one_is_the_searched_positions_best_while_followed_ones_are_impossible_there(store, monkeypatch,
                                                                                          tmp_path):
    """λ = 1 at searched positions, where every one is finite, is their best pair member although every
    position's λ = 1 total is inf (a followed position is impossible there); combined halves and `at_lambdas`
    agree, and the report shows the searched positions' figure."""
    monkeypatch.setattr(knnlm_eval, "follow_pointers", pointed)
    config = EvalConfig(context_len=8, stride=4, batch_size=2, lambdas=LAMBDAS, pointer_steps=2)
    result = evaluate_knnlm(UniformLM(), store, NoSearch(), config, progress=False)
    positions = np.arange(result.tokens)  # every position scored, in order
    nll = reference_nll(positions, config.temperature)
    followed = positions % 3 == 0
    assert result.searched == (~followed).sum() and math.isinf(result.nll[1.0])
    searched = {lam: nll[lam][~followed].sum() for lam in LAMBDAS}
    best = min(searched[lam] for lam in LAMBDAS) + min(nll[lam][followed].sum() for lam in LAMBDAS)
    assert (result.best_lambda, result.followed_lambda) == (1.0, 0.0)
    assert result.best_perplexity == pytest.approx(math.exp(best / result.tokens), rel=1e-6)
    for lam in LAMBDAS:
        assert result.searched_nll[lam] == pytest.approx(searched[lam], rel=1e-6)

    n = count_batches(store, config)
    halves = [evaluate_knnlm(UniformLM(), store, NoSearch(), config, progress=False, batches=r)
              for r in (range(0, n // 2), range(n // 2, n))]
    combined = combine_knn([knn_result(json.loads(json.dumps(h.to_dict()))) for h in halves], seconds=1.0)
    assert (combined.best_lambda, combined.followed_lambda, combined.searched) == (1.0, 0.0, result.searched)
    assert combined.best_perplexity == pytest.approx(result.best_perplexity, rel=1e-9)

    chosen = at_lambdas(result, 1.0, 0.5, "valid")
    at = searched[1.0] + nll[0.5][followed].sum()
    assert chosen.best_perplexity == pytest.approx(math.exp(at / result.tokens), rel=1e-6)
    write_report(tmp_path / "report", chosen, None, {})  # the plot's searched share is finite: drawn


def test_a_result_without_searched_sums_takes_them_as_before():
    """A result made before results kept the searched positions' own sums (no `searched_nll`) takes them as
    every position's less the followed ones' (inf wherever every position's is): as those results did."""
    result = knn_result_impossible_at_one()
    assert result.searched_nll == {0.0: 400.0, 0.5: 370.0, 1.0: math.inf}
    body = result.to_dict()
    del body["searched_nll"]
    unpointed = {**body, "searched": 100, "followed_nll": {lam: 0.0 for lam in body["nll"]}}
    assert knn_result(unpointed).searched_nll == {0.0: 500.0, 0.5: 450.0, 1.0: math.inf}  # exact: none followed


def test_saved_shares_with_followed_positions_but_no_searched_sums_are_computed_again(caplog):
    """A kNN-LM share saved before shares kept the searched positions' own sums cannot give them where it
    followed pointers and a sum is inf: it is computed again. One whose sums are finite (their difference is
    the searched positions'), one that followed none (its sums are every position's) and RETRO shares are kept."""
    identity = {"model": "m", "datastore_version": "v", "store": "s"}
    knn = {"tokens": 10, "searched": 10, "nll": {"0.5": 9.0, "1.0": 12.0}, "followed_nll": {"0.5": 1.0, "1.0": 2.0}}
    impossible = {"nll": {"0.5": 9.0, "1.0": math.inf}, "followed_nll": {"0.5": 1.0, "1.0": math.inf}}
    done = {0: {"identity": identity, "result": {**knn, **impossible, "searched": 6}},  # followed 4, an inf sum
            1: {"identity": identity, "result": {**knn, **impossible}},  # followed none: kept
            2: {"identity": identity, "result": {**knn, **impossible, "searched": 6, "searched_nll": {"0.5": 5.0}}},
            3: {"identity": identity, "result": {"tokens": 10, "nll": 9.0, "nll_without": 9.5}},  # RETRO
            4: {"identity": identity, "result": {**knn, "searched": 6}}}  # followed 4, every sum finite: kept
    saved = {i: json.loads(json.dumps(body)) for i, body in done.items()}  # as read back (inf as Infinity)
    with caplog.at_level("WARNING"):
        kept = current(saved, identity)
    assert sorted(kept) == [1, 2, 3, 4]
    assert "searched positions" in caplog.text


def reference_log_probs(distances: np.ndarray, values: np.ndarray, temperature: float) -> np.ndarray:
    """float64 log p_kNN (N, V), in log space, one row and one token at a time."""
    out = np.full((len(distances), V), -np.inf)
    for row in range(len(distances)):
        valid = (values[row] >= 0) & np.isfinite(distances[row])
        if not valid.any():
            continue
        logits = -distances[row].astype(np.float64) / temperature
        norm = np.logaddexp.reduce(logits[valid])
        for token in set(values[row][valid].tolist()):
            out[row, token] = np.logaddexp.reduce(logits[valid & (values[row] == token)]) - norm
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.25, 5.0])
def test_far_neighbours_keep_their_log_probabilities_over_the_vocabulary(temperature):
    """A neighbour ~100·T or more further than the nearest has log p_kNN of about -d / T, as in float64 and
    as `knn_target_log_prob` gives it, not -inf; ordinary rows, duplicates and missing neighbours as before."""
    distances = np.array([[0.0, 200.0, 300.0, np.inf],
                          [5.0, 5.0, 1000.0, 1000.0],  # far duplicates: log(2) + their own weight
                          [1.0, 2.0, 3.0, 2.5],  # ordinary
                          [np.inf] * 4], np.float32) * temperature  # no neighbour
    values = np.array([[1, 2, 3, -1], [4, 5, 6, 6], [7, 7, 8, 0], [-1] * 4])
    d, v = torch.from_numpy(distances), torch.from_numpy(values)
    got = knn_log_probs(d, v, V, temperature)  # (N, V)
    want = reference_log_probs(distances, values, temperature)
    np.testing.assert_array_equal(np.isneginf(got.numpy()), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=1e-6, atol=1e-5)
    assert got[0, 3].item() == pytest.approx(-300.0, rel=1e-6)
    for row, token in ((0, 2), (0, 3), (1, 6), (2, 8)):
        target = knn_target_log_prob(d[row:row + 1], v[row:row + 1], torch.tensor([token]), temperature)
        assert got[row, token].item() == pytest.approx(target.item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("lam", [0.25, 0.9, 1.0])
def test_decodings_mixture_is_unchanged_for_ordinary_neighbours_and_exact_for_far_ones(lam):
    """`mix_log_probs` over ordinary neighbours agrees with the float64 mixture as before; over a far
    neighbour whose token the LM all but rules out, it keeps λ·p_kNN instead of (1 - λ)·p_LM alone."""
    rng = np.random.default_rng(5)
    n, k = 6, 8
    lm = torch.log_softmax(torch.from_numpy(rng.normal(0, 3, (n, V)).astype(np.float32)), -1)  # (n, V)
    lm[0, 3] = -400.0  # the far neighbour's token: p_LM ~ e^-400, p_kNN ~ e^-300
    distances = np.sort(rng.uniform(0, 30, (n, k)), axis=1).astype(np.float32)
    values = rng.integers(0, 8, (n, k))
    distances[0, :3], values[0, :3] = (0.0, 200.0, 300.0), (1, 2, 3)
    distances[0, 3:], values[0, 3:] = np.inf, -1
    got = mix_log_probs(lm, torch.from_numpy(distances), torch.from_numpy(values), lam, 2.0)  # (n, V)
    knn = reference_log_probs(distances, values, 2.0)
    want = np.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm.double().numpy()) if lam < 1 else knn
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-5)
    dense = interpolate(lm, knn_log_probs(torch.from_numpy(distances), torch.from_numpy(values), V, 2.0), lam)
    torch.testing.assert_close(got, dense, rtol=4e-7, atol=0)
