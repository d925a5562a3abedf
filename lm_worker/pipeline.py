"""The whole LM side on one corpus, stage by stage, into one run directory, on a Ray cluster:

    prepare -> train the LM -> encode kNN-LM keys (Ray Data job) -> build its datastore (Ray job)
            -> embed RETRO chunks (Ray Data job) -> build its datastore -> serve both (Ray actors)
            -> fetch RETRO neighbours (own document excluded) -> train RETRO (retro-fitted onto the LM,
               on the "retro" split: text the LM never saw)
            -> evaluate on LM worker actors (kNN-LM λ sweep, RETRO with and without neighbours)
            -> attention map -> generated samples -> RUN/report/

Each stage leaves its output in the layout below and is skipped when that output exists, so an
interrupted run carries on where it stopped (training resumes from its checkpoint, encoding from its
finished parts, evaluation from its finished shares) and a second run reuses everything.

    RUN/data/  RUN/lm/  RUN/knnlm-source/  RUN/knnlm-datastore/  RUN/retro-source/
    RUN/retro-datastore/  RUN/retro/  RUN/report/ (summary.md, table.md, eval.json, samples.md, *.png)

With no `address`, Ray runs as a local cluster on this machine; with one (or RAY_ADDRESS, as under
`ray job submit`), the same stages run on that cluster, which must share RUN's filesystem.

Example:
    >>> report = run_pipeline(PipelineConfig(run=Path("runs/stdlib")))
    >>> print(report.summary)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lm_worker.retrieval import RetrievalConfig
from lm_worker.token_store import (
    RETRO_SPLIT,
    PrepareConfig,
    TokenStore,
    load_prepared,
    prepare_corpus,
    prepare_retro_split,
    write_token_store,
)
from lm_worker.train import TrainConfig

log = logging.getLogger(__name__)

PROMPTS = ("def read_config(path):\n", "class Parser:\n    def __init__(self", "import os\nimport sys\n\n")


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of every stage and where it runs. The defaults fit 2 CPU cores in well under an hour;
    `demo()` in under 20 minutes. The held-out split is cut into validation text (its last
    `tune_tokens` tokens, where kNN-LM's temperature is chosen) and test documents (the rest),
    where every reported perplexity is measured. `encode_workers` / `eval_workers` are Ray actors (0: a plain loop in
    this process); `serve_on_ray` serves the shards as Ray actors (else local processes). `retro_encoder` embeds
    RETRO's chunks: "minilm", or "lm" (the trained base LM's key at each chunk's last token). `retro_init`: "lm"
    retro-fits RETRO onto the trained base LM (its decoder frozen, only CCA and the neighbour encoder train),
    "scratch" trains RETRO's own decoder (`retro.preset`) from random weights. A retro-fitted RETRO trains on
    `max_retro_tokens` tokens of training-side documents the LM never saw (the "retro" split; 0: on the LM's
    own training text, where the frozen LM predicts so well from memory that the neighbours add little)."""

    run: Path = Path("runs/stdlib")
    corpus: str = "stdlib"
    vocab_size: int = 4096
    max_train_tokens: int = 800_000
    max_heldout_tokens: int = 40_000
    max_retro_tokens: int = 3_200_000
    lm: TrainConfig = field(default_factory=lambda: TrainConfig(kind="lm", preset="small", steps=500, eval_every=50))
    retro: TrainConfig = field(default_factory=lambda: TrainConfig(kind="retro", preset="small", steps=1600,
                                                                   batch_size=8, chunk_len=8, eval_every=50))
    n_neighbours: int = 2
    context_len: int = 256
    stride: int = 128
    shards: int = 2
    knn: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(k=1024, nprobe=32))
    retro_nprobe: int = 32
    retro_encoder: str = "lm"
    retro_init: str = "lm"
    eval_tokens: int = 0
    temperatures: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    tune_tokens: int = 4096
    encode_workers: int = 2
    eval_workers: int = 2
    serve_on_ray: bool = True
    address: str | None = None
    num_cpus: int = 0  # logical CPUs of a local Ray cluster; 0: max(4, the machine's)
    samples: int = 3
    sample_tokens: int = 48
    progress: bool = True

    def __post_init__(self):
        if self.retro_init not in ("lm", "scratch"):
            raise ValueError(f"retro_init must be 'lm' or 'scratch', got {self.retro_init!r}")
        if self.max_retro_tokens < 0:
            raise ValueError(f"max_retro_tokens must be >= 0, got {self.max_retro_tokens}")

    @property
    def retro_split(self) -> str:
        """The split RETRO trains on: "retro" (text the LM never saw) when retro-fitted with one, else "train"."""
        return RETRO_SPLIT if self.retro_init == "lm" and self.max_retro_tokens else "train"

    @classmethod
    def demo(cls, run: Path = Path("runs/demo"), **overrides) -> PipelineConfig:
        """The demo's sizes: every stage at CPU scale, about 10 minutes on 2 cores."""
        sizes = dict(run=run, max_train_tokens=300_000, max_heldout_tokens=16_000, max_retro_tokens=300_000,
                     lm=TrainConfig(kind="lm", preset="small", steps=300, batch_size=8, warmup=50, eval_every=100,
                                    checkpoint_every=100),
                     retro=TrainConfig(kind="retro", preset="small", steps=150, batch_size=8, chunk_len=8, warmup=30,
                                       eval_every=75, checkpoint_every=75))
        return cls(**{**sizes, **overrides})


