"""kNN-LM scoring against a plain float64 numpy reference: softmax of -d/T over the neighbours found,
summed per token; missing neighbours, empty rows, far neighbours; interpolation in probability space."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_worker.evaluation.knnlm import interpolate, knn_log_probs, knn_target_log_prob, mix_log_probs

V = 11


def reference_knn_probs(distances: np.ndarray, values: np.ndarray, vocab_size: int, temperature: float) -> np.ndarray:
    """p_kNN (N, V) in float64, one row and one neighbour at a time."""
    probs = np.zeros((len(distances), vocab_size))
    for row in range(len(distances)):
        valid = [j for j in range(distances.shape[1]) if values[row, j] >= 0 and np.isfinite(distances[row, j])]
        if not valid:
            continue
        logits = np.array([-float(distances[row, j]) / temperature for j in valid])
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        for j, w in zip(valid, weights):
            probs[row, values[row, j]] += w
    return probs


def log_or_minus_inf(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def neighbours(seed: int = 0, n: int = 6, k: int = 8, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Random neighbours with duplicate tokens (values drawn from 4 of V tokens), some missing, and
    one row (the last) with no neighbour at all."""
    rng = np.random.default_rng(seed)
    distances = np.sort(rng.uniform(0, scale, (n, k)), axis=1).astype(np.float32)
    values = rng.integers(0, 4, (n, k))
    values[0, 5:] = -1  # missing neighbours come last, as the service returns them
    distances[0, 5:] = np.inf
    values[2, 1:] = -1
    distances[2, 1:] = np.inf
    values[-1] = -1
    distances[-1] = np.inf
    return distances, values


def as_torch(distances: np.ndarray, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(distances), torch.from_numpy(values).long()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 7.0])
def test_knn_log_probs_match_reference(temperature):
    distances, values = neighbours()
    got = knn_log_probs(*as_torch(distances, values), V, temperature)  # (N, V)
    want = log_or_minus_inf(reference_knn_probs(distances, values, V, temperature))
    assert got.shape == (len(distances), V)
    np.testing.assert_array_equal(np.isneginf(got.numpy()), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=1e-5, atol=1e-6)
    # duplicates are summed: every row with a neighbour is a distribution
    sums = got.double().exp().sum(-1).numpy()
    np.testing.assert_allclose(sums[:-1], 1.0, rtol=1e-5)
    assert sums[-1] == 0.0  # no neighbour: p_kNN is zero everywhere


@pytest.mark.parametrize("temperature", [1.0, 0.5, 7.0])
def test_knn_target_log_prob_matches_reference(temperature):
    distances, values = neighbours(seed=1)
    probs = reference_knn_probs(distances, values, V, temperature)
    targets = np.array([values[0, 0], values[1, 3], values[2, 0], 9, values[4, 7], 2])  # 9 is never a value
    got = knn_target_log_prob(*as_torch(distances, values), torch.from_numpy(targets).long(), temperature)
    want = log_or_minus_inf(probs[np.arange(len(targets)), targets])
    assert got.shape == (len(targets),)
    assert math.isinf(got[3]) and got[3] < 0  # target carried by no neighbour
    assert math.isinf(got[-1]) and got[-1] < 0  # no neighbour at all
    finite = np.isfinite(want)
    np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=1e-5, atol=1e-6)
    # agrees with the full distribution
    full = knn_log_probs(*as_torch(distances, values), V, temperature)
    torch.testing.assert_close(got, full[torch.arange(len(targets)), torch.from_numpy(targets)])


