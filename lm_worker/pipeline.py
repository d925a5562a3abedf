"""The whole LM side on one corpus, stage by stage, into one run directory:

    prepare -> train the LM -> encode kNN-LM keys -> build its datastore
            -> embed RETRO chunks -> build its datastore -> serve both
            -> fetch RETRO neighbours (own document excluded) -> train RETRO
            -> evaluate (kNN-LM λ sweep, RETRO with and without neighbours) -> attention map

Each stage leaves its output in the layout below and is skipped when that output exists, so an
interrupted run carries on where it stopped (training resumes from its checkpoint).

    RUN/data/  RUN/lm/  RUN/knnlm-source/  RUN/knnlm-datastore/  RUN/retro-source/
    RUN/retro-datastore/  RUN/retro/  RUN/eval/

Example:
    >>> report = run_pipeline(PipelineConfig(run=Path("runs/stdlib")))
    >>> print(report.table)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lm_worker.retrieval import RetrievalConfig
from lm_worker.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of every stage. The defaults fit 2 CPU cores in well under an hour. The held-out split is
    cut into validation documents (`tune_tokens`, where kNN-LM's temperature is chosen) and test
    documents, where every reported perplexity is measured."""

    run: Path = Path("runs/stdlib")
    corpus: str = "stdlib"
    vocab_size: int = 4096
    max_train_tokens: int = 800_000
    max_heldout_tokens: int = 40_000
    lm: TrainConfig = field(default_factory=lambda: TrainConfig(kind="lm", preset="small", steps=500, eval_every=50))
    retro: TrainConfig = field(default_factory=lambda: TrainConfig(kind="retro", preset="small", steps=400,
                                                                   batch_size=8, chunk_len=16, eval_every=50))
    n_neighbours: int = 2
    context_len: int = 256
    stride: int = 128
    shards: int = 2
    knn: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(k=1024, nprobe=32))
    retro_nprobe: int = 32
    eval_tokens: int = 0
    temperatures: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    tune_tokens: int = 4096
    num_cpus: int = 2
    progress: bool = True


@dataclass(frozen=True)
class PipelineReport:
    """Where everything went, and the evaluation's table."""

    run: Path
    table: str
    eval_json: Path
    plots: list[Path]


def _done(path: Path) -> bool:
    return path.exists()


def _prepare(config: PipelineConfig) -> None:
    from lm_worker.token_store import PrepareConfig, prepare_corpus

    if _done(config.run / "data" / "heldout" / "documents.json"):
        return
    report = prepare_corpus(PrepareConfig(out=config.run / "data", corpus=config.corpus, vocab_size=config.vocab_size,
                                          max_train_tokens=config.max_train_tokens,
                                          max_heldout_tokens=config.max_heldout_tokens, progress=config.progress))
    log.info("prepared: documents %s, tokens %s", report.documents, report.tokens)


def _train(config: PipelineConfig, train_config: TrainConfig, name: str, neighbours: Path | None = None) -> Path:
    from lm_worker.train import train

    report = train(train_config, config.run / "data", config.run / name, neighbours_dir=neighbours,
                   progress=config.progress)
    log.info("%s: %d steps, train loss %.3f, held-out loss %.3f, %.0f tokens/s", name, report.steps,
             report.train_loss, report.heldout_loss, report.tokens_per_s)
    return report.checkpoint


def _build(config: PipelineConfig, source: Path, datastore: Path) -> None:
    from lm_worker.encode import build_source

    if _done(datastore / "manifest.json"):
        return
    import ray

    build_source(source, datastore, shards=config.shards, num_cpus=config.num_cpus, progress=config.progress)
    ray.shutdown()


def _knnlm_source(config: PipelineConfig, lm_checkpoint: Path) -> None:
    from lm_worker.checkpoint import load_checkpoint
    from lm_worker.encode import encode_knnlm
    from lm_worker.token_store import TokenStore

    if _done(config.run / "knnlm-source" / "source.json"):
        return
    model = load_checkpoint(lm_checkpoint).model
    encode_knnlm(model, TokenStore.open(config.run / "data" / "train"), config.run / "knnlm-source",
                 context_len=config.context_len, stride=config.stride, progress=config.progress)


def _retro_source(config: PipelineConfig, encoder) -> None:
    from lm_worker.encode import embed_chunks, encode_retro
    from lm_worker.token_store import TokenStore

    source = config.run / "retro-source"
    L = config.retro.chunk_len
    if not _done(source / "source.json"):
        encode_retro(TokenStore.open(config.run / "data" / "train"), encoder, L, source, progress=config.progress)
    if not _done(source / "heldout-keys.npy"):
        tmp = source / "heldout-keys.tmp.npy"
        embed_chunks(TokenStore.open(config.run / "data" / "heldout"), encoder, L, tmp, progress=config.progress)
        tmp.rename(source / "heldout-keys.npy")


def _neighbours(config: PipelineConfig, retriever) -> None:
    from lm_worker.encode import chunk_exclusions, precompute_neighbours
    from lm_worker.token_store import TokenStore

    source, L = config.run / "retro-source", config.retro.chunk_len
    own_document = lambda: chunk_exclusions(TokenStore.open(config.run / "data" / "train"), L)  # noqa: E731
    for name, keys, exclude in (("neighbours-train.npy", "keys.npy", own_document),
                                ("neighbours-heldout.npy", "heldout-keys.npy", lambda: None)):
        if _done(source / name):
            continue
        tmp = source / f"{name}.tmp.npy"
        precompute_neighbours(retriever, np.load(source / keys, mmap_mode="r"), exclude(), tmp,
                              progress=config.progress)
        tmp.rename(source / name)


