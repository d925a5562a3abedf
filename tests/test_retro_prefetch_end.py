"""RETRO decoding with overlapped prefetch leaves nothing behind when its decode loop ends: a prefetch
sent for a chunk that an early EOS never reaches is dropped and the prefetch thread let go, so no stale
query holds up the next decode's (e.g. `lm-worker generate`'s next prompt length). The tokens are those
of serial retrieval."""

from __future__ import annotations

import threading

import pytest
import torch
from test_steppers import FakeEncoder, FakeRetriever, L, random_tokens

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.retro_stepper import RetroStepper


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread."""


@pytest.fixture(scope="module")
def retro():
    from test_steppers import K, V, sharpened

    from lm_worker.models.retro import Retro, RetroConfig

    torch.manual_seed(1)
    return sharpened(Retro(RetroConfig.tiny(vocab_size=V, chunk_len=L, n_neighbours=K)))


def fake_chunks() -> FakeRetriever:
    payload = random_tokens((40, 2 * L), seed=4).numpy()
    return FakeRetriever(FakeEncoder().embed(payload[:, :L]), payload, k=3)


def test_a_prefetch_past_an_early_eos_is_let_go_with_its_thread(retro):
    """Prompt of 5 tokens, chunks of 4, prefetch 3: chunk 1's query (position 4) is sent from `start`; EOS
    is the first token chosen, so chunk 1 never completes. Once `generate` returns, the prefetch thread
    ends (after the search it may have begun), as it does for two prompt lengths decoded one after the other."""
    prompt, encoder = random_tokens((1, 5), seed=10), FakeEncoder()
    first = generate(RetroStepper(retro, fake_chunks(), encoder, prefetch=3), prompt, GenerateConfig(max_new_tokens=1))
    cfg = GenerateConfig(max_new_tokens=8, eos_id=int(first.tokens[0, 0]))
    serial = generate(RetroStepper(retro, fake_chunks(), encoder, prefetch=3), prompt, cfg)
    before = set(threading.enumerate())
    stepper = RetroStepper(retro, fake_chunks(), encoder, prefetch=3, overlap=True)
    out = generate(stepper, prompt, cfg)
    assert torch.equal(out.tokens, serial.tokens) and out.lengths.tolist() == [1]
    assert stepper.stats.retrieval_calls == 2  # chunk 0 with the prompt, and chunk 1's prefetch, never needed
    generate(stepper, random_tokens((2, 6), seed=11), cfg)  # the next prompt length, as `generate`'s CLI decodes
    prefetchers = [t for t in threading.enumerate() if t not in before and t.name.startswith("retro-prefetch")]
    for thread in prefetchers:
        thread.join(timeout=2.0)
    assert not any(t.is_alive() for t in prefetchers)
