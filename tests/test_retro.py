"""RETRO: cache equivalence, beam reordering, causality in tokens and in neighbours, CCA weights, learning."""

from __future__ import annotations

import math

import pytest
import torch

from lm_worker.models.retro import Retro, RetroConfig

V, B, T, L, K = 64, 3, 13, 4, 2
C = T // L  # complete chunks


@pytest.fixture(scope="module")
def model() -> Retro:
    torch.manual_seed(0)
    return Retro(RetroConfig.tiny(vocab_size=V, chunk_len=L, n_neighbours=K)).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def neighbours() -> torch.Tensor:
    return torch.randint(0, V, (B, C, K, 2 * L), generator=torch.Generator().manual_seed(2))


def run_in_pieces(model: Retro, tokens: torch.Tensor, neighbours: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    cache, logits, start = model.new_cache(), [], 0
    for size in sizes:
        logits.append(model(tokens[:, start:start + size], neighbours, cache=cache))
        start += size
    assert cache.offset == tokens.shape[1]
    return torch.cat(logits, dim=1)


def other_tokens(x: torch.Tensor) -> torch.Tensor:
    return (x + 1) % V


@torch.no_grad()
def test_shapes_and_attention_weights(model, tokens, neighbours):
    logits, weights = model(tokens, neighbours, return_attention=True)
    assert logits.shape == (B, T, V)
    assert len(weights) == len(model.config.decoder_cca_layers) == 2
    for w in weights:
        assert w.shape == (B, model.config.n_head, T, K, 2 * L)
        sums = w.sum(dim=(-1, -2))  # (B, H, T)
        torch.testing.assert_close(sums[..., :L - 1], torch.zeros_like(sums[..., :L - 1]))
        torch.testing.assert_close(sums[..., L - 1:], torch.ones_like(sums[..., L - 1:]))
    torch.testing.assert_close(model(tokens, neighbours), logits)


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[1] * T, [5, 1, 7], [3, 9, 1]], ids=["one-at-a-time", "5-1-7", "3-9-1"])
def test_cache_matches_full_forward(model, tokens, neighbours, sizes):
    torch.testing.assert_close(run_in_pieces(model, tokens, neighbours, sizes), model(tokens, neighbours))


@torch.no_grad()
def test_cache_ignores_rows_for_incomplete_chunks(model, tokens, neighbours):
    extra = torch.cat([neighbours, neighbours[:, :1]], dim=1)  # a row for the unfinished chunk C
    full = model(tokens, neighbours)
    torch.testing.assert_close(model(tokens, extra), full)
    torch.testing.assert_close(run_in_pieces(model, tokens, extra, [1] * T), full)


@torch.no_grad()
@pytest.mark.parametrize("fed, back", [(2 * L + 2, 4), (2 * L, 1), (2 * L + 1, 1), (3 * L, 2 * L)])
def test_cache_rewind_matches_a_cache_that_never_saw_the_positions(model, tokens, neighbours, fed, back):
    """A rewind across a chunk's end forgets that chunk's encoding and the hidden states it was made of."""
    cache = model.new_cache()
    model(tokens[:, :fed], neighbours, cache=cache)
    cache.rewind(back)
    kept = fed - back
    got = model(tokens[:, kept:], neighbours, cache=cache)
    torch.testing.assert_close(got, model(tokens, neighbours)[:, kept:])


@torch.no_grad()
def test_cache_reorder_matches_reordered_batch(model, tokens, neighbours):
    cut = 7  # mid-chunk: the cache holds one encoded chunk and a partial one
    cache = model.new_cache()
    model(tokens[:, :cut], neighbours, cache=cache)
    beams = torch.tensor([2, 0, 0, 1])
    cache.reorder(beams)
    got = model(tokens[beams, cut:], neighbours[beams], cache=cache)
    want = model(tokens[beams], neighbours[beams])[:, cut:]
    torch.testing.assert_close(got, want)


@torch.no_grad()
def test_causal_in_tokens(model, tokens, neighbours):
    before = model(tokens, neighbours)
    changed = tokens.clone()
    changed[:, 6] = other_tokens(changed[:, 6])
    after = model(changed, neighbours)
    torch.testing.assert_close(after[:, :6], before[:, :6])
    assert not torch.allclose(after[:, 6:], before[:, 6:])


@torch.no_grad()
@pytest.mark.parametrize("chunk", range(C))
def test_chunk_neighbours_reach_only_later_positions(model, tokens, neighbours, chunk):
    """Chunk c's neighbours are first seen by its last token, position (c + 1) * L - 1."""
    first = (chunk + 1) * L - 1
    before = model(tokens, neighbours)
    changed = neighbours.clone()
    changed[:, chunk] = other_tokens(changed[:, chunk])
    after = model(tokens, changed)
    torch.testing.assert_close(after[:, :first], before[:, :first])
    assert not torch.allclose(after[:, first], before[:, first])


@torch.no_grad()
def test_first_positions_see_no_neighbours(model, tokens, neighbours):
    without = model(tokens, None)
    torch.testing.assert_close(model(tokens, neighbours)[:, :L - 1], without[:, :L - 1])
    torch.testing.assert_close(model(tokens, other_tokens(neighbours))[:, :L - 1], without[:, :L - 1])
    assert not torch.allclose(model(tokens, neighbours)[:, L - 1:], without[:, L - 1:])


