"""One `RaLMSpecRetro.decode` call: RETRO's decode loop with each row's chunk neighbours guessed from its
local cache, checked once the service answers, and each row rolled back alone where its guess failed
(see `lm_worker.decoding.ralmspec.retro`).

Every model step feeds one token to each row that has one and holds the others
(`RaggedRetroCache.holding`), so rows go at their own pace within a chunk: a row replaying the steps of
a failed guess does so while the others decode on. At a chunk's end they meet again: a row whose next
token completes a chunk waits while another row is still short of its own chunk's end, so the rows
complete their chunks in one step, with one query batch, one embedding and one encoding of the
neighbours, as serial decoding does. (Without the gate the tokens are the same, at the cost of an
embedding, a request and an encoding of the whole batch for every row that ends its chunk alone.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.ralmspec.chunk_caches import ChunkCaches
from lm_worker.decoding.ralmspec.rows import CommittedRows
from lm_worker.decoding.sampling import choose_tokens, row_generators
from lm_worker.decoding.stepper_stats import Pending, last_log_probs, wait_for

_UNBOUNDED = 2 ** 62  # RETRO has no longest sequence: a held row never fills its cache


@dataclass
class _Request:
    """A search in flight for some rows' chunks: its `Pending`, the rows it asks for (in order), their
    guesses and their neighbours (n, K, 2L) once the answer has been read (by whichever row needs it first)."""

    pending: Pending
    rows: list[int]
    guessed: torch.Tensor | None = None  # (n, K, 2L) the rows' guesses, if every row had one
    true: torch.Tensor | None = None


@dataclass
class _RowGuess:
    """A row's chunk decoded on guessed neighbours, and what the row goes back to if the service disagrees:
    its committed tokens then (the last is fed by the step that first used the guess), their summed
    log-prob and its sampler's state."""

    chunk: int
    committed: int
    total: torch.Tensor
    generator: torch.Tensor | None
    guessed: torch.Tensor  # (K, 2L)
    request: _Request