def test_duplicate_tokens_are_summed():
    distances = np.array([[0.0, 0.0, 0.0, math.log(2.0)]], dtype=np.float32)
    values = np.array([[5, 5, 3, 5]])
    # weights 1, 1, 1, 1/2 over a total of 3.5: token 5 gets 2.5 / 3.5, token 3 gets 1 / 3.5
    got = knn_log_probs(*as_torch(distances, values), V, 1.0).exp()
    assert got[0, 5].item() == pytest.approx(2.5 / 3.5, rel=1e-6)
    assert got[0, 3].item() == pytest.approx(1 / 3.5, rel=1e-6)
    target = knn_target_log_prob(*as_torch(distances, values), torch.tensor([5]), 1.0)
    assert target.exp().item() == pytest.approx(2.5 / 3.5, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_far_neighbours_are_stable(temperature):
    distances, values = neighbours(seed=2, scale=50.0)
    distances = distances + np.float32(1e4)  # exp(-1e4) underflows unless normalised in log space
    got = knn_log_probs(*as_torch(distances, values), V, temperature)
    targets = torch.from_numpy(values[:, 0].clip(min=0)).long()
    target = knn_target_log_prob(*as_torch(distances, values), targets, temperature)
    assert not torch.isnan(got).any() and not torch.isnan(target).any()
    want = log_or_minus_inf(reference_knn_probs(distances, values, V, temperature))
    # float32 probabilities below ~1e-38 flush to zero in the full distribution: compare the rest
    visible = want > -60.0
    np.testing.assert_allclose(got.numpy()[visible], want[visible], rtol=1e-5, atol=1e-5)
    assert (got.numpy()[~visible] < -60.0).all()
    # the target's log-probability stays in log space: exact even when tiny
    want_target = want[np.arange(len(targets)), targets.numpy()]
    assert torch.isfinite(target[:-1]).all()  # each row but the empty one has its own first value
    np.testing.assert_allclose(target[:-1].numpy(), want_target[:-1], rtol=1e-5, atol=1e-5)


def test_inf_distance_with_a_value_counts_as_missing():
    distances = np.array([[1.0, np.inf]], dtype=np.float32)
    values = np.array([[2, 7]])
    got = knn_log_probs(*as_torch(distances, values), V, 1.0)
    assert got[0, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isneginf(got[0, 7])


def reference_interpolate(lm_log_prob: np.ndarray, knn_log_prob: np.ndarray, lam: float) -> np.ndarray:
    return log_or_minus_inf(lam * np.exp(knn_log_prob.astype(np.float64))
                            + (1 - lam) * np.exp(lm_log_prob.astype(np.float64)))


@pytest.mark.parametrize("lam", [0.01, 0.25, 0.5, 0.9, 0.999])
def test_interpolate_matches_reference(lam):
    rng = np.random.default_rng(3)
    lm = np.log(rng.uniform(1e-6, 1, 50)).astype(np.float32)
    knn = np.log(rng.uniform(1e-6, 1, 50)).astype(np.float32)
    knn[:5] = -np.inf  # no neighbour carries the target: (1 - λ) p_LM
    knn[5:8] = 0.0  # every neighbour does
    got = interpolate(torch.from_numpy(lm), torch.from_numpy(knn), lam)
    want = reference_interpolate(lm, knn, lam)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:5].numpy(), lm[:5] + math.log1p(-lam), rtol=1e-5)
    assert (got >= torch.from_numpy(lm) + math.log1p(-lam) - 1e-5).all()


