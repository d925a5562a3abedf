"""Perplexity evaluation spread over N LM worker actors on a Ray cluster, all querying the same shards.

The evaluation's batches of windows (see `lm_worker.evaluation.batches.count_batches`) are cut into shares of
`batches_per_share` consecutive batches, fixed by the data and the config alone, never by the number
of workers. Each worker actor loads the model once and evaluates whole shares; the driver hands shares
to idle workers and keeps each share's summed negative log-likelihoods and token count, keyed by its
index. The figures are the shares' sums added in share order, so 1 worker and N workers give the same
perplexity to the last digit (every worker runs the same number of torch threads).

Each finished share is checkpointed (`CHECKPOINT/share-00012.json`, written atomically) before it
counts; a rerun with the same job skips those computed with the same model weights, datastore version
and token store (`lm_worker.evaluation.shares`). A worker that dies (its node lost, its process killed)
is replaced by a new actor and its unfinished share goes back to the queue: a share is counted once,
when its result first arrives.

Example:
    >>> job = EvalJob(kind="knnlm", checkpoint=Path("run/lm"), store=Path("run/data/test"),
    ...               target="127.0.0.1:7100", config=EvalConfig(retrieval=RetrievalConfig(k=1024)))
    >>> result = evaluate_distributed(job, WorkerPoolConfig(workers=2, checkpoint_dir=Path("run/eval/shares")))
    >>> result.best_perplexity
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm.auto import tqdm

from lm_worker.evaluation.combine import combine
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.eval_worker import EvalWorker
from lm_worker.evaluation.knnlm_eval import KnnEvalResult
from lm_worker.evaluation.retro_eval import RetroEvalResult
from lm_worker.evaluation.shares import (
    PATH_FIELDS,
    Share,
    current,
    identity_of,
    open_saved,
    plan_shares,
    planned,
    save_share,
)
from lm_worker.retrieval.service import TOKEN_ENV, ClientSecurity, join_cluster_of
from retriever_server.cluster.connect import connect, free_resources

log = logging.getLogger(__name__)

KINDS = ("knnlm", "retro")
STALL_REPORT_S = 30.0  # how often a pool whose workers cannot start says so
MODEL_KINDS = {"knnlm": ("lm", "hf"), "retro": ("retro",)}  # the checkpoint kinds each evaluation takes
SECURITY_FILES = ("tls_ca", "tls_cert", "tls_key", "token_file")  # the files a `ClientSecurity` names


@dataclass(frozen=True)
class EvalJob:
    """What to evaluate: a checkpoint of `kind` ("knnlm": an LM with a kNN-LM datastore, "retro"), a
    token store directory, the retrieval service's `target` (a router address, comma-separated shard
    addresses, or "ray:NAME" for a deployment on the Ray cluster), and the evaluation config.
    `tokenizer` (RETRO) is the tokenizer.json the chunk encoder decodes with; default the store's
    parent folder's. `encoder_lm` is the LM checkpoint of an LM-encoded RETRO datastore when it is not
    where the datastore says. `encoder_factory`, when given, builds the chunk encoder in each worker instead.
    `security` is the TLS and token files of the calls to the service (None: plaintext; a token from the
    driver's RETRIEVER_AUTH_TOKEN goes to each worker as an argument of its actor, never in the job)."""

    kind: str
    checkpoint: Path
    store: Path
    target: str
    config: EvalConfig = field(default_factory=EvalConfig)
    tokenizer: Path | None = None
    encoder_lm: Path | None = None
    encoder_factory: Callable | None = None
    security: ClientSecurity | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("checkpoint", "store", "tokenizer", "encoder_lm"):  # as workers in other folders see them
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).absolute())
        if self.security is not None:  # its TLS and token files too
            files = {name: Path(value).absolute() for name in SECURITY_FILES
                     if (value := getattr(self.security, name)) is not None}
            object.__setattr__(self, "security", dataclasses.replace(self.security, **files))

    def describe(self) -> dict:
        """What identifies the job apart from its files: its kind and config. A checkpoint folder holding
        another job's shares is refused; the files (model, token store, datastore) are identified by
        their contents in each share (`shares.identity_of`), so a path spelled otherwise, or a moved
        run folder, still matches."""
        body = dataclasses.asdict(self)
        body.pop("encoder_factory")
        body.pop("security")  # how the service is reached, not what is evaluated (and never a secret on disk)
        for name in PATH_FIELDS:
            body.pop(name)
        config = body["config"]
        config["retrieval"].pop("timeout_s")  # how long a search may take and when it is sent, not what it
        config.pop("overlap")  # answers (`shares.holds_another_job` ignores what a marker holds beyond these)
        if self.kind == "retro":  # kNN-LM's mixing and pointers do not touch a RETRO evaluation
            for name in ("lambdas", "temperature", "pointer_steps", "min_pointers", "pointer_temperature_scale",
                         "pointer_agreement", "pointer_crowd"):
                config.pop(name)
        elif not config["pointer_steps"]:  # so shares checkpointed before the pointer fields existed still match
            config.pop("pointer_agreement")
            config.pop("pointer_crowd")
        else:  # each window a run of chains of its own: shares from when a batch was one run differ
            config["pointer_runs"] = "window"
        body["target"] = None  # the same shards may be served at another address
        return json.loads(json.dumps(body, default=str))


