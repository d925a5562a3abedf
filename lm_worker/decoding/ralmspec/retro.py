"""Speculative retrieval for RETRO, per chunk (RaLMSpec's idea at RETRO's granularity).

RETRO needs chunk c's neighbours from the step that feeds chunk c's last token on. Serial retrieval
(`RetroStepper`, prefetch 0) blocks there until the service answers. Here each sequence instead guesses
them from its local cache: the datastore chunks it has retrieved and the chunks that follow them (in a
RETRO datastore chunk i + 1 continues chunk i, so when the text follows a stored document its next
neighbours are the successors of the last ones), ranked by exact distance to the chunk's query
embedding. Decoding goes on with the guess while the service searches, and the guess is checked once
the answer is back:

- every row's guessed neighbours equal the service's (token for token): the model saw exactly what
  serial retrieval would have shown it, so everything decoded since stands;
- any row differs: the whole batch goes back to the step that first used the guess (its cache, its
  history, its samplers' states) and decodes on with the service's neighbours.

RETRO's cache holds one length for the whole batch, so a rollback is the batch's, and a guess pays
only when it holds for every row that has not finished. A held guess saves the wait for the service.
A failed one costs little more than serial retrieval: it is checked as soon as the answer is back,
the steps decoded meanwhile ran while serial decoding would have been waiting, and the step being
decoded when the answer came is the most that is lost. So by default (`adaptive`) a chunk is decoded on
its guess only while p · wait > (1 - p) · step, from running estimates of p (how often the batch's
guess held), the wait and a step's seconds. Where it does not guess, the guess is still made and
checked, so p stays current. The local caches rank by L2 distance whatever the datastore's metric: a
guess ranked otherwise fails its check, which costs speed, never exactness. The tokens are serial
retrieval's whatever the guesses.

Example:
    >>> decoder = RaLMSpecRetro(retro, retriever, encoder)
    >>> out = generate(decoder, prompt, GenerateConfig(max_new_tokens=64))   # as RetroStepper, prefetch 0
    >>> decoder.stats.accepted, decoder.stats.verified                        # chunks whose guess held
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.ralmspec.config import SpeculationStats
from lm_worker.decoding.sampling import choose_tokens, row_generators
from lm_worker.decoding.stepper_stats import Pending, last_log_probs, wait_for
from lm_worker.retrieval.config import ChunkNeighbours
from lm_worker.retrieval.local_cache import LocalCaches


class _Mean:
    """An exponentially weighted running mean (weight 0.3 on each new value); None before any value."""

    def __init__(self, prior: float | None = None):
        self.value = prior

    def add(self, x: float) -> None:
        self.value = x if self.value is None else 0.7 * self.value + 0.3 * x


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


class RaLMSpecRetro:
    """RETRO decoding (greedy or sampling) with per-chunk speculative retrieval (see the module doc).

    Args:
        model: a `Retro` model.
        retriever: a retriever over a RETRO datastore that keeps its keys, with k >= the model's neighbours.
        encoder: embeds query windows, `embed(int (n, w)) -> float32 (n, d)`, as for `RetroStepper`.
        successors: datastore chunks after each retrieved one that also enter the local caches (1..16).
        cache_rows: chunks each sequence's local cache keeps.
        adaptive: decode on a guess only where the estimates say it pays (else on every full guess).

    `stats` (a `SpeculationStats`) counts, for RETRO: `speculated` row-chunks decoded on a guess,
    `verified` and `accepted` chunks decoded on a guess and those whose guess held for the batch,
    `verifications` guesses checked (used or not), `windows` per check (rows, rows whose guess
    differed), `rollbacks` batch rollbacks and `wasted` batch steps they discarded; `steps` counts
    every forward, replays included.
    """

    decodes_itself = True  # `generate` hands it the whole prompt batch

    def __init__(self, model: torch.nn.Module, retriever, encoder, successors: int = 2, cache_rows: int = 1024,
                 adaptive: bool = True):
        if not 1 <= successors <= 16 or cache_rows < 1:
            raise ValueError(f"successors must lie in 1..16 and cache_rows be >= 1, got {successors}, {cache_rows}")
        self.model, self.retriever, self.encoder = model, retriever, encoder
        self.successors, self.cache_rows, self.adaptive = successors, cache_rows, adaptive
        self.chunk_len, self.n_neighbours = model.config.chunk_len, model.config.n_neighbours
        self.stats = SpeculationStats()
        self.held = _Mean(0.5)  # how often a whole batch's guess held (checked guesses, used or not)
        self.wait_s = _Mean()  # seconds blocked on a chunk's answer without a guess
        self.step_s = _Mean()  # seconds of one decoding step

    def worth_guessing(self) -> bool:
        """Whether decoding on a guess pays by the running estimates (always, unless `adaptive`)."""
        if not self.adaptive:
            return True
        if self.wait_s.value is None or self.step_s.value is None:
            return False  # nothing measured yet: a serial chunk measures the wait
        p = self.held.value
        return p * self.wait_s.value > (1 - p) * self.step_s.value

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, config: GenerateConfig) -> GenerateOutput:
        """Continues every prompt row (B, T) as `generate` does with `RetroStepper(prefetch=0)`: the same tokens."""
        if config.strategy == "beam":
            raise ValueError("speculative RETRO decoding does greedy decoding and sampling; for beam search "
                             "use RETRO without it")
        return _Decode(self, prompt, config).run()

    def embed(self, windows: list[np.ndarray]) -> np.ndarray:
        """Query embeddings (n, d) of windows (each (B, L)), embedded one window at a time as `RetroStepper`
        does, so that the service is asked exactly what serial retrieval asks."""
        started = time.perf_counter()
        queries = np.concatenate([self.encoder.embed(w) for w in windows]).astype(np.float32, copy=False)
        elapsed = time.perf_counter() - started
        self.stats.encode_s += elapsed
        self.stats.retrieval_s += elapsed  # embedding is part of RETRO's retrieval (`StepperStats`), and
        self.stats.wait_s += elapsed  # decoding waits for it, as `RetroStepper` counts it
        return np.ascontiguousarray(queries)

    def search(self, queries: np.ndarray) -> ChunkNeighbours:
        """The service's neighbours of query embeddings (n, d), with their successors and keys."""
        return self.retriever.chunk_rows(queries, self.successors, return_keys=True)


