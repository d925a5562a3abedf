"""Distributed evaluation benchmark: kNN-LM evaluation tokens/s with 1 and 2 LM worker actors.

On the first N test tokens of a run directory, against one `LocalDeployment` of RUN/knnlm-datastore
(2 shard processes and a router), it times in one run:

- (a) "in-process": `evaluate_knnlm` in this process over gRPC, torch on every core: the reference;
- (b) "1 worker": `evaluate_distributed` with one worker actor (`--worker-threads` torch threads);
- (c) "2 workers": the same with two worker actors.

(b) and (c) are timed whole, the actors' start (importing torch, loading the checkpoint) included,
as a user waits for them; the steady rate from the shares' own seconds is shown too. It checks that
(b) and (c) give the same perplexity to the last digit and (a) the same up to summation order, and
writes OUT/eval_workers.json.

    python benchmarks/eval_workers.py --run runs/stdlib [--tokens 16384] [--k 1024] [--out bench_out]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import ray
import torch

from lm_worker.data.token_store import TokenStore
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.distributed import EvalJob, WorkerPoolConfig, evaluate_distributed
from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
from lm_worker.models.checkpoint import load_checkpoint
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.service import ServiceRetriever
from retriever_server.cluster.launcher import LocalDeployment


def _split(run: Path) -> Path:
    data = run / "data"
    return data / "test" if (data / "test").is_dir() else data / "heldout"


def _row(name: str, tokens: int, seconds: float, reference: float, perplexity: float) -> dict:
    rate = tokens / seconds
    return {"name": name, "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(rate, 1),
            "vs_in_process": round(rate / reference, 3), "best_perplexity": perplexity}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/stdlib"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=10.0)
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--batches-per-share", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()

    try:
        store = TokenStore.open(_split(args.run))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--run {args.run} is not a run folder with a held-out split ({err}); make one with "
                         "lm-worker demo or lm-worker pipeline") from None
    checkpoint = args.run / "lm"
    config = EvalConfig(max_tokens=args.tokens, temperature=args.temperature,
                        retrieval=RetrievalConfig(k=args.k, nprobe=args.nprobe))
    rows = []
    with LocalDeployment(args.run / "knnlm-datastore") as deployment:
        with ServiceRetriever(deployment.router_address, config.retrieval) as retriever:
            model = load_checkpoint(checkpoint).model
            evaluate_knnlm(model, store, retriever, EvalConfig(max_tokens=256, retrieval=config.retrieval), False)
            started = time.perf_counter()
            reference = evaluate_knnlm(model, store, retriever, config, progress=False)
            seconds = time.perf_counter() - started
        base_rate = reference.tokens / seconds
        rows.append(_row("in-process (reference)", reference.tokens, seconds, base_rate, reference.best_perplexity))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        job = EvalJob(kind="knnlm", checkpoint=checkpoint, store=store.directory, target=deployment.router_address,
                      config=config)
        results = {}
        for workers in (1, 2):
            pool = WorkerPoolConfig(workers=workers, batches_per_share=args.batches_per_share,
                                    torch_threads=args.worker_threads, progress=False)
            started = time.perf_counter()
            results[workers] = evaluate_distributed(job, pool)
            seconds = time.perf_counter() - started
            rows.append(_row(f"{workers} worker{'s' if workers > 1 else ''}", results[workers].tokens, seconds,
                             base_rate, results[workers].best_perplexity))
        ray.shutdown()
    same = results[1].perplexity == results[2].perplexity
    close = all(math.isclose(results[1].perplexity[lam], reference.perplexity[lam], rel_tol=1e-9)
                for lam in config.lambdas)
    print(f"kNN-LM evaluation, {reference.tokens} tokens of {store.directory}, k={args.k}, nprobe={args.nprobe}, "
          f"{os.cpu_count()} CPUs, worker torch threads {args.worker_threads}, in-process torch threads "
          f"{torch.get_num_threads()}\n")
    print("| evaluation | seconds | tokens/s | vs in-process | best perplexity |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['vs_in_process']:.2f}x | "
              f"{r['best_perplexity']:.4f} |")
    speedup = rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"\n2 workers / 1 worker: {speedup:.2f}x; 1 and 2 workers equal to the last digit: {same}; "
          f"equal to in-process up to summation order: {close}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_workers.json").write_text(json.dumps(
        {"rows": rows, "two_vs_one": round(speedup, 3), "identical": same, "close_to_in_process": close,
         "machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(args)}, indent=2, default=str))
    return 0 if same and close else 1


if __name__ == "__main__":
    raise SystemExit(main())