@dataclass(frozen=True)
class WorkerPoolConfig:
    """How to spread an evaluation.

    `workers` actors, each with `num_cpus`/`num_gpus` (1 GPU each on a GPU cluster) and extra custom
    `resources`, running `torch_threads` threads; `batches_per_share` batches per unit of work;
    `checkpoint_dir` keeps finished shares (None: nothing kept); `address` is the Ray cluster
    (None: RAY_ADDRESS, as under `ray job submit`, else a local cluster with `num_cpus_local`, or for a
    "ray:NAME" target the cluster `ray start` made on this machine, which runs the deployment);
    `max_replacements` bounds how many dead workers are replaced; `stall_timeout_s` how long the pool
    may have no worker alive before giving up."""

    workers: int = 2
    batches_per_share: int = 4
    checkpoint_dir: Path | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int = 1
    device: str = "cpu"
    address: str | None = None
    num_cpus_local: int | None = None
    max_replacements: int = 16
    stall_timeout_s: float = 300.0
    progress: bool = True

    def __post_init__(self):
        if self.workers < 1 or self.batches_per_share < 1 or self.torch_threads < 1:
            raise ValueError(f"workers, batches_per_share and torch_threads must be >= 1, got {self.workers}, "
                             f"{self.batches_per_share}, {self.torch_threads}")


class _Pool:
    """Worker actors handed shares one at a time; a dead worker's share is queued again and the worker
    replaced (up to `max_replacements` times)."""

    def __init__(self, job: EvalJob, config: WorkerPoolConfig, identity: dict[str, str] | None = None):
        self.job, self.config = job, config
        self.actor_class = ray.remote(EvalWorker)
        self.starting: dict = {}  # started() ref -> actor
        self.running: dict = {}  # run() ref -> (actor, share)
        self.idle: list = []
        self.replaced = 0
        self.dead: list[BaseException] = []  # why each worker died that `wait` has yet to replace
        self.nodes: set[str] = set()
        self.identity = identity  # what every worker must compute with (None: what the first one does)
        for _ in range(config.workers):
            self._start_worker()

    def _start_worker(self) -> None:
        c = self.config
        token = os.environ.get(TOKEN_ENV, "").strip() or None  # the driver's, for workers on any node
        actor = self.actor_class.options(num_cpus=c.num_cpus, num_gpus=c.num_gpus, resources=c.resources or None,
                                         max_restarts=0).remote(self.job, c.torch_threads, c.device, token)
        self.starting[actor.started.remote()] = actor

    def _lost(self, actor, why: BaseException) -> None:
        """A worker died: kill what is left of it; `wait` starts another in its place unless it found a failure."""
        ray.kill(actor, no_restart=True)
        self.dead.append(why)

    def _replace_dead(self) -> RuntimeError | None:
        """Starts a worker in place of each one that died; past `max_replacements`, the error to raise."""
        for why in self.dead:
            if self.replaced >= self.config.max_replacements:
                return RuntimeError(f"{self.replaced} evaluation workers were replaced and another died: "
                                    f"{type(why).__name__}: {_last_line(why)}")
            self.replaced += 1
            log.warning("an evaluation worker died (%s); starting a replacement", type(why).__name__)
            self._start_worker()
        return None

    def dispatch(self, queue: deque[Share]) -> None:
        while queue and self.idle:
            actor, share = self.idle.pop(), queue.popleft()
            self.running[actor.run.remote(share)] = (actor, share)

    def wait(self, queue: deque[Share], timeout_s: float = 1.0) -> tuple[list[dict], Exception | None]:
        """Results that arrived by the time the first did (at most `timeout_s`); a dead worker's share goes back
        to the front of `queue`. It returns at the first result, not at the timeout, while a replacement
        worker waits for room. A failure (a worker that failed to start, or raised in a share; one dead
        worker too many) comes back beside the results found with it, for the caller to save them first;
        a dead worker found in the same wait is killed and its share queued again, but not replaced."""
        refs = [*self.starting, *self.running]
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s) if refs else ([], [])
        if ready:  # and whatever else is done by now
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        results: list[dict] = []
        failure, self.dead = None, []
        for ref in ready:
            if failure is not None and ref in self.starting:  # no worker is taken on past a failure
                continue
            try:
                self._take(ref, queue, results)
            except Exception as err:  # noqa: BLE001 - raised by the caller once the results are saved
                failure = failure or err
        return results, failure or self._replace_dead()  # none is replaced beside a failure, before it or after

    def _take(self, ref, queue: deque[Share], results: list[dict]) -> None:
        """One ready ref: a worker started (idle now), a share's result (added to `results`), or a dead worker."""
        if ref in self.starting:
            actor = self.starting.pop(ref)
            try:
                node, identity = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # its node lost, or its start failed there
                if err.actor_init_failed:  # an error of its own (no service, no model): another fails alike
                    ray.kill(actor, no_restart=True)
                    raise RuntimeError(f"an evaluation worker failed to start: {_last_line(err)}") from None
                self._lost(actor, err)
                return
            self._same(identity)
            self.nodes.add(node)
            self.idle.append(actor)
            return
        actor, share = self.running.pop(ref)
        try:
            results.append(ray.get(ref))
            self.idle.append(actor)
        except ray.exceptions.RayActorError as err:
            queue.appendleft(share)
            self._lost(actor, err)
        except ray.exceptions.RayTaskError as err:  # the share failed in the worker: its error, not Ray's
            raise _worker_error(err) from None

    def _same(self, identity: dict[str, str]) -> None:
        """Every worker must compute with what the driver (or the first worker) found: RuntimeError if the
        model, the datastore or the token store changed while the evaluation ran."""
        if self.identity is None:
            self.identity = identity
        elif identity != self.identity:
            raise RuntimeError(f"an evaluation worker computes with {identity}, the evaluation with {self.identity}: "
                               "the model, the datastore or the token store changed during the evaluation")

    @property
    def alive(self) -> bool:
        return bool(self.idle or self.running)

    def shutdown(self) -> None:
        for actor in [*self.idle, *self.starting.values(), *(a for a, _ in self.running.values())]:
            ray.kill(actor, no_restart=True)


