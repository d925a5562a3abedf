"""RETRO attention maps: the plotted weights are the model's own CCA weights for the positions that read
the chosen chunk's neighbours (shifted by chunk_len - 1), a softmax over the K * 2L neighbour tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_worker.data.tokenizer import train_tokenizer
from lm_worker.evaluation.attention_plot import chunk_query_positions, plot_chunk_attention
from lm_worker.models.retro import Retro, RetroConfig

T = 14  # three complete chunks of 4, and two tokens of a fourth


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n" * 40, "import os\nprint(os.getcwd())\n" * 40], 300)


@pytest.fixture(scope="module")
def setup(tokenizer):
    torch.manual_seed(0)
    model = Retro(RetroConfig.tiny(vocab_size=tokenizer.vocab_size)).eval()
    L, K = model.config.chunk_len, model.config.n_neighbours
    tokens = torch.randint(0, tokenizer.vocab_size, (1, T))
    neighbours = torch.randint(0, tokenizer.vocab_size, (1, T // L, K, 2 * L))
    return model, tokens, neighbours


def cca_grid_weights(model: Retro, tokens, neighbours) -> dict[int, torch.Tensor]:
    """Per CCA layer, the weights its cross-attention computes on the shifted grid, (chunks, H, L, K*2L)."""
    captured, hooks = {}, []
    for i in model.cca_layers:
        def hook(module, inputs, output, i=i):
            captured[i] = output[1].double()
        hooks.append(model.cca[str(i)].attn.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(tokens, neighbours)
    finally:
        for h in hooks:
            h.remove()
    return captured


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_weights_are_the_models_cca_weights_for_the_shifted_positions(setup, tokenizer, tmp_path, chunk):
    model, tokens, neighbours = setup
    L, K = model.config.chunk_len, model.config.n_neighbours
    out = tmp_path / "cca.png"
    maps = plot_chunk_attention(model, tokens, neighbours, tokenizer, chunk, out)
    positions = chunk_query_positions(chunk, L, T)
    assert positions[0] == chunk * L + L - 1 and len(positions) == min(L, T - positions[0])
    assert maps.shape == (len(model.cca_layers), len(positions), K * 2 * L)
    np.testing.assert_allclose(maps.sum(-1), 1, atol=1e-5)
    grid = cca_grid_weights(model, tokens, neighbours)
    for n, i in enumerate(model.cca_layers):
        # grid row `chunk`, slot j is position chunk*L + L - 1 + j (no cache, so the grid starts at chunk 0)
        ref = grid[i][chunk].mean(0)[:len(positions)].numpy()  # (P, K*2L) mean over heads, float64
        np.testing.assert_allclose(maps[n], ref, rtol=1e-5, atol=1e-6)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_chosen_chunks_neighbours_matter(setup, tmp_path):
    model, tokens, neighbours = setup
    base = plot_chunk_attention(model, tokens, neighbours, None, 1, tmp_path / "a.png", layer=2)
    later = neighbours.clone()
    later[:, 2] = (later[:, 2] + 1) % model.config.vocab_size  # chunk 2's neighbours: read by later positions only
    np.testing.assert_allclose(plot_chunk_attention(model, tokens, later, None, 1, tmp_path / "b.png", layer=2),
                               base, rtol=1e-6, atol=1e-7)
    own = neighbours.clone()
    own[:, 1] = (own[:, 1] + 1) % model.config.vocab_size
    changed = plot_chunk_attention(model, tokens, own, None, 1, tmp_path / "c.png", layer=2)
    assert not np.allclose(changed, base, atol=1e-4)


def test_one_layer(setup, tmp_path):
    model, tokens, neighbours = setup
    every = plot_chunk_attention(model, tokens, neighbours, None, 1, tmp_path / "all.png")
    last = plot_chunk_attention(model, tokens, neighbours, None, 1, tmp_path / "one.png", layer=model.cca_layers[-1])
    np.testing.assert_array_equal(last, every[-1])
    assert (tmp_path / "one.png").stat().st_size > 0


@pytest.mark.parametrize("chunk,c,match", [(3, 3, "chunk 3 has no neighbours"), (-1, 3, "chunk -1"),
                                           (1, 1, "neighbours hold 1 chunks")])
def test_chunk_without_neighbours_is_an_error(setup, tmp_path, chunk, c, match):
    model, tokens, neighbours = setup
    with pytest.raises(ValueError, match=match):
        plot_chunk_attention(model, tokens, neighbours[:, :c], None, chunk, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bad_inputs_are_errors(setup, tmp_path):
    model, tokens, neighbours = setup
    with pytest.raises(ValueError, match="no CCA"):
        plot_chunk_attention(model, tokens, neighbours, None, 0, tmp_path / "x.png", layer=0)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        plot_chunk_attention(model, tokens.repeat(2, 1), neighbours.repeat(2, 1, 1, 1), None, 0, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(1, C, K, 2L\)"):
        plot_chunk_attention(model, tokens, None, None, 0, tmp_path / "x.png")
