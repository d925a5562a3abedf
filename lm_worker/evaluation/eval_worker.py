"""`EvalWorker`, one LM worker actor of a distributed evaluation (`lm_worker.evaluation.distributed`): it
loads the model, the token store and a retriever once, then evaluates the shares the driver hands it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from lm_worker.evaluation.shares import Share, identity_of
from lm_worker.retrieval.service import ClientSecurity

if TYPE_CHECKING:
    from lm_worker.evaluation.distributed import EvalJob


class EvalWorker:
    """An LM worker: loads the model, the store and a retriever once, then evaluates shares."""

    def __init__(self, job: EvalJob, torch_threads: int, device: str, token: str | None = None):
        """`token`: the driver's RETRIEVER_AUTH_TOKEN, for a job whose security names no token of its own
        (an argument, not an environment variable: Ray logs the environments it makes for actors)."""
        import torch

        from lm_worker.data.token_store import TokenStore
        from lm_worker.models.checkpoint import load_checkpoint
        from lm_worker.retrieval.service import ServiceRetriever, resolve_target

        torch.set_num_threads(torch_threads)
        self.job = job
        self.model = load_checkpoint(job.checkpoint, device).model
        self.store = TokenStore.open(job.store)
        retrieval = job.config.retrieval
        if job.kind == "retro":
            retrieval = dataclasses.replace(retrieval, k=self.model.config.n_neighbours)
        security = job.security or ClientSecurity()
        if token and not security.token and security.token_file is None:
            security = dataclasses.replace(security, token=token)
        self.retriever = ServiceRetriever(resolve_target(job.target), retrieval, security)
        self._identity = identity_of(self.model, self.retriever.version, job.store)
        if job.kind == "retro":
            self.encoder = job.encoder_factory() if job.encoder_factory else self._chunk_encoder()

    def _chunk_encoder(self):
        """The encoder that made the RETRO datastore's keys (named by its metadata)."""
        from lm_worker.data.tokenizer import Tokenizer
        from lm_worker.encoders.registry import chunk_encoder_for

        path = self.job.tokenizer or Path(self.job.store).parent / "tokenizer.json"
        return chunk_encoder_for(self.retriever.metadata, Tokenizer.load(path), self.job.encoder_lm, threads=1)

    def ready(self) -> str:
        """The node this worker runs on."""
        return ray.get_runtime_context().get_node_id()

    def started(self) -> tuple[str, dict[str, str]]:
        """The node this worker runs on, and what its shares are computed with: the model's fingerprint,
        the datastore's version and the token store's fingerprint."""
        return self.ready(), self._identity

    def run(self, share: Share) -> dict:
        """The share's summed negative log-likelihoods and token count, and where it ran."""
        from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
        from lm_worker.evaluation.retro_eval import evaluate_retro

        batches = range(share.start, share.stop)
        if self.job.kind == "knnlm":
            result = evaluate_knnlm(self.model, self.store, self.retriever, self.job.config, False, batches)
        else:
            result = evaluate_retro(self.model, self.store, self.retriever, self.encoder, self.job.config, False,
                                    batches)
        return {"share": share.index, "start": share.start, "stop": share.stop, "node": self.ready(),
                "pid": os.getpid(), "identity": self._identity,
                "result": result.to_dict()}