@torch.no_grad()
def test_missing_chunk_rows_mean_no_retrieval(model, tokens, neighbours):
    """Positions whose chunk has no neighbour row behave as with no neighbours at all."""
    first_only = model(tokens, neighbours[:, :1])
    torch.testing.assert_close(first_only[:, :2 * L - 1], model(tokens, neighbours)[:, :2 * L - 1])
    torch.testing.assert_close(model(tokens[:, :L - 1], neighbours[:, :1]), model(tokens[:, :L - 1]))


def test_bad_neighbours_raise(model, tokens, neighbours):
    with pytest.raises(ValueError, match="neighbour length"):
        model(tokens, neighbours[..., :L])
    with pytest.raises(ValueError, match="must be"):
        model(tokens, neighbours[0])
    with pytest.raises(ValueError, match=f"1 neighbours per chunk, the model takes n_neighbours = {K}"):
        model(tokens, neighbours[:, :, :1])  # one of its K: attended over as if they were all


def test_the_loss_under_bfloat16_autocast_is_float32s_to_its_precision(model, tokens, neighbours):
    """Training on a GPU runs under autocast (amp): the chunked cross-attention's bfloat16 output was put
    into a float32 tensor, and the first RETRO step raised "Index put requires the source and destination
    dtypes match"."""
    with torch.no_grad():
        exact = model.loss(tokens, neighbours, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.loss(tokens, neighbours, tokens)
    assert torch.isfinite(mixed) and abs(float(mixed) - float(exact)) < 0.05 * float(exact)


@torch.no_grad()
@pytest.mark.parametrize("bad", [V, -1])
def test_token_ids_outside_the_vocabulary_raise_a_clear_error(model, tokens, neighbours, bad):
    wrong = neighbours.clone()
    wrong[1, 0, 1, 3] = bad  # e.g. a datastore's token stream from another tokenizer
    with pytest.raises(ValueError, match=rf"neighbours holds token id {bad}, outside the model's vocabulary \[0, {V}"):
        model(tokens, wrong)
    wrong = tokens.clone()
    wrong[2, 5] = bad
    with pytest.raises(ValueError, match=rf"tokens holds token id {bad}, outside"):
        model(wrong, neighbours)
    assert model(tokens, neighbours).shape == (B, T, V)  # in-range ids pass


def test_config_defaults_and_validation():
    assert RetroConfig(vocab_size=10, n_layer=12).decoder_cca_layers == (2, 5, 8, 11)
    assert RetroConfig(vocab_size=10).neighbour_len == 128
    assert RetroConfig(vocab_size=10, enc_n_layer=3).encoder_cross_layers == (0, 1, 2)
    for cfg in (RetroConfig.tiny(), RetroConfig.small(vocab_size=100), RetroConfig.gpu(vocab_size=100)):
        assert cfg.d_model % cfg.n_head == 0
    with pytest.raises(ValueError, match="cca_layers"):
        RetroConfig(vocab_size=10, n_layer=3, cca_layers=(3,))
    for bad, match in ((dict(chunk_len=0), "chunk_len must be a positive integer"),
                       (dict(n_neighbours=-1), "n_neighbours must be a positive integer"),
                       (dict(n_layer=2), "no decoder layer attends to the neighbours"),
                       (dict(cca_layers="12"), "cca_layers must be a tuple"), (dict(dropout=1.0), "dropout")):
        with pytest.raises(ValueError, match=match):
            RetroConfig(vocab_size=10, **bad)


def _copy_task(batch: int, vocab: int, length: int = 4 * L):
    """Random tokens; chunk c's first neighbour is chunk c and its true continuation, the second is noise."""
    seq = torch.randint(0, vocab, (batch, length + L + 1))
    true = torch.stack([seq[:, c * L:(c + 2) * L] for c in range(length // L)], dim=1)  # (batch, chunks, 2L)
    neighbours = torch.stack([true, torch.randint(0, vocab, true.shape)], dim=2)  # (batch, chunks, 2, 2L)
    targets = seq[:, 1:length + 1].clone()
    targets[:, :L - 1] = -100  # these positions cannot see any neighbour
    return seq[:, :length], neighbours, targets


@pytest.mark.slow
def test_learns_to_copy_from_neighbours():
    """After brief training, true neighbours predict the continuation far better than shuffled ones."""
    torch.manual_seed(0)
    vocab = 32
    cfg = RetroConfig.tiny(vocab_size=vocab, chunk_len=L, d_model=64, d_ff=128, n_head=4, n_layer=2,
                           cca_layers=(1,), enc_n_layer=1)
    model = Retro(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model.loss(*_copy_task(32, vocab))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        x, neighbours, targets = _copy_task(256, vocab)
        true_loss = model.loss(x, neighbours, targets).item()
        shuffled_loss = model.loss(x, neighbours[torch.randperm(256)], targets).item()
    assert true_loss < 0.6 * math.log(vocab)
    assert true_loss < shuffled_loss - 1.0
