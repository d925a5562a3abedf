"""Steppers: a model, its key/value cache and its retrieval behind the `lm_worker.decode.Stepper` protocol.

- `LMStepper`: a plain LM, log-softmax of the last position's logits.
- `KnnLMStepper`: kNN-LM, log(λ p_kNN + (1-λ) p_LM) with neighbours of the newest position's key
  retrieved for every row in one call per step. Its steps also come in two phases (`submit_step`: model
  step and request sent; `finish`: wait and mix), and `fork` makes a copy with its own cache, so with
  `overlap=True` `generate` pipelines two prompt groups across steps (`lm_worker.pipelined`): one group's
  request is in flight while the other group's model step runs. Same tokens, less time blocked.
- `SpeculativeKnnLMStepper` (in `lm_worker.speculative`): kNN-LM that computes the next step on the
  LM's own argmax while this step's neighbours are in flight.
- `RetroStepper`: RETRO, neighbours per chunk. Chunk c's neighbours are first needed when its last
  token (position c*L + L - 1) is fed. With `prefetch` s > 0 (PipeRAG-style) the query for chunk c is the
  window of the L most recent tokens when position c*L + L - 1 - s is fed; with `overlap` it is embedded
  and searched from that moment, in a background thread, while the next s tokens are decoded; without
  it the same query is embedded and searched, blocking, when the neighbours are needed (so the two
  produce the same tokens). prefetch 0 is exact RETRO: the query is chunk c itself.

Every stepper counts its time in `stats` (`StepperStats`): model compute, query encoding, time blocked
on retrieval, and the latency of the retrievals themselves, so a caller can tell how much was hidden.

Example:
    >>> stepper = KnnLMStepper(lm, ServiceRetriever(address, RetrievalConfig(k=64)), lam=0.25, overlap=True)
    >>> out = generate(stepper, prompt, GenerateConfig(max_new_tokens=32))  # two groups, interleaved
    >>> stepper.stats.wait_s, stepper.stats.retrieval_s  # summed over both groups
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lm_worker.knnlm import interpolate, knn_log_probs


@dataclass
class StepperStats:
    """Where a stepper's time went (seconds) and how often it retrieved.

    compute_s: model forwards and mixing. wait_s: blocked on retrieval (blocking calls, or waiting on a
    future). retrieval_s: the retrievals' own latency (a blocking call's duration, or a future's
    submit-to-done time); for RETRO it includes embedding the queries, of which encode_s is the part.
    retrieval_s - wait_s is the retrieval time hidden behind compute. steps: model steps (start included);
    a pipelined generate counts each group's, and its forks share one `StepperStats`, so all of it is summed.
    guessed, guessed_right: rows whose guessed next token a speculative stepper checked against the token
    the decoder chose, and how many of those it had right (`lm_worker.speculative`). steps_checked,
    steps_held: steps whose guess (made or only computed) it checked, and those where every row's held.
    """

    compute_s: float = 0.0
    encode_s: float = 0.0
    wait_s: float = 0.0
    retrieval_s: float = 0.0
    retrieval_calls: int = 0
    queries: int = 0
    steps: int = 0
    guessed: int = 0
    guessed_right: int = 0
    steps_checked: int = 0
    steps_held: int = 0

    @property
    def hidden_s(self) -> float:
        return max(0.0, self.retrieval_s - self.wait_s)


class _Pending:
    """A retrieval in flight: its future, when it was sent, when it finished, and which of its rows
    each row of the current batch takes (None: all, in order), composed through every `reorder`."""

    def __init__(self, future: Future):
        self.future = future
        self.sent = time.perf_counter()
        self.finished: float | None = None
        self.rows: torch.Tensor | None = None
        future.add_done_callback(self._done)

    def _done(self, _future: Future) -> None:
        self.finished = time.perf_counter()

    def reorder(self, indices: torch.Tensor) -> None:
        self.rows = indices if self.rows is None else self.rows.index_select(0, indices)


def _wait(pending: _Pending, stats: StepperStats) -> Any:
    """The future's result, counting the time blocked on it and its latency."""
    started = time.perf_counter()
    result = pending.future.result()
    now = time.perf_counter()
    stats.wait_s += now - started
    stats.retrieval_s += (pending.finished or now) - pending.sent
    return result


def _blocking(call, stats: StepperStats) -> Any:
    """A blocking retrieval: all of its time is both latency and waiting."""
    started = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - started
    stats.wait_s += elapsed
    stats.retrieval_s += elapsed
    stats.retrieval_calls += 1
    return result


def _last_log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)


