"""RETRO over a `RaggedRetroCache`: the logits of a `RetroCache` bit for bit, with every row at one length
and with rows rolled back alone and replayed while the others are held or go on; a forward of several
positions needs one length; one-token attention grouped by length equals attention without padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm_worker.models.layers import attend_by_length, length_groups
from lm_worker.models.retro import Retro, RetroConfig

V, B, S, L, K, STEPS = 64, 5, 6, 4, 2, 20  # S: prompt length, not a whole number of chunks


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def decoded() -> tuple[Retro, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tiny RETRO, tokens (B, S + STEPS), neighbours (B, C, K, 2L), and the logits (B, STEPS + 1, V) of a
    `RetroCache` decode: the prompt's last position, then one token a step."""
    torch.manual_seed(0)
    model = Retro(RetroConfig.tiny(vocab_size=V, chunk_len=L, n_neighbours=K)).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, S + STEPS), generator=g)
    neighbours = torch.randint(0, V, (B, (S + STEPS) // L + 1, K, 2 * L), generator=g)
    cache = model.new_cache()
    with torch.no_grad():
        out = [model(tokens[:, :S], neighbours, cache=cache)[:, -1]]
        out += [model(tokens[:, S + t:S + t + 1], neighbours, cache=cache)[:, -1] for t in range(STEPS)]
    return model, tokens, neighbours, torch.stack(out, dim=1)


def test_rows_at_one_length_give_the_logits_of_a_retro_cache(decoded):
    model, tokens, neighbours, serial = decoded
    cache = model.new_cache(ragged=True)
    with torch.no_grad():
        out = [model(tokens[:, :S], neighbours, cache=cache)[:, -1]]
        out += [model(tokens[:, S + t:S + t + 1], neighbours, cache=cache)[:, -1] for t in range(STEPS)]
    assert torch.equal(torch.stack(out, dim=1), serial)
    assert cache.lengths.tolist() == [S + STEPS] * B
    assert cache.n_encoded.tolist() == [(S + STEPS) // L] * B


@pytest.mark.parametrize("back", [1, 3, 7])
def test_a_row_rolled_back_alone_replays_its_logits_bit_for_bit(decoded, back):
    """Row 1 goes back `back` positions (forgetting the chunks they completed, encoded again on the way)
    and replays them while rows 0 and 2 are held and rows 3 and 4 decode on past their end."""
    model, tokens, neighbours, serial = decoded
    cache = model.new_cache(ragged=True)
    end = S + STEPS - 8
    with torch.no_grad():
        model(tokens[:, :S], neighbours, cache=cache)
        for t in range(S, end):
            model(tokens[:, t:t + 1], neighbours, cache=cache)
        cache.truncate(torch.tensor([1]), torch.tensor([end - back]))
        assert int(cache.n_encoded[1]) == (end - back) // L
        for j in range(back):
            step = tokens[:, end + j:end + j + 1].clone()  # rows 3, 4: their next tokens
            step[1, 0] = tokens[1, end - back + j]
            with cache.holding([0, 2], max_len=10 ** 9):
                logits = model(step, neighbours, cache=cache)[:, -1]  # (B, V)
            assert torch.equal(logits[1], serial[1, end - back + j - S + 1])
            assert torch.equal(logits[3:], serial[3:, end + j - S + 1])
    assert cache.lengths.tolist() == [end, end, end, end + back, end + back]


def test_neighbours_that_come_late_for_several_chunks_are_all_encoded_at_once(decoded):
    """Decoded one token a step without neighbours, then given them: every chunk they cover is encoded at
    that step, as a `RetroCache` does (one a step, the others lagging, gave other logits, by up to 0.15)."""
    model, tokens, neighbours, _ = decoded
    late = 14  # positions decoded before any neighbours come: three chunks complete by then
    logits = {}
    for ragged in (False, True):
        cache, out = model.new_cache(ragged=ragged), []
        with torch.no_grad():
            model(tokens[:, :1], None, cache=cache)
            for t in range(1, S + STEPS):
                out.append(model(tokens[:, t:t + 1], neighbours if t >= late else None, cache=cache)[:, -1])
        logits[ragged] = torch.stack(out, dim=1)
    assert cache.n_encoded.tolist() == [(S + STEPS) // L] * B  # the ragged cache's
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_a_forward_of_several_positions_needs_every_row_at_one_length(decoded):
    model, tokens, neighbours, _ = decoded
    cache = model.new_cache(ragged=True)
    with torch.no_grad():
        model(tokens[:, :S], neighbours, cache=cache)
        cache.truncate(torch.tensor([0]), torch.tensor([S - 1]))
        with pytest.raises(ValueError, match="same length"):
            model(tokens[:, S:S + 2], neighbours, cache=cache)
        with pytest.raises(ValueError, match="return_attention"):
            model(tokens[:, S:S + 1], neighbours, cache=cache, return_attention=True)


def test_one_token_attention_by_length_equals_attention_without_padding():
    """Rows of three lengths in one padded buffer: each row's output has the bits of its own unpadded
    attention, as a `KVCache` (no padding, an all-seeing mask) computes it."""
    g = torch.Generator().manual_seed(3)
    H, D, width = 2, 8, 12
    lengths = torch.tensor([4, 11, 4, 7])
    q, k, v = (torch.randn(4, H, n, D, generator=g) for n in (1, width, width))
    got = attend_by_length(q, k, v, length_groups(lengths))
    for row, length in enumerate(lengths.tolist()):
        S_row = length + 1
        want = F.scaled_dot_product_attention(q[row:row + 1], k[row:row + 1, :, :S_row], v[row:row + 1, :, :S_row],
                                              attn_mask=torch.ones(1, S_row, dtype=torch.bool))
        assert torch.equal(got[row:row + 1], want)
    (rows, width), = length_groups(torch.tensor([5, 5]))  # one length: every row at once
    assert rows is None and width == 6
