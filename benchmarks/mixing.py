"""CPU cost of one kNN-LM decoding step's mixing, log(λ p_kNN + (1-λ) p_LM) over the vocabulary: the
decoders' `mix_log_probs` (mixes only where p_kNN > 0) against the dense reference it replaced,
`interpolate(lm, knn_log_probs(...))` (p_kNN built over the whole vocabulary, its log, a logaddexp over
every token), in the same run, on one thread.

Each batch size gets random LM log-probs (B, V) and k neighbours per row with duplicate tokens and some
missing ones; both sides mix the same inputs, taking turns, and must agree bit for bit.

    python benchmarks/mixing.py [--vocab 4096] [--k 16] [--batches 1,8,32] [--out bench_out]

Prints a table (thread CPU µs per mix, the ratio, equal or not) and writes OUT/mixing.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lm_worker.evaluation.knnlm import interpolate, knn_log_probs, mix_log_probs

LAM, TEMPERATURE = 0.25, 10.0


def inputs(batch: int, vocab: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM log-probs (B, V), neighbour distances (B, k) and values (B, k): tokens from a small set (duplicates),
    the last quarter of row 0's neighbours missing."""
    rng = np.random.default_rng(seed)
    lm = torch.log_softmax(torch.from_numpy(rng.normal(0, 3, (batch, vocab)).astype(np.float32)), -1)
    distances = np.sort(rng.uniform(0, 40, (batch, k)), axis=1).astype(np.float32)
    values = rng.integers(0, max(2, vocab // 16), (batch, k))
    values[0, k - k // 4:], distances[0, k - k // 4:] = -1, np.inf
    return lm, torch.from_numpy(distances), torch.from_numpy(values)


def thread_cpu_us(call: Callable[[], torch.Tensor], seconds: float) -> float:
    """Thread CPU µs per call, calling for about `seconds` of wall time."""
    calls, started, began = 0, time.thread_time(), time.perf_counter()
    while time.perf_counter() - began < seconds:
        call()
        calls += 1
    return (time.thread_time() - started) / calls * 1e6


def measure(batch: int, vocab: int, k: int, seconds: float, rounds: int = 3) -> dict:
    """Both sides on the same inputs, `rounds` turns each; the median of each side's turns."""
    lm, distances, values = inputs(batch, vocab, k)
    sides = {
        "dense": lambda: interpolate(lm, knn_log_probs(distances, values, vocab, TEMPERATURE), LAM),
        "sparse": lambda: mix_log_probs(lm, distances, values, LAM, TEMPERATURE),
    }
    turns = {name: [] for name in sides}
    for _ in range(rounds):
        for name, call in sides.items():
            turns[name].append(thread_cpu_us(call, seconds / rounds))
    dense, sparse = (float(np.median(turns[name])) for name in sides)
    return {"batch": batch, "vocab": vocab, "k": k, "dense_us": dense, "sparse_us": sparse,
            "ratio": sparse / dense, "equal": bool(torch.equal(sides["dense"](), sides["sparse"]()))}


def table(rows: list[dict]) -> str:
    lines = ["| batch | vocab | k | dense µs | sparse µs | sparse / dense | bit for bit |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['batch']} | {r['vocab']} | {r['k']} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
              f"{r['ratio']:.2f} | {'yes' if r['equal'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the quick start's LM: 4096)")
    parser.add_argument("--k", type=int, default=16, help="neighbours per row")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per batch size and side")
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1 or args.vocab < 2 or args.k < 1:
        parser.error("--batches must list positive numbers, --vocab be 2 or more and --k 1 or more")
    torch.set_num_threads(1)
    rows = [measure(b, args.vocab, args.k, args.seconds) for b in batches]
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixing.json").write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2))
    print(f"\nwrote {args.out / 'mixing.json'}")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
