"""Speculative retrieval for RETRO, per chunk (RaLMSpec's idea at RETRO's granularity).

RETRO needs chunk c's neighbours from the step that feeds chunk c's last token on. Serial retrieval
(`RetroStepper`, prefetch 0) blocks there until the service answers. Here each sequence instead guesses
them from its local cache (`chunk_caches.ChunkCaches`): the datastore chunks it has retrieved and the
chunks that follow them (in a RETRO datastore chunk i + 1 continues chunk i, so when the text follows a
stored document its next neighbours are the successors of the last ones), ranked by exact distance to
the chunk's query embedding. Decoding goes on with the guess while the service searches, and the guess
is checked once the answer is back. Where a row's guessed neighbours equal the service's (token for
token), the model saw exactly what serial retrieval would have shown it, so everything decoded since
stands. Where they differ, decoding goes back to the step that first used the guess (tokens, summed
log-probs, samplers' states, cache) and decodes on with the service's neighbours:

- `rollback="batch"` (`retro_batch.RetroBatchDecode`, the default): the whole batch goes back. The batch
  keeps one length (`RetroCache`).
- `rollback="row"` (`retro_rows.RetroRowDecode`): only the rows whose guess failed go back, while the
  others decode on; the rows keep their own lengths (`RaggedRetroCache`). They meet again at each
  chunk's end, where a chunk's query embedding, search and neighbour encoding are done once for the
  batch: so the batch waits there for its slowest row, and a row's rollback costs the batch the steps a
  batch rollback costs. On two CPU cores its bookkeeping and ragged attention make it slower than the
  default (docs/results.md); it is there for batches whose rows end their chunks apart, and where a
  forward of the batch costs what a forward of one row costs.

A held guess saves the wait for the service. A failed one costs little more than serial retrieval: it
is checked as soon as the answer is back, the steps decoded meanwhile ran while serial decoding would
have been waiting. So by default (`adaptive`) a chunk is decoded on its guesses only while p · wait >
(1 - p) · step, from running estimates of p (how often a chunk's guess held for every row that used
it), the wait and a step's seconds. Where it does not guess, the guesses are still made and checked, so
p stays current. The local caches rank by L2 distance whatever the datastore's metric: a guess ranked
otherwise fails its check, which costs speed, never exactness.

Either way the tokens and log-probs are serial retrieval's, bit for bit. With `rollback="row"` every
forward has the batch's shape, a row's chunk is encoded and cross-attended in a batch of every row as
serial decoding does, its self-attention sees exactly its own positions (`layers.attend_by_length`),
and a chunk's queries are embedded in the batch serial decoding embeds (every row's window, a finished
row's as serial feeds it EOS; every guess is checked first), as an encoder may pad a batch to its
longest text.

Example:
    >>> decoder = RaLMSpecRetro(retro, retriever, encoder)
    >>> out = generate(decoder, prompt, GenerateConfig(max_new_tokens=64))   # as RetroStepper, prefetch 0
    >>> decoder.stats.accepted, decoder.stats.verified                        # guessed chunks that held
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.ralmspec.config import SpeculationStats
from lm_worker.decoding.ralmspec.retro_batch import RetroBatchDecode
from lm_worker.decoding.ralmspec.retro_rows import RetroRowDecode
from lm_worker.decoding.ralmspec.split import search_split, submit_split
from lm_worker.decoding.stepper_stats import Pending
from lm_worker.retrieval.config import ChunkNeighbours, check_retro_inputs
from lm_worker.retrieval.local_cache import queries_per_request

ROLLBACKS = ("batch", "row")  # what a failed guess sends back (`RaLMSpecRetro.rollback`)


class _Mean:
    """An exponentially weighted running mean (weight 0.3 on each new value); None before any value."""

    def __init__(self, prior: float | None = None):
        self.value = prior

    def add(self, x: float) -> None:
        self.value = x if self.value is None else 0.7 * self.value + 0.3 * x


class RaLMSpecRetro:
    """RETRO decoding (greedy or sampling) with per-chunk speculative retrieval (see the module doc).

    Args:
        model: a `Retro` model.
        retriever: a retriever over a RETRO datastore that keeps its keys, with k >= the model's neighbours.
        encoder: embeds query windows, `embed(int (n, w)) -> float32 (n, d)`, as for `RetroStepper`.
        successors: datastore chunks after each retrieved one that also enter the local caches (1..16).
        cache_rows: chunks each sequence's local cache keeps.
        adaptive: decode on a guess only where the estimates say it pays (else on every full guess).
        rollback: "batch" rolls the whole batch back where a row's guess failed, "row" only that row.

    `stats` (a `SpeculationStats`) counts, for RETRO: `speculated` row-chunks decoded on a guess; then
    with `rollback="batch"`, `verified` and `accepted` chunks decoded on a guess and those whose guess
    held for the batch, `verifications` guesses checked (used or not), `windows` per check (rows, rows
    whose guess differed), `rollbacks` batch rollbacks and `wasted` the batch steps they discarded; with
    `rollback="row"` the same counted per row: row-chunks, row guesses, rows rolled back, row-steps.
    `steps` counts every forward, replays included.
    """

    decodes_itself = True  # `generate` hands it the whole prompt batch

    def __init__(self, model: torch.nn.Module, retriever, encoder, successors: int = 2, cache_rows: int = 1024,
                 adaptive: bool = True, rollback: str = "batch"):
        check_retro_inputs(model, retriever, encoder)  # as `RetroStepper` checks them
        if not 1 <= successors <= 16 or cache_rows < 1:
            raise ValueError(f"successors must lie in 1..16 and cache_rows be >= 1, got {successors}, {cache_rows}")
        if rollback not in ROLLBACKS:
            raise ValueError(f"rollback must be one of {', '.join(ROLLBACKS)}, got {rollback!r}")
        self.model, self.retriever, self.encoder = model, retriever, encoder
        self.successors, self.cache_rows, self.adaptive, self.rollback = successors, cache_rows, adaptive, rollback
        self.chunk_len, self.n_neighbours = model.config.chunk_len, model.config.n_neighbours
        self.stats = SpeculationStats()
        self.held = _Mean(0.5)  # how often a chunk's guess held for every row (checked guesses, used or not)
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
        decode = RetroRowDecode if self.rollback == "row" else RetroBatchDecode
        return decode(self, prompt, config).run()

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
        """The service's neighbours of query embeddings (n, d), with their successors and keys, asked in
        pieces where one request's answer would pass the service's response limit (`split`)."""
        return search_split(self._search, queries, self.per_request(queries))

    def per_request(self, queries: np.ndarray) -> int:
        """The most of these query embeddings (n, d) one request carries (`local_cache.queries_per_request`)."""
        token_bytes = 8 * 2 * self.chunk_len  # a chunk's payload: its 2L tokens, int64 at most
        return queries_per_request(self.retriever, self.retriever.config.k, queries.shape[1], self.successors,
                                   True, token_bytes)

    def _search(self, queries: np.ndarray) -> ChunkNeighbours:
        return self.retriever.chunk_rows(queries, self.successors, return_keys=True)

    def send(self, queries: np.ndarray) -> Pending:
        """`search` of query embeddings (n, d), in flight on the retriever's pool (its pieces together); counted."""
        getattr(self.retriever, "check_open", lambda: None)()  # a closed retriever says so, not its pool
        queries = np.ascontiguousarray(queries)
        per_request = self.per_request(queries)
        self.stats.retrieval_calls += -(-len(queries) // per_request)
        self.stats.queries += len(queries)
        return Pending(submit_split(self.retriever.pool, self._search, queries, per_request))

    def neighbour_tokens(self, found: ChunkNeighbours, device: torch.device) -> torch.Tensor:
        """An answer's first K neighbours' tokens (n, K, 2L), the K the model takes."""
        tokens = found.tokens
        if tokens.shape[1] < self.n_neighbours:
            raise ValueError(f"the retriever returned {tokens.shape[1]} neighbours; "
                             f"the model needs {self.n_neighbours}")
        return torch.from_numpy(np.ascontiguousarray(tokens[:, :self.n_neighbours], dtype=np.int64)).to(device)
