"""`lm-worker generate` with a Hugging Face checkpoint refuses `--ralmspec` (speculative retrieval needs a
TransformerLM's per-row positions) in one line, before any retrieval service starts: the datastore named
does not even exist, so a later refusal would be about it instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm_worker.cli import main


def one_line_error(capsys, *args: str) -> str:
    """Runs `lm-worker ARGS`; asserts it failed with exit code 1 and one stderr line; returns that line."""
    code = main(["--no-progress", "--log-level", "WARNING", *args])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN/data (a tiny BPE over a tiny corpus) and RUN/gpt2 (an untrained tiny GPT-2 folder)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hf-generate")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"def f_{i}(x):\n    return x + {i}\n" * 4}) + "\n"
                              for i in range(8)))
    assert main(["--no-progress", "--log-level", "WARNING", "prepare", "--corpus", str(corpus), "--out",
                 str(root / "data"), "--vocab-size", "300", "--heldout-fraction", "0.2"]) == 0
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    return root


@pytest.mark.parametrize("extra", [[], ["--guess", "lm"]], ids=["cache", "lm"])
def test_ralmspec_with_a_hugging_face_checkpoint_is_refused_before_any_server(capsys, run, extra):
    err = one_line_error(capsys, "generate", "--checkpoint", str(run / "gpt2"), "--data", str(run / "data"),
                         "--prompt", "def", "--datastore", str(run / "no-such-datastore"), "--ralmspec", *extra)
    assert err == ("lm-worker generate: error: --ralmspec speculative retrieval needs a TransformerLM (per-row "
                   "positions): it takes a checkpoint of kind 'lm', and --checkpoint is a Hugging Face model (kind "
                   "'hf')"), err
