"""RETRO over a `RaggedRetroCache` when neighbours come late for several chunks after some were already
encoded: every chunk they cover is encoded in that one step, and the logits are a `RetroCache`'s."""

from __future__ import annotations

import pytest
import torch

from lm_worker.models.retro import Retro, RetroConfig

V, B, T, L, K = 64, 2, 26, 4, 2
LATE = 14  # the step at which the neighbours of every chunk come; only chunk 0's come before


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


def decode(model: Retro, tokens: torch.Tensor, neighbours: torch.Tensor, ragged: bool) -> tuple[torch.Tensor, list]:
    """Logits (B, T - 1, V) of a one-token-a-step decode given chunk 0's neighbours only before step LATE
    and all of them from it, and the cache's encoded chunks (B,) after each step (ragged only)."""
    cache, out, encoded = model.new_cache(ragged=ragged), [], []
    with torch.no_grad():
        model(tokens[:, :1], neighbours[:, :1], cache=cache)
        for t in range(1, T):
            given = neighbours if t >= LATE else neighbours[:, :1]
            out.append(model(tokens[:, t:t + 1], given, cache=cache)[:, -1])
            encoded.append(cache.counts(tokens)[1].tolist() if ragged else None)
    return torch.stack(out, dim=1), encoded


def test_late_neighbours_for_several_chunks_after_a_first_encoding_are_all_encoded():
    """In float64: the step the neighbours come encodes chunks 1 and 2 (both complete by then), and every
    logit from that step on equals a `RetroCache`'s."""
    torch.manual_seed(0)
    model = Retro(RetroConfig.tiny(vocab_size=V, chunk_len=L, n_neighbours=K)).double().eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    neighbours = torch.randint(0, V, (B, T // L, K, 2 * L), generator=g)  # (B, C, K, N)
    want, _ = decode(model, tokens, neighbours, ragged=False)
    got, encoded = decode(model, tokens, neighbours, ragged=True)
    assert encoded[LATE - 2] == [1] * B  # after step LATE - 1: chunk 0 only
    assert encoded[LATE - 1] == [LATE // L] * B  # after step LATE: every complete chunk
    assert encoded[-1] == [T // L] * B
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
