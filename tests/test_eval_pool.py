"""The distributed evaluation's worker pool, with Ray stubbed (no cluster, no timing): shares that finish
beside a failure are saved before it is raised, and no worker is started in place of a dead one once a
failure is found; without a failure a dead worker is replaced."""

from __future__ import annotations

import json
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch

import lm_worker.evaluation.knnlm
import lm_worker.retrieval.service
from lm_worker.data.token_store import write_token_store
from lm_worker.evaluation import distributed
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.distributed import EvalJob, WorkerPoolConfig, evaluate_distributed
from lm_worker.evaluation.shares import identity_of
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

CONFIG = EvalConfig(context_len=16, stride=8, batch_size=1)  # 1 batch a share: shares 0, 1, 2, ...
VERSION = "datastore-v1"


@dataclass(frozen=True)
class Ref:
    """An object ref of the stub: `what` is "started" or "run(N)"; ready from round `ready_in` on."""

    actor: str
    what: str
    ready_in: int


class Actor:
    """A stubbed worker actor: `started.remote()` and `run.remote(share)` give refs of the stub."""

    def __init__(self, fake: FakeRay, name: str):
        self.name = name
        self.started = types.SimpleNamespace(remote=lambda: fake.ref(self, "started"))
        self.run = types.SimpleNamespace(remote=lambda share: fake.ref(self, f"run({share.index})"))


class FakeRay:
    """What the pool calls of `ray`, scripted: each ref is ready one `ray.wait` round after it was made
    (`delays` adds rounds), and `ray.get` gives what `outcomes` says for it ("started" of a worker
    "w0", "w1", ... in the order they are made, or "run(N)" of share N, a list taken one per attempt):
    an exception is raised, else the worker's start or the share's record as a real worker gives them."""

    exceptions = ray.exceptions

    def __init__(self, identity: dict, outcomes: dict, delays: dict | None = None):
        self.identity, self.outcomes, self.delays = identity, outcomes, delays or {}
        self.round = 0
        self.actors: list[str] = []
        self.killed: list[str] = []
        self.ran: dict[int, list[str]] = {}  # share -> the workers it was handed to

    def remote(self, cls):  # ray.remote(EvalWorker): the actor class
        return types.SimpleNamespace(options=lambda **kwargs: types.SimpleNamespace(remote=self.actor))

    def actor(self, *args) -> Actor:
        self.actors.append(f"w{len(self.actors)}")
        return Actor(self, self.actors[-1])

    def ref(self, actor: Actor, what: str) -> Ref:
        if what.startswith("run("):
            self.ran.setdefault(int(what[4:-1]), []).append(actor.name)
        key = f"{actor.name}.{what}" if what == "started" else what
        return Ref(actor.name, what, self.round + 1 + self.delays.get(key, 0))

    def wait(self, refs, num_returns=1, timeout=None):
        if timeout != 0:  # the pool's first wait of a round; the second takes whatever else is ready
            self.round += 1
        ready = [r for r in refs if r.ready_in <= self.round]
        return ready[:num_returns], [r for r in refs if r not in ready[:num_returns]]

    def get(self, ref: Ref):
        key = f"{ref.actor}.started" if ref.what == "started" else ref.what
        outcome = self.outcomes.get(key)
        if isinstance(outcome, list):
            outcome = outcome.pop(0) if outcome else None
        if isinstance(outcome, BaseException):
            raise outcome
        if ref.what == "started":
            return f"node-{ref.actor}", self.identity
        share = int(ref.what[4:-1])
        return {"share": share, "node": f"node-{ref.actor}", "identity": self.identity, "result": {}}

    def kill(self, actor: Actor, no_restart: bool = True) -> None:
        self.killed.append(actor.name)


def died() -> ray.exceptions.RayActorError:
    return ray.exceptions.RayActorError(error_msg="the worker's process died")


def failed_to_start() -> ray.exceptions.RayActorError:
    return ray.exceptions.RayActorError(error_msg="RuntimeError: no encoder on this worker", actor_init_failed=True)


