"""Attention maps of RETRO's chunked cross-attention (CCA): which neighbour tokens a chunk's positions read.

CCA is shifted by chunk_len - 1 (see `lm_worker.models.retro`): the neighbours retrieved for chunk c are
read by positions c*L + L - 1 ... c*L + 2L - 2 (the last token of chunk c and the first L - 1 tokens
of chunk c + 1). `plot_chunk_attention` draws those positions' weights over the K x 2L neighbour
tokens, averaged over heads, one panel per CCA layer, as a PNG. It draws on a bare `Figure` (the Agg
canvas), so pyplot's global state is untouched.

Example:
    >>> weights = plot_chunk_attention(model, tokens, neighbours, tokenizer, chunk=3, out_path=Path("cca.png"))
    >>> weights.shape  # (n_cca_layers, positions, K * 2L); (positions, K * 2L) with layer=...
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from lm_worker.models.retro import Retro

log = logging.getLogger(__name__)


def chunk_query_positions(chunk: int, chunk_len: int, n_tokens: int) -> np.ndarray:
    """Positions that attend to chunk `chunk`'s neighbours: c*L + L - 1 ... c*L + 2L - 2, within the tokens."""
    first = chunk * chunk_len + chunk_len - 1
    return np.arange(first, min(first + chunk_len, n_tokens))


def _check(model: Retro, tokens: torch.Tensor, neighbours: torch.Tensor | None, chunk: int,
           layer: int | None) -> None:
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be (1, T), got {tuple(tokens.shape)}")
    if neighbours is None or neighbours.dim() != 4 or neighbours.shape[0] != 1:
        shape = None if neighbours is None else tuple(neighbours.shape)
        raise ValueError(f"neighbours must be (1, C, K, 2L), got {shape}")
    L, T, C = model.config.chunk_len, tokens.shape[1], neighbours.shape[1]
    complete = T // L
    if not 0 <= chunk < min(C, complete):
        raise ValueError(f"chunk {chunk} has no neighbours attended to: the neighbours hold {C} chunks and the {T} "
                         f"tokens hold {complete} complete chunks of {L}; pick a chunk in [0, {min(C, complete)})")
    if layer is not None and layer not in model.cca_layers:
        raise ValueError(f"layer {layer} has no CCA; CCA layers are {model.cca_layers}")


def _label(tokenizer, token: int) -> str:
    """A short, one-line label for a token id."""
    if tokenizer is None:
        return str(token)
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in tokenizer.decode([token]))  # \n -> "\\n"
    text = text.replace(" ", "␣")
    text = text if len(text) <= 12 else text[:11] + "…"
    return text.replace("$", r"\$")  # no mathtext