class _Decode:
    """One `RaLMSpecRetro.decode` call: the decode loop of `sample_or_greedy`, with guessed chunks."""

    def __init__(self, owner: RaLMSpecRetro, prompt: torch.Tensor, config: GenerateConfig):
        self.owner, self.config, self.stats = owner, config, owner.stats
        B, self.device = prompt.shape[0], prompt.device
        self.L, self.K = owner.chunk_len, owner.n_neighbours
        self.cache = owner.model.new_cache()
        self.history = prompt.long().clone()  # (B, S)
        self.neighbours = torch.zeros(B, 0, self.K, 2 * self.L, dtype=torch.long, device=self.device)  # (B, C, K, 2L)
        self.local: LocalCaches | None = None  # made with the first answer (its key dimension)
        self.chunk_tokens: dict[int, np.ndarray] = {}  # datastore chunk id -> its (2L,) tokens
        sampled = config.strategy == "sample"
        self.generators = row_generators(config.seed, config.first_row, B, self.device) if sampled else []
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
        pending = self._send(queries)
        guessed = self._local_guess(queries)
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

    def _local_guess(self, queries: np.ndarray) -> torch.Tensor | None:
        """Each row's K cached chunks nearest its query (B, d): (B, K, 2L), or None if a row holds fewer."""
        if self.local is None:
            return None
        _, ids = self.local.search(queries, self.K)  # (B, K) datastore ids, -1 where too few
        if (ids < 0).any():
            return None
        guessed = np.stack([[self.chunk_tokens[i] for i in row] for row in ids.tolist()])  # (B, K, 2L)
        return torch.from_numpy(guessed).to(self.device)

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

    def _send(self, queries: np.ndarray) -> Pending:
        """The service's search of query embeddings (n, d), in flight on the retriever's pool."""
        self.stats.retrieval_calls += 1
        self.stats.queries += len(queries)
        getattr(self.owner.retriever, "check_open", lambda: None)()  # a closed retriever says so, not its pool
        return Pending(self.owner.retriever.pool.submit(self.owner.search, queries))

    def _blocking(self, queries: np.ndarray) -> ChunkNeighbours:
        found = wait_for(self._send(queries), self.stats)
        self._remember(found)
        return found

    def _rows(self, found: ChunkNeighbours, chunks: int) -> torch.Tensor:
        """(chunks * B, k, 2L) tokens, chunk-major, -> (B, chunks, K, 2L), the first K neighbours."""
        tokens = found.tokens
        if tokens.shape[1] < self.K:
            raise ValueError(f"the retriever returned {tokens.shape[1]} neighbours; the model needs {self.K}")
        rows = torch.from_numpy(np.ascontiguousarray(tokens[:, :self.K], dtype=np.int64)).to(self.device)
        return rows.view(chunks, -1, *rows.shape[1:]).transpose(0, 1)

    def _remember(self, found: ChunkNeighbours) -> None:
        """Puts an answer's chunks and their successors (ids, keys, tokens) into the rows' local caches;
        an answer for several chunks (the prompt's) is chunk-major."""
        if found.keys is None or found.next_ids is None or found.next_keys is None:
            raise ValueError("the retriever returned no keys or successors: speculative retrieval ranks its "
                             "local caches by the stored keys of the chunks found and the chunks after them "
                             "(a datastore built with --keep-keys)")
        B = self.history.shape[0]
        if self.local is None:
            self.local = LocalCaches(B, self.owner.cache_rows, found.keys.shape[-1])
        d = found.keys.shape[-1]
        ids = np.concatenate([found.ids[..., None], found.next_ids], axis=-1)  # (n, k, 1 + s)
        keys = np.concatenate([found.keys[:, :, None], found.next_keys], axis=2)  # (n, k, 1 + s, d)
        tokens = np.concatenate([found.tokens[:, :, None], found.next_tokens], axis=2)  # (n, k, 1 + s, 2L)
        for i, row_id in zip(tokens.reshape(-1, tokens.shape[-1]), ids.reshape(-1).tolist()):
            if row_id >= 0:
                self.chunk_tokens.setdefault(row_id, i.astype(np.int64))
        owners = np.repeat(np.arange(B), ids[0].size)  # a chunk's queries: row 0's rows, then row 1's, ...
        for first in range(0, len(ids), B):  # chunk by chunk (query q belongs to row q % B): a chunk that
            # the prompt's earlier chunks pushed out of a row's cache and a later one found is kept
            part = slice(first, first + B)
            self.local.add_many(owners[:ids[part].size], ids[part].reshape(-1), keys[part].reshape(-1, d),
                                ids[part].reshape(-1))
