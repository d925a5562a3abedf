"""The small training data the training tests share: a prepared corpus and fake RETRO neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lm_worker.data.prepare import PrepareConfig, prepare_corpus
from lm_worker.data.token_store import TokenStore

L = 4  # RetroConfig.tiny's chunk length


def small_corpus(corpus: Path, out: Path) -> Path:
    """`out`: a repetitive corpus of 12 small files written to `corpus`, prepared with a 300-token BPE."""
    for i in range(12):
        lines = [f"def f{j % 5}(x):\n    return x + {j % 3}\n" for j in range(i, i + 60)]
        (corpus / f"mod{i}.py").write_text("".join(lines))
    prepare_corpus(PrepareConfig(out=out, corpus=str(corpus), vocab_size=300, heldout_fraction=0.25, progress=False))
    return out


def fake_neighbours(data: Path, out: Path) -> Path:
    """`out`: neighbours of every chunk of `data`'s splits, two chunk + continuation windows each, taken
    from elsewhere in the stream."""
    for split in ("train", "heldout"):
        tokens = np.asarray(TokenStore.open(data / split).tokens)
        n = len(tokens) // L
        starts = (np.arange(n)[:, None] * 7 + np.array([[3, 11]])) % (len(tokens) - 2 * L)  # (n, K)
        rows = tokens[starts[..., None] + np.arange(2 * L)]  # (n, K, 2L)
        np.save(out / f"neighbours-{split}.npy", rows.astype(np.int32))
    return out
