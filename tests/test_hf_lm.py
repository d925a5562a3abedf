"""The Hugging Face causal LM wrapper: keys against a hand computation of GPT-2's last block, logits
against HF's own, cached decoding against the cache-free forward, beam reordering, and loading a
folder through `load_checkpoint`. Models are tiny, built from configs and saved locally."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm_worker.models.checkpoint import load_checkpoint
from lm_worker.models.hf_causal_lm import HFCausalLM, find_last_ffn

V, B, T = 50, 3, 11


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(gpt2_dir) -> HFCausalLM:
    return HFCausalLM.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def gpt2_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """GPT-2 causal self-attention written out by hand: x (B, T, C) -> (B, T, C)."""
    B_, T_, C = x.shape
    H = attn.num_heads
    q, k, v = attn.c_attn(x).split(C, dim=-1)
    q, k, v = (t.view(B_, T_, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // H)  # (B, H, T, T)
    causal = torch.ones(T_, T_, dtype=torch.bool).tril()
    y = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v  # (B, H, T, D)
    return attn.c_proj(y.transpose(1, 2).reshape(B_, T_, C))


@torch.no_grad()
def test_max_len_is_read_from_the_config_alone(gpt2_dir, tmp_path):
    from lm_worker.models.checkpoint import checkpoint_max_len, save_checkpoint
    from lm_worker.models.retro import Retro, RetroConfig
    from lm_worker.models.transformer_lm import LMConfig, TransformerLM

    assert checkpoint_max_len(gpt2_dir) == 32
    for name, model in (("lm", TransformerLM(LMConfig.tiny(64, max_len=48))), ("retro", Retro(RetroConfig.tiny(64)))):
        save_checkpoint(tmp_path / name / "checkpoint.pt", kind=name, model=model, config=model.config, step=0,
                        tokenizer_fingerprint="t", extra={})
    assert checkpoint_max_len(tmp_path / "lm") == 48 and checkpoint_max_len(tmp_path / "retro") is None


def test_config(lm):
    assert lm.config.vocab_size == V and lm.config.d_model == 16 and lm.config.max_len == 32
    assert lm.config.model_type == "gpt2"
    assert not lm.training


@torch.no_grad()
def test_keys_are_the_input_of_the_last_mlp(lm, tokens):
    logits, keys = lm(tokens, return_keys=True)
    assert logits.shape == (B, T, V) and keys.shape == (B, T, 16)
    hidden = lm.hf(input_ids=tokens, output_hidden_states=True).hidden_states[-2]  # input of the last block
    block = lm.hf.transformer.h[-1]
    x = hidden + gpt2_attention(block.attn, block.ln_1(hidden))
    torch.testing.assert_close(keys, block.ln_2(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_on_keys_sees_the_keys_before_the_last_mlp(lm, tokens):
    """As `TransformerLM`'s: called once with the returned keys (B, T, d) before the last MLP runs; the
    same outputs as without it."""
    events, seen = [], []
    hook = lm.hf.transformer.h[-1].mlp.c_fc.register_forward_pre_hook(lambda *_: events.append("last mlp"))
    try:
        logits, keys = lm(tokens, return_keys=True, on_keys=lambda k: (events.append("keys"), seen.append(k)))
    finally:
        hook.remove()
    assert events == ["keys", "last mlp"] and len(seen) == 1 and seen[0].shape == (B, T, 16)
    plain_logits, plain_keys = lm(tokens, return_keys=True)
    assert torch.equal(seen[0], keys) and torch.equal(keys, plain_keys) and torch.equal(logits, plain_logits)
    assert torch.equal(lm(tokens, on_keys=seen.append), plain_logits) and torch.equal(seen[1], keys)


@torch.no_grad()
def test_logits_equal_hf(lm, tokens):
    torch.testing.assert_close(lm(tokens), lm.hf(input_ids=tokens).logits)
    targets = torch.roll(tokens, -1, dims=1)
    expected = F.cross_entropy(lm.hf(input_ids=tokens).logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(lm.loss(tokens, targets), expected)


@torch.no_grad()
@pytest.mark.parametrize("sizes", [[1] * T, [5, 1, 5], [2, 9]], ids=["one-at-a-time", "5-1-5", "2-9"])
def test_cache_matches_full_forward(lm, tokens, sizes):
    full_logits, full_keys = lm(tokens, return_keys=True)
    cache, logits, keys, start = lm.new_cache(), [], [], 0
    for size in sizes:
        out, k = lm(tokens[:, start:start + size], cache=cache, return_keys=True)
        logits.append(out)
        keys.append(k)
        start += size
    assert cache.offset == T
    torch.testing.assert_close(torch.cat(logits, dim=1), full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(keys, dim=1), full_keys, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_reorder_matches_reordered_batch(lm, tokens):
    cache = lm.new_cache()
    lm(tokens[:, :6], cache=cache)
    beams = torch.tensor([2, 0, 0, 1])  # duplicates and drops rows, as beam search does
    cache.reorder(beams)
    got = lm(tokens[beams, 6:], cache=cache)
    torch.testing.assert_close(got, lm(tokens[beams])[:, 6:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cache_rewind_forgets_the_last_positions(lm, tokens):
    cache = lm.new_cache()
    lm(tokens[:, :6], cache=cache)
    lm((tokens[:, 6:8] + 1) % V, cache=cache)
    cache.rewind(2)
    assert cache.offset == 6
    torch.testing.assert_close(lm(tokens[:, 6:], cache=cache), lm(tokens)[:, 6:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_too_long_is_refused(lm):
    cache = lm.new_cache()
    lm(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_len 32"):
        lm(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@torch.no_grad()
def test_token_ids_outside_the_vocabulary_are_refused_by_name(lm):
    V = lm.config.vocab_size
    with pytest.raises(ValueError, match=rf"tokens holds token id {V}, outside the model's vocabulary \[0, {V}\)"):
        lm(torch.tensor([[1, V]]))  # a bare IndexError from the embedding (a device-side assert on a GPU)


def test_load_checkpoint_on_a_folder(gpt2_dir, lm, tokens):
    loaded = load_checkpoint(gpt2_dir)
    assert loaded.kind == "hf" and loaded.step == 0 and loaded.tokenizer_fingerprint == ""
    assert isinstance(loaded.model, HFCausalLM) and not loaded.model.training
    assert loaded.config == lm.config
    torch.testing.assert_close(loaded.model(tokens), lm(tokens))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "opt"])
def test_last_ffn_found_in_other_architectures(arch):
    import transformers

    small = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
        expected = model.model.layers[-1].mlp
    elif arch == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**small))
        expected = model.gpt_neox.layers[-1].mlp
    else:
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
            word_embed_proj_dim=16))
        expected = model.model.decoder.layers[-1].fc1
    assert find_last_ffn(model, 2) is expected
    with torch.no_grad():
        tokens = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
        logits, keys = HFCausalLM(model.eval())(tokens, return_keys=True)
    assert logits.shape == (2, 5, V) and keys.shape == (2, 5, 16)


def test_missing_ffn_is_a_clear_error():
    blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    with pytest.raises(ValueError, match="cannot find the feed-forward block"):
        find_last_ffn(torch.nn.Sequential(blocks), 3)
    with pytest.raises(ValueError, match="no list of 5 transformer layers"):
        find_last_ffn(torch.nn.Sequential(blocks), 5)
