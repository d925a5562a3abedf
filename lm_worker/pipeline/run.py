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

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from lm_worker.data.prepare import load_prepared
from lm_worker.data.token_store import RETRO_SPLIT
from lm_worker.pipeline.config import PipelineConfig, PipelineReport
from lm_worker.pipeline.data_stage import (
    check_prepared_corpus,
    check_prepared_splits,
    check_retro_split,
    prepare_data,
    prepare_retro,
    split_heldout,
    split_size,
    split_sizes,
)
from lm_worker.pipeline.datastore_stage import (
    check_neighbour_files,
    fetch_neighbours,
    neighbour_splits,
    retro_search,
    serve_datastore,
    sources_and_datastores,
)
from lm_worker.pipeline.eval_stage import attention_map, evaluate_test, tune_temperature, write_samples
from lm_worker.pipeline.model_stage import is_trained, retro_train_config, train_model, trained_parameters
from lm_worker.pipeline.stages import Stages, connect_ray, done
from lm_worker.pipeline.staleness import check_made_from, check_models


def run_pipeline(config: PipelineConfig = PipelineConfig()) -> PipelineReport:
    """Runs (or finishes) every stage; returns the summary and where the outputs are.

    Raises:
        ValueError: the held-out split is too small to leave test documents after the validation ones, or
            the run holds data prepared from another corpus or vocabulary, a model trained with other
            settings (or one that would train on under what was made from it), a retro split, sources,
            datastores, neighbours or a RETRO made with other settings or from another LM or encoder than
            this run's (the message names everything to remove).
        RuntimeError, OSError: a stage failed (what it finished stays for the next run).
    """
    from lm_worker.evaluation.config import EvalConfig
    from lm_worker.evaluation.knnlm_eval import at_lambdas
    from lm_worker.models.checkpoint import load_checkpoint
    from lm_worker.retrieval.service import ServiceRetriever, resolve_target

    run = Path(config.run)
    config, stages = replace(config, run=run), Stages()
    if config.address or os.environ.get("RAY_ADDRESS"):  # a cluster named: joined before any stage runs
        connect_ray(config)
    check_prepared_corpus(config)  # each check refuses, before any work, what was made otherwise than asked
    (run / "report").mkdir(parents=True, exist_ok=True)
    with stages.stage("prepare corpus and tokenizer", reused=done(run / "data" / "heldout" / "documents.json")):
        if not done(run / "data" / "heldout" / "documents.json"):
            prepare_data(config)
    check_prepared_splits(config)
    check_retro_split(config)
    check_models(config)
    if config.retro_split == RETRO_SPLIT:
        retro_documents = run / "data" / RETRO_SPLIT / "documents.json"
        with stages.stage(f"prepare the retro split ({config.max_retro_tokens} tokens the LM never sees)",
                          reused=done(retro_documents)):
            if not done(retro_documents):
                prepare_retro(config)
    tokenizer, _, heldout = load_prepared(run / "data")
    valid, test = split_heldout(config, heldout)
    with stages.stage(f"train LM ({config.lm.steps} steps)", reused=is_trained(config, config.lm, "lm")):
        lm_checkpoint = train_model(config, config.lm, "lm")
    check_made_from(config, lm_checkpoint)
    connect_ray(config)
    encoder = sources_and_datastores(config, stages, lm_checkpoint, tokenizer)
    check_neighbour_files(config)
    eval_config = EvalConfig(context_len=config.context_len, stride=config.stride, max_tokens=config.eval_tokens,
                             retrieval=config.knn)
    retro_retrieval = retro_search(config)
    lm = load_checkpoint(lm_checkpoint).model
    with serve_datastore(config, run / "retro-datastore", "retro") as (retro_target, retro_security), \
            serve_datastore(config, run / "knnlm-datastore", "knnlm") as (knn_target, knn_security), \
            ServiceRetriever(resolve_target(retro_target), retro_retrieval, retro_security) as retro_retriever, \
            ServiceRetriever(resolve_target(knn_target), config.knn, knn_security) as knn_retriever:
        with stages.stage("RETRO neighbours of every chunk", reused=all(
                done(run / "retro-source" / f"neighbours-{s}.npy") for s in neighbour_splits(config))):
            fetch_neighbours(config, retro_retriever)
        retro_training = retro_train_config(config)
        fitted = f" retro-fitted onto the LM, on the {retro_training.split} split" if retro_training.init_from else ""
        with stages.stage(f"train RETRO ({config.retro.steps} steps{fitted})",
                          reused=is_trained(config, retro_training, "retro")):
            retro_checkpoint = train_model(config, retro_training, "retro", neighbours=run / "retro-source")
        retro = load_checkpoint(retro_checkpoint).model
        with stages.stage("choose kNN-LM's temperature and λ on validation text",
                          reused=done(run / "report" / "temperature.json")) as stage:
            choice = tune_temperature(config, lm, valid, knn_retriever, eval_config)
            stage.reused = choice.reused
        where = f"{config.eval_workers} workers" if config.eval_workers else "in this process"
        with stages.stage(f"evaluate kNN-LM ({where})", reused=False) as stage:
            swept, stage.reused = evaluate_test(config, "knnlm", lm_checkpoint, test, (knn_target, knn_security),
                                                replace(eval_config, temperature=choice.temperature), lm,
                                                knn_retriever, encoder)
            knn_result = at_lambdas(swept, choice.lam, choice.followed_lam, "valid")  # never the test's own best
        with stages.stage(f"evaluate RETRO ({where})", reused=False) as stage:
            retro_result, stage.reused = evaluate_test(config, "retro", retro_checkpoint, test,
                                                       (retro_target, retro_security),
                                                       replace(eval_config, retrieval=retro_retrieval), retro,
                                                       retro_retriever, encoder)
        clear_results(config.run / "report")  # from here on this run's files replace the last run's
        with stages.stage("attention map and samples", reused=False):
            attention = attention_map(config, retro, encoder, retro_retriever, tokenizer, test)
            samples = write_samples(config, tokenizer, lm, knn_retriever, knn_result, retro, retro_retriever, encoder) \
                if config.samples else None
    return write_pipeline_report(config, stages, knn_result, retro_result, test, valid, choice, lm,
                                 retro, attention, samples)


