"""The transformer LM: key/value cache equivalence, beam reordering, causality, kNN-LM keys, training."""

from __future__ import annotations

import pytest
import torch

from lm_worker.models.transformer_lm import LMConfig, TransformerLM

V, B, T = 64, 3, 13


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(LMConfig.tiny(vocab_size=V)).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def run_in_pieces(model: TransformerLM, tokens: torch.Tensor, sizes: list[int]):
    """Feed `tokens` through one cache in pieces of `sizes`; return the concatenated logits and keys."""
    cache, logits, keys, start = model.new_cache(), [], [], 0
    for size in sizes:
        out, k = model(tokens[:, start:start + size], cache=cache, return_keys=True)
        logits.append(out)
        keys.append(k)
        start += size
    assert cache.offset == tokens.shape[1]
    return torch.cat(logits, dim=1), torch.cat(keys, dim=1)


@torch.no_grad()
def test_shapes(model, tokens):
    logits, keys = model(tokens, return_keys=True)
    assert logits.shape == (B, T, V)
    assert keys.shape == (B, T, model.config.d_model)
    assert model(tokens).shape == (B, T, V)


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[1] * T, [5, 1, 7], [2, 11]], ids=["one-at-a-time", "5-1-7", "2-11"])
def test_cache_matches_full_forward(model, tokens, sizes):
    full_logits, full_keys = model(tokens, return_keys=True)
    logits, keys = run_in_pieces(model, tokens, sizes)
    torch.testing.assert_close(logits, full_logits)
    torch.testing.assert_close(keys, full_keys)


@torch.no_grad()
def test_cache_reorder_matches_reordered_batch(model, tokens):
    prefix, rest = tokens[:, :7], tokens[:, 7:]
    cache = model.new_cache()
    model(prefix, cache=cache)
    beams = torch.tensor([2, 0, 0, 1])  # duplicates and drops rows, as beam search does
    cache.reorder(beams)
    got = model(rest[beams], cache=cache)
    want = model(torch.cat([prefix[beams], rest[beams]], dim=1))[:, 7:]
    torch.testing.assert_close(got, want)


@torch.no_grad()
def test_cache_rewind_forgets_the_last_positions(model, tokens):
    """A rejected speculative step: feed a wrong token, rewind it, feed the right one: as if never fed."""
    cache = model.new_cache()
    model(tokens[:, :7], cache=cache)
    model((tokens[:, 7:8] + 1) % V, cache=cache)
    cache.rewind(1)
    assert cache.offset == 7
    got, got_keys = model(tokens[:, 7:], cache=cache, return_keys=True)
    want, want_keys = model(tokens, return_keys=True)
    torch.testing.assert_close(got, want[:, 7:])
    torch.testing.assert_close(got_keys, want_keys[:, 7:])
    with pytest.raises(ValueError, match="cannot rewind 14 of 13"):
        cache.rewind(14)


@torch.no_grad()
def test_causal(model, tokens):
    before = model(tokens)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % V
    after = model(changed)
    torch.testing.assert_close(after[:, :8], before[:, :8])
    assert not torch.allclose(after[:, 8:], before[:, 8:])


@torch.no_grad()
def test_knn_keys_are_last_ffn_input(model, tokens):
    seen = []
    handle = model.blocks[-1].ffn.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        _, keys = model(tokens, return_keys=True)
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(keys, seen[0], rtol=0, atol=0)


@torch.no_grad()
def test_on_keys_sees_the_keys_before_the_last_ffn_and_the_head(model, tokens):
    """`on_keys` is called once, with the keys the forward returns, before the last feed-forward block
    and the output head run (a caller sends their retrieval then); the outputs are those of a forward
    without it, bit for bit."""
    events, seen = [], []
    hooks = [model.blocks[-1].ffn.register_forward_pre_hook(lambda *_: events.append("last ffn")),
             model.head.register_forward_pre_hook(lambda *_: events.append("head"))]
    try:
        logits, keys = model(tokens, cache=model.new_cache(), return_keys=True,
                             on_keys=lambda k: (events.append("keys"), seen.append(k.clone())))
    finally:
        for hook in hooks:
            hook.remove()
    assert events == ["keys", "last ffn", "head"]
    plain_logits, plain_keys = model(tokens, cache=model.new_cache(), return_keys=True)
    assert torch.equal(seen[0], keys) and torch.equal(keys, plain_keys) and torch.equal(logits, plain_logits)


@torch.no_grad()
@pytest.mark.parametrize("bad", [V, -1])
def test_token_ids_outside_the_vocabulary_raise_a_clear_error(model, tokens, bad):
    wrong = tokens.clone()
    wrong[1, 4] = bad
    with pytest.raises(ValueError, match=rf"tokens holds token id {bad}, outside the model's vocabulary \[0, {V}\)"):
        model(wrong)
    cache = model.new_cache()  # nothing is cached from a refused call
    with pytest.raises(ValueError, match="outside"):
        model(wrong, cache=cache)
    assert cache.offset == 0


def test_max_len_is_enforced(model):
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, model.config.max_len + 1, dtype=torch.long))
    cache = model.new_cache()
    model(torch.zeros(1, model.config.max_len, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_presets_and_validation():
    for cfg in (LMConfig.tiny(), LMConfig.small(vocab_size=1000), LMConfig.gpu(vocab_size=1000)):
        assert cfg.d_model % cfg.n_head == 0
    assert TransformerLM(LMConfig.tiny(vocab_size=10)).num_parameters() > 0
    with pytest.raises(ValueError):
        LMConfig(vocab_size=10, d_model=30, n_head=4)


def test_dropout_is_off_in_eval():
    torch.manual_seed(0)
    m = TransformerLM(LMConfig.tiny(dropout=0.5)).eval()
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(m(x), m(x))


def test_learns_sequence_reversal():
    """A sanity check of the whole model: given digits and a separator, it learns to predict the digits
    reversed, which needs attention to earlier positions."""
    torch.manual_seed(0)
    n, sep = 6, 10
    model = TransformerLM(LMConfig.tiny(vocab_size=12, d_model=64, d_ff=128, n_head=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        x = torch.randint(0, 10, (64, n))
        seq = torch.cat([x, torch.full((64, 1), sep), x.flip(1)], dim=1)  # (64, 2n+1)
        targets = seq[:, 1:].clone()
        targets[:, :n] = -100  # score only the reversed half
        loss = model.loss(seq[:, :-1], targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0
    assert sum(losses[-10:]) / 10 < 0.25 * losses[0]


@torch.no_grad()
def test_keys_only_forward_equals_full_forward(model, tokens):
    _, keys = model(tokens, return_keys=True)
    assert torch.allclose(model.keys(tokens), keys, atol=1e-6)
