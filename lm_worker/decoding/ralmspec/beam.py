"""Speculative retrieval for beam search: each prompt's W beams guess their neighbours from the prompt's
local cache, one request every s steps verifies the guessed steps of every prompt, and a prompt whose
selection comes out otherwise rolls back alone. The results are those of serial retrieval.

A beam step selects a prompt's W new beams from its beams' log-probs (`select_beams`); with guessed
neighbours the selection is a guess too. Settling replays each prompt's guessed steps from its last
verified state with the service's neighbours: while a replayed selection continues the same rows with
the same tokens (and ends the prompt, or not, alike), the step holds and its verified scores and
finished hypotheses replace the guessed ones. At the first step that differs the prompt takes the
replayed selection and rolls back: its rows of the key/value cache return to their state before that
step, reordered by the replayed selection, and its later steps are dropped; the other prompts go on
from where they are. The window keeps the cache as of its first step (`RaggedKVCache.snapshot`) and,
for each later step, only the position each row wrote and how the beams were reordered (`_Window`):
about one copy of the cache however long the stride, not one per step.

Example (through `RaLMSpecKnnLM`, which runs this for `strategy="beam"`):
    >>> out = generate(RaLMSpecKnnLM(lm, retriever), prompt, GenerateConfig(strategy="beam", num_beams=4))
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lm_worker.decoding.beam import Hypotheses, finish_beams, select_beams
from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.stepper_stats import Pending, last_keys, wait_for
from lm_worker.models.ragged_cache import CacheSnapshot, RaggedKVCache
from lm_worker.retrieval.local_cache import LocalCaches


@dataclass
class _Beams:
    """One prompt's beam search after t selections: scores (1, W), histories (W, t), its hypotheses,
    and whether it has ended (no live beam can win, or max_new_tokens)."""

    scores: torch.Tensor
    history: torch.Tensor
    hyps: Hypotheses
    t: int
    ended: bool

    def clone(self) -> _Beams:
        hyps = copy.copy(self.hyps)
        hyps.items = list(self.hyps.items)
        return _Beams(self.scores, self.history, hyps, self.t, self.ended)


@dataclass
class _BeamStep:
    """A prompt's step awaiting verification: its state before the selection, the LM's log-probs (W, V)
    and queries (W, d) of its beams, the guessed selection (rows (W,) within the prompt and tokens
    (W,); None: a serial step, not guessed) and its place in the window (its `_Window` tick)."""

    before: _Beams
    lm_log_probs: torch.Tensor
    queries: np.ndarray
    source: torch.Tensor | None
    token: torch.Tensor | None
    ended: bool
    tick: int


class _Window:
    """The key/value cache over a verification window's batched steps (ticks), as a rollback needs it: the
    cache after the first tick's forward (a snapshot: the buffers a reorder then leaves behind), then per
    later tick only the position each row wrote, keys and values per layer (B*W, H, D), and per tick the
    reorder (B*W,) that followed its forward. A row's cache after tick j's forward is its ancestor's at the
    first tick plus the positions its ancestors wrote at ticks 1..j."""

    def __init__(self, cache: RaggedKVCache):
        self.base: CacheSnapshot = cache.snapshot()
        self.written: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # ticks 1.. of the window
        self.orders: list[torch.Tensor] = []  # per tick: new row r continues old row orders[t][r]

    def record(self, cache: RaggedKVCache) -> None:
        """After a later tick's forward: the position each row wrote (its last; an idle row's is unused)."""
        rows, slots = torch.arange(len(cache.lengths), device=cache.lengths.device), cache.lengths - 1
        self.written.append(([k[rows, :, slots] for k in cache.keys], [v[rows, :, slots] for v in cache.values]))

    def restore(self, cache: RaggedKVCache, tick: int, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Row rows[i] of `cache` becomes row sources[i] as it was after tick `tick`'s forward (before its
        reorder): rows (n,), sources (n,) long. The rows' ancestors at every tick of the window were open."""
        ancestors = [sources]  # the rows at tick `tick`, then at each tick before it
        for order in reversed(self.orders[:tick]):
            ancestors.append(order[ancestors[-1]])
        ancestors.reverse()  # ancestors[t]: the rows at tick t
        cache.restore_rows(self.base, rows, ancestors[0])
        start = self.base.lengths[ancestors[0]]  # (n,) their length after the first tick's forward
        for t in range(1, tick + 1):
            keys, values = self.written[t - 1]
            for layer, (k, v) in enumerate(zip(keys, values)):
                cache.keys[layer][rows, :, start + t - 1] = k[ancestors[t]]  # (n, H, D)
                cache.values[layer][rows, :, start + t - 1] = v[ancestors[t]]
        cache.lengths[rows] = start + tick


