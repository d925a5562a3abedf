"""The pipeline's evaluation: kNN-LM's temperature chosen on validation text, the test split's
perplexities on LM worker actors, an attention map and generated samples."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path

from lm_worker.data.token_store import write_text_atomically
from lm_worker.pipeline.config import PROMPTS, PipelineConfig
from lm_worker.pipeline.stages import done

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnnChoice:
    """kNN-LM's settings chosen on the validation text: the temperature, λ at searched positions and λ at
    followed ones (the same λ without pointers), with T -> the best perplexity over the λ sweep, and
    whether they were read from RUN/report/temperature.json rather than chosen now."""

    temperature: float
    lam: float
    followed_lam: float
    by_temperature: dict[float, float]
    reused: bool


def scoring_settings(eval_config) -> dict:
    """The settings of an evaluation that change which tokens it scores and how, apart from the λs, the
    temperature and the retrieval (the windows, the token budget, own-document exclusion, pointers)."""
    skipped = {"lambdas", "temperature", "retrieval", "batch_size"}
    return {f.name: getattr(eval_config, f.name) for f in fields(eval_config) if f.name not in skipped}


def tune_temperature(config: PipelineConfig, lm, valid, retriever, eval_config) -> KnnChoice:
    """kNN-LM's softmax temperature and λ, chosen together on the validation documents (in this process,
    through the service), never on the test split that reports them. Kept in RUN/report/temperature.json
    with the temperatures and λs tried, the LM, the text's length, the kNN retrieval settings, the
    datastore's version and what is scored (windows, token budget, pointers), and chosen again when any of
    them changed, or when the file is unreadable."""
    from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
    from lm_worker.models.fingerprint import model_fingerprint

    path = config.run / "report" / "temperature.json"
    knn = eval_config.retrieval  # what the neighbours are: how many, how searched
    asked = {"temperatures": list(config.temperatures), "lambdas": list(eval_config.lambdas),
             "lm": model_fingerprint(lm), "valid_tokens": len(valid),
             "retrieval": {"k": knn.k, **knn.search_settings()},
             "datastore": getattr(retriever, "version", None),  # a datastore rebuilt by hand finds other neighbours
             "scoring": scoring_settings(eval_config)}  # which tokens are scored, and how
    if done(path):
        saved = read_choice(path)
        if saved is not None and saved["lambda"] is not None and {key: saved.get(key) for key in asked} == asked:
            return KnnChoice(saved["chosen"], saved["lambda"], saved["followed_lambda"],
                             saved["best_perplexity_by_temperature"], True)
        log.info("choosing kNN-LM's temperature and λ again: %s %s", path,
                 "is unreadable" if saved is None else "was chosen for other settings")
    results = {}
    for T in config.temperatures:
        results[T] = evaluate_knnlm(lm, valid, retriever, replace(eval_config, temperature=T), progress=False)
        log.info("temperature %g: best perplexity %.3f (λ=%g) on %d validation tokens", T,
                 results[T].best_perplexity, results[T].best_lambda, len(valid))
    best = {T: result.best_perplexity for T, result in results.items()}
    chosen = results[min(best, key=best.get)]
    choice = KnnChoice(chosen.temperature, chosen.best_lambda, chosen.followed_lambda, best, False)
    write_text_atomically(path, json.dumps({"chosen": choice.temperature, "lambda": choice.lam,
                                            "followed_lambda": choice.followed_lam,
                                            "best_perplexity_by_temperature": best, **asked},
                                           indent=2))  # whole: a stopped write leaves no half file
    return choice


def read_choice(path: Path) -> dict | None:
    """temperature.json with its choice as numbers (T -> perplexity with float keys); None, logged, when it is
    not JSON or lacks them (a file cut short by a run stopped while writing it, before writes were atomic). A
    file written before λ was chosen with T has no "lambdas": it was chosen for other settings."""
    try:
        saved = json.loads(path.read_text())
        saved["chosen"] = float(saved["chosen"])
        for key in ("lambda", "followed_lambda"):  # absent from a file written before λ was chosen with T
            saved[key] = float(saved[key]) if key in saved else None
        saved["best_perplexity_by_temperature"] = {float(t): float(p) for t, p in
                                                   saved["best_perplexity_by_temperature"].items()}
        return saved
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        log.warning("%s is unreadable (%s: %s): the temperature is chosen again", path, type(err).__name__, err)
        return None


def evaluate_test(config: PipelineConfig, kind: str, checkpoint: Path, test, served: tuple, eval_config, model,
                  retriever, encoder) -> tuple:
    """The test split's figures: on `eval_workers` LM worker actors (finished shares kept in
    RUN/report/shares/KIND), or in this process with 0 workers; and whether they were all read from
    the shares an earlier run finished (nothing evaluated now)."""
    from lm_worker.evaluation.distributed import EvalJob, WorkerPoolConfig, evaluate_distributed
    from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
    from lm_worker.evaluation.retro_eval import evaluate_retro
    from lm_worker.evaluation.shares import holds_another_job
    from lm_worker.models.checkpoint import CHECKPOINT_NAME

    if config.eval_workers == 0:
        if kind == "knnlm":
            return evaluate_knnlm(model, test, retriever, eval_config, config.progress), False
        return evaluate_retro(model, test, retriever, encoder, eval_config, config.progress), False
    target, security = served  # the router's address, and how its clients reach it
    encoder_lm = config.run / "lm" / CHECKPOINT_NAME if kind == "retro" and config.retro_encoder == "lm" else None
    job = EvalJob(kind=kind, checkpoint=checkpoint, store=test.directory, target=target, config=eval_config,
                  tokenizer=config.run / "data" / "tokenizer.json", security=security,
                  encoder_lm=encoder_lm)  # this run's LM, not the path the datastore recorded
    shares = config.run / "report" / "shares" / kind
    if shares.is_dir() and holds_another_job(job.describe(), shares):  # e.g. another temperature chosen: the
        log.info("evaluating the test split again: %s holds another evaluation's shares", shares)  # run's own
        shutil.rmtree(shares)
    pool = WorkerPoolConfig(workers=config.eval_workers, checkpoint_dir=shares, address=config.address,
                            progress=config.progress)
    evaluated = []
    result = evaluate_distributed(job, pool, on_share=evaluated.append)
    return result, not evaluated


def fenced(text: str, language: str = "python") -> str:
    """`text` as a markdown code block that holds whatever it contains: the fence is longer than any
    run of backticks in it, and closes on a line of its own even when the text ends mid-line."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip(chr(10))}\n{fence}\n"