@dataclass(frozen=True)
class PipelineReport:
    """Where everything went: the summary (evaluation table and stage times), the report folder."""

    run: Path
    table: str
    summary: str
    report: Path
    eval_json: Path
    plots: list[Path]
    samples: Path | None


class _Stages:
    """Wall time of each stage, and whether it found its output already there."""

    def __init__(self):
        self.rows: list[tuple[str, float, bool]] = []

    @contextlib.contextmanager
    def stage(self, name: str, reused: bool) -> Iterator[None]:
        log.info("%s: %s", name, "reusing what is there" if reused else "running")
        started = time.perf_counter()
        yield
        self.rows.append((name, time.perf_counter() - started, reused))

    def table(self) -> str:
        lines = ["| stage | seconds | |", "|---|---:|---|"]
        lines += [f"| {name} | {s:.1f} | {'reused' if reused else ''} |" for name, s, reused in self.rows]
        lines.append(f"| total | {sum(s for _, s, _ in self.rows):.1f} | |")
        return "\n".join(lines) + "\n"


def _done(path: Path) -> bool:
    return path.exists()


def _connect(config: PipelineConfig) -> None:
    from retriever_server.ray_connect import connect

    connect(config.address, config.num_cpus or max(4, os.cpu_count() or 1), log_to_driver=False)


# ---------------------------------------------------------------------------------------------- data, models


def _prepare_config(config: PipelineConfig):
    return PrepareConfig(out=config.run / "data", corpus=config.corpus, vocab_size=config.vocab_size,
                         max_train_tokens=config.max_train_tokens, max_heldout_tokens=config.max_heldout_tokens,
                         max_retro_tokens=config.max_retro_tokens, progress=config.progress)


def _prepare(config: PipelineConfig) -> None:
    report = prepare_corpus(replace(_prepare_config(config), max_retro_tokens=0))
    log.info("prepared: documents %s, tokens %s", report.documents, report.tokens)


def _prepare_retro_split(config: PipelineConfig) -> None:
    """RUN/data/retro, the text RETRO's new layers train on; also added to a run prepared without one."""
    store = prepare_retro_split(_prepare_config(config))
    log.info("retro split: %d documents, %d tokens", len(store.documents), len(store))


def _cut_validation(docs: list, tune_tokens: int) -> tuple[list, list]:
    """(test, valid): valid is the last `tune_tokens` tokens of the held-out documents, the document
    where it starts cut in two (its head stays a test document), test the rest."""
    test, valid, need = list(docs), [], tune_tokens
    while need > 1 and test:  # (a document's tokens, then its EOS)
        name, tokens = test.pop()
        if len(tokens) + 1 > need:  # longer than what is still needed: only its tail validates
            cut = len(tokens) - (need - 1)
            test.append((f"{name}[:{cut}]", tokens[:cut]))
            valid.insert(0, (f"{name}[{cut}:]", tokens[cut:]))
            need = 0
        else:
            valid.insert(0, (name, tokens))
            need -= len(tokens) + 1
    if not test:
        raise ValueError(f"{len(docs)} held-out documents leave nothing to test on after {tune_tokens} "
                         "validation tokens: lower tune_tokens or hold out more text")
    return test, valid


