"""One `RaLMSpecRetro.decode` call with `rollback="batch"`: the decode loop of `sample_or_greedy`, with
each chunk's neighbours guessed from the rows' local caches, checked once the service answers, and the
whole batch rolled back where any row's guess failed (see `lm_worker.decoding.ralmspec.retro`).

The batch keeps one length in a `RetroCache`, so a rollback is the batch's, and a guess pays only when it
holds for every row that has not finished. A failed guess costs little more than serial retrieval: it is
checked as soon as the answer is back, the steps decoded meanwhile ran while serial decoding would have
been waiting, and the step being decoded when the answer came is the most that is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.ralmspec.chunk_caches import ChunkCaches
from lm_worker.decoding.sampling import choose_tokens, row_generators
from lm_worker.decoding.stepper_stats import Pending, last_log_probs, wait_for
from lm_worker.retrieval.config import ChunkNeighbours


@dataclass
class _Snapshot:
    """The decoding state just before the step that first used a guessed chunk (restored on rollback)."""

    chunk: int
    token: torch.Tensor  # (B,) the token that step feeds
    t: int
    cache: tuple
    history_len: int
    out_len: int
    total: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    generators: list[torch.Tensor]


@dataclass
class _Guess:
    """A chunk decoded on guessed neighbours, and the service's answer for it in flight."""

    snapshot: _Snapshot
    guessed: torch.Tensor  # (B, K, 2L)
    pending: Pending
    true: torch.Tensor | None = None  # (B, K, 2L) the service's, once checked


