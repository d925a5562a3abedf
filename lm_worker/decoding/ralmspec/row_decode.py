"""One `RaLMSpecKnnLM.decode` call for greedy decoding and sampling: the per-row state (speculated steps,
committed tokens, the ragged key/value cache) and the speculate / send / settle loop, each row rolled back
alone where a verified token differs from its guess (see `lm_worker.decoding.ralmspec.decoder`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.ralmspec.rows import CommittedRows
from lm_worker.decoding.sampling import choose_tokens, row_generators
from lm_worker.decoding.stepper_stats import Pending, last_keys, wait_for
from lm_worker.models.ragged_cache import RaggedKVCache
from lm_worker.retrieval.local_cache import LocalCaches


@dataclass
class _Step:
    """A speculated step of one row: the LM's log-probs (V,), the query (d,), the token chosen from the
    cache's neighbours, and the row generator's state before its draw (sampling)."""

    lm_log_probs: torch.Tensor
    query: np.ndarray
    token: int
    state: torch.Tensor | None


@dataclass
class _InFlight:
    """A verification request: its `Pending` future, how many of each row's first steps it carries, the
    window's stride (0: serial) and this process's seconds on its steps."""

    pending: Pending
    sent: list[int]
    window: int
    work_s: float  # this process's seconds on the window's steps


class RowDecode:
    """One `RaLMSpecKnnLM.decode` call: the per-row state and the speculate / send / settle loop."""

    def __init__(self, owner, prompt: torch.Tensor, config: GenerateConfig):
        self.owner, self.config, self.stats = owner, config, owner.stats
        self.prompt, self.prompt_len = prompt, prompt.shape[1]
        B = prompt.shape[0]
        self.rows = CommittedRows(B, config)
        self.cache = RaggedKVCache(len(owner.model.blocks), by_length=True)
        self.local = LocalCaches(B, owner.speculation.cache_rows, owner.model.config.d_model) \
            if owner.speculation.guess == "cache" else None
        self.pending: list[list[_Step]] = [[] for _ in range(B)]  # speculated, not yet settled
        self.sent = [0] * B  # of each row's pending steps, how many the request in flight carries
        self.in_flight: _InFlight | None = None
        self.generators = row_generators(config.seed, config.row_indices(B), prompt.device) \
            if config.strategy == "sample" else None
        self.next_input = torch.zeros(B, dtype=torch.long, device=prompt.device)
        self.window_s = 0.0  # this process's seconds on the window being speculated

    def run(self) -> GenerateOutput:
        self._first_step()
        scheduler = self.owner.scheduler
        scheduler.rows = len(self.pending)
        stride = scheduler.plan()
        while not all(self.rows.done(r) for r in range(len(self.pending))):
            if self.in_flight is not None and (self.in_flight.pending.future.done() or not self._can_speculate(stride)):
                self._settle()
                stride = scheduler.plan()
            elif stride == 0 and self.in_flight is None and not any(self.pending):
                self._serial_step(self._open_rows())
                stride = scheduler.plan()
            elif self.in_flight is None and self._unsent() and (self._window_full(stride) or not self._open_rows()):
                self._send(stride)
                if not self.owner.speculation.asynchronous:
                    self._settle()
                    stride = scheduler.plan()
            elif self._speculate(self._open_rows(), stride) and not self.owner.speculation.asynchronous:
                self._settle()  # its window's request went out from within its model step
                stride = scheduler.plan()
        return self.rows.output(self.prompt.device)

    def _open_rows(self) -> list[int]:
        """Rows that can take another speculative step: not done, and not at max_new_tokens already."""
        limit = self.config.max_new_tokens
        return [r for r, p in enumerate(self.pending)
                if not self.rows.done(r) and len(self.rows.tokens[r]) + len(p) < limit and not (p and p[-1].token < 0)]

    def _unsent(self) -> bool:
        return any(len(p) > n for p, n in zip(self.pending, self.sent))

    def _window_full(self, stride: int, stepping: list[int] = ()) -> bool:
        """Whether some row has `stride` unsent steps, counting one more for each row of `stepping`."""
        return max(len(p) - n + (r in stepping) for r, (p, n) in enumerate(zip(self.pending, self.sent))) >= stride

    def _can_speculate(self, stride: int) -> bool:
        return bool(self._open_rows()) and not self._window_full(stride)

    def _choose(self, row: int, log_probs: torch.Tensor) -> int:
        """The row's token from its log-probs (V,), drawing from its generator when sampling."""
        generators = [self.generators[row]] if self.generators is not None else []
        return int(choose_tokens(log_probs[None], self.config, generators)[0])

    def _first_step(self) -> None:
        """The prompt's forward and one real retrieval for every row: no cache to guess from yet."""
        early: list[Pending] = []
        lm_log_probs, _ = self.owner.model_step(  # (B, V); the request sent once the keys exist
            self.cache, self.prompt, lambda keys: early.append(self.owner.send(last_keys(keys), in_flight=True)))
        found = wait_for(early[0], self.stats)
        log_probs = self.owner.mix(lm_log_probs, found.distances, found.values)  # (B, V)
        if found.keys is not None:
            self.local.add_neighbours(np.arange(len(self.pending)), found, slice(None))
        for r in range(len(self.pending)):
            token = self._choose(r, log_probs[r])
            self.rows.commit(r, token, float(log_probs[r, token]))
            self.next_input[r] = token
        self.stats.steps += 1

    def _step(self, rows: list[int], on_keys: Callable[[torch.Tensor], None] | None = None
              ) -> tuple[torch.Tensor, np.ndarray]:
        """One batched model step on `next_input`: the LM's log-probs (B, V) and keys (B, d). Only `rows`
        keep their new position; the other rows' is dropped again. `on_keys` gets the keys (B, 1, d)
        before the forward ends (a request sent then is in flight while the output head runs)."""
        opened = set(rows)
        idle = [r for r in range(len(self.pending)) if r not in opened]
        with self.cache.holding(idle, self.owner.model.config.max_len):  # an idle row at max_len holds all
            # its tokens: it is never fed again
            return self.owner.model_step(self.cache, self.next_input[:, None], on_keys)  # (B, V), (B, d)

    def _speculate(self, open_rows: list[int], stride: int) -> bool:
        """One batched model step; at a stride above 0 each open row guesses its token from its local
        cache's neighbours (or the LM alone), else its step waits for the service's (a serial step). The
        other rows' new position is dropped again. Where this step fills the window and no request is in
        flight, the window's request leaves from within the step, once the keys exist; returns whether it did."""
        started, guess, early = time.perf_counter(), stride > 0, []
        fills = self.in_flight is None and self._window_full(stride, open_rows)
        lm_log_probs, queries = self._step(open_rows, self._window_sender(open_rows, stride, early) if fills else None)
        if guess:
            log_probs = lm_log_probs[open_rows]  # (b, V)
            if self.local is not None:
                distances, values = self.local.search(queries, self.owner.k)  # (B, k), (B, k)
                log_probs = self.owner.mix(log_probs, distances[open_rows], values[open_rows])  # (b, V)
            greedy = log_probs.argmax(dim=-1).tolist() if self.generators is None else None
        for i, r in enumerate(open_rows):
            state = self.generators[r].get_state() if self.generators is not None else None
            token = -1
            if guess:
                token = greedy[i] if greedy is not None else self._choose(r, log_probs[i])
                self.next_input[r] = token
            self.pending[r].append(_Step(lm_log_probs[r], queries[r], token, state))
        self.stats.ticks += 1
        self.stats.steps += 1  # a model step, as `StepperStats` counts them
        self.stats.speculated += len(open_rows) if guess else 0
        elapsed = time.perf_counter() - started
        self.stats.compute_s += elapsed
        self.window_s += elapsed
        if early:
            self._send(stride, early[0])
        return bool(early)

    def _window_sender(self, open_rows: list[int], stride: int, out: list[Pending]) -> Callable[[torch.Tensor], None]:
        """An `on_keys` that sends the window `_send` would send once this step is kept: every row's unsent
        steps' queries and, for each open row, this step's (keys (B, 1, d)), in the same order."""
        def send(keys: torch.Tensor) -> None:
            new, opened = last_keys(keys), set(open_rows)  # (B, d)
            queries = [q for r, (p, n) in enumerate(zip(self.pending, self.sent))
                       for q in [*(s.query for s in p[n:]), *([new[r]] if r in opened else [])]]
            for_cache = self._window(stride) > 0 or self.owner.scheduler.primes
            out.append(self.owner.send(np.stack(queries), for_cache, in_flight=True))

        return send

    def _serial_step(self, rows: list[int]) -> None:
        """A serial step with nothing pending (the plan's usual step where guessing does not pay): one
        model step, the service's neighbours for the open `rows`, their tokens committed. What a serial
        window of `_speculate`, `_send` and `_settle` does, without keeping the step per row."""
        started, early, for_cache = time.perf_counter(), [], self.owner.scheduler.primes

        def send(keys: torch.Tensor) -> None:  # (B, 1, d): the open rows' queries, sent before the head runs
            early.append(self.owner.send(last_keys(keys)[rows], for_cache, in_flight=True))

        lm_log_probs, _ = self._step(rows, send)  # (B, V)
        if len(rows) < len(self.pending):
            lm_log_probs = lm_log_probs[rows]  # (n, V)
        work_s = time.perf_counter() - started
        pending = early[0]
        found = wait_for(pending, self.stats)
        started = time.perf_counter()
        log_probs = self.owner.mix(lm_log_probs, found.distances, found.values)  # (n, V)
        if found.keys is not None:
            self.local.add_neighbours(np.asarray(rows), found, slice(None))
        self._settle_serial(rows, log_probs, log_probs.argmax(dim=-1) if self.generators is None else None)
        settle_s = time.perf_counter() - started
        self.stats.compute_s += work_s + settle_s
        self.stats.ticks += 1
        self.stats.steps += 1
        self.stats.verifications += 1
        self.stats.strides.append(0)
        self.stats.windows.append((len(rows), 0))
        latency = (pending.finished or time.perf_counter()) - pending.sent
        self.owner.scheduler.observe(0, work_s, latency, settle_s=settle_s)

    def _window(self, stride: int) -> int:
        """The stride of the window the unsent steps make: steps guessed while the previous request was in
        flight (asynchronous) are verified as a window even where the plan is now a serial step."""
        guessed = max(sum(s.token >= 0 for s in p[n:]) for p, n in zip(self.pending, self.sent))
        return stride if stride > 0 or not guessed else guessed

    def _send(self, stride: int, pending: Pending | None = None) -> None:
        """Sends every row's unsent steps in one request (`pending`: already sent, from within the last
        model step) and keeps it as the request in flight."""
        window, sent = self._window(stride), [len(p) for p in self.pending]
        if pending is None:
            queries = [s.query for p, n in zip(self.pending, self.sent) for s in p[n:]]
            pending = self.owner.send(np.stack(queries), window > 0 or self.owner.scheduler.primes)
        self.in_flight = _InFlight(pending, sent, window, self.window_s)
        self.window_s = 0.0
        self.sent = sent
        self.stats.strides.append(window)

    def _settle(self) -> None:
        """Waits for the request in flight; each row keeps its sent steps up to the first wrong token,
        takes the verified token there and rolls back alone."""
        flight, self.in_flight = self.in_flight, None
        found = wait_for(flight.pending, self.stats)
        steps = [(r, s) for r, p in enumerate(self.pending) for s in p[:flight.sent[r]]]
        started = time.perf_counter()
        log_probs = self.owner.mix(torch.stack([s.lm_log_probs for _, s in steps]), found.distances,
                                   found.values)  # (n, V)
        greedy = log_probs.argmax(dim=-1) if self.generators is None else None  # (n,)
        first, accepted, checked, rolled_back = 0, 0, 0, self.stats.rollbacks
        if found.keys is not None:  # query i is a step of row owners[i]
            owners = np.repeat(np.arange(len(flight.sent)), flight.sent)
            self.local.add_neighbours(owners, found, slice(None))
        if flight.window == 0:  # a serial step per row: nothing guessed, nothing to roll back
            self._settle_serial([r for r, n in enumerate(flight.sent) if n], log_probs, greedy)
        else:
            first = 0
            for r, count in enumerate(flight.sent):
                if count:
                    window = slice(first, first + count)
                    held, seen = self._settle_row(r, count, log_probs[window],
                                                  None if greedy is None else greedy[window])
                    accepted, checked = accepted + held, checked + seen
                    first += count
        self.sent = [0] * len(self.pending)
        settle_s = time.perf_counter() - started
        self.stats.compute_s += settle_s
        self.stats.verifications += 1
        self.stats.windows.append((sum(1 for n in flight.sent if n), self.stats.rollbacks - rolled_back))
        self.stats.verified += checked
        self.stats.accepted += accepted
        latency = (flight.pending.finished or time.perf_counter()) - flight.pending.sent
        self.owner.scheduler.observe(flight.window, flight.work_s, latency, accepted, checked, settle_s)

    def _settle_serial(self, rows: list[int], log_probs: torch.Tensor, greedy: torch.Tensor | None) -> None:
        """Commits one serial step per row (log_probs (n, V) with the service's neighbours, greedy: their
        argmax (n,)), all rows at once where decoding is greedy."""
        if greedy is not None:
            tokens, chosen = greedy.tolist(), log_probs.gather(1, greedy[:, None])[:, 0].tolist()
        else:
            tokens = [self._choose(r, log_probs[i]) for i, r in enumerate(rows)]
            chosen = [float(log_probs[i, t]) for i, t in enumerate(tokens)]
        self.rows.commit_many(rows, tokens, chosen)
        self.next_input[rows] = torch.tensor(tokens, dtype=torch.long, device=self.next_input.device)
        for r in rows:
            self.pending[r] = []

    def _settle_row(self, row: int, count: int, log_probs: torch.Tensor, greedy: torch.Tensor | None
                    ) -> tuple[int, int]:
        """Commits the row's first `count` steps as verified (log_probs (count, V) with the service's
        neighbours; greedy: their argmax (count,), None when sampling); rolls the row back at the first
        step whose token differs. Returns the guesses that held and the guesses checked: those up to the
        first wrong one, or up to the row's end; the steps after either are dropped unchecked."""
        steps = self.pending[row]
        latest = self.generators[row].get_state() if self.generators is not None else None
        if greedy is not None:
            chosen = greedy.tolist()
            chosen_log_probs = log_probs.gather(1, greedy[:, None])[:, 0].tolist()
        for j in range(count):
            if greedy is not None:
                token, log_prob = chosen[j], chosen_log_probs[j]
            else:
                self.generators[row].set_state(steps[j].state)
                token = self._choose(row, log_probs[j])
                log_prob = float(log_probs[j, token])
            self.rows.commit(row, token, log_prob)
            if steps[j].token < 0:  # a serial step: nothing was guessed, nothing comes after it
                self.next_input[row] = token
                self.pending[row] = []
                return j, j
            if token != steps[j].token or not self._same_draws(row, steps, j):
                self._roll_back(row, token, dropped=len(steps) - j - 1)
                return j, j + 1
            if self.rows.done(row):
                self.pending[row] = []
                return j + 1, j + 1
        self.pending[row] = steps[count:]
        if latest is not None and self.pending[row]:  # the steps speculated since go on from there
            self.generators[row].set_state(latest)
        return count, count

    def _same_draws(self, row: int, steps: list[_Step], j: int) -> bool:
        """Whether the row's generator, after the verified draw of step j, is where step j + 1 began."""
        if self.generators is None or j + 1 >= len(steps):
            return True
        return torch.equal(self.generators[row].get_state(), steps[j + 1].state)

    def _roll_back(self, row: int, token: int, dropped: int) -> None:
        """Forgets the row's later steps: its cache keeps the positions of its committed tokens but the
        last, which is fed next."""
        self.stats.rollbacks += 1
        self.stats.wasted += dropped
        self.pending[row] = []
        keep = self.prompt_len + len(self.rows.tokens[row]) - 1
        self.cache.truncate(torch.tensor([row]), torch.tensor([keep]))
        self.next_input[row] = token