class LMStepper:
    """A plain LM with its key/value cache: anything with `forward(tokens, cache)` and `new_cache()`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = None
        self.stats = StepperStats()

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, V) of the token after the prompt (B, T); resets the cache."""
        self.cache = self.model.new_cache()
        return self._forward(prompt)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, V) after feeding one token (B,) per row."""
        return self._forward(tokens[:, None])

    @torch.no_grad()
    def reorder(self, indices: torch.Tensor) -> None:
        self.cache.reorder(indices)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = _last_log_probs(self.model(tokens, cache=self.cache))
        self.stats.compute_s += time.perf_counter() - started
        self.stats.steps += 1
        return out


# ---------------------------------------------------------------------------------------------
# kNN-LM
# ---------------------------------------------------------------------------------------------

@dataclass
class KnnStep:
    """A kNN-LM step in flight: the LM's log-probs (b, V) and its neighbours, found (serial) or a `_Pending`."""

    lm_log_probs: torch.Tensor
    found: Any


class KnnLMStepper:
    """kNN-LM decoding: the LM's next-token distribution mixed with its neighbours', every step.

    `start` / `step` run a whole step; `submit_start` / `submit_step` run the model and send the request
    (a `KnnStep` comes back) and `finish(step)` waits for the neighbours and mixes, so a caller can compute
    in between. `fork()` gives a stepper with the same model, retriever and settings, its own cache and
    the same `stats` object: the pipeline decodes each prompt group with a fork and their times add up.

    Args:
        model: a `TransformerLM` (or anything with `forward(tokens, cache, return_keys)` and `new_cache()`).
        retriever: a `ServiceRetriever` or `InProcessRetriever` over a kNN-LM datastore of this LM's keys.
        lam: λ, the weight of p_kNN.
        temperature: of the neighbour softmax over -distance.
        overlap: send each request as a future (`submit_knn`) and let `generate` pipeline two prompt groups
            (`pipelined` is then true; see `lm_worker.pipelined`); False retrieves with one blocking call
            per step. Either way each row gets the same neighbours and the same tokens. The pipeline runs two
            half-batch forwards and two requests per step, so it pays only where a half-batch forward costs
            clearly less than a full one (large batches) and the requests' latency does not compete with the
            model for the same cores; at small batches, where a forward's cost hardly depends on its rows,
            it is slower than serial (see `benchmarks/decoding.py`).
    """

    def __init__(self, model: torch.nn.Module, retriever, lam: float = 0.25, temperature: float = 1.0,
                 overlap: bool = False):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must lie in [0, 1], got {lam}")
        self.model, self.retriever = model, retriever
        self.lam, self.temperature, self.overlap = lam, temperature, overlap
        self.stats = StepperStats()
        self.cache = None

    @property
    def pipelined(self) -> bool:
        """Whether `generate` decodes with this stepper in interleaved groups."""
        return self.overlap

    def fork(self) -> KnnLMStepper:
        """A copy with the same model, retriever, settings and `stats`, and no cache yet."""
        twin = copy.copy(self)
        twin.cache = None
        return twin

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Mixed log-probs (B, V) of the token after the prompt (B, T); resets the cache."""
        return self.finish(self.submit_start(prompt))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mixed log-probs (B, V) after feeding one token (B,) per row."""
        return self.finish(self.submit_step(tokens))

    @torch.no_grad()
    def submit_start(self, prompt: torch.Tensor) -> KnnStep:
        """Runs the prompt (B, T) through a fresh cache and sends the retrieval for its last position."""
        self.cache = self.model.new_cache()
        return self._submit(prompt)

    @torch.no_grad()
    def submit_step(self, tokens: torch.Tensor) -> KnnStep:
        """Feeds one token (B,) per row and sends the retrieval for the new position."""
        return self._submit(tokens[:, None])

    @torch.no_grad()
    def finish(self, step: KnnStep) -> torch.Tensor:
        """Mixed log-probs (B, V) of a submitted step, once its neighbours are in."""
        found = _wait(step.found, self.stats) if isinstance(step.found, _Pending) else step.found
        self.stats.steps += 1
        return self._mix(step.lm_log_probs, found)

    @torch.no_grad()
    def reorder(self, indices: torch.Tensor) -> None:
        """Selects batch rows (B',) of the cache; call it between a `finish` and the next submit."""
        self.cache.reorder(indices)

    def _submit(self, tokens: torch.Tensor, in_flight: bool | None = None) -> KnnStep:
        """Model step on `tokens` (B, T) and the request for the last position's neighbours: sent as a
        future when `in_flight` (default: `overlap`), else answered at once."""
        lm_log_probs, keys = self._model_step(tokens)
        return KnnStep(lm_log_probs, self._request(keys, self.overlap if in_flight is None else in_flight))

    def _model_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """The LM's log-probs (B, V) and kNN-LM keys (B, d) at the last of `tokens` (B, T), cache advanced."""
        started = time.perf_counter()
        logits, keys = self.model(tokens, cache=self.cache, return_keys=True)  # (B, T, V), (B, T, d)
        lm_log_probs = _last_log_probs(logits)  # (B, V)
        keys = np.ascontiguousarray(keys[:, -1].float().cpu().numpy())  # (B, d)
        self.stats.compute_s += time.perf_counter() - started
        return lm_log_probs, keys

    def _request(self, keys: np.ndarray, in_flight: bool):
        """The neighbours of `keys` (n, d): a `_Pending` future, or found now (blocking)."""
        self.stats.queries += len(keys)
        if in_flight:
            self.stats.retrieval_calls += 1
            return _Pending(self.retriever.submit_knn(keys))
        return _blocking(lambda: self.retriever.knn(keys), self.stats)

    def _mix(self, lm_log_probs: torch.Tensor, found) -> torch.Tensor:
        """log(λ p_kNN + (1-λ) p_LM) (B, V) from the LM's log-probs and the neighbours found."""
        started = time.perf_counter()
        device = lm_log_probs.device
        knn = knn_log_probs(torch.tensor(found.distances, device=device),
                            torch.tensor(found.values, dtype=torch.long, device=device),
                            lm_log_probs.shape[-1], self.temperature)  # (B, V)
        out = interpolate(lm_log_probs, knn, self.lam)
        self.stats.compute_s += time.perf_counter() - started
        return out