def _split_heldout(config: PipelineConfig, heldout):
    """The held-out documents split in two: "valid" (their last `tune_tokens` tokens) to choose
    kNN-LM's temperature on, and "test" (the rest), where every perplexity is reported."""
    data = config.run / "data"
    if not _done(data / "test" / "documents.json"):
        docs = [(d.name, np.asarray(heldout.tokens[d.start:d.end - 1])) for d in heldout.documents]  # EOS re-added
        test, valid = _cut_validation(docs, config.tune_tokens)
        eos = int(heldout.tokens[-1])
        for name, part in (("valid", valid), ("test", test)):
            write_token_store(data / name, part, eos, heldout.tokenizer_fingerprint)
    return TokenStore.open(data / "valid"), TokenStore.open(data / "test")


def _train(config: PipelineConfig, train_config: TrainConfig, name: str, neighbours: Path | None = None) -> Path:
    from lm_worker.train import train

    resume = _same_start(config, train_config, name)
    if not resume:
        log.warning("%s holds a model trained from another start (init_from); training %s afresh",
                    config.run / name, name)
    report = train(train_config, config.run / "data", config.run / name, neighbours_dir=neighbours,
                   resume=resume, progress=config.progress)
    log.info("%s: %d steps, train loss %.3f, held-out loss %.3f, %.0f tokens/s", name, report.steps,
             report.train_loss, report.heldout_loss, report.tokens_per_s)
    return report.checkpoint


def _trained(config: PipelineConfig, train_config: TrainConfig, name: str) -> bool:
    saved = _saved(config, name)
    return saved is not None and saved[0] >= train_config.steps and saved[1:] == _start(train_config)


def _start(train_config: TrainConfig) -> tuple[bool, str]:
    """How a model's training starts: retro-fitted (has an init_from) or not, and the split it trains on."""
    return bool(train_config.init_from), train_config.split


def _saved(config: PipelineConfig, name: str) -> tuple[int, bool, str] | None:
    """RUN/name's checkpoint: its step, whether it was retro-fitted and its training split; None if there is none."""
    from lm_worker.checkpoint import load_checkpoint

    path = config.run / name / "checkpoint.pt"
    if not path.exists():
        return None
    loaded = load_checkpoint(path)
    saved = loaded.extra.get("train_config", {})
    return loaded.step, bool(saved.get("init_from", "")), saved.get("split", "train")


def _same_start(config: PipelineConfig, train_config: TrainConfig, name: str) -> bool:
    """False when RUN/name holds a checkpoint that started otherwise: from scratch where RUN/lm is to be
    retro-fitted or the other way round, or on another split (a run made before `retro_init` or
    `max_retro_tokens` changed). A moved run still matches."""
    saved = _saved(config, name)
    return saved is None or saved[1:] == _start(train_config)


def _split_size(config: PipelineConfig, split: str) -> dict:
    """{"split", "documents", "tokens"} of RUN/data/SPLIT."""
    store = TokenStore.open(config.run / "data" / split)
    return {"split": split, "documents": len(store.documents), "tokens": len(store)}


def _trained_parameters(config: PipelineConfig, retro) -> int:
    """RETRO's parameters that training changed: the new layers only when retro-fitted with a frozen base."""
    from lm_worker.retrofit import is_base_parameter

    frozen = config.retro_init == "lm" and config.retro.freeze_base
    return sum(p.numel() for n, p in retro.named_parameters() if not (frozen and is_base_parameter(n)))


def _retro_train_config(config: PipelineConfig) -> TrainConfig:
    """RETRO's training settings: retro-fitted onto RUN/lm, or from scratch (`retro_init`)."""
    init_from = str(config.run / "lm" / "checkpoint.pt") if config.retro_init == "lm" else ""
    return replace(config.retro, init_from=init_from, split=config.retro_split)


# ---------------------------------------------------------------------------------------------- sources, datastores