def test_interpolate_ends():
    rng = np.random.default_rng(4)
    lm = torch.from_numpy(np.log(rng.uniform(1e-6, 1, 20)).astype(np.float32))
    knn = torch.from_numpy(np.log(rng.uniform(1e-6, 1, 20)).astype(np.float32))
    knn[0] = -math.inf
    assert torch.equal(interpolate(lm, knn, 0.0), lm)  # exactly the LM, not a rounded mixture
    assert torch.equal(interpolate(lm, knn, 0), lm)
    at_one = interpolate(lm, knn, 1.0)
    assert torch.equal(at_one, knn)
    assert torch.isneginf(at_one[0])
    both_missing = interpolate(torch.tensor([-math.inf]), torch.tensor([-math.inf]), 0.5)
    assert torch.isneginf(both_missing).all()


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.25, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mix_log_probs_is_the_dense_mixture(lam, seed):
    """Decoding mixes only where p_kNN > 0: every other entry is the dense mixture's to the bit, the
    mixed ones within a rounding of it (logaddexp over k entries against over V), and all close to the
    float64 reference."""
    rng = np.random.default_rng(seed)
    vocab, n, k = 4096, 9, 16
    lm = torch.log_softmax(torch.from_numpy(rng.normal(0, 3, (n, vocab)).astype(np.float32)), -1)  # (n, V)
    lm[1, :7] = -math.inf  # tokens the LM rules out, some of them neighbours' values
    distances = np.sort(rng.uniform(0, 40, (n, k)), axis=1).astype(np.float32)
    values = rng.integers(0, 24, (n, k))  # duplicate tokens in most rows; token 0 among them
    values[0, 10:] = -1  # missing neighbours
    distances[0, 10:] = np.inf
    values[2] = -1  # no neighbour at all: token 0 (where missing ones point) gets nothing
    distances[2] = np.inf
    values[3, :] = 0  # every neighbour on token 0
    got = mix_log_probs(lm, *as_torch(distances, values), lam, temperature=7.0)  # (n, V)
    dense = interpolate(lm, knn_log_probs(*as_torch(distances, values), vocab, 7.0), lam)
    if lam == 1.0:  # p_kNN alone is 0 everywhere in row 2: decoding takes the LM's row there, not -inf
        assert torch.isneginf(dense[2]).all()
        dense[2] = lm[2]
    assert got.shape == (n, vocab) and got.dtype == dense.dtype
    mixed = torch.zeros(n, vocab, dtype=torch.bool)
    mixed.scatter_(1, torch.from_numpy(values).clamp(min=0), torch.from_numpy(values >= 0))  # where p_kNN > 0
    assert torch.equal(got[~mixed], dense[~mixed])
    torch.testing.assert_close(got[mixed], dense[mixed], rtol=4e-7, atol=0)  # a rounding at most
    want = reference_interpolate(lm.numpy(), log_or_minus_inf(reference_knn_probs(distances, values, vocab, 7.0)), lam)
    want[2] = lm[2].numpy() if lam == 1.0 else want[2]
    np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.75])
def test_a_row_mixed_alone_has_the_bits_it_has_in_a_batch(lam):
    """A speculative decoder settles one row where serial decoding mixes the batch: the row's numbers must
    not depend on its neighbours in the tensor (k = 6 entries a row: no whole SIMD vectors; p_LM and p_kNN
    of one size, where rounding shows)."""
    rng = np.random.default_rng(4)
    n, vocab, k = 12, 64, 6
    lm = torch.log_softmax(torch.from_numpy(rng.normal(0, 1, (n, vocab)).astype(np.float32)), -1)  # (n, V)
    distances, values = as_torch(rng.uniform(0, 10, (n, k)).astype(np.float32), rng.integers(0, vocab, (n, k)))
    batch = mix_log_probs(lm, distances, values, lam, 4.0)  # (n, V)
    for r in range(n):
        assert torch.equal(mix_log_probs(lm[r:r + 1], distances[r:r + 1], values[r:r + 1], lam, 4.0), batch[r:r + 1])


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_bad_lambda_raises(lam):
    with pytest.raises(ValueError, match="lambda"):
        interpolate(torch.zeros(3), torch.zeros(3), lam)
    distances, values = neighbours()
    with pytest.raises(ValueError, match="lambda"):
        mix_log_probs(torch.zeros(len(values), V), *as_torch(distances, values), lam)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature_raises(temperature):
    distances, values = neighbours()
    with pytest.raises(ValueError, match="temperature"):
        knn_log_probs(*as_torch(distances, values), V, temperature)
    with pytest.raises(ValueError, match="temperature"):
        knn_target_log_prob(*as_torch(distances, values), torch.zeros(len(values), dtype=torch.long), temperature)