class RetroBatchDecode:
    """One `RaLMSpecRetro.decode` call (greedy decoding or sampling), the batch rolled back together."""

    def __init__(self, owner, prompt: torch.Tensor, config: GenerateConfig):
        self.owner, self.config, self.stats = owner, config, owner.stats
        B, self.device = prompt.shape[0], prompt.device
        self.L, self.K = owner.chunk_len, owner.n_neighbours
        self.cache = owner.model.new_cache()
        self.history = prompt.long().clone()  # (B, S)
        self.neighbours = torch.zeros(B, 0, self.K, 2 * self.L, dtype=torch.long, device=self.device)  # (B, C, K, 2L)
        self.caches = ChunkCaches(B, owner.cache_rows)
        sampled = config.strategy == "sample"
        self.generators = row_generators(config.seed, config.row_indices(B), self.device) if sampled else []
        self.out: list[torch.Tensor] = []
        self.total = torch.zeros(B, dtype=torch.float32, device=self.device)
        self.lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.guess: _Guess | None = None

    def run(self) -> GenerateOutput:
        config = self.config
        log_probs, t = self._start(), 0
        while True:
            token = choose_tokens(log_probs, config, self.generators)  # (B,)
            if config.eos_id is not None:
                token = token.masked_fill(self.finished, config.eos_id)
            live = ~self.finished
            self.total += torch.where(live, log_probs.float().gather(1, token[:, None]).squeeze(1), 0.0)
            self.lengths += live.long()
            self.out.append(token)
            if config.eos_id is not None:
                self.finished |= token == config.eos_id
            if bool(self.finished.all()) or t == config.max_new_tokens - 1:
                if self.guess is None or self._guess_held():
                    break
                log_probs, t = self._roll_back()
            else:
                log_probs, t = self._feed(token, t)
            t += 1
        return GenerateOutput(torch.stack(self.out, dim=1), self.total, self.lengths, self.total.clone())

    def _start(self) -> torch.Tensor:
        """Log-probs (B, V) after the prompt; its complete chunks are retrieved in one blocking call."""
        due = self.history.shape[1] // self.L
        if due:
            found = self._blocking(self.owner.embed([self._window(c) for c in range(due)]))
            self.neighbours = self._rows(found, due)
        return self._forward(self.history)

    def _feed(self, token: torch.Tensor, t: int) -> tuple[torch.Tensor, int]:
        """Feeds one token per row; checks the guess in flight once its answer is back (rolling back if it
        failed) or, at the latest, when the next chunk completes, whose neighbours it then guesses.
        Returns (log-probs (B, V), the loop's step)."""
        if self.guess is not None and self.guess.pending.future.done() and not self._guess_held():
            return self._roll_back()
        self.history = torch.cat([self.history, token[:, None]], dim=1)
        due = self.history.shape[1] // self.L
        if due > self.neighbours.shape[1]:  # chunk due - 1 is complete: its neighbours are needed now
            if self.guess is not None and not self._guess_held():
                return self._roll_back()
            self._guess_chunk(due - 1, token, t)
        return self._forward(token[:, None]), t

    def _guess_chunk(self, chunk: int, token: torch.Tensor, t: int) -> None:
        """Sends chunk `chunk`'s query and takes each row's guess from its local cache; with no full guess
        for some row, waits for the service instead."""
        queries = self.owner.embed([self._window(chunk)])  # (B, d)
        pending = self.owner.send(queries)
        guessed = self.caches.guess(queries, self.K)
        guessed = None if guessed is None else guessed.to(self.device)  # (B, K, 2L)
        if guessed is None or not self.owner.worth_guessing():
            started = time.perf_counter()
            found = wait_for(pending, self.stats)
            self.owner.wait_s.add(time.perf_counter() - started)
            self._remember(found)
            true = self._rows(found, 1)  # (B, 1, K, 2L)
            if guessed is not None:  # the guess, checked though unused
                self._check(true[:, 0], guessed, self.finished)
            self.neighbours = torch.cat([self.neighbours, true], dim=1)
            return
        snapshot = _Snapshot(chunk, token, t, self.cache.state(), self.history.shape[1] - 1, len(self.out),
                             self.total.clone(), self.lengths.clone(), self.finished.clone(),
                             [g.get_state() for g in self.generators])
        self.guess = _Guess(snapshot, guessed, pending)
        self.neighbours = torch.cat([self.neighbours, guessed[:, None]], dim=1)
        self.stats.speculated += len(queries)

    def _guess_held(self) -> bool:
        """Waits for the guess in flight: True if the service's neighbours are the guessed ones for every row
        (the guess is then settled), False if not (the guess is kept for `_roll_back`)."""
        found = wait_for(self.guess.pending, self.stats)
        self._remember(found)
        true = self._rows(found, 1)[:, 0]  # (B, K, 2L)
        self.stats.verified += 1
        self.guess.true = true
        if self._check(true, self.guess.guessed, self.guess.snapshot.finished):
            self.stats.accepted += 1
            self.guess = None
            return True
        return False

    def _check(self, true: torch.Tensor, guessed: torch.Tensor, finished: torch.Tensor) -> bool:
        """Whether the guess (B, K, 2L) equals the service's neighbours for every row not `finished` (B,)
        when it was first used: a finished row's tokens are EOS whatever its neighbours. Counted."""
        differs = (true != guessed).flatten(1).any(dim=1) & ~finished  # (B,)
        failed = int(differs.sum())
        self.stats.verifications += 1
        self.stats.windows.append((len(true), failed))
        self.owner.held.add(float(failed == 0))
        return failed == 0

    def _roll_back(self) -> tuple[torch.Tensor, int]:
        """Back to the step that first used the failed guess; that step is fed again with the service's
        neighbours. Returns its log-probs and its loop step."""
        guess, self.guess = self.guess, None
        s = guess.snapshot
        self.stats.rollbacks += 1
        self.stats.wasted += len(self.out) - s.out_len
        self.cache.restore(s.cache)
        self.history = torch.cat([self.history[:, :s.history_len], s.token[:, None]], dim=1)
        del self.out[s.out_len:]
        self.total, self.lengths, self.finished = s.total, s.lengths, s.finished  # not used again
        for g, state in zip(self.generators, s.generators):
            g.set_state(state)
        self.neighbours = torch.cat([self.neighbours[:, :s.chunk], guess.true[:, None]], dim=1)
        return self._forward(s.token[:, None]), s.t

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        neighbours = self.neighbours if self.neighbours.shape[1] else None
        log_probs = last_log_probs(self.owner.model(tokens, neighbours, cache=self.cache))  # (B, V)
        elapsed = time.perf_counter() - started
        self.stats.compute_s += elapsed
        if tokens.shape[1] == 1:
            self.owner.step_s.add(elapsed)
        self.stats.steps += 1
        self.stats.ticks += 1
        return log_probs

    def _window(self, chunk: int) -> np.ndarray:
        """Chunk `chunk`'s tokens for every row (B, L): its query, as `RetroStepper` forms it at prefetch 0."""
        return self.history[:, chunk * self.L:(chunk + 1) * self.L].cpu().numpy().copy()

    def _blocking(self, queries: np.ndarray) -> ChunkNeighbours:
        found = wait_for(self.owner.send(queries), self.stats)
        self._remember(found)
        return found

    def _rows(self, found: ChunkNeighbours, chunks: int) -> torch.Tensor:
        """(chunks * B, k, 2L) tokens, chunk-major, -> (B, chunks, K, 2L), the first K neighbours."""
        rows = self.owner.neighbour_tokens(found, self.device)  # (chunks * B, K, 2L)
        return rows.view(chunks, -1, *rows.shape[1:]).transpose(0, 1)

    def _remember(self, found: ChunkNeighbours) -> None:
        """Puts an answer into the rows' local caches; an answer for several chunks (the prompt's) is
        chunk-major, query q being row q % B's."""
        B = self.history.shape[0]
        chunks = len(found.ids) // B
        self.caches.add(found, list(range(B)) * chunks, chunks)