def _attention_plot(config: PipelineConfig, retro_model, encoder, retriever, tokenizer) -> Path:
    from lm_worker.attention_plot import plot_retrieved_attention
    from lm_worker.token_store import TokenStore

    test = TokenStore.open(config.run / "data" / "test")
    out = config.run / "eval" / "attention.png"
    plot_retrieved_attention(retro_model, test.tokens[: 4 * retro_model.config.chunk_len], retriever, encoder,
                             tokenizer, chunk=1, out_path=out)
    return out


def _split_heldout(config: PipelineConfig, heldout):
    """The held-out documents split in two: "valid" (the last documents, at least `tune_tokens`
    tokens) to choose kNN-LM's temperature on, and "test" (the others), where perplexity is reported."""
    from lm_worker.token_store import TokenStore, write_token_store

    data = config.run / "data"
    if not _done(data / "test" / "documents.json"):
        docs = [(d.name, np.asarray(heldout.tokens[d.start:d.end - 1])) for d in heldout.documents]  # EOS re-added
        cut = next((i for i in range(len(docs) - 1, -1, -1)
                    if sum(len(t) + 1 for _, t in docs[i:]) >= config.tune_tokens), 0)
        if cut == 0:
            raise ValueError(f"{len(docs)} held-out documents leave nothing to test on after {config.tune_tokens} "
                             "validation tokens: lower tune_tokens or hold out more text")
        eos = int(heldout.tokens[-1])
        for name, part in (("valid", docs[cut:]), ("test", docs[:cut])):
            write_token_store(data / name, part, eos, heldout.tokenizer_fingerprint)
    return TokenStore.open(data / "valid"), TokenStore.open(data / "test")


def _tune_temperature(config: PipelineConfig, lm, valid, retriever, eval_config) -> tuple[float, dict[float, float]]:
    """kNN-LM's softmax temperature, chosen on the validation documents: T -> best perplexity over
    the λ sweep, and the best T."""
    from lm_worker.evaluate import evaluate_knnlm

    best: dict[float, float] = {}
    for T in config.temperatures:
        best[T] = evaluate_knnlm(lm, valid, retriever, replace(eval_config, temperature=T), progress=False
                                 ).best_perplexity
        log.info("temperature %g: best perplexity %.3f on %d validation tokens", T, best[T], len(valid))
    return min(best, key=best.get), best


def run_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineReport:
    """Runs (or finishes) every stage; returns the evaluation table and where the outputs are."""
    from lm_worker.checkpoint import load_checkpoint
    from lm_worker.chunk_encoder import ChunkEncoder
    from lm_worker.eval_report import write_report
    from lm_worker.evaluate import EvalConfig, evaluate_knnlm, evaluate_retro
    from lm_worker.retrieval import ServiceRetriever
    from lm_worker.token_store import load_prepared
    from retriever_server.launcher import LocalDeployment

    run = Path(config.run)
    config = replace(config, run=run)
    _prepare(config)
    tokenizer, _, heldout = load_prepared(run / "data")
    valid, test = _split_heldout(config, heldout)
    lm_checkpoint = _train(config, config.lm, "lm")
    _knnlm_source(config, lm_checkpoint)
    _build(config, run / "knnlm-source", run / "knnlm-datastore")
    encoder = ChunkEncoder(tokenizer)
    _retro_source(config, encoder)
    _build(config, run / "retro-source", run / "retro-datastore")
    retro_retrieval = RetrievalConfig(k=config.n_neighbours, nprobe=config.retro_nprobe, exact_rerank=True,
                                      rerank_candidates=8 * config.n_neighbours)
    with LocalDeployment(run / "retro-datastore") as retro_ds, \
            ServiceRetriever(retro_ds.router_address, retro_retrieval) as retro_retriever:
        _neighbours(config, retro_retriever)
        retro_checkpoint = _train(config, config.retro, "retro", neighbours=run / "retro-source")
        retro = load_checkpoint(retro_checkpoint).model
        eval_config = EvalConfig(context_len=config.context_len, stride=config.stride, max_tokens=config.eval_tokens,
                                 retrieval=config.knn)
        retro_result = evaluate_retro(retro, test, retro_retriever, encoder, eval_config, config.progress)
        attention = _attention_plot(config, retro, encoder, retro_retriever, tokenizer)
    lm = load_checkpoint(lm_checkpoint).model
    with LocalDeployment(run / "knnlm-datastore") as knn_ds, \
            ServiceRetriever(knn_ds.router_address, config.knn) as knn_retriever:
        temperature, tuning = _tune_temperature(config, lm, valid, knn_retriever, eval_config)
        knn_result = evaluate_knnlm(lm, test, knn_retriever, replace(eval_config, temperature=temperature),
                                    config.progress)
    meta = {"config": json.loads(json.dumps(asdict(config), default=str)),
            "evaluated_on": {"split": "test (the held-out documents before the validation ones)", "tokens": len(test),
                             "documents": len(test.documents)},
            "temperature_tuning": {"split": "valid (the last held-out documents)", "tokens": len(valid),
                                   "best_perplexity_by_temperature": {str(t): p for t, p in tuning.items()},
                                   "chosen": temperature},
            "lm_parameters": sum(p.numel() for p in lm.parameters()),
            "retro_parameters": sum(p.numel() for p in retro.parameters())}
    table = write_report(run / "eval", knn_result, retro_result, meta)
    plots = [run / "lm" / "loss.png", run / "retro" / "loss.png", run / "eval" / "ppl_vs_lambda.png", attention]
    return PipelineReport(run, table, run / "eval" / "eval.json", plots)