class BeamDecode:
    """One beam search with speculative retrieval, for `RaLMSpecKnnLM.decode` (see the module doc)."""

    def __init__(self, owner, prompt: torch.Tensor, config: GenerateConfig):
        self.owner, self.config, self.stats = owner, config, owner.stats
        self.prompt, self.B, self.W = prompt, prompt.shape[0], config.num_beams
        self.cache = RaggedKVCache(len(owner.model.blocks), by_length=True)
        self.local = LocalCaches(self.B, owner.speculation.cache_rows, owner.model.config.d_model)
        self.beams: list[_Beams] = []
        self.pending: list[list[_BeamStep]] = [[] for _ in range(self.B)]
        self.device = prompt.device  # the model's
        self.next_input = torch.zeros(self.B * self.W, dtype=torch.long, device=self.device)
        self.window_s = 0.0  # this process's seconds on the steps since the last verification
        self.window: _Window | None = None  # the cache over the pending steps' ticks

    def run(self) -> GenerateOutput:
        self._first_step()
        scheduler = self.owner.scheduler
        scheduler.rows = self.B * self.W  # guesses per step: every beam of every prompt
        stride = scheduler.plan()
        while not all(b.ended for b in self.beams) or any(self.pending):
            open_prompts = self._open(stride)
            sent = self._step(open_prompts, stride) if open_prompts else None
            if any(self.pending) and (not self._open(stride) or self._window_full(stride)):
                self._verify(stride, sent)
                stride = scheduler.plan()
        return self._output()

    def _window_full(self, stride: int, stepping: list[int] = ()) -> bool:
        """Whether some prompt has max(stride, 1) pending steps, counting one more for each of `stepping`."""
        return max(len(p) + (b in stepping) for b, p in enumerate(self.pending)) >= max(stride, 1)

    def _rows(self, b: int) -> torch.Tensor:
        return torch.arange(b * self.W, (b + 1) * self.W, device=self.device)

    def _open(self, stride: int) -> list[int]:
        """Prompts that take another step now: not ended, window not full, no serial step waiting."""
        return [b for b, beams in enumerate(self.beams)
                if not beams.ended and len(self.pending[b]) < max(stride, 1)
                and not (self.pending[b] and self.pending[b][-1].source is None)]

    def _first_step(self) -> None:
        """The prompts' forward and one real retrieval; the first selection of every prompt."""
        early: list[Pending] = []
        lm_log_probs, _ = self.owner.model_step(  # (B, V); the request sent once the keys exist
            self.cache, self.prompt, lambda keys: early.append(self.owner.send(last_keys(keys), in_flight=True)))
        found = wait_for(early[0], self.stats)
        log_probs = self.owner.mix(lm_log_probs, found.distances, found.values).float()  # (B, V)
        self.local.add_neighbours(np.arange(self.B), found, slice(None))
        source = torch.zeros(self.B * self.W, dtype=torch.long, device=self.device)
        for b in range(self.B):
            scores = torch.full((1, self.W), -torch.inf, device=self.device)
            scores[0, 0] = 0.0  # the W copies are identical: start from one
            no_tokens = torch.zeros(self.W, 0, dtype=torch.long, device=self.device)
            start = _Beams(scores, no_tokens, Hypotheses(self.W, self.config), 0, False)
            after, _, token = self._select(start, log_probs[b:b + 1].repeat(self.W, 1))
            self.beams.append(after)
            source[self._rows(b)] = b  # every beam continues the prompt's one row
            self.next_input[self._rows(b)] = token
        self.cache.reorder(source)
        self.stats.steps += 1

    def _select(self, beams: _Beams, log_probs: torch.Tensor) -> tuple[_Beams, torch.Tensor, torch.Tensor]:
        """One selection of a prompt from its beams' log-probs (W, V): the state after it, the rows
        (W,) within the prompt the new beams continue and their tokens (W,). `beams` is left as it was."""
        state = beams.clone()
        choice = select_beams(log_probs, state.scores, state.history, [state.hyps], state.t, self.config)
        ended = state.hyps.done or state.t == self.config.max_new_tokens - 1
        return _Beams(choice.scores, choice.history, state.hyps, state.t + 1, ended), choice.source, choice.token

    def _step(self, open_prompts: list[int], stride: int) -> Pending | None:
        """One batched model step; at a stride above 0 each open prompt selects its beams from its local
        cache's neighbours (a guess), else keeps the step for the service's (a serial step). Other rows'
        position is dropped. Where this step fills the window, its verification request leaves from within
        the step once the keys exist, and is returned."""
        started, guess, early = time.perf_counter(), stride > 0, []
        fills = self._window_full(stride, open_prompts)
        rows_open = torch.cat([self._rows(b) for b in open_prompts])
        idle = sorted(set(range(self.B * self.W)) - set(rows_open.tolist()))
        with self.cache.holding(idle, self.owner.model.config.max_len):  # an idle row at max_len is an ended
            # prompt's, or one whose last selection is a guess: replayed from the step's log-probs, never fed
            lm_log_probs, queries = self.owner.model_step(  # (B*W, V), (B*W, d)
                self.cache, self.next_input[:, None],
                self._window_sender(open_prompts, stride, early) if fills else None)
        if not any(self.pending):  # the window's first tick
            self.window = _Window(self.cache)
        else:
            self.window.record(self.cache)
        tick = len(self.window.orders)
        source = torch.arange(self.B * self.W, device=self.device)
        if guess:
            distances, values = self.local.search(queries.reshape(self.B, self.W, -1), self.owner.k)  # (B, W, k)
        for b in open_prompts:
            rows = self._rows(b)
            step = _BeamStep(self.beams[b], lm_log_probs[rows], queries[rows.cpu().numpy()], None, None, False,
                             tick)
            if guess:
                log_probs = self.owner.mix(lm_log_probs[rows], distances[b], values[b]).float()  # (W, V)
                self.beams[b], step.source, step.token = self._select(self.beams[b], log_probs)
                step.ended = self.beams[b].ended
                source[rows] = rows[step.source]
                self.next_input[rows] = step.token
            self.pending[b].append(step)
        if guess:
            self.cache.reorder(source)
        self.window.orders.append(source)
        self.stats.ticks += 1
        self.stats.steps += 1  # a model step, as `StepperStats` counts them
        self.stats.speculated += len(open_prompts) if guess else 0  # prompt-steps: a prompt guesses as one
        elapsed = time.perf_counter() - started
        self.stats.compute_s += elapsed
        self.window_s += elapsed
        return early[0] if early else None

    def _window_sender(self, open_prompts: list[int], stride: int, out: list[Pending]
                       ) -> Callable[[torch.Tensor], None]:
        """An `on_keys` that sends what `_verify` would once this step is kept: every prompt's pending steps'
        queries and, for each open prompt, this step's (keys (B*W, 1, d)), prompt by prompt."""
        def send(keys: torch.Tensor) -> None:
            new, opened = last_keys(keys), set(open_prompts)  # (B*W, d)
            queries = [q for b, p in enumerate(self.pending)
                       for q in [*(s.queries for s in p), *([new[self._rows(b).cpu().numpy()]] if b in opened else [])]]
            out.append(self.owner.send(np.concatenate(queries), stride > 0 or self.owner.scheduler.primes,
                                       in_flight=True))

        return send

    def _verify(self, stride: int, pending: Pending | None = None) -> None:
        """One request for every pending step (`pending`: already sent, from within the last model step);
        each prompt replays its steps with the service's neighbours and rolls back alone at the first whose
        selection differs."""
        prompts = [b for b in range(self.B) if self.pending[b]]
        steps = [s for b in prompts for s in self.pending[b]]
        if pending is None:
            for_cache = stride > 0 or self.owner.scheduler.primes
            pending = self.owner.send(np.concatenate([s.queries for s in steps]), for_cache)
        found = wait_for(pending, self.stats)
        latency = (pending.finished or time.perf_counter()) - pending.sent
        started = time.perf_counter()
        log_probs = self.owner.mix(torch.cat([s.lm_log_probs for s in steps]), found.distances,
                                   found.values).float()  # (n * W, V)
        first, accepted, guessed, rolled_back = 0, 0, 0, 0
        if found.keys is not None:  # prompt b's steps, W beams each, one after another
            owners = np.repeat(np.asarray(prompts), [len(self.pending[b]) * self.W for b in prompts])
            self.local.add_neighbours(owners, found, slice(None))
        for b in prompts:
            count = len(self.pending[b])
            held, checked = self._replay(b, log_probs[first:first + count * self.W].view(count, self.W, -1))
            accepted, guessed = accepted + held, guessed + checked
            rolled_back += int(held < checked)
            first += count * self.W
        self.window = None  # no step pending: the next tick opens a window
        self.stats.verifications += 1
        self.stats.strides.append(stride)
        self.stats.windows.append((len(prompts), rolled_back))
        self.stats.rollbacks += rolled_back
        self.stats.verified += guessed
        self.stats.accepted += accepted
        settle_s = time.perf_counter() - started
        self.stats.compute_s += settle_s
        self.owner.scheduler.observe(stride, self.window_s, latency, accepted, guessed, settle_s)
        self.window_s = 0.0

    def _replay(self, b: int, log_probs: torch.Tensor) -> tuple[int, int]:
        """Replays prompt b's pending steps with verified log-probs (n, W, V); returns the guessed steps
        that held and the guessed steps checked (up to the first that failed; the later ones are dropped
        unchecked)."""
        steps, self.pending[b] = self.pending[b], []
        state = steps[0].before
        guessed = [s.source is not None for s in steps]
        for j, step in enumerate(steps):
            after, source, token = self._select(state, log_probs[j])
            if step.source is not None and torch.equal(source, step.source) and torch.equal(token, step.token) \
                    and after.ended == step.ended:
                state = after
                continue
            rows = self._rows(b)
            self.window.restore(self.cache, step.tick, rows, rows[source])
            self.next_input[rows] = token
            self.beams[b] = after
            self.stats.wasted += len(steps) - j - 1  # the later steps, dropped unchecked
            return sum(guessed[:j]), sum(guessed[:j + 1])
        self.beams[b] = state  # the same selections, with the verified scores and hypotheses
        return sum(guessed), sum(guessed)

    def _output(self) -> GenerateOutput:
        outs = [finish_beams([b.hyps], b.scores, b.history, self.W, self.config.eos_id, self.device)
                for b in self.beams]
        width = max(o.tokens.shape[1] for o in outs)
        pad = self.config.eos_id if self.config.eos_id is not None else 0
        tokens = torch.full((len(outs), width), pad, dtype=torch.long, device=self.device)
        for i, o in enumerate(outs):
            tokens[i, :o.tokens.shape[1]] = o.tokens[0]
        return GenerateOutput(tokens, torch.cat([o.log_probs for o in outs]), torch.cat([o.lengths for o in outs]),
                              torch.cat([o.scores for o in outs]))

