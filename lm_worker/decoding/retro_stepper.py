"""RETRO decoding, with neighbours per chunk.

Chunk c's neighbours are first needed when its last token (position c*L + L - 1) is fed. With
`prefetch` s > 0 (PipeRAG-style) the query for chunk c is the window of the L most recent tokens when
position c*L + L - 1 - s is fed; with `overlap` it is embedded and searched from that moment, in a
background thread, while the next s tokens are decoded; without it the same query is embedded and
searched, blocking, when the neighbours are needed (so the two produce the same tokens). prefetch 0 is
exact RETRO: the query is chunk c itself.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lm_worker.decoding.stepper_stats import Pending, StepperStats, blocking, last_log_probs, wait_for
from lm_worker.retrieval.config import check_retro_inputs


class RetroStepper:
    """RETRO decoding with neighbours retrieved per chunk, optionally prefetched (see the module doc).

    A query is a window of tokens, embedded by `encoder` and searched with `retriever.chunks`; both make
    up its retrieval time. With overlap, prefetched queries run (embedding and search) in a background
    thread of this stepper, so the whole retrieval is in flight while the model decodes.

    Args:
        model: a `Retro` model.
        retriever: a retriever over a RETRO datastore (`chunks(embeddings) -> (n, k, 2L)`) with
            k >= n_neighbours; the first `n_neighbours` neighbours are used.
        encoder: embeds query windows: `embed(int (n, w)) -> float32 (n, d)`, e.g. a `ChunkEncoder`.
        prefetch: s in [0, chunk_len): how many tokens before a chunk's end its query is formed.
        overlap: send prefetched queries when formed (True) or when their neighbours are needed (False).

    Attributes:
        neighbours: (B, C, K, 2L) long, the neighbours of chunk c in row c, as passed to the model.
        history: (B, S) long, every token fed so far.
    """

    def __init__(self, model: torch.nn.Module, retriever, encoder, prefetch: int = 0, overlap: bool = False):
        check_retro_inputs(model, retriever, encoder)
        L = model.config.chunk_len
        if not 0 <= prefetch < L:
            raise ValueError(f"prefetch must lie in [0, chunk_len={L}), got {prefetch}")
        self.model, self.retriever, self.encoder = model, retriever, encoder
        self.prefetch, self.overlap = prefetch, overlap
        self.chunk_len, self.n_neighbours = L, model.config.n_neighbours
        self.stats = StepperStats()
        self.cache = None
        self.history = torch.zeros(0, 0, dtype=torch.long)
        self.neighbours = torch.zeros(0, 0, self.n_neighbours, 2 * L, dtype=torch.long)
        self._pending: dict[int, Pending] = {}
        self._queried = 0  # chunks before this one have been sent or retrieved
        self._pool: ThreadPoolExecutor | None = None
        self._expected: int | None = None  # positions the next decode loop feeds at most (`expect_positions`)
        self._positions: int | None = None  # the same for this one (None: unknown), set by `start`

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, V) after the prompt (B, T); the prompt's complete chunks are retrieved in one call.
        Prefetches a previous decoding left unused (one that ended without `end_decoding`) are dropped first."""
        if self._pending:
            self.end_decoding()
        self.cache = self.model.new_cache()
        self.history = prompt.long().clone()
        self.neighbours = torch.zeros(len(prompt), 0, self.n_neighbours, 2 * self.chunk_len, dtype=torch.long,
                                      device=prompt.device)
        self._pending, self._queried = {}, 0
        self._positions, self._expected = self._expected, None
        return self._advance(self.history)

    def expect_positions(self, positions: int) -> None:
        """The most positions the next decoding (from `start`) feeds: no chunk is prefetched that they
        do not complete. `generate` tells it; without it every chunk whose query is known is prefetched."""
        self._expected = positions

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, V) after feeding one token (B,) per row."""
        self.history = torch.cat([self.history, tokens.long()[:, None]], dim=1)
        return self._advance(tokens.long()[:, None])

    @torch.no_grad()
    def reorder(self, indices: torch.Tensor) -> None:
        """Selects rows of the history, the neighbours, the cache and every request in flight."""
        self.history = self.history.index_select(0, indices)
        self.neighbours = self.neighbours.index_select(0, indices)
        self.cache.reorder(indices)
        for pending in self._pending.values():
            pending.reorder(indices)

    def end_decoding(self) -> None:
        """Drops the prefetches decoding will not use (its loop ended early, on EOS or a finished beam search):
        queued ones are cancelled, and the prefetch thread ends once a search it has begun is done, so none
        runs ahead of the next decoding's (a new thread serves it)."""
        self._pending = {}
        self.close()

    def close(self) -> None:
        """Stops the prefetch thread (a prefetch never needed, e.g. past an early EOS, is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _query_position(self, chunk: int) -> int:
        return chunk * self.chunk_len + self.chunk_len - 1 - self.prefetch

    def _window(self, chunk: int) -> np.ndarray:
        """The query of `chunk` for every row: the (up to) L tokens ending at its query position, (B, w)."""
        end = self._query_position(chunk) + 1
        return self.history[:, max(0, end - self.chunk_len):end].cpu().numpy().copy()

    def _query(self, windows: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Embeds query windows and searches them in one call: (m * B, k, 2L) tokens and the embedding seconds."""
        started = time.perf_counter()
        embedded = np.concatenate([self.encoder.embed(w) for w in windows]).astype(np.float32, copy=False)
        encode_s = time.perf_counter() - started
        return self.retriever.chunks(embedded), encode_s

    def _neighbour_rows(self, found: np.ndarray, chunks: int) -> torch.Tensor:
        """(chunks * B, k, 2L) retrieved tokens, chunk-major, -> (B, chunks, K, 2L)."""
        if found.shape[1] < self.n_neighbours:
            raise ValueError(f"the retriever returned {found.shape[1]} neighbours; the model needs {self.n_neighbours}")
        rows = torch.from_numpy(np.ascontiguousarray(found[:, :self.n_neighbours])).long().to(self.history.device)
        return rows.view(chunks, -1, *rows.shape[1:]).transpose(0, 1)

    def _advance(self, tokens: torch.Tensor) -> torch.Tensor:
        known = self.history.shape[1]  # positions 0 .. known-1 are known
        due = known // self.chunk_len  # chunks whose last token is known: their neighbours are needed now
        self._gather(due)
        self._send_prefetches(known, due)
        started = time.perf_counter()
        neighbours = self.neighbours if self.neighbours.shape[1] else None
        logits = self.model(tokens, neighbours, cache=self.cache)  # (B, T, V)
        out = last_log_probs(logits)
        self.stats.compute_s += time.perf_counter() - started
        self.stats.steps += 1
        return out

    def _send_prefetches(self, known: int, due: int) -> None:
        """With overlap: sends the queries of chunks not yet due whose query position is known."""
        chunk = max(self._queried, due)
        while self.overlap and self.prefetch and self._query_position(chunk) < known and self._completes(chunk):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="retro-prefetch")
            self._pending[chunk] = Pending(self._pool.submit(self._query, [self._window(chunk)]))
            self.stats.retrieval_calls += 1
            self.stats.queries += len(self.history)
            chunk += 1
        self._queried = max(self._queried, chunk)

    def _completes(self, chunk: int) -> bool:
        """Whether decoding feeds the chunk's last position (unknown: assumed so)."""
        return self._positions is None or (chunk + 1) * self.chunk_len <= self._positions

    def _gather(self, due: int) -> None:
        """Appends the neighbours of chunks have .. due-1: collected if in flight, else retrieved in one call."""
        have = self.neighbours.shape[1]
        if due <= have:
            return
        missing = [c for c in range(have, due) if c not in self._pending]
        fetched = {}
        if missing:
            found, encode_s = blocking(lambda: self._query([self._window(c) for c in missing]), self.stats)
            self.stats.encode_s += encode_s
            self.stats.queries += len(missing) * len(self.history)
            rows = self._neighbour_rows(found, len(missing))  # (B, m, K, 2L)
            fetched = {c: rows[:, i] for i, c in enumerate(missing)}
        for c in range(have, due):
            if c in self._pending:
                pending = self._pending.pop(c)
                found, encode_s = wait_for(pending, self.stats)
                self.stats.encode_s += encode_s
                rows = self._neighbour_rows(found, 1)[:, 0]  # (B0, K, 2L)
                fetched[c] = rows if pending.rows is None else rows.index_select(0, pending.rows)
        new = torch.stack([fetched[c] for c in range(have, due)], dim=1)  # (B, due - have, K, 2L)
        self.neighbours = torch.cat([self.neighbours, new], dim=1)
        self._queried = max(self._queried, due)