def _encode(config: PipelineConfig, kind: str, lm_checkpoint: Path | None = None) -> None:
    """The train split's kNN-LM or RETRO source, by the Ray Data job (or a plain loop with 0 workers)."""
    from lm_worker.encode_job import EncodeJobConfig, run_encode_job

    out = config.run / f"{kind}-source"
    job = EncodeJobConfig(kind=kind, data=config.run / "data", checkpoint=lm_checkpoint, encoder=config.retro_encoder,
                          chunk_len=config.retro.chunk_len, context_len=config.context_len, stride=config.stride,
                          workers=max(config.encode_workers, 1), address=config.address, progress=config.progress)
    run_encode_job(job, out)


def _neighbour_splits(config: PipelineConfig) -> tuple[str, ...]:
    """The splits whose chunks need RETRO neighbours: the one RETRO trains on, and the held-out one."""
    return config.retro_split, "heldout"


def _query_splits(config: PipelineConfig) -> tuple[str, ...]:
    """The splits whose chunks query the RETRO datastore but are not in it (so they need their own keys)."""
    return tuple(split for split in _neighbour_splits(config) if split != "train")


def _check_retro_split(config: PipelineConfig) -> None:
    """ValueError when RUN/data/retro was written within another token budget than `max_retro_tokens`
    (a run made before the budget changed), naming what to remove so the split and what follows from
    it are made again. A split written before budgets were recorded is taken as it is."""
    split = config.run / "data" / RETRO_SPLIT
    if config.retro_split != RETRO_SPLIT or not _done(split / "documents.json"):
        return
    budget = TokenStore.open(split).max_tokens
    if budget is not None and budget != config.max_retro_tokens:
        source = config.run / "retro-source"
        raise ValueError(f"{split} holds the retro split of a {budget}-token budget, max_retro_tokens is "
                         f"{config.max_retro_tokens}: remove {split}, {source / 'retro-keys.npy'}, "
                         f"{source / 'neighbours-retro.npy'} and {config.run / 'retro'} to make it again, or "
                         f"use another run folder")


def _check_neighbour_files(config: PipelineConfig) -> None:
    """ValueError when RUN/retro-source holds neighbours fetched with another n_neighbours than the config's."""
    source = config.run / "retro-source"
    for split in _neighbour_splits(config):
        path = source / f"neighbours-{split}.npy"
        if _done(path) and (k := np.load(path, mmap_mode="r").shape[1]) != config.n_neighbours:
            raise ValueError(f"{path} holds {k} neighbours per chunk, n_neighbours is {config.n_neighbours}: remove "
                             f"{source}/neighbours-*.npy and {config.run / 'retro'} to fetch and train again")


def _split_keys(config: PipelineConfig, encoder, split: str) -> None:
    """RUN/retro-source/SPLIT-keys.npy: the RETRO queries of a split's chunks."""
    from lm_worker.encode import embed_chunks

    source = config.run / "retro-source"
    tmp = source / f"{split}-keys.tmp.npy"
    embed_chunks(TokenStore.open(config.run / "data" / split), encoder, config.retro.chunk_len, tmp,
                 progress=config.progress)
    tmp.rename(source / f"{split}-keys.npy")


def _build(config: PipelineConfig, source: Path, datastore: Path) -> None:
    from lm_worker.encode import build_source

    build_source(source, datastore, shards=config.shards, progress=config.progress)


@contextlib.contextmanager
def _serve(config: PipelineConfig, datastore: Path, name: str) -> Iterator[str]:
    """Serves a datastore for the duration: shards and router as Ray actors, or as local processes.
    Yields the router's address."""
    if config.serve_on_ray:
        from retriever_server.ray_serving import RayDeployment, RayServeConfig

        host = None if (config.address or os.environ.get("RAY_ADDRESS")) else "127.0.0.1"
        serve = RayServeConfig(datastore, name=f"{config.run.name}-{name}", cpus_per_shard=0.5, host=host,
                               metrics=False)
        with RayDeployment(serve) as deployment:
            yield deployment.router_address
    else:
        from retriever_server.launcher import LocalDeployment

        with LocalDeployment(datastore) as deployment:
            yield deployment.router_address