class RetroRowDecode:
    """One `RaLMSpecRetro.decode` call (greedy decoding or sampling), each row rolled back alone."""

    def __init__(self, owner, prompt: torch.Tensor, config: GenerateConfig):
        self.owner, self.config, self.stats = owner, config, owner.stats
        self.prompt = prompt.long()
        self.B, self.S = prompt.shape
        self.L, self.K = owner.chunk_len, owner.n_neighbours
        self.cache = owner.model.new_cache(ragged=True)
        chunks = (self.S + config.max_new_tokens) // self.L + 1
        self.neighbours = torch.zeros(self.B, chunks, self.K, 2 * self.L, dtype=torch.long,
                                      device=prompt.device)  # (B, C, K, 2L): row b's chunk c, guessed or true
        self.known = [0] * self.B  # chunks of each row whose neighbours are in `neighbours`
        self.rows = CommittedRows(self.B, config)
        self.generators = row_generators(config.seed, config.row_indices(self.B), prompt.device) \
            if config.strategy == "sample" else None
        self.guesses: list[_RowGuess | None] = [None] * self.B
        self.log_probs: torch.Tensor | None = None  # (B, V) each row's last forward's
        self.fresh = [False] * self.B  # rows whose `log_probs` are not yet chosen from
        self.next: dict[int, int] = {}  # rows that go on, and the token each feeds next
        self.caches = ChunkCaches(self.B, owner.cache_rows)

    def run(self) -> GenerateOutput:
        """Decodes every row to its end: serial retrieval's tokens, lengths and log-probs."""
        self._start()
        while True:
            self._choose()
            self._settle_answered()
            if not self.next:
                waiting = [r for r in range(self.B) if self.guesses[r] is not None]
                if not waiting:
                    return self.rows.output(self.prompt.device)
                self._settle(min(waiting, key=lambda r: self.guesses[r].request.pending.sent))
                continue
            feeding = self._feeding()
            if self._due(feeding):  # the rows meet at a chunk's end: every guess still unchecked is checked
                # first, so that the query batch holds every row's settled tokens, as serial retrieval's does
                for r in range(self.B):
                    if self.guesses[r] is not None:
                        self._settle(r)
                feeding = self._feeding()
            self._retrieve(self._due(feeding))
            self._forward(feeding)

    # -- decoding ------------------------------------------------------------------------------------

    def _start(self) -> None:
        """The prompt's forward; its complete chunks are retrieved first, in one blocking call."""
        due = self.S // self.L
        if due:
            windows = [self.prompt[:, c * self.L:(c + 1) * self.L].cpu().numpy() for c in range(due)]
            request = self._send(self.owner.embed(windows), [r for _ in range(due) for r in range(self.B)])
            found = self._read(request, chunks=due)  # (due * B, K, 2L), chunk-major
            self.neighbours[:, :due] = found.view(due, self.B, self.K, -1).transpose(0, 1)
            self.known = [due] * self.B
        self._model(self.prompt)
        self.fresh = [True] * self.B

    def _choose(self) -> None:
        """Commits each row's token from its fresh log-probs; the rows that go on feed it next."""
        rows = [r for r in range(self.B) if self.fresh[r]]
        if not rows:
            return
        log_probs = self.log_probs[rows]  # (n, V)
        if self.generators is None:
            tokens = log_probs.argmax(dim=-1).tolist()
        else:
            tokens = [int(choose_tokens(log_probs[i:i + 1], self.config, [self.generators[r]])[0])
                      for i, r in enumerate(rows)]
        for i, (r, token) in enumerate(zip(rows, tokens)):
            self.fresh[r] = False
            self.rows.commit(r, token, float(log_probs[i, token]))
            if not self.rows.done(r):
                self.next[r] = token

    def _feeding(self) -> list[int]:
        """The rows this step feeds: every row that goes on, but those at the gate (`_due`) while another
        row is short of its chunk's end."""
        rows = sorted(self.next)
        due = self._due(rows)
        return [r for r in rows if r not in due] or rows

    def _due(self, rows: list[int]) -> list[int]:
        """Those of `rows` whose next token completes a chunk with no neighbours yet: needed when it is fed."""
        return [r for r in rows if self._position(r) % self.L == self.L - 1
                and (self._position(r) + 1) // self.L > self.known[r]]

    def _position(self, row: int) -> int:
        """The position of the token the row feeds next (its last committed one)."""
        return self.S + len(self.rows.tokens[row]) - 1

    def _forward(self, rows: list[int]) -> None:
        """One model step: each of `rows` takes its next token, the other rows are held."""
        tokens = torch.zeros(self.B, 1, dtype=torch.long, device=self.prompt.device)
        tokens[rows, 0] = torch.tensor([self.next.pop(r) for r in rows], dtype=torch.long, device=tokens.device)
        feeding = set(rows)
        idle = [r for r in range(self.B) if r not in feeding]
        with self.cache.holding(idle, _UNBOUNDED):
            elapsed = self._model(tokens)
        self.owner.step_s.add(elapsed)
        for r in rows:
            self.fresh[r] = True

    def _model(self, tokens: torch.Tensor) -> float:
        """A forward of tokens (B, T); keeps its log-probs (B, V) and returns its seconds."""
        started = time.perf_counter()
        self.log_probs = last_log_probs(self.owner.model(tokens, self.neighbours, cache=self.cache))  # (B, V)
        elapsed = time.perf_counter() - started
        self.stats.compute_s += elapsed
        self.stats.steps += 1
        self.stats.ticks += 1
        return elapsed

    # -- guessing and checking ------------------------------------------------------------------------

    def _retrieve(self, due: list[int]) -> None:
        """Sends the query of the chunk each `due` row completes and takes each row's guess from its local
        cache; with no full guess for some row, or where guessing does not pay, waits for the service."""
        if not due:
            return
        chunks = [(self._position(r) + 1) // self.L - 1 for r in due]
        queries = self.owner.embed([self._windows(due, chunks)])  # (B, d): every row, as serial retrieval asks
        request = self._send(queries[due], due)  # in flight while the local caches guess
        guessed = self.caches.guess(queries, self.K, due)
        request.guessed = guessed = None if guessed is None else guessed.to(self.prompt.device)  # (n, K, 2L)
        if guessed is None or not self.owner.worth_guessing():
            started = time.perf_counter()
            true = self._read(request)  # (n, K, 2L)
            self.owner.wait_s.add(time.perf_counter() - started)
            for i, (r, c) in enumerate(zip(due, chunks)):
                self._know(r, c, true[i])
                if guessed is not None:  # the guess, checked though unused
                    self._check(true[i], guessed[i])
            return
        for i, (r, c) in enumerate(zip(due, chunks)):
            state = self.generators[r].get_state() if self.generators is not None else None
            self.guesses[r] = _RowGuess(c, len(self.rows.tokens[r]), self.rows.total[r].clone(), state, guessed[i],
                                        request)
            self._know(r, c, guessed[i])
        self.stats.speculated += len(due)

    def _settle_answered(self) -> None:
        """Checks every guess whose answer is back."""
        for r in range(self.B):
            if self.guesses[r] is not None and self.guesses[r].request.pending.future.done():
                self._settle(r)

    def _settle(self, row: int) -> None:
        """Checks the row's guess against the service's neighbours (waiting for them); where they differ,
        the row goes back to the step that first used the guess and feeds it again with the service's."""
        guess, self.guesses[row] = self.guesses[row], None
        true = self._read(guess.request)[guess.request.rows.index(row)]  # (K, 2L)
        self.stats.verified += 1
        if self._check(true, guess.guessed):
            self.stats.accepted += 1
            return
        self.stats.rollbacks += 1
        self.stats.wasted += len(self.rows.tokens[row]) - guess.committed
        self.rows.roll_back(row, guess.committed, guess.total)
        if self.generators is not None:
            self.generators[row].set_state(guess.generator)
        self.cache.truncate(torch.tensor([row]), torch.tensor([self._position(row)]))
        self.fresh[row] = False
        self._know(row, guess.chunk, true)
        self.next[row] = self.rows.tokens[row][-1]

    def _check(self, true: torch.Tensor, guessed: torch.Tensor) -> bool:
        """Whether a row's guess (K, 2L) equals the service's neighbours; counted."""
        held = torch.equal(true, guessed)
        self.stats.verifications += 1
        self.stats.windows.append((1, int(not held)))
        return held

    def _know(self, row: int, chunk: int, neighbours: torch.Tensor) -> None:
        """The row's chunk has these neighbours (K, 2L) now; later chunks none."""
        self.neighbours[row, chunk] = neighbours
        self.known[row] = chunk + 1

    def _windows(self, rows: list[int], chunks: list[int]) -> np.ndarray:
        """Query windows (B, L): row r's chunk for each of `rows`, and for every other row (one that has
        finished: the rows meet at each chunk's end) the same chunk as serial decoding holds it, EOS after
        the row's last token. The batch is serial retrieval's, so an encoder whose output for a row depends
        on the batch (MiniLM pads to the longest text) gives each row's query serial's bits."""
        fill = self.config.eos_id if self.config.eos_id is not None else 0
        windows = np.empty((self.B, self.L), dtype=np.int64)
        for r in range(self.B):
            c = chunks[rows.index(r)] if r in rows else chunks[0]
            sequence = self.prompt[r].tolist() + self.rows.tokens[r]
            sequence += [fill] * max(0, (c + 1) * self.L - len(sequence))
            windows[r] = sequence[c * self.L:(c + 1) * self.L]
        return windows

    # -- the service ----------------------------------------------------------------------------------

    def _send(self, queries: np.ndarray, rows: list[int]) -> _Request:
        """The service's search of query embeddings (n, d), one per entry of `rows`, in flight."""
        return _Request(self.owner.send(queries), rows)

    def _read(self, request: _Request, chunks: int = 1) -> torch.Tensor:
        """The request's neighbours (n, K, 2L), waiting for them and adding them to the local caches the first
        time; `chunks`: how many chunks of every row it asks for, chunk-major (the prompt's)."""
        if request.true is None:
            found = wait_for(request.pending, self.stats)
            self.caches.add(found, request.rows, chunks)
            request.true = self.owner.neighbour_tokens(found, self.prompt.device)  # (n, K, 2L)
            if request.guessed is not None:  # whether the guesses held for every row (the gate waits for all)
                self.owner.held.add(float(torch.equal(request.true, request.guessed)))
        return request.true
