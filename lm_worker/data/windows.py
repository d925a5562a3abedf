"""Sliding windows over a token stream, shared by kNN-LM encoding and perplexity evaluation.

Windows of at most `context_len` positions slide by `stride`: the first one covers (and scores)
every position it holds, each later one only its last `stride`, so every position after the first
window sees at least `context_len - stride` earlier tokens (fairseq's `--context-window`). The
scored ranges tile the stream in order; a key or a score is computed once per position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Input positions [start, end) (targets start + 1 .. end); positions [score_from, end) are scored."""

    start: int
    end: int
    score_from: int


def iter_windows(n_positions: int, context_len: int, stride: int, align: int = 1) -> Iterator[Window]:
    """Sliding windows that score each of `n_positions` positions exactly once, in order.

    Every window holds at most `context_len` positions and starts at a multiple of `align`
    (RETRO's chunk length; `context_len` and `stride` must then be multiples of it).
    """
    if not 1 <= stride <= context_len:  # 0 would never end; past context_len, positions would lose their context
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    if align > 1 and (context_len % align or stride % align):
        raise ValueError(f"context_len {context_len} and stride {stride} must be multiples of {align}")
    end = min(context_len, n_positions)
    if end > 0:
        yield Window(0, end, 0)
    while end < n_positions:
        new_end = min(end + stride, n_positions)
        start = -(-max(0, new_end - context_len) // align) * align  # rounded up to a multiple of align
        yield Window(start, new_end, end)
        end = new_end