def _neighbours(config: PipelineConfig, retriever) -> None:
    from lm_worker.encode import chunk_exclusions, precompute_neighbours, read_source

    source, L = config.run / "retro-source", config.retro.chunk_len
    for split in _neighbour_splits(config):
        name = f"neighbours-{split}.npy"
        if _done(source / name):
            continue
        if split == "train":  # the datastore's own chunks: each leaves out its own document
            train = TokenStore.open(config.run / "data" / "train")
            keys, exclude = read_source(source).open_keys(), chunk_exclusions(train, L)
        else:  # no document of these is in the datastore: nothing to leave out
            keys, exclude = np.load(source / f"{split}-keys.npy", mmap_mode="r"), None
        tmp = source / f"{name}.tmp.npy"
        precompute_neighbours(retriever, keys, exclude, tmp, progress=config.progress)
        tmp.rename(source / name)


# ---------------------------------------------------------------------------------------------- evaluation


def _tune_temperature(config: PipelineConfig, lm, valid, retriever, eval_config) -> tuple[float, dict[float, float]]:
    """kNN-LM's softmax temperature, chosen on the validation documents (in this process, through the
    service): T -> best perplexity over the λ sweep, and the best T. Kept in RUN/report/temperature.json."""
    from lm_worker.evaluate import evaluate_knnlm

    path = config.run / "report" / "temperature.json"
    if _done(path):
        saved = json.loads(path.read_text())
        return saved["chosen"], {float(t): p for t, p in saved["best_perplexity_by_temperature"].items()}
    best: dict[float, float] = {}
    for T in config.temperatures:
        best[T] = evaluate_knnlm(lm, valid, retriever, replace(eval_config, temperature=T), progress=False
                                 ).best_perplexity
        log.info("temperature %g: best perplexity %.3f on %d validation tokens", T, best[T], len(valid))
    chosen = min(best, key=best.get)
    path.write_text(json.dumps({"chosen": chosen, "best_perplexity_by_temperature": best}, indent=2))
    return chosen, best


def _evaluate(config: PipelineConfig, kind: str, checkpoint: Path, test, target: str, eval_config, model, retriever,
              encoder):
    """The test split's figures: on `eval_workers` LM worker actors (finished shares kept in
    RUN/report/shares/KIND), or in this process with 0 workers."""
    from lm_worker.distributed_eval import EvalJob, WorkerPoolConfig, evaluate_distributed
    from lm_worker.evaluate import evaluate_knnlm, evaluate_retro

    if config.eval_workers == 0:
        if kind == "knnlm":
            return evaluate_knnlm(model, test, retriever, eval_config, config.progress)
        return evaluate_retro(model, test, retriever, encoder, eval_config, config.progress)
    job = EvalJob(kind=kind, checkpoint=checkpoint, store=test.directory, target=target, config=eval_config,
                  tokenizer=config.run / "data" / "tokenizer.json")
    pool = WorkerPoolConfig(workers=config.eval_workers, checkpoint_dir=config.run / "report" / "shares" / kind,
                            address=config.address, progress=config.progress)
    return evaluate_distributed(job, pool)


def _samples(config: PipelineConfig, tokenizer, lm, knn_retriever, knn, retro, retro_retriever, encoder) -> Path:
    """A few continuations of code prompts by the LM alone, kNN-LM and RETRO, written to samples.md."""
    import torch

    from lm_worker.decode import GenerateConfig, generate
    from lm_worker.speculative import SpeculativeKnnLMStepper
    from lm_worker.steppers import LMStepper, RetroStepper

    prompts = PROMPTS[:config.samples]
    # Nucleus sampling with one seed for all three: greedy decoding of models this small repeats itself.
    decode = GenerateConfig(strategy="sample", temperature=0.8, top_p=0.9, seed=0, max_new_tokens=config.sample_tokens,
                            eos_id=tokenizer.eos_id)
    steppers = {"LM alone": (LMStepper(lm), decode),
                f"kNN-LM (λ={knn.best_lambda:g}, T={knn.temperature:g})":
                    (SpeculativeKnnLMStepper(lm, knn_retriever, lam=knn.best_lambda, temperature=knn.temperature,
                                             eos_id=tokenizer.eos_id), decode),
                "RETRO, queries sent 4 tokens early":
                    (RetroStepper(retro, retro_retriever, encoder, prefetch=4), decode)}
    lines = ["# Samples\n", "Each model continues each prompt by nucleus sampling (top-p 0.9, temperature 0.8, "
             "seed 0).\n"]
    for prompt in prompts:
        lines.append(f"## Prompt\n\n```python\n{prompt}```\n")
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
        for name, (stepper, decoding) in steppers.items():
            out = generate(stepper, ids, decoding)
            text = tokenizer.decode(out.tokens[0, : int(out.lengths[0])].tolist())
            lines.append(f"### {name}\n\n```python\n{text}\n```\n")
    path = config.run / "report" / "samples.md"
    path.write_text("\n".join(lines))
    return path


