"""kNN-LM evaluation benchmark: held-out tokens/s through the retrieval service against in-process FAISS.

On the first N held-out tokens of a run directory, in one process and one run, it times the same
sliding-window perplexity evaluation (`lm_worker.evaluation`) four ways:

- (a) "lm": the base LM alone (no retrieval): the ceiling;
- (b) "in-process": kNN-LM with `InProcessRetriever` over RUN/knnlm-datastore (the shard files
  searched inside this process, one after another, merged exactly): the reference;
- (c) "router": kNN-LM with `ServiceRetriever` through a `LocalDeployment` (one process per shard
  and a router, on this machine);
- (d) "fan-out": the same shard servers, queried by the client directly (no router).

Each side is warmed up on a few tokens, then timed `--repeats` times; the fastest run counts (the
machine is shared). It reports tokens/s and the ratios (c)/(b), (d)/(b) and (b)/(a), and checks that (b), (c) and (d),
which search the same shards, give the same perplexities.

    python benchmarks/knnlm_eval.py --run RUN [--tokens 4096] [--k 1024] [--nprobe 0] [--out bench_out]

RUN is laid out as the CLI writes it: RUN/data (prepared corpus), RUN/lm/checkpoint.pt (the base LM)
and RUN/knnlm-datastore (built from that LM's keys). Writes OUT/knnlm_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# The shard servers started here search on this machine's cores while the model computes: the
# model's OpenMP threads sleep between operations instead of spinning for those cores, as
# `lm-worker eval` does beside local servers. Set before torch loads; your own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lm_worker.data.token_store import TokenStore
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.knnlm_eval import KnnEvalResult, evaluate_knnlm, evaluate_lm
from lm_worker.models.checkpoint import load_checkpoint  # noqa: E402
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.retrieval.service import ServiceRetriever
from retriever_server.cluster.launcher import LocalDeployment  # noqa: E402
from retriever_server.datastore.manifest import read_manifest  # noqa: E402

PPL_RTOL = 1e-6  # (b), (c), (d) search the same shards: their perplexities must agree to rounding


@dataclass(frozen=True)
class BenchConfig:
    """What to evaluate and how."""

    run: Path
    out: Path = Path("bench_out")
    tokens: int = 4096
    k: int = 1024
    nprobe: int = 0
    exact_rerank: bool = False
    rerank_candidates: int = 0
    context_len: int = 0  # 0: the datastore's (the window its keys were made with), else 256
    stride: int = 0  # 0: context_len // 2
    batch_size: int = 8
    temperature: float = 1.0
    warmup_tokens: int = 256
    repeats: int = 3
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def checkpoint(self) -> Path:
        return self.run / "lm" / "checkpoint.pt"

    @property
    def datastore(self) -> Path:
        return self.run / "knnlm-datastore"

    @property
    def heldout(self) -> Path:
        return self.run / "data" / "heldout"


def check_run(config: BenchConfig) -> None:
    """Exits with a message naming every piece of RUN that is missing."""
    if not config.run.is_dir():
        raise SystemExit(f"error: run directory {config.run} does not exist (expected RUN/data, RUN/lm/checkpoint.pt "
                         f"and RUN/knnlm-datastore)")
    needed = {config.heldout / "documents.json": "the held-out split (prepare the corpus into RUN/data)",
              config.checkpoint: "the base LM checkpoint (train it into RUN/lm)",
              config.datastore / "manifest.json": "the kNN-LM datastore (encode and build it into RUN/knnlm-datastore)"}
    missing = [f"  {path}: {what}" for path, what in needed.items() if not path.is_file()]
    if missing:
        raise SystemExit(f"error: {config.run} is not a complete run; missing:\n" + "\n".join(missing))


def eval_config(config: BenchConfig, metadata: dict[str, str], max_len: int | None) -> EvalConfig:
    """The evaluation window: the datastore's context_len unless given, capped by the model's max_len."""
    context = config.context_len or int(metadata.get("context_len") or 256)
    if max_len:
        context = min(context, max_len)
    retrieval = RetrievalConfig(k=config.k, nprobe=config.nprobe, exact_rerank=config.exact_rerank,
                                rerank_candidates=config.rerank_candidates)
    return EvalConfig(context_len=context, stride=config.stride or max(context // 2, 1), batch_size=config.batch_size,
                      max_tokens=config.tokens, temperature=config.temperature, retrieval=retrieval)


def side(name: str, result: KnnEvalResult | None, seconds: float, tokens: int, ppl: float | None = None) -> dict:
    """One row: throughput, where the time went and the perplexities."""
    row = {"side": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    if result is None:
        return {**row, "base_perplexity": ppl}
    return {**row, "model_seconds": result.model_seconds, "retrieval_seconds": result.retrieval_seconds,
            "retrieval_wait_seconds": result.retrieval_wait_seconds, "base_perplexity": result.base_perplexity,
            "best_lambda": result.best_lambda, "best_perplexity": result.best_perplexity,
            "perplexity": {str(lam): p for lam, p in result.perplexity.items()}}


def fastest(call, repeats: int):
    """The fastest of `repeats` timed calls: (seconds, its result)."""
    best = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        seconds = time.perf_counter() - started
        if best is None or seconds < best[0]:
            best = (seconds, result)
    return best


def time_knnlm(name: str, model, store: TokenStore, retriever, config: EvalConfig, warmup: EvalConfig,
               repeats: int) -> dict:
    """Warms the retriever and model up on a few tokens, then times the whole evaluation."""
    evaluate_knnlm(model, store, retriever, warmup, progress=False)
    seconds, result = fastest(lambda: evaluate_knnlm(model, store, retriever, config, progress=False), repeats)
    print(f"  {name:10s}: {result.tokens / seconds:8.1f} tokens/s, perplexity {result.base_perplexity:.3f} -> "
          f"{result.best_perplexity:.3f} at λ={result.best_lambda:g}", flush=True)
    return side(name, result, seconds, result.tokens)


def perplexity_agreement(rows: list[dict]) -> dict:
    """Largest relative perplexity difference of each kNN-LM side against the in-process one."""
    ref = rows[0]["perplexity"]
    out = {}
    for row in rows[1:]:
        diffs = [abs(row["perplexity"][lam] - p) / p if np.isfinite(p) else float(row["perplexity"][lam] != p)
                 for lam, p in ref.items()]
        out[row["side"]] = max(diffs)
    return {"max_relative_difference": out, "agree": all(d <= PPL_RTOL for d in out.values())}


def run(config: BenchConfig) -> dict:
    """Loads the run, times (a)-(d) back to back, returns every number."""
    check_run(config)
    loaded = load_checkpoint(config.checkpoint, device=config.device)
    if loaded.kind not in ("lm", "hf"):
        raise SystemExit(f"error: {config.checkpoint} holds a {loaded.kind!r} model, not a kNN-LM base LM")
    model, store, manifest = loaded.model, TokenStore.open(config.heldout), read_manifest(config.datastore)
    if manifest.metadata.get("tokenizer", store.tokenizer_fingerprint) != store.tokenizer_fingerprint:
        raise SystemExit(f"error: the datastore was built with tokenizer {manifest.metadata['tokenizer']}, the "
                         f"held-out split uses {store.tokenizer_fingerprint}")
    evaluation = eval_config(config, manifest.metadata, getattr(loaded.config, "max_len", None))
    warmup = replace(evaluation, max_tokens=min(config.warmup_tokens, config.tokens))
    print(f"{manifest.ntotal} rows in {len(manifest.shards)} shards ({manifest.factory}); {evaluation.max_tokens} "
          f"held-out tokens, window {evaluation.context_len}/{evaluation.stride}, k={config.k}, "
          f"nprobe={config.nprobe or manifest.default_nprobe}", flush=True)

    evaluate_lm(model, store, warmup, progress=False)
    seconds, (ppl, tokens) = fastest(lambda: evaluate_lm(model, store, evaluation, progress=False), config.repeats)
    rows = [side("lm", None, seconds, tokens, ppl)]
    print(f"  {'lm':10s}: {rows[0]['tokens_per_s']:8.1f} tokens/s, perplexity {ppl:.3f}", flush=True)
    with InProcessRetriever(config.datastore, evaluation.retrieval) as retriever:
        rows.append(time_knnlm("in-process", model, store, retriever, evaluation, warmup, config.repeats))
    deployment = LocalDeployment(config.datastore).start()
    try:
        for name, target in (("router", deployment.router_address), ("fan-out", deployment.shard_addresses)):
            with ServiceRetriever(target, evaluation.retrieval) as retriever:
                rows.append(time_knnlm(name, model, store, retriever, evaluation, warmup, config.repeats))
    finally:
        deployment.stop()
    by = {row["side"]: row["tokens_per_s"] for row in rows}
    ratios = {"router / in-process": by["router"] / by["in-process"],
              "fan-out / in-process": by["fan-out"] / by["in-process"],
              "in-process / lm": by["in-process"] / by["lm"]}
    return {"config": {**asdict(config), "run": str(config.run), "out": str(config.out)},
            "evaluation": {**asdict(evaluation), "retrieval": asdict(evaluation.retrieval)},
            "datastore": {"path": str(config.datastore), "ntotal": manifest.ntotal, "factory": manifest.factory,
                          "shards": len(manifest.shards), "dimension": manifest.dimension},
            "environment": environment(), "sides": rows, "ratios": ratios,
            "perplexity_agreement": perplexity_agreement(rows[1:])}


def environment() -> dict:
    import faiss

    return {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1m": os.getloadavg()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def speed_table(results: dict) -> str:
    lines = ["| side | tokens | seconds | tokens/s | model s | retrieval s | waited s | base ppl | best λ | best ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["sides"]:
        if "best_perplexity" not in r:
            lines.append(f"| {r['side']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                         f"{r['seconds']:.2f} | - | - | {r['base_perplexity']:.3f} | - | - |")
            continue
        lines.append(f"| {r['side']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['model_seconds']:.2f} | {r['retrieval_seconds']:.2f} | {r['retrieval_wait_seconds']:.2f} | "
                     f"{r['base_perplexity']:.3f} | {r['best_lambda']:g} | {r['best_perplexity']:.3f} |")
    return "\n".join(lines)


def ratio_table(results: dict) -> str:
    agreement = results["perplexity_agreement"]
    lines = ["| ratio (tokens/s) | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in results["ratios"].items()]
    diffs = ", ".join(f"{name} {d:.1e}" for name, d in agreement["max_relative_difference"].items())
    lines += ["", f"Perplexities of in-process, router and fan-out agree: {'YES' if agreement['agree'] else 'NO'} "
                  f"(max relative difference vs in-process: {diffs})"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory (RUN/data, RUN/lm, RUN/knnlm-datastore)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--k", type=int, default=1024, help="neighbours per token")
    parser.add_argument("--nprobe", type=int, default=0, help="inverted lists probed (0: the datastore's default)")
    parser.add_argument("--exact-rerank", action="store_true", help="re-rank candidates with the stored keys")
    parser.add_argument("--rerank-candidates", type=int, default=0, help="candidates re-ranked (0: the server's)")
    parser.add_argument("--context-len", type=int, default=0, help="window (0: the datastore's context_len)")
    parser.add_argument("--stride", type=int, default=0, help="tokens scored per window (0: half the window)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass and retrieval request")
    parser.add_argument("--temperature", type=float, default=1.0, help="kNN-LM softmax temperature")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest counts")
    parser.add_argument("--device", default=BenchConfig.device, help="where the LM runs")
    args = parser.parse_args(argv)
    return BenchConfig(run=args.run, out=args.out, tokens=args.tokens, k=args.k, nprobe=args.nprobe,
                       exact_rerank=args.exact_rerank, rerank_candidates=args.rerank_candidates,
                       context_len=args.context_len, stride=args.stride, batch_size=args.batch_size,
                       temperature=args.temperature, device=args.device, repeats=args.repeats)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    results = run(config)
    env = results["environment"]
    print(f"\ntorch {env['torch']}, faiss {env['faiss']}, {env['cpus']} CPUs, GPU {env['cuda']}, "
          f"OMP_WAIT_POLICY={env['omp_wait_policy'] or '(unset)'}, "
          f"1-min load average after timing {env['load_average_1m']:.2f}\n")
    print(speed_table(results))
    print()
    print(ratio_table(results))
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / "knnlm_eval.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0 if results["perplexity_agreement"]["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