def evaluate_distributed(job: EvalJob, config: WorkerPoolConfig = WorkerPoolConfig(),
                         on_share: Callable[[dict], None] | None = None) -> KnnEvalResult | RetroEvalResult:
    """Evaluates `job` over `config.workers` LM worker actors and combines their shares.

    Args:
        job: the model, token store, retrieval target and evaluation config.
        config: workers, their resources, share size, checkpoint folder, Ray address.
        on_share: called with each finished share's record (share index, node, identity, result) as it
            arrives.

    Returns:
        A `KnnEvalResult` (kind "knnlm") or `RetroEvalResult` (kind "retro") whose figures do not
        depend on the number of workers.

    Raises:
        ValueError: the checkpoint folder holds another evaluation's shares, the config is invalid, or
            the datastore is of another kind or (kNN-LM) its keys were made by another model; found
            before any worker starts, as is a service that does not answer (its `RetrieverError`).
            An error a worker raises while it evaluates a share is raised as it was raised there.
        RuntimeError: more than `max_replacements` workers died, none could run for `stall_timeout_s`,
            or the model, datastore or token store changed while the evaluation ran.

    Example:
        >>> evaluate_distributed(job, WorkerPoolConfig(workers=4, num_gpus=1, address="ray://head:10001"))
    """
    from lm_worker.data.token_store import TokenStore
    from lm_worker.evaluation.batches import check_scorable, check_window, count_batches
    from lm_worker.models.checkpoint import load_checkpoint

    started = time.perf_counter()
    model = load_checkpoint(job.checkpoint, kinds=MODEL_KINDS[job.kind],  # checked here, in one line,
                            flag=f"a {job.kind} evaluation").model  # before any worker starts
    check_window(model, job.config)
    align = model.config.chunk_len if job.kind == "retro" else 1
    store = TokenStore.open(job.store)
    try:
        check_scorable(store, job.config, align)
    except ValueError as e:
        raise ValueError(f"{job.store}: {e}") from None
    shares = plan_shares(count_batches(store, job.config, align), config.batches_per_share)
    join_cluster_of(job.target, config.address)  # a ray:NAME deployment runs on a cluster already up
    # the datastore answers and suits the model, checked here in one line before anything is written or
    # any worker starts; the saved shares and every worker are held to what the driver finds
    identity = identity_of(model, _checked_datastore_version(job, model), job.store)
    del model
    saved = planned(open_saved(job.describe(), config.checkpoint_dir), shares)
    done = current(saved, identity) if saved else {}
    queue = deque(s for s in shares if s.index not in done)
    log.info("%d shares of %d batches; %d already done; %d workers", len(shares), config.batches_per_share,
             len(done), config.workers)
    if queue:
        connect(config.address, config.num_cpus_local, log_to_driver=False)
        _run_shares(job, config, queue, done, identity, on_share, len(shares))
    result = combine(job.kind, [done[s.index] for s in shares], time.perf_counter() - started)
    log.info("%s over %d tokens from %d shares", job.kind, result.tokens, len(shares))
    return result


