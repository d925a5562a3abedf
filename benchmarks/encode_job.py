"""Encode job benchmark: rows/s of the Ray Data encode job with 1 and 2 workers against the plain loop.

On a slice of a run's train split, in one process and one run, it encodes the same rows three ways
per kind, `--repeats` times each in rotating order (the fastest run counts: the machine is shared),
and checks that every run's keys agree:

- "plain loop": the in-process reference, one process using every core (torch's default threads):
  RETRO `embed_chunks` with the MiniLM `ChunkEncoder`; kNN-LM `encode_knnlm` with the run's LM;
- "job, 1 worker": `run_encode_job` with one actor holding every core;
- "job, 2 workers": two actors, the cores split between them.

The job's time counts everything after `ray.init` (planning, starting the actors, loading the
model in each, encoding, writing the parts and indexes); `ray.init` is timed apart. "rows/s in
parts" is rows / (the actors' seconds encoding and writing parts, summed, / workers): the job's
rate once its actors are up, without their start-up and model loading. The slice is
written as its own prepared corpus under OUT/encode-data, so the job runs as users run it.

    python benchmarks/encode_job.py [--run runs/stdlib] [--chunks 8192] [--knn-tokens 131072] [--repeats 2]
                                    [--out bench_out]

Writes OUT/encode_job.json; the sources it encodes go to OUT/encode-job and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from lm_worker.data.token_store import TokenStore
from lm_worker.jobs.encode_job import run_encode_job
from lm_worker.jobs.encode_plan import EncodeJobConfig
from lm_worker.sources.knnlm import encode_knnlm
from lm_worker.sources.retro import embed_chunks
from lm_worker.sources.source import read_source

KEYS_ATOL = 1e-4  # the job and the plain loop compute the same keys up to float rounding


@dataclass(frozen=True)
class BenchConfig:
    """What to encode and how."""

    run: Path = Path("runs/stdlib")
    out: Path = Path("bench_out")
    chunks: int = 8192
    knn_tokens: int = 131072
    workers: tuple[int, ...] = (1, 2)
    parts: int = 8  # parts per job
    kinds: tuple[str, ...] = ("retro", "knnlm")
    repeats: int = 2  # runs per side, in rotating order; the fastest counts (the machine is shared)
    progress: bool = False

    @property
    def data(self) -> Path:
        return self.out / "encode-data"


def slice_corpus(run: Path, out: Path, tokens: int) -> TokenStore:
    """Writes the first `tokens` tokens of RUN/data/train (and the tokenizer) as a prepared corpus at `out`."""
    source = TokenStore.open(run / "data" / "train")
    tokens = min(tokens, len(source))
    train = out / "train"
    if (train / "documents.json").is_file() and len(TokenStore.open(train)) == tokens:
        return TokenStore.open(train)
    shutil.rmtree(out, ignore_errors=True)
    train.mkdir(parents=True)
    shutil.copy(run / "data" / "tokenizer.json", out / "tokenizer.json")
    np.save(train / "tokens.npy", np.asarray(source.tokens[:tokens]))
    np.save(train / "doc_ids.npy", np.asarray(source.doc_ids[:tokens]))
    documents = [{"name": d.name, "start": d.start, "end": min(d.end, tokens)} for d in source.documents
                 if d.start < tokens]
    (train / "documents.json").write_text(json.dumps({"tokenizer": source.tokenizer_fingerprint,
                                                      "documents": documents}))
    return TokenStore.open(train)


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def plain_retro(config: BenchConfig, store: TokenStore, chunk_len: int, out: Path) -> tuple[float, None, np.ndarray]:
    """(seconds, None, keys) of `embed_chunks` with a fresh ChunkEncoder, its loading counted."""
    from lm_worker.data.tokenizer import Tokenizer
    from lm_worker.encoders.minilm_chunks import ChunkEncoder

    def encode():
        encoder = ChunkEncoder(Tokenizer.load(config.data / "tokenizer.json"))
        return embed_chunks(store, encoder, chunk_len, out / "plain-retro-keys.npy", progress=config.progress)

    seconds, keys = timed(encode)
    return seconds, None, np.asarray(keys)


def plain_knnlm(config: BenchConfig, store: TokenStore, context_len: int, stride: int,
                out: Path) -> tuple[float, None, np.ndarray]:
    """(seconds, None, keys) of `encode_knnlm` with the run's LM, its loading counted."""
    from lm_worker.models.checkpoint import load_checkpoint

    def encode():
        model = load_checkpoint(config.run / "lm").model
        return encode_knnlm(model, store, out / "plain-knnlm", context_len, stride, progress=config.progress)

    seconds, info = timed(encode)
    return seconds, None, np.load(info.keys_path)


