"""Speculative retrieval for batched kNN-LM decoding (RaLMSpec, Zhang et al., ICML 2024): each sequence
guesses its neighbours from a local cache of the rows it has retrieved and their successors, and one
batched request verifies the guesses of every row every s steps. The tokens and log-probs are those of
serial retrieval, bit for bit (the row and beam decoders' cache attends per row length).

Serial kNN-LM decoding sends one request per step (B queries) and waits for it. Here each step runs the
model and takes the step's neighbours from the sequence's local cache (`LocalCaches`: an exact search
over a few thousand rows in process), so the token is chosen at once; the step's query and LM log-probs
are kept. After s steps the kept steps of every row go out in one request; with `asynchronous`, the
next s steps are speculated while it is in flight:

    steps 1..s (cache) ─ send 1..s ─ steps s+1..2s (cache) ─ settle 1..s ─ send s+1..2s ─ ...

Settling recomputes every sent step with the service's neighbours and chooses its token again, as serial
decoding would (greedy: argmax; sampling: the row's generator restored to its state before that step's
draw). A row keeps its steps up to the first whose token differs; there it takes the verified token and
rolls back alone: its key/value cache is truncated (`RaggedKVCache`) and its later steps are dropped,
while the other rows of the batch go on from where they are. Every answer, with each neighbour's
successors and their keys, goes into the sequence's local cache.

With `SpeculationConfig(guess="lm")` a row guesses the LM's own token instead (no local cache, plain
requests, no stored keys needed); asynchronously at a stride of 1, each step is computed on the last
step's guess while the last step is verified.

A request leaves from within the model step that completes its window (or a serial step), as soon as
the keys exist (the model's `on_keys`), so the service searches while the output head runs; with
`asynchronous`, a window completed while the last one is in flight leaves once that one is settled.

The stride s comes from `StrideScheduler`: RaLMSpec's optimal stride for the measured acceptance rate
and costs, or a serial step (no guess) where no stride beats serial retrieval.

Beam search speculates per prompt (`lm_worker.decoding.ralmspec.beam`): a prompt's beams are coupled,
so a prompt rolls back as a whole. Asynchronous verification applies to greedy decoding and sampling;
beam search verifies synchronously. The model must be a `TransformerLM` (its layers take per-row
positions); guessing from the cache, the datastore must keep its keys (`retriever-server build
--keep-keys`): the local caches search them.

Example:
    >>> decoder = RaLMSpecKnnLM(lm, ServiceRetriever(address, RetrievalConfig(k=16)), lam=0.25)
    >>> out = generate(decoder, prompt, GenerateConfig(max_new_tokens=64))  # serial retrieval's tokens
    >>> decoder.stats.hit_rate, decoder.stats.verifications
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from lm_worker.decoding.config import GenerateConfig, GenerateOutput
from lm_worker.decoding.generate import check_room
from lm_worker.decoding.ralmspec.beam import BeamDecode
from lm_worker.decoding.ralmspec.config import SpeculationConfig, SpeculationStats
from lm_worker.decoding.ralmspec.row_decode import RowDecode
from lm_worker.decoding.ralmspec.scheduler import StrideScheduler
from lm_worker.decoding.ralmspec.split import search_split, submit_split
from lm_worker.decoding.stepper_stats import Pending, last_keys, last_log_probs
from lm_worker.evaluation.knnlm import check_knnlm_inputs, check_mixing, mix_log_probs
from lm_worker.models.ragged_cache import RaggedKVCache
from lm_worker.models.transformer_lm import TransformerLM
from lm_worker.retrieval.config import KnnNeighbours
from lm_worker.retrieval.local_cache import queries_per_request

VALUE_BYTES = 8  # a kNN-LM datastore's value (its "values" payload row) takes at most an int64


class RaLMSpecKnnLM:
    """kNN-LM decoding with speculative retrieval verified in batches (see the module doc).

    `generate(decoder, prompt, config)` calls `decode`: greedy, sampling (temperature, top-k, top-p) and
    beam search, each with the results of serial retrieval.

    Args:
        model: a `TransformerLM`.
        retriever: a `ServiceRetriever` or `InProcessRetriever` over a kNN-LM datastore (keeping keys to guess
            from the local caches).
        lam: λ, the weight of p_kNN.
        temperature: of the neighbour softmax over -distance.
        speculation: stride, asynchrony, successors, local cache size and where guesses come from.
    """

    decodes_itself = True  # `generate` hands it the whole prompt batch

    def __init__(self, model: torch.nn.Module, retriever, lam: float = 0.25, temperature: float = 1.0,
                 speculation: SpeculationConfig = SpeculationConfig()):
        check_mixing(lam, temperature)
        if not isinstance(model, TransformerLM):
            raise ValueError("speculative retrieval needs a TransformerLM (per-row positions), "
                             f"got {type(model).__name__}")
        check_knnlm_inputs(model, retriever)
        self.model, self.retriever = model, retriever
        self.lam, self.temperature, self.speculation = lam, temperature, speculation
        self.k = retriever.config.k
        self.stats = SpeculationStats()
        self.scheduler = StrideScheduler(speculation)

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, config: GenerateConfig) -> GenerateOutput:
        """Continues every prompt row (B, T) as `generate` does with `KnnLMStepper`: the same tokens."""
        check_room(self, prompt.shape[1], config.max_new_tokens)  # as `generate` checks, for direct callers
        if config.strategy == "beam":
            if self.speculation.guess != "cache":
                raise ValueError("beam search guesses from the local caches: it takes guess='cache'")
            return BeamDecode(self, prompt, config).run()
        return RowDecode(self, prompt, config).run()

    def send(self, queries: np.ndarray, for_cache: bool = True, in_flight: bool | None = None) -> Pending:
        """Asks the service for the neighbours of queries (n, d); `for_cache`: with their successors and
        keys, for the local caches (never when guessing from the LM). `in_flight` (default: `asynchronous`):
        a future in flight; else answered before it returns. A request whose answer would pass the service's
        response limit goes out in pieces (`split`), their answers joined in order."""
        getattr(self.retriever, "check_open", lambda: None)()  # a closed retriever says so, not its pool
        for_cache = for_cache and self.speculation.guess == "cache"
        successors = self.speculation.successors if for_cache else 0
        per_request = queries_per_request(self.retriever, self.k, queries.shape[1], successors, for_cache,
                                          VALUE_BYTES)
        self.stats.queries += len(queries)
        self.stats.retrieval_calls += -(-len(queries) // per_request)  # the pieces it goes out in

        def search(part: np.ndarray) -> KnnNeighbours:  # (m, d) -> m queries' neighbours
            return self.retriever.knn(part, None, successors, for_cache)

        if self.speculation.asynchronous if in_flight is None else in_flight:
            return Pending(submit_split(self.retriever.pool, search, queries, per_request))
        future: Future = Future()
        pending = Pending(future)  # sent now
        future.set_result(search_split(search, queries, per_request))
        self.stats.wait_s += time.perf_counter() - pending.sent  # blocked all along
        return pending

    def mix(self, lm_log_probs: torch.Tensor, distances: np.ndarray, values: np.ndarray) -> torch.Tensor:
        """log(λ p_kNN + (1-λ) p_LM) (n, V) from the LM's log-probs (n, V) and neighbours (n, k) (copied:
        an answer's arrays are read-only)."""
        device = lm_log_probs.device  # the model's (the neighbours arrive as host arrays)
        d = torch.tensor(distances, dtype=torch.float32, device=device)  # (n, k), a copy
        v = torch.tensor(values, dtype=torch.int64, device=device)  # (n, k)
        return mix_log_probs(lm_log_probs, d, v, self.lam, self.temperature)  # (n, V)

    def model_step(self, cache: RaggedKVCache, tokens: torch.Tensor,
                   on_keys: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """The LM's log-probs (B, V) and kNN-LM keys (B, d) at the last of `tokens` (B, T), cache advanced;
        `on_keys` is called with the keys (B, T, d) before the forward's last feed-forward block and head."""
        logits, keys = self.model(tokens, cache=cache, return_keys=True, on_keys=on_keys)  # (B, T, V), (B, T, d)
        return last_log_probs(logits), last_keys(keys)