# ---------------------------------------------------------------------------------------------
# RETRO
# ---------------------------------------------------------------------------------------------

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
        self._pending: dict[int, _Pending] = {}
        self._queried = 0  # chunks before this one have been sent or retrieved
        self._pool: ThreadPoolExecutor | None = None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Log-probs (B, V) after the prompt (B, T); the prompt's complete chunks are retrieved in one call."""
        self.cache = self.model.new_cache()
        self.history = prompt.long().clone()
        self.neighbours = torch.zeros(len(prompt), 0, self.n_neighbours, 2 * self.chunk_len, dtype=torch.long,
                                      device=prompt.device)
        self._pending, self._queried = {}, 0
        return self._advance(self.history)

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

    def close(self) -> None:
        """Stops the prefetch thread (a prefetch never needed, e.g. past the last token, is dropped)."""
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
        out = _last_log_probs(logits)
        self.stats.compute_s += time.perf_counter() - started
        self.stats.steps += 1
        return out

    def _send_prefetches(self, known: int, due: int) -> None:
        """With overlap: sends the queries of chunks not yet due whose query position is known."""
        chunk = max(self._queried, due)
        while self.overlap and self.prefetch and self._query_position(chunk) < known:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="retro-prefetch")
            self._pending[chunk] = _Pending(self._pool.submit(self._query, [self._window(chunk)]))
            self.stats.retrieval_calls += 1
            self.stats.queries += len(self.history)
            chunk += 1
        self._queried = max(self._queried, chunk)

    def _gather(self, due: int) -> None:
        """Appends the neighbours of chunks have .. due-1: collected if in flight, else retrieved in one call."""
        have = self.neighbours.shape[1]
        if due <= have:
            return
        missing = [c for c in range(have, due) if c not in self._pending]
        fetched = {}
        if missing:
            found, encode_s = _blocking(lambda: self._query([self._window(c) for c in missing]), self.stats)
            self.stats.encode_s += encode_s
            self.stats.queries += len(missing) * len(self.history)
            rows = self._neighbour_rows(found, len(missing))  # (B, m, K, 2L)
            fetched = {c: rows[:, i] for i, c in enumerate(missing)}
        for c in range(have, due):
            if c in self._pending:
                pending = self._pending.pop(c)
                found, encode_s = _wait(pending, self.stats)
                self.stats.encode_s += encode_s
                rows = self._neighbour_rows(found, 1)[:, 0]  # (B0, K, 2L)
                fetched[c] = rows if pending.rows is None else rows.index_select(0, pending.rows)
        new = torch.stack([fetched[c] for c in range(have, due)], dim=1)  # (B, due - have, K, 2L)
        self.neighbours = torch.cat([self.neighbours, new], dim=1)
        self._queried = max(self._queried, due)