RESULTS = ("summary.md", "table.md", "eval.json", "samples.md")  # a run's figures and texts, rewritten each run


def clear_results(report: Path) -> None:
    """Removes the last run's figures and texts from `report` before this run writes its own: stopped
    part-way, or with no samples asked for, it leaves none of the last run's beside this one's."""
    for name in RESULTS:
        (report / name).unlink(missing_ok=True)


def write_pipeline_report(config, stages, knn_result, retro_result, test, valid, choice, lm, retro,
                          attention, samples) -> PipelineReport:
    from lm_worker.evaluation.report import report_table, write_report

    report = config.run / "report"
    # The config as it ran: RETRO's training settings as `retro_train_config` made them (retro-fitted
    # from RUN/lm, on the retro split), and each split's token budget beside the tokens it holds.
    ran = replace(config, retro=retro_train_config(config))
    meta = {"config": json.loads(json.dumps(asdict(ran), default=str)),
            "splits": split_sizes(config),
            "evaluated_on": {"split": "test (the held-out documents but their last tune_tokens tokens)",
                             "tokens": len(test),
                             "predicted_tokens": knn_result.tokens,
                             "documents": len(test.documents)},
            "temperature_tuning": {"split": "valid (the last tune_tokens held-out tokens)", "tokens": len(valid),
                                   "best_perplexity_by_temperature": {str(t): p for t, p in
                                                                      choice.by_temperature.items()},
                                   "chosen": choice.temperature, "lambda": choice.lam,
                                   "followed_lambda": choice.followed_lam},
            "lm_parameters": sum(p.numel() for p in lm.parameters()),
            "retro_parameters": sum(p.numel() for p in retro.parameters()),
            "retro_trained_parameters": trained_parameters(config, retro),
            "retro_trained_on": split_size(config, config.retro_split),
            "stages": [{"stage": n, "seconds": round(s, 1), "reused": r} for n, s, r in stages.rows]}
    write_report(report, knn_result, retro_result, meta)
    plots = [report / "ppl_vs_lambda.png", attention]
    for name in ("lm", "retro"):
        if (config.run / name / "loss.png").exists():
            plots.append(Path(shutil.copy(config.run / name / "loss.png", report / f"loss_{name}.png")))
    table = report_table(knn_result, retro_result)
    summary = (f"Perplexity over the {knn_result.tokens} tokens predicted in the {len(test)}-token test split "
               f"({len(test.documents)} held-out documents); kNN-LM's temperature T={choice.temperature:g} and "
               f"λ={choice.lam:g} chosen on the {len(valid)} held-out tokens after them.\n\n{table}\n{stages.table()}")
    (report / "summary.md").write_text(summary)
    return PipelineReport(config.run, table, summary, report, report / "eval.json", plots, samples)