def _attention_plot(config: PipelineConfig, retro_model, encoder, retriever, tokenizer, test) -> Path:
    from lm_worker.attention_plot import plot_retrieved_attention

    out = config.run / "report" / "attention.png"
    plot_retrieved_attention(retro_model, test.tokens[: 4 * retro_model.config.chunk_len], retriever, encoder,
                             tokenizer, chunk=1, out_path=out)
    return out


# ---------------------------------------------------------------------------------------------- the run


def _sources_and_datastores(config: PipelineConfig, stages: _Stages, lm_checkpoint: Path, tokenizer):
    """Encodes and builds both datastores; returns the encoder of the RETRO source's keys."""
    from lm_worker.encode import read_source
    from lm_worker.retro_encoders import chunk_encoder_for

    run, encoder = config.run, None
    for kind in ("knnlm", "retro"):
        source, datastore = run / f"{kind}-source", run / f"{kind}-datastore"
        with stages.stage(f"encode {kind} (Ray Data, {config.encode_workers} workers)",
                          reused=_done(source / "source.json")):
            if not _done(source / "source.json"):
                _encode(config, kind, lm_checkpoint)
        if kind == "retro":
            info = read_source(source)
            if info.chunk_len != config.retro.chunk_len:
                raise ValueError(f"{source} holds chunks of {info.chunk_len} tokens, RETRO's chunk_len is "
                                 f"{config.retro.chunk_len}: remove {source}, {run / 'retro-datastore'} and "
                                 f"{run / 'retro'} to rebuild them, or use another run folder")
            encoder = chunk_encoder_for(info.encoder_metadata, tokenizer)
            for split in _query_splits(config):
                with stages.stage(f"embed {split} chunks", reused=_done(source / f"{split}-keys.npy")):
                    if not _done(source / f"{split}-keys.npy"):
                        _split_keys(config, encoder, split)
        with stages.stage(f"build {kind} datastore ({config.shards} shards)",
                          reused=_done(datastore / "manifest.json")):
            if not _done(datastore / "manifest.json"):
                _build(config, source, datastore)
    return encoder