def _draw(ax, weights: np.ndarray, row_labels: list[str], col_labels: list[str], K: int, N: int, title: str):
    """One heatmap (positions x K*N): a solid line between neighbours, a dashed one before each continuation,
    and the parts named along the top."""
    image = ax.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest")
    for k in range(K):
        if k:
            ax.axvline(k * N - 0.5, color="white", linewidth=1.5)
        ax.axvline(k * N + N // 2 - 0.5, color="white", linewidth=0.6, linestyle="--")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=7)
    top = ax.secondary_xaxis("top")
    top.set_xticks([k * N + part * N // 2 + N / 4 - 0.5 for k in range(K) for part in (0, 1)])
    top.set_xticklabels([f"neighbour {k} {part}" for k in range(K) for part in ("chunk", "continuation")], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("reading position: its token", fontsize=7)
    ax.set_xlabel("retrieved token (each neighbour: its chunk, then the chunk's continuation)", fontsize=7)
    return image


def plot_chunk_attention(model: Retro, tokens: torch.Tensor, neighbours: torch.Tensor, tokenizer, chunk: int,
                         out_path: Path, layer: int | None = None) -> np.ndarray:
    """Plots how the positions that read chunk `chunk`'s neighbours attend to them, and returns the weights.

    Args:
        model: a `Retro` model (run here cache-free, in eval mode).
        tokens: (1, T) token ids.
        neighbours: (1, C, K, 2L) neighbour token ids, row c retrieved for chunk c.
        tokenizer: labels tokens with their text (`Tokenizer`), or None to label them with ids.
        chunk: the chunk whose neighbours are shown; its positions are c*L + L - 1 ... c*L + 2L - 2.
        out_path: the PNG to write.
        layer: one CCA decoder layer (an index in `model.cca_layers`), or None for every CCA layer.

    Returns:
        float32 head-averaged CCA weights, (P, K * 2L) for one layer or (n_cca_layers, P, K * 2L);
        each row sums to 1 (a softmax over the K * 2L neighbour tokens).

    Raises:
        ValueError: tokens or neighbours are not one sequence, `chunk` has no neighbours or no position
            that reads them, or `layer` has no CCA.
    """
    _check(model, tokens, neighbours, chunk, layer)
    L = model.config.chunk_len
    K, N = neighbours.shape[2:4]
    model.eval()
    with torch.inference_mode():
        _, attention = model(tokens, neighbours, return_attention=True)  # per CCA layer (1, H, T, K, N)
    layers = model.cca_layers if layer is None else (layer,)
    positions = chunk_query_positions(chunk, L, tokens.shape[1])
    maps = np.stack([attention[model.cca_layers.index(i)][0].mean(0)[positions].reshape(len(positions), K * N)
                     .float().cpu().numpy() for i in layers])  # (layers, P, K*N)
    row_labels = [f"{p}: {_label(tokenizer, int(tokens[0, p]))}" for p in positions]
    col_labels = [_label(tokenizer, int(t)) for t in neighbours[0, chunk].reshape(-1)]
    fig = Figure(figsize=(max(6.0, 0.16 * K * N + 2), (0.25 * len(positions) + 2) * len(layers)))  # Agg canvas
    axes = fig.subplots(len(layers), 1, squeeze=False)
    for ax, i, weights in zip(axes[:, 0], layers, maps):
        image = _draw(ax, weights, row_labels, col_labels, K, N, f"CCA layer {i}, chunk {chunk}, mean over heads")
        bar = fig.colorbar(image, ax=ax, fraction=0.02)
        bar.set_label("attention weight (mean over heads; a row sums to 1)", fontsize=7)
    fig.tight_layout()
    save_whole(fig, Path(out_path))
    log.info("wrote the CCA map of chunk %d to %s", chunk, out_path)
    return maps[0] if layer is not None else maps


def save_whole(fig: Figure, out_path: Path) -> None:
    """Saves `fig` at `out_path` in the format its suffix names (PNG without one), through a file beside it
    that replaces `out_path` only once written whole: a save that fails leaves an earlier file as it was."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(work, format=out_path.suffix[1:].lower() or "png", dpi=120,
                    bbox_inches="tight")  # long token labels are not cut off
        os.replace(work, out_path)
    except BaseException:
        work.unlink(missing_ok=True)
        raise


def plot_retrieved_attention(model: Retro, token_ids, retriever, encoder, tokenizer, chunk: int,
                             out_path: Path) -> np.ndarray:
    """Retrieves neighbours for the complete chunks of `token_ids` (one sequence) and plots chunk
    `chunk`'s attention over them with `plot_chunk_attention`; returns its weights.

    Args:
        retriever: anything with `chunks(embeddings (C, d)) -> (C, K, 2L)`, e.g. a `ServiceRetriever`.
        encoder: embeds token chunks (C, L), e.g. a `ChunkEncoder`.

    Raises:
        ValueError: the text has no chunk after `chunk` to read its neighbours.
    """
    L = model.config.chunk_len
    C = len(token_ids) // L
    if not 0 <= chunk < C:
        raise ValueError(f"chunk {chunk} is not a whole chunk of the text: it has {C} complete chunk"
                         f"{'s' * (C != 1)} of {L} tokens; pick a chunk in [0, {C})")
    tokens = torch.tensor(np.array(token_ids[: C * L]), dtype=torch.long)  # (C*L,), a copy of a memmap slice
    neighbours = retriever.chunks(encoder.embed(tokens.view(C, L).numpy()))  # (C, K, 2L)
    return plot_chunk_attention(model, tokens[None], torch.from_numpy(neighbours)[None], tokenizer, chunk, out_path)