def job(config: BenchConfig, kind: str, workers: int, rows: int, params: dict,
        out: Path) -> tuple[float, float, np.ndarray]:
    """(wall seconds, seconds the actors spent encoding and writing parts, summed, keys) of one job run."""
    per_worker = max(1, (os.cpu_count() or 1) // workers)
    job_config = EncodeJobConfig(kind=kind, data=config.data, workers=workers, num_cpus=per_worker,
                                 threads=per_worker, rows_per_part=-(-rows // config.parts), progress=config.progress,
                                 **params)
    target = out / f"job-{kind}-{workers}"
    shutil.rmtree(target, ignore_errors=True)
    seconds, info = timed(lambda: run_encode_job(job_config, target))
    return seconds, info.details["part_seconds"], np.asarray(info.open_keys())


def sides(config: BenchConfig, kind: str, out: Path) -> tuple[int, dict[str, tuple[int, Callable]]]:
    """The rows encoded and, per side, (workers, a call returning (seconds, part seconds, keys))."""
    source = read_source(config.run / f"{kind}-source")
    if kind == "retro":
        L = source.chunk_len
        store = slice_corpus(config.run, config.data, config.chunks * L)
        rows, params = len(store) // L, {"chunk_len": L}
        plain = partial(plain_retro, config, store, L, out)
    else:
        context_len, stride = source.details["context_len"], source.details["stride"]
        store = slice_corpus(config.run, config.data, config.knn_tokens)
        rows, params = len(store) - 1, {"checkpoint": config.run / "lm", "context_len": context_len, "stride": stride}
        plain = partial(plain_knnlm, config, store, context_len, stride, out)
    named = {"plain loop": (0, plain)}
    for w in config.workers:
        named[f"job, {w} worker{'s' * (w > 1)}"] = (w, partial(job, config, kind, w, rows, params, out))
    return rows, named


def measure(config: BenchConfig, kind: str, out: Path) -> list[dict]:
    """Times every side `repeats` times in rotating order (the fastest counts); checks every run's keys
    against the plain loop's first run."""
    rows, named = sides(config, kind, out)
    best: dict[str, dict] = {}
    diff = dict.fromkeys(named, 0.0)
    ref = None
    for repeat in range(config.repeats):
        order = list(named)[repeat % len(named):] + list(named)[:repeat % len(named)]
        if ref is None:
            order = ["plain loop", *(n for n in order if n != "plain loop")]
        for name in order:
            workers, call = named[name]
            seconds, part_seconds, keys = call()
            ref = keys if ref is None else ref
            diff[name] = max(diff[name], float(np.abs(keys - ref).max()))
            print(f"  {kind} {name}: {rows / seconds:9.1f} rows/s", flush=True)
            threads = max(1, (os.cpu_count() or 1) // workers) if workers else torch.get_num_threads()
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {"kind": kind, "side": name, "workers": workers, "rows": rows, "seconds": seconds,
                              "threads": threads, "rows_per_s": rows / seconds,
                              "steady_rows_per_s": rows / (part_seconds / workers) if workers else None}
    results = [{**best[name], "max_abs_diff": diff[name]} for name in named]
    for r in results:
        r["vs_plain_loop"] = r["rows_per_s"] / best["plain loop"]["rows_per_s"]
    return results


def environment() -> dict:
    import ray

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1m": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    lines = ["| encoding | side | threads/worker | rows | seconds | rows/s | vs plain loop | rows/s in parts "
             "| max abs key diff |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"retro": "RETRO chunks (MiniLM)", "knnlm": "kNN-LM keys (run's LM)"}
    for r in rows:
        steady = "-" if r["steady_rows_per_s"] is None else f"{r['steady_rows_per_s']:.1f}"
        lines.append(f"| {names[r['kind']]} | {r['side']} | {r['threads']} | {r['rows']} | {r['seconds']:.1f} | "
                     f"{r['rows_per_s']:.1f} | {r['vs_plain_loop']:.2f}x | {steady} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/stdlib"), help="run directory (RUN/data, RUN/lm, "
                        "RUN/knnlm-source, RUN/retro-source)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory")
    parser.add_argument("--chunks", type=int, default=8192, help="RETRO: first chunks of the train split")
    parser.add_argument("--knn-tokens", type=int, default=131072, help="kNN-LM: first tokens of the train split")
    parser.add_argument("--parts", type=int, default=8, help="parts per job")
    parser.add_argument("--kinds", default="retro,knnlm", help="which encodings to time")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, in rotating order; the fastest counts")
    parser.add_argument("--progress", action="store_true", help="show the progress bars")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not set(kinds) <= {"retro", "knnlm"}:
        parser.error(f"--kinds takes retro and/or knnlm, got {args.kinds}")
    return BenchConfig(run=args.run, out=args.out, chunks=args.chunks, knn_tokens=args.knn_tokens, parts=args.parts,
                       kinds=kinds, repeats=max(1, args.repeats), progress=args.progress)


def main(argv: list[str] | None = None) -> int:
    import ray

    config = parse_args(argv)
    for kind in config.kinds:
        if not (config.run / f"{kind}-source" / "source.json").is_file():
            raise SystemExit(f"error: {config.run}/{kind}-source is not a finished source (run lm-worker pipeline)")
    config.out.mkdir(parents=True, exist_ok=True)
    work = config.out / "encode-job"
    work.mkdir(exist_ok=True)
    ray_seconds, _ = timed(lambda: ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                                            logging_level="WARNING"))
    try:
        rows = [r for kind in config.kinds for r in measure(config, kind, work)]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the encoded sources: hundreds of MB, not needed after
    results = {"config": {**asdict(config), "run": str(config.run), "out": str(config.out)},
               "environment": environment(), "ray_init_seconds": ray_seconds, "rows": rows}
    env = results["environment"]
    print(f"\ntorch {env['torch']}, ray {env['ray']}, {env['cpus']} CPUs, GPU {env['cuda']}, 1-min load average "
          f"after timing {env['load_average_1m']:.2f}; ray.init {ray_seconds:.1f} s (not counted)\n")
    print(table(rows))
    path = config.out / "encode_job.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {path}")
    agree = all(r["max_abs_diff"] <= KEYS_ATOL for r in rows)
    if not agree:
        print(f"error: the job's keys differ from the plain loop's by more than {KEYS_ATOL}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