def run_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineReport:
    """Runs (or finishes) every stage; returns the summary and where the outputs are.

    Raises:
        ValueError: the held-out split is too small to leave test documents after the validation ones, or
            the run holds a retro split, RETRO source or neighbours made with other settings (the message
            names what to remove).
        RuntimeError, OSError: a stage failed (what it finished stays for the next run).
    """
    from lm_worker.checkpoint import load_checkpoint
    from lm_worker.evaluate import EvalConfig
    from lm_worker.retrieval import ServiceRetriever

    run = Path(config.run)
    config, stages = replace(config, run=run), _Stages()
    (run / "report").mkdir(parents=True, exist_ok=True)
    with stages.stage("prepare corpus and tokenizer", reused=_done(run / "data" / "heldout" / "documents.json")):
        if not _done(run / "data" / "heldout" / "documents.json"):
            _prepare(config)
    _check_retro_split(config)
    if config.retro_split == RETRO_SPLIT:
        retro_documents = run / "data" / RETRO_SPLIT / "documents.json"
        with stages.stage(f"prepare the retro split ({config.max_retro_tokens} tokens the LM never sees)",
                          reused=_done(retro_documents)):
            if not _done(retro_documents):
                _prepare_retro_split(config)
    tokenizer, _, heldout = load_prepared(run / "data")
    valid, test = _split_heldout(config, heldout)
    with stages.stage(f"train LM ({config.lm.steps} steps)", reused=_trained(config, config.lm, "lm")):
        lm_checkpoint = _train(config, config.lm, "lm")
    _connect(config)
    encoder = _sources_and_datastores(config, stages, lm_checkpoint, tokenizer)
    _check_neighbour_files(config)
    eval_config = EvalConfig(context_len=config.context_len, stride=config.stride, max_tokens=config.eval_tokens,
                             retrieval=config.knn)
    retro_retrieval = RetrievalConfig(k=config.n_neighbours, nprobe=config.retro_nprobe, exact_rerank=True,
                                      rerank_candidates=8 * config.n_neighbours)
    lm = load_checkpoint(lm_checkpoint).model
    with _serve(config, run / "retro-datastore", "retro") as retro_target, \
            _serve(config, run / "knnlm-datastore", "knnlm") as knn_target, \
            ServiceRetriever(retro_target, retro_retrieval) as retro_retriever, \
            ServiceRetriever(knn_target, config.knn) as knn_retriever:
        with stages.stage("RETRO neighbours of every chunk", reused=all(
                _done(run / "retro-source" / f"neighbours-{s}.npy") for s in _neighbour_splits(config))):
            _neighbours(config, retro_retriever)
        retro_training = _retro_train_config(config)
        fitted = f" retro-fitted onto the LM, on the {retro_training.split} split" if retro_training.init_from else ""
        with stages.stage(f"train RETRO ({config.retro.steps} steps{fitted})",
                          reused=_trained(config, retro_training, "retro")):
            retro_checkpoint = _train(config, retro_training, "retro", neighbours=run / "retro-source")
        retro = load_checkpoint(retro_checkpoint).model
        with stages.stage("choose kNN-LM's temperature on validation text",
                          reused=_done(run / "report" / "temperature.json")):
            temperature, tuning = _tune_temperature(config, lm, valid, knn_retriever, eval_config)
        with stages.stage(f"evaluate kNN-LM ({config.eval_workers} workers)", reused=False):
            knn_result = _evaluate(config, "knnlm", lm_checkpoint, test, knn_target,
                                   replace(eval_config, temperature=temperature), lm, knn_retriever, encoder)
        with stages.stage(f"evaluate RETRO ({config.eval_workers} workers)", reused=False):
            retro_result = _evaluate(config, "retro", retro_checkpoint, test, retro_target,
                                     replace(eval_config, retrieval=retro_retrieval), retro, retro_retriever, encoder)
        with stages.stage("attention map and samples", reused=False):
            attention = _attention_plot(config, retro, encoder, retro_retriever, tokenizer, test)
            samples = _samples(config, tokenizer, lm, knn_retriever, knn_result, retro, retro_retriever, encoder) \
                if config.samples else None
    return _report(config, stages, knn_result, retro_result, test, valid, temperature, tuning, lm, retro, attention,
                   samples)


def _report(config, stages, knn_result, retro_result, test, valid, temperature, tuning, lm, retro, attention,
            samples) -> PipelineReport:
    from lm_worker.eval_report import report_table, write_report

    report = config.run / "report"
    meta = {"config": json.loads(json.dumps(asdict(config), default=str)),
            "evaluated_on": {"split": "test (the held-out documents but their last tune_tokens tokens)",
                             "tokens": len(test),
                             "predicted_tokens": knn_result.tokens,
                             "documents": len(test.documents)},
            "temperature_tuning": {"split": "valid (the last tune_tokens held-out tokens)", "tokens": len(valid),
                                   "best_perplexity_by_temperature": {str(t): p for t, p in tuning.items()},
                                   "chosen": temperature},
            "lm_parameters": sum(p.numel() for p in lm.parameters()),
            "retro_parameters": sum(p.numel() for p in retro.parameters()),
            "retro_trained_parameters": _trained_parameters(config, retro),
            "retro_trained_on": _split_size(config, config.retro_split),
            "stages": [{"stage": n, "seconds": round(s, 1), "reused": r} for n, s, r in stages.rows]}
    write_report(report, knn_result, retro_result, meta)
    plots = [report / "ppl_vs_lambda.png", attention]
    for name in ("lm", "retro"):
        if (config.run / name / "loss.png").exists():
            plots.append(Path(shutil.copy(config.run / name / "loss.png", report / f"loss_{name}.png")))
    table = report_table(knn_result, retro_result)
    summary = (f"Perplexity over the {knn_result.tokens} tokens predicted in the {len(test)}-token test split "
               f"({len(test.documents)} held-out documents); kNN-LM's temperature T={temperature:g} chosen on the "
               f"{len(valid)} held-out tokens after them.\n\n{table}\n{stages.table()}")
    (report / "summary.md").write_text(summary)
    return PipelineReport(config.run, table, summary, report, report / "eval.json", plots, samples)