def _checked_datastore_version(job: EvalJob, model) -> str:
    """The version of the datastore the job's target serves (one GetInfo), once the same checks as an
    evaluation in one process passed: the service answers (else its RetrieverError), and the datastore
    is of the job's kind, of the token store's tokenizer and, for kNN-LM, made by this model (else
    ValueError)."""
    from lm_worker.data.token_store import TokenStore
    from lm_worker.evaluation.knnlm import check_knnlm_inputs
    from lm_worker.retrieval.config import check_retro_inputs
    from lm_worker.retrieval.service import ServiceRetriever, resolve_target

    security = job.security or ClientSecurity()
    with ServiceRetriever(resolve_target(job.target), job.config.retrieval, security) as retriever:
        (check_knnlm_inputs if job.kind == "knnlm" else check_retro_inputs)(model, retriever)
        made, ours = str(retriever.metadata.get("tokenizer", "")), TokenStore.open(job.store).tokenizer_fingerprint
        if made and made != ours:
            raise ValueError(f"{job.store} was tokenized with {ours}, but the datastore at {job.target} holds "
                             f"tokens of tokenizer {made[:80]!r}")
        return retriever.version


def _worker_error(err: ray.exceptions.RayTaskError) -> Exception:
    """What a worker raised (a RetrieverError, a ValueError, ...), as raised there; Ray's wrapper with
    its traceback when the cause did not travel."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else RuntimeError(f"an evaluation worker failed: {_last_line(err)}")


def _last_line(err: Exception) -> str:
    """The last line of a Ray error's text: the exception that ended the remote traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _run_shares(job: EvalJob, config: WorkerPoolConfig, queue: deque[Share], done: dict[int, dict],
                identity: dict[str, str] | None, on_share: Callable[[dict], None] | None, total: int) -> None:
    """Computes the queued shares on a pool of workers (each computing with `identity`, when given),
    adding each to `done` once saved."""
    pool = _Pool(job, config, identity)
    try:
        with tqdm(total=total, initial=len(done), desc=f"{job.kind} eval ({config.workers} workers)",
                  unit="share", disable=not config.progress) as bar:
            def finished(body: dict) -> None:
                bar.update(1)
                if on_share is not None:
                    on_share(body)

            _compute(pool, config, queue, done, finished)
        log.info("evaluation workers ran on %d nodes; %d replaced", len(pool.nodes), pool.replaced)
    finally:
        pool.shutdown()


def _compute(pool: _Pool, config: WorkerPoolConfig, queue: deque[Share], done: dict[int, dict],
             on_share: Callable[[dict], object]) -> None:
    """Hands the queued shares to the pool's workers until all are done; each is saved before it counts."""
    last_alive = reported = time.monotonic()
    while queue or pool.running:
        pool.dispatch(queue)
        results, failure = pool.wait(queue)
        for body in results:
            if body["share"] in done:  # never counted twice
                continue
            save_share(config.checkpoint_dir, body)
            done[body["share"]] = body
            on_share({**body, "replaced": pool.replaced})  # what the caller sees: workers replaced so far
        if failure is not None:  # once the shares found with it are saved: a rerun does not compute them again
            raise failure
        now = time.monotonic()
        if pool.alive:
            last_alive = now
        elif now - last_alive > config.stall_timeout_s:
            raise RuntimeError(f"no evaluation worker could start for {config.stall_timeout_s:.0f} s: does the "
                               f"cluster have {config.num_cpus} CPUs / {config.num_gpus} GPUs free?")
        elif now - reported > STALL_REPORT_S:  # say why nothing moves, long before giving up
            reported = now
            log.warning("no evaluation worker has started for %.0f s (gives up after %.0f s): the cluster has %s; "
                        "each worker takes %s CPUs, %s GPUs", now - last_alive, config.stall_timeout_s,
                        free_resources(), config.num_cpus, config.num_gpus)