def write_samples(config: PipelineConfig, tokenizer, lm, knn_retriever, knn, retro, retro_retriever, encoder) -> Path:
    """A few continuations of code prompts by the LM alone, kNN-LM and RETRO, written to samples.md."""
    import torch

    from lm_worker.decoding.config import GenerateConfig
    from lm_worker.decoding.generate import generate
    from lm_worker.decoding.knnlm_stepper import KnnLMStepper
    from lm_worker.decoding.lm_stepper import LMStepper
    from lm_worker.decoding.retro_stepper import RetroStepper

    prompts = PROMPTS[:config.samples]
    # Nucleus sampling with one seed for all three: greedy decoding of models this small repeats itself.
    decode = GenerateConfig(strategy="sample", temperature=0.8, top_p=0.9, seed=0, max_new_tokens=config.sample_tokens,
                            eos_id=tokenizer.eos_id)
    steppers = {"LM alone": (LMStepper(lm), decode),
                f"kNN-LM (λ={knn.best_lambda:g}, T={knn.temperature:g})":
                    (KnnLMStepper(lm, knn_retriever, lam=knn.best_lambda, temperature=knn.temperature), decode),
                "RETRO, queries sent 4 tokens early":
                    (RetroStepper(retro, retro_retriever, encoder, prefetch=4), decode)}
    lines = ["# Samples\n", "Each model continues each prompt by nucleus sampling (top-p 0.9, temperature 0.8, "
             "seed 0).\n"]
    for prompt in prompts:
        lines.append(f"## Prompt\n\n{fenced(prompt)}\n")
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
        for name, (stepper, decoding) in steppers.items():
            out = generate(stepper, ids, decoding)
            text = tokenizer.decode(out.tokens[0, : int(out.lengths[0])].tolist())
            lines.append(f"### {name}\n\n{fenced(text)}\n")
    path = config.run / "report" / "samples.md"
    path.write_text("\n".join(lines))
    return path


def attention_map(config: PipelineConfig, retro_model, encoder, retriever, tokenizer, test) -> Path:
    from lm_worker.evaluation.attention_plot import plot_retrieved_attention

    out = config.run / "report" / "attention.png"
    plot_retrieved_attention(retro_model, test.tokens[: 4 * retro_model.config.chunk_len], retriever, encoder,
                             tokenizer, chunk=1, out_path=out)
    return out