def raised_in_share(message: str) -> ray.exceptions.RayTaskError:
    return ray.exceptions.RayTaskError("run", "Traceback ...", ValueError(message))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[EvalJob, dict]:
    """A kNN-LM job of a tiny LM over a store of 6 batches, and the identity its workers compute with."""
    tmp = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(vocab_size=50, max_len=16)).eval()
    checkpoint = save_checkpoint(tmp / "lm.pt", kind="lm", model=lm, config=lm.config, step=0,
                                 tokenizer_fingerprint="bpe:test", extra={})
    store = write_token_store(tmp / "heldout", [("d", [i % 50 for i in range(1, 57)])], 0, "bpe:test")
    job = EvalJob(kind="knnlm", checkpoint=checkpoint, store=store.directory, target="127.0.0.1:1", config=CONFIG)
    return job, identity_of(lm, VERSION, store.directory)


@pytest.fixture
def stub(inputs, monkeypatch):
    """Installs a FakeRay as the module's `ray` (and a service that answers with VERSION); returns a maker."""
    class Service:
        metadata: dict = {}
        version = VERSION

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(lm_worker.retrieval.service, "ServiceRetriever", Service)
    monkeypatch.setattr(lm_worker.evaluation.knnlm, "check_knnlm_inputs", lambda model, retriever: None)
    monkeypatch.setattr(distributed, "connect", lambda *args, **kwargs: False)

    def install(outcomes: dict, delays: dict | None = None) -> FakeRay:
        fake = FakeRay(inputs[1], outcomes, delays)
        monkeypatch.setattr(distributed, "ray", fake)
        return fake

    return install


def run(inputs, workers: int, folder: Path, caplog) -> tuple[list[dict], pytest.ExceptionInfo]:
    """Runs the evaluation until it fails; (what on_share saw, the failure)."""
    seen: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="lm_worker.evaluation.distributed"):
        with pytest.raises(Exception) as failed:
            evaluate_distributed(inputs[0], WorkerPoolConfig(workers=workers, batches_per_share=1, progress=False,
                                                             checkpoint_dir=folder), on_share=seen.append)
    return seen, failed


def saved(folder: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["share"] for p in folder.glob("share-*.json"))


def test_a_share_finished_beside_a_failure_is_saved_and_no_worker_replaces_one_dying_after_it(
        inputs, stub, tmp_path, caplog):
    """In one wait: the third worker fails to start, share 0 finishes and the worker of share 1 dies. Share 0
    is saved before the failure is raised; the dead worker's share goes back and the worker is killed, but
    no worker is started in its place."""
    fake = stub({"w2.started": failed_to_start(), "run(1)": died()}, delays={"w2.started": 1})
    seen, failed = run(inputs, 3, tmp_path, caplog)
    assert failed.type is RuntimeError
    assert str(failed.value) == "an evaluation worker failed to start: RuntimeError: no encoder on this worker"
    assert [b["share"] for b in seen] == saved(tmp_path) == [0]
    assert fake.actors == ["w0", "w1", "w2"]  # no replacement
    assert fake.ran[1][0] in fake.killed and "w2" in fake.killed
    assert "starting a replacement" not in caplog.text


def test_no_worker_replaces_one_that_died_before_a_failure_in_the_same_wait(inputs, stub, tmp_path, caplog):
    """The worker of share 0 dies and share 1 raises, found in one wait: the share's own error is raised, and
    the evaluation that stops does not start a worker first."""
    fake = stub({"run(0)": died(), "run(1)": raised_in_share("the chunk encoder failed")})
    seen, failed = run(inputs, 2, tmp_path, caplog)
    assert failed.type is ValueError and str(failed.value) == "the chunk encoder failed"
    assert seen == [] and saved(tmp_path) == []
    assert fake.actors == ["w0", "w1"] and fake.ran[0][0] in fake.killed
    assert "starting a replacement" not in caplog.text


def test_a_dead_worker_is_replaced_while_nothing_failed(inputs, stub, tmp_path, caplog):
    """Without a failure the pool does replace a dead worker, and its share is run again."""
    fake = stub({"run(1)": [died(), raised_in_share("stop here")]})
    seen, failed = run(inputs, 2, tmp_path, caplog)
    assert failed.type is ValueError and str(failed.value) == "stop here"
    assert fake.actors == ["w0", "w1", "w2"] and len(fake.ran[1]) == 2
    assert [(b["share"], b["replaced"]) for b in seen] == [(0, 1)] and saved(tmp_path) == [0]
    assert caplog.text.count("starting a replacement") == 1
