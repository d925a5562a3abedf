"""What a retrieval asks for, and the kNN-LM and RETRO neighbours it gets back as arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Ranges = Sequence[tuple[int, int] | None] | None  # per query: one [start, end) row range to exclude, or None


@dataclass(frozen=True)
class RetrievalConfig:
    """Per-request knobs: neighbours per query, inverted lists probed (0: the datastore's default),
    exact re-ranking of `rerank_candidates` candidates from the stored keys, and the deadline."""

    k: int = 64
    nprobe: int = 0
    exact_rerank: bool = False
    rerank_candidates: int = 0
    timeout_s: float = 300.0

    def search_settings(self) -> dict:
        """What of a search, beyond k, changes the neighbours it finds (not its deadline), as a record says it."""
        return {"nprobe": self.nprobe, "exact_rerank": self.exact_rerank, "rerank_candidates": self.rerank_candidates}


@dataclass
class KnnNeighbours:
    """kNN-LM neighbours: distances float32 (n, k) squared L2 (inf where there is no neighbour),
    values int64 (n, k) next-token ids (-1 where there is no neighbour), ids int64 (n, k) rows; with
    successors asked for, next_values int64 (n, k, s): the values of the s rows after each neighbour
    (-1 where there is none: past its shard's end, or no neighbour), and next_ids int64 (n, k, s) their
    rows; with keys asked for, keys float32 (n, k, d) the neighbours' stored keys and next_keys float32
    (n, k, s, d) their successors'."""

    distances: np.ndarray
    values: np.ndarray
    ids: np.ndarray
    next_values: np.ndarray | None = None
    next_ids: np.ndarray | None = None
    keys: np.ndarray | None = None
    next_keys: np.ndarray | None = None


@dataclass
class ChunkNeighbours:
    """RETRO neighbours with their datastore rows: tokens int64 (n, k, 2L) (each neighbour chunk and its
    continuation), ids int64 (n, k) (-1 where there is no neighbour); with successors asked for, next_ids
    int64 (n, k, s) and next_tokens int64 (n, k, s, 2L): the s chunks after each neighbour; with keys asked
    for, keys float32 (n, k, d) and next_keys float32 (n, k, s, d)."""

    tokens: np.ndarray
    ids: np.ndarray
    next_ids: np.ndarray | None = None
    next_tokens: np.ndarray | None = None
    keys: np.ndarray | None = None
    next_keys: np.ndarray | None = None


def check_retro_inputs(model, retriever, encoder=None) -> None:
    """ValueError when `model` is not a RETRO model (one whose config has a chunk_len), `retriever`'s
    datastore says (its manifest's kind) it is not a RETRO datastore, or its keys were made by an encoder
    other than `encoder` (both fingerprints known: the manifest's "encoder", `encoder.fingerprint`)."""
    if not hasattr(getattr(model, "config", None), "chunk_len"):
        raise ValueError(f"RETRO takes a Retro model, got {type(model).__name__}: decode a language model with "
                         "LMStepper or KnnLMStepper, evaluate it with evaluate_lm or evaluate_knnlm")
    kind = (getattr(retriever, "metadata", None) or {}).get("kind")
    if kind not in (None, "retro"):
        raise ValueError(f"the datastore is a {str(kind)[:80]!r} datastore (its manifest's kind), not a RETRO one")
    made_by, mine = (getattr(retriever, "metadata", None) or {}).get("encoder"), getattr(encoder, "fingerprint", None)
    if made_by and mine and made_by != mine:  # the datastore's value escaped as repr, at most 80 characters
        raise ValueError(f"the datastore's keys were made by the encoder {str(made_by)[:80]!r}, not by this one "
                         f"({mine!r}): query it with the encoder that built it")
