"""Decoding benchmark: kNN-LM and RETRO decoding against the retrieval service, with retrieval
overlapped with model compute against the same retrieval done serially, in the same run.

    python benchmarks/decoding.py --run RUN [--out RUN/bench] [--batches 1,8,32] [--beams 4 --beam-prompts 2]
                                  [--new-tokens 64] [--models knnlm,retro] [--via fan-out] [--server-cpus 1]
                                  [--quick]

RUN is a run directory (RUN/data, RUN/lm/checkpoint.pt, RUN/retro/checkpoint.pt, RUN/knnlm-datastore,
RUN/retro-datastore). Each datastore is served by a `LocalDeployment` (its shards and a router, local
processes) while its model decodes prompts cut from the held-out split. Per model:

- kNN-LM, greedy over each of `batches` prompts (1, 8 and 32 by default), and beam search (`beams` beams, no EOS) over
  `beam_prompts` prompts: the LM alone (the reference without retrieval); `KnnLMStepper` serial (one
  blocking call per step for every row, sent after the forward: `early=False`); early request (the same
  stepper's default: each step's request sent from within the forward once the keys exist, so the service
  searches while the last feed-forward block and the output head run; the same work and requests);
  pipelined (`overlap=True`: the prompts in two groups with a cache each, decoded interleaved so each
  group's request is in flight while the other group's model
  step runs; see `lm_worker.decoding.pipelined`); and, for greedy, speculative (`SpeculativeKnnLMStepper`: the
  next step computed on the LM's argmax while this step's neighbours are in flight, guessing only while
  that pays; see `lm_worker.decoding.speculative`) and RaLMSpec (`RaLMSpecKnnLM`: each prompt guesses its
  neighbours from a local cache of the rows it retrieved and their successors, verified in one request
  every s steps, rows (beam search: prompts) rolled back alone; adaptive, at a fixed stride of 2 to
  show what guessing costs where it does not pay, and, for greedy, asynchronous (the next window guessed
  while the last one is verified) from the caches and from the LM's own token; see
  `lm_worker.decoding.ralmspec`). Greedy scenarios are
  summarised by the adaptive RaLMSpec run (with its hit rate: the share of guessed steps that held), beam
  search by the pipelined one; a table of its own compares RaLMSpec with serial retrieval in every scenario.
  kNN-LM's temperature is the one the run chose (RUN/report/temperature.json).
- RETRO, greedy over each of `batches` prompts: the model without neighbours (reference); exact RETRO (prefetch
  0, serial by nature); prefetch s (query formed s tokens before the chunk end) serial, and overlapped
  (sent when formed, in flight during the next s tokens); and RaLMSpec per chunk (`RaLMSpecRetro`: exact
  queries, each chunk's neighbours guessed from the rows' local caches, decoded on while the service
  searches, the batch rolled back where a guess failed), adaptive and on every guess, and on every guess
  with only the failed rows rolled back (`rollback="row"`), against exact
  RETRO in a table of its own. Its retrieval is a small share of its
  decoding time (one request per chunk), so run-to-run noise in the model's time moves the share
  hidden by tens of points: RETRO runs `RETRO_REPEATS` times as often as kNN-LM.
Serial and overlapped runs decode the same tokens (checked).

Reported: tokens/s (prompts x new tokens / wall seconds), retrieval calls and CPU milliseconds (this
process and the servers) per generated token, the time the serial run spent in retrieval,
and the fraction of it that overlap hid, (t_serial - t_overlap) / t_retrieval_serial, over the whole
call (kNN-LM, RETRO) and over the decode steps alone (RETRO: the prompt's retrieval in `start` cannot
be overlapped); and, from the overlapped run's own counters, 1 - blocked / retrieval seconds. RETRO's
prefetch rows are judged against the prefetch serial run, its exact and RaLMSpec rows (exact queries)
against exact serial retrieval.

Every run also records the CPU seconds this process (model, mixing, client) and the servers used
(/proc, Linux), and from them a ceiling: the share of the serial run's retrieval a run would hide if it
took no longer than its own CPU work needs on its cores (with `--server-cpus`, the servers' seconds on
their cores and this process's on the rest; else all of it on all cores). "CPU ceiling" is that of the
overlapped run, "serial-work ceiling" that of the serial run's work, the most an overlap that adds no
work could hide. A design whose ceiling is below the bar cannot reach it on these cores, however it is
scheduled. (Clock ticks of 10 ms and run-to-run noise make both estimates, not bounds to the percent.)

The kNN-LM pipeline runs two half-batch forwards and two requests per step: its "model s" against the
serial run's shows what that costs, and the time it can save is at most the difference between a full
and a half-batch forward (see `lm_worker.decoding.pipelined`); with a few prompts on a small CPU model, where a
forward's cost hardly depends on its rows, and servers sharing the model's cores, it saves nothing.

torch runs with one thread: the machine's cores are shared by the model, the shard servers and the
router, and with torch's default of one thread per core the model and the servers fight over them and
the timings turn to noise. Writes OUT/decoding.json and its figure, OUT/decoding.png (`decoding_plot.py`),
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from decoding_plot import plot_decoding  # this file's neighbour: benchmarks/ is on sys.path when it runs

from lm_worker.decoding.config import GenerateConfig
from lm_worker.decoding.generate import generate
from lm_worker.decoding.knnlm_stepper import KnnLMStepper
from lm_worker.decoding.lm_stepper import LMStepper
from lm_worker.decoding.ralmspec.config import SpeculationConfig
from lm_worker.decoding.ralmspec.decoder import RaLMSpecKnnLM
from lm_worker.decoding.ralmspec.retro import RaLMSpecRetro
from lm_worker.decoding.retro_stepper import RetroStepper
from lm_worker.decoding.speculative import SpeculativeKnnLMStepper
from lm_worker.decoding.stepper_stats import StepperStats
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.service import ServiceRetriever
from retriever_server.cluster.cpus import format_cpus, parse_cpus, pin
from retriever_server.cluster.launcher import LocalDeployment

RETRO_REPEATS = 3  # RETRO's runs per kNN-LM run (see the module doc)
BAR_SCENARIO = "greedy x8"  # the speed bar: kNN-LM greedy over 8 prompts, an exact decoder against serial retrieval...
BAR_SPEEDUP = 1.5  # ...at this many times its tokens/s, the same tokens, and no more CPU per token
NOT_JUDGED = "not the judged configuration"  # the bar's verdict where no --server-cpus gave the servers cores
REQUIRED = ("data/tokenizer.json", "data/heldout")  # what every run needs; each model its checkpoint and datastore
MODEL_FILES = {"knnlm": ("lm/checkpoint.pt", "knnlm-datastore/manifest.json"),
               "retro": ("retro/checkpoint.pt", "retro-datastore/manifest.json")}


@dataclass(frozen=True)
class BenchConfig:
    """What to decode and how often. prefetch -1 means chunk_len // 2; beams 0 skips kNN-LM beam search."""

    run: Path
    out: Path
    batches: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 64
    new_tokens: int = 64
    beams: int = 4
    beam_prompts: int = 2
    models: tuple[str, ...] = ("knnlm", "retro")
    k: int = 16
    nprobe: int = 0
    lam: float = 0.25
    knn_temperature: float = 1.0
    prefetch: int = -1
    repeats: int = 5
    threads: int = 1
    via: str = "fan-out"  # how the client reaches the shards: "fan-out" to them itself (as lm-worker does), or "router"
    server_cpus: tuple[int, ...] = ()  # cores of the servers, the model on the others (default: all share all)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def check_run(run: Path, models: tuple[str, ...] = tuple(MODEL_FILES)) -> None:
    """Exits with a clear message when RUN lacks something the benchmark needs to decode with `models`."""
    needed = [*REQUIRED, *(p for model in models for p in MODEL_FILES[model])]
    missing = [p for p in needed if not (run / p).exists()]
    if missing:
        sys.exit(f"{run} is not a complete run directory; missing: {', '.join(str(run / p) for p in missing)}\n"
                 "(a run folder as `lm-worker demo` or `lm-worker pipeline` makes it: RUN/data, "
                 "RUN/lm/checkpoint.pt, RUN/retro/checkpoint.pt, RUN/knnlm-datastore, RUN/retro-datastore)")


def load_models(run: Path, models: tuple[str, ...] = tuple(MODEL_FILES)):
    """(tokenizer, held-out store, LM LoadedModel, RETRO LoadedModel), with fingerprints checked; a model
    that `models` does not use (the LM for "knnlm", RETRO for "retro") is None, its checkpoint unread."""
    from lm_worker.data.prepare import load_prepared
    from lm_worker.models.checkpoint import load_checkpoint

    tokenizer, _train, heldout = load_prepared(run / "data")
    lm = load_checkpoint(run / "lm" / "checkpoint.pt") if "knnlm" in models else None
    retro = load_checkpoint(run / "retro" / "checkpoint.pt") if "retro" in models else None
    for name, loaded, kind in (("lm", lm, "lm"), ("retro", retro, "retro")):
        if loaded is None:
            continue
        if loaded.kind != kind:
            sys.exit(f"{run / name / 'checkpoint.pt'} holds a {loaded.kind!r} model, expected {kind!r}")
        if loaded.tokenizer_fingerprint != tokenizer.fingerprint:
            print(f"warning: {name} was trained with tokenizer {loaded.tokenizer_fingerprint}, "
                  f"the data uses {tokenizer.fingerprint}", flush=True)
    return tokenizer, heldout, lm, retro


def make_prompts(tokens: np.ndarray, batch: int, prompt_len: int) -> torch.Tensor:
    """`batch` prompts (batch, prompt_len) cut from the held-out stream at evenly spaced offsets."""
    if len(tokens) < prompt_len + batch:
        sys.exit(f"the held-out split has {len(tokens)} tokens, too few for {batch} prompts of {prompt_len}")
    starts = np.linspace(0, len(tokens) - prompt_len, batch).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + prompt_len]) for s in starts]).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

class TimedStart:
    """Wraps a stepper to time its `start` and snapshot its stats there, so decode steps can be told apart."""

    def __init__(self, inner):
        self.inner, self.start_s, self.after_start = inner, 0.0, StepperStats()

    def start(self, prompt):
        began = time.perf_counter()
        out = self.inner.start(prompt)
        self.start_s = time.perf_counter() - began
        self.after_start = copy.copy(self.inner.stats)
        return out

    def __getattr__(self, name: str):
        """Everything else is the stepper's own (`step`, `reorder`, and `expect_positions`, which `generate`
        looks up: without it a RETRO stepper prefetched a chunk past the end of decoding, one call more)."""
        if name == "inner":  # not set yet (a copy being made): no stepper to ask
            raise AttributeError(name)
        return getattr(self.inner, name)


class ProcessGone(RuntimeError):
    """A process whose CPU seconds a benchmark reads has exited, or was restarted under another pid: what
    it used is lost, and a figure over it would be wrong (negative, or too small)."""


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) process `pid` has used, from /proc; raises `ProcessGone`
    once it has exited."""
    try:
        state, *fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        state = "X"
    if state in ("Z", "X"):
        raise ProcessGone(f"process {pid} exited during the measurement (a server crashed or was restarted): "
                          "its CPU seconds are lost; run the benchmark again")
    return (int(fields[10]) + int(fields[11])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def server_cpu_reader(deployment: LocalDeployment) -> Callable[[], float]:
    """A running total of the CPU seconds used by the deployment's processes as they are now (shards and
    router): reading it raises `ProcessGone` once one of them has exited, even if it was restarted since."""
    pids = [p.popen.pid for p in deployment.processes()]
    return lambda: sum(process_cpu_s(pid) for pid in pids)


@dataclass(frozen=True)
class Cores:
    """How many cores the model's process and the servers have, and whether they share them."""

    model: int
    servers: int
    shared: bool

    def floor_s(self, run: dict) -> float:
        """The least wall time a run's CPU work fits in on these cores: the servers' work on theirs and
        the model process's on its own, or, shared, all of it on all of them."""
        if self.shared:
            return (run["server_cpu_s"] + run["worker_cpu_s"]) / self.model
        return max(run["server_cpu_s"] / self.servers, run["worker_cpu_s"] / self.model)


def decode_once(make: Callable[[], object], prompt: torch.Tensor, gen: GenerateConfig, time_start: bool,
                servers_cpu: Callable[[], float]) -> dict:
    """One timed `generate` with a fresh stepper: wall seconds, the stepper's stats, the tokens, and the
    CPU seconds this process and the servers (`servers_cpu()`, a running total) used meanwhile. With
    `time_start` the stepper is wrapped to time `start` apart (that hides a pipelined stepper's `fork`)."""
    stepper = make()
    time_start = time_start and not getattr(stepper, "decodes_itself", False)  # one that runs its own loop
    wrapped = TimedStart(stepper) if time_start else stepper
    servers_before, worker_before = servers_cpu(), time.process_time()
    began = time.perf_counter()
    out = generate(wrapped, prompt, gen)
    seconds = time.perf_counter() - began
    cpu = {"worker_cpu_s": time.process_time() - worker_before, "server_cpu_s": servers_cpu() - servers_before}
    if hasattr(stepper, "close"):
        stepper.close()
    stats, result = stepper.stats, {}
    if time_start:
        result = {"steps_seconds": seconds - wrapped.start_s,
                  "steps_retrieval_s": stats.retrieval_s - wrapped.after_start.retrieval_s}
    return {"seconds": seconds, "stats": asdict(stats), **result, **cpu, "new_tokens": int(out.tokens.shape[1]),
            "tokens": out.tokens}


def measure(variants: dict[str, Callable[[], object]], prompt: torch.Tensor, gen: GenerateConfig,
            repeats: int, servers_cpu: Callable[[], float], time_start: bool = False) -> dict[str, dict]:
    """Each variant once to warm up, then `repeats` rounds, variants interleaved; the median run of each
    (of an even count, the faster of the middle two), its `cpu_ms_per_token` over all the timed runs. Its
    `tokens_digest` holds every distinct output of all the variant's runs, the warm-up's included: two
    variants decode the same tokens only where each decoded one output every time, the same one."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    outputs: dict[str, list[list]] = {name: [] for name in variants}
    for name, make in variants.items():
        outputs[name].append(decode_once(make, prompt, gen, time_start, servers_cpu)["tokens"].tolist())
    for _ in range(repeats):
        for name, make in variants.items():
            runs[name].append(decode_once(make, prompt, gen, time_start, servers_cpu))
            outputs[name].append(runs[name][-1].pop("tokens").tolist())
    result = {}
    for name, done in runs.items():
        median = sorted(done, key=lambda r: r["seconds"])[(len(done) - 1) // 2]
        generated = prompt.shape[0] * median["new_tokens"]
        median["tokens_per_s"] = generated / median["seconds"]
        median["calls_per_token"] = median["stats"]["retrieval_calls"] / generated
        # CPU over every timed run, not the median's alone: decoders near serial's CPU pass or miss on one run's noise
        cpu_s = sum(r["worker_cpu_s"] + r["server_cpu_s"] for r in done)
        median["cpu_ms_per_token"] = 1e3 * cpu_s / sum(prompt.shape[0] * r["new_tokens"] for r in done)
        median["all_seconds"] = [r["seconds"] for r in done]
        median["tokens_digest"] = [t for i, t in enumerate(outputs[name]) if t not in outputs[name][:i]]
        result[name] = median
    return result


def hidden(serial: dict, seconds: float) -> float:
    """The share of the serial run's retrieval seconds that a run of `seconds` hides."""
    retrieval = serial["stats"]["retrieval_s"]
    return (serial["seconds"] - seconds) / retrieval if retrieval else 0.0


def annotate(rows: dict[str, dict], serial: str, cores: Cores) -> None:
    """Gives every run with retrieval its share of `serial`'s retrieval seconds hidden, and the CPU ceiling of
    that share (`Cores.floor_s`)."""
    for row in rows.values():
        if row["stats"]["retrieval_calls"]:
            row["hidden_fraction"] = hidden(rows[serial], row["seconds"])
            row["ceiling"] = hidden(rows[serial], cores.floor_s(row))


def annotate_retro(rows: dict[str, dict], prefetch_serial: str, cores: Cores) -> None:
    """`annotate` for RETRO: the prefetch rows against `prefetch_serial`, their own serial run; exact retrieval
    and RaLMSpec (exact queries, the same requests) against exact serial retrieval, `retro exact (prefetch 0)`."""
    prefetch = {name: row for name, row in rows.items() if name.startswith("retro prefetch ")}
    annotate({name: row for name, row in rows.items() if name not in prefetch}, "retro exact (prefetch 0)", cores)
    annotate(prefetch, prefetch_serial, cores)


def overlap_summary(serial: dict, overlapped: dict) -> dict:
    """Speed-up, the fraction of the serial run's retrieval time that overlapping hid, and the most that
    the CPU work of each run could let it hide (both runs `annotate`d): "ceiling" for the overlapped
    run's own work, "serial work ceiling" for the serial run's (no overlap does less work)."""
    retrieval, st = serial["stats"]["retrieval_s"], overlapped["stats"]
    summary = {"serial_tokens_per_s": serial["tokens_per_s"], "overlap_tokens_per_s": overlapped["tokens_per_s"],
               "speedup": overlapped["tokens_per_s"] / serial["tokens_per_s"], "retrieval_s_serial": retrieval,
               "hidden_fraction": overlapped["hidden_fraction"], "ceiling": overlapped["ceiling"],
               "serial_work_ceiling": serial["ceiling"],
               "counters_hidden_fraction": 1.0 - st["wait_s"] / st["retrieval_s"] if st["retrieval_s"] else 0.0,
               "same_tokens": serial["tokens_digest"] == overlapped["tokens_digest"]}
    if "steps_seconds" in serial:
        steps_retrieval = serial["steps_retrieval_s"]
        summary["steps_retrieval_s_serial"] = steps_retrieval
        summary["steps_hidden_fraction"] = ((serial["steps_seconds"] - overlapped["steps_seconds"]) / steps_retrieval
                                            if steps_retrieval else 0.0)
    return summary


# ---------------------------------------------------------------------------------------------
# The two models
# ---------------------------------------------------------------------------------------------

def cores_of(config: BenchConfig) -> Cores:
    """The model's cores (this process's, pinned by `run`) and the servers' (`--server-cpus`, else the same)."""
    model = len(os.sched_getaffinity(0))
    return Cores(model, len(config.server_cpus) or model, shared=not config.server_cpus)


def target_of(deployment: LocalDeployment, via: str) -> str | list[list[str]]:
    """The router's address, or (fan-out) every shard's replica addresses for the client to fan out to."""
    return deployment.router_address if via == "router" else deployment.shard_addresses


def ralmspec_summary(rows: dict[str, dict]) -> dict:
    """RaLMSpec's runs (adaptive and stride 2) against the serial run: hit rates, speed-ups, same tokens."""
    serial, adaptive, forced = rows["knn-lm serial"], rows["knn-lm ralmspec"], rows["knn-lm ralmspec stride 2"]
    stats = adaptive["stats"]
    return {"hit_rate": stats["accepted"] / max(1, stats["verified"]),
            "ralmspec_speedup": adaptive["tokens_per_s"] / serial["tokens_per_s"],
            "ralmspec_same_tokens": serial["tokens_digest"] == adaptive["tokens_digest"],
            "cpu_per_token_vs_serial": adaptive["cpu_ms_per_token"] / serial["cpu_ms_per_token"],
            "serial_windows": sum(1 for s in stats["strides"] if s == 0) / max(1, len(stats["strides"])),
            "strides": stats["strides"],
            "stride_2_hit_rate": forced["stats"]["accepted"] / max(1, forced["stats"]["verified"]),
            "stride_2_speedup": forced["tokens_per_s"] / serial["tokens_per_s"],
            "stride_2_same_tokens": serial["tokens_digest"] == forced["tokens_digest"],
            **lm_guess_summary(rows)}


def lm_guess_summary(rows: dict[str, dict]) -> dict:
    """RaLMSpec guessing the LM's own token (asynchronous, adaptive) against the serial run, where it ran."""
    serial, lm_guess = rows["knn-lm serial"], rows.get("knn-lm ralmspec lm guess")
    if lm_guess is None:
        return {}
    stats = lm_guess["stats"]
    return {"lm_guess_speedup": lm_guess["tokens_per_s"] / serial["tokens_per_s"],
            "lm_guess_hit_rate": stats["accepted"] / max(1, stats["verified"]),
            "lm_guess_same_tokens": serial["tokens_digest"] == lm_guess["tokens_digest"],
            "lm_guess_serial_windows": sum(1 for s in stats["strides"] if s == 0) / max(1, len(stats["strides"]))}


def early_summary(rows: dict[str, dict]) -> dict:
    """The request sent from within the forward (`KnnLMStepper(early=True)`) against serial retrieval."""
    serial, early = rows["knn-lm serial"], rows["knn-lm early request"]
    return {"early_speedup": early["tokens_per_s"] / serial["tokens_per_s"],
            "early_cpu_per_token_vs_serial": early["cpu_ms_per_token"] / serial["cpu_ms_per_token"],
            "early_same_tokens": serial["tokens_digest"] == early["tokens_digest"]}


def bench_knnlm(config: BenchConfig, lm, scenarios: dict[str, tuple[torch.Tensor, GenerateConfig]]) -> dict:
    """Per scenario: LM alone, kNN-LM serial and kNN-LM pipelined, against RUN/knnlm-datastore served locally."""
    retrieval, cores = RetrievalConfig(k=config.k, nprobe=config.nprobe), cores_of(config)
    results = {}
    with LocalDeployment(config.run / "knnlm-datastore", cpus=config.server_cpus) as deployment, \
            ServiceRetriever(target_of(deployment, config.via), retrieval) as retriever:
        if retriever.dimension != lm.config.d_model:
            sys.exit(f"knnlm-datastore has keys of dimension {retriever.dimension}; the LM's are {lm.config.d_model}")
        model, lam, temperature = lm.model, config.lam, config.knn_temperature
        for name, (prompt, gen) in scenarios.items():
            variants = {
                "lm (no retrieval)": lambda: LMStepper(model),
                "knn-lm serial": lambda: KnnLMStepper(model, retriever, lam, temperature, overlap=False, early=False),
                "knn-lm early request": lambda: KnnLMStepper(model, retriever, lam, temperature, overlap=False),
                "knn-lm pipelined": lambda: KnnLMStepper(model, retriever, lam, temperature, overlap=True),
            }
            if gen.strategy != "beam":  # beam search reorders rows every step, which drops every guess
                variants["knn-lm speculative"] = lambda gen=gen: SpeculativeKnnLMStepper(
                    model, retriever, lam, temperature, eos_id=gen.eos_id)
            variants["knn-lm ralmspec"] = lambda: RaLMSpecKnnLM(model, retriever, lam, temperature)
            variants["knn-lm ralmspec stride 2"] = lambda: RaLMSpecKnnLM(
                model, retriever, lam, temperature, speculation=SpeculationConfig(stride=2))
            if gen.strategy != "beam":  # the LM's own token as the guess, verified while the next step runs
                variants["knn-lm ralmspec lm guess"] = lambda: RaLMSpecKnnLM(
                    model, retriever, lam, temperature, speculation=SpeculationConfig(asynchronous=True, guess="lm"))
                # guesses from the local caches, each window guessed while the last one is verified
                variants["knn-lm ralmspec async"] = lambda: RaLMSpecKnnLM(
                    model, retriever, lam, temperature, speculation=SpeculationConfig(asynchronous=True))
            print(f"kNN-LM {name}: {retriever.ntotal} rows, k={config.k}, lambda={lam}, T={temperature} ...",
                  flush=True)
            rows = measure(variants, prompt, gen, config.repeats, server_cpu_reader(deployment))
            overlap = "ralmspec" if gen.strategy != "beam" else "pipelined"
            annotate(rows, "knn-lm serial", cores)
            summary = overlap_summary(rows["knn-lm serial"], rows[f"knn-lm {overlap}"])
            summary.update(ralmspec_summary(rows))
            summary.update(early_summary(rows))
            if "knn-lm speculative" in rows:
                stats = rows["knn-lm speculative"]["stats"]
                summary["guesses_held"] = stats["guessed_right"] / stats["guessed"] if stats["guessed"] else 0.0
                summary["rows_guessed"] = stats["guessed"]
                summary["steps_all_held"] = stats["steps_held"] / max(1, stats["steps_checked"])
            results[name] = {"rows": rows, "summary": {**summary, "overlap": overlap}}
    return results


def bench_retro(config: BenchConfig, retro, tokenizer, prompts: dict[int, torch.Tensor], gen: GenerateConfig) -> dict:
    """RETRO without neighbours, exact, and prefetched serial / overlapped, against RUN/retro-datastore, for
    each batch of prompts."""
    from lm_worker.encoders.registry import chunk_encoder_for

    L = retro.config.chunk_len
    s = L // 2 if config.prefetch < 0 else config.prefetch
    retrieval = RetrievalConfig(k=retro.config.n_neighbours, nprobe=config.nprobe)
    with LocalDeployment(config.run / "retro-datastore", cpus=config.server_cpus) as deployment, \
            ServiceRetriever(target_of(deployment, config.via), retrieval) as retriever:
        encoder = chunk_encoder_for(retriever.metadata, tokenizer)  # the encoder of the datastore's keys
        model = retro.model
        variants = {
            "retro (no retrieval)": lambda: LMStepper(model),
            "retro exact (prefetch 0)": lambda: RetroStepper(model, retriever, encoder, prefetch=0),
            f"retro prefetch {s} serial": lambda: RetroStepper(model, retriever, encoder, prefetch=s, overlap=False),
            f"retro prefetch {s} overlapped": lambda: RetroStepper(model, retriever, encoder, prefetch=s,
                                                                   overlap=True),
            "retro ralmspec": lambda: RaLMSpecRetro(model, retriever, encoder),
            "retro ralmspec, every guess": lambda: RaLMSpecRetro(model, retriever, encoder, adaptive=False),
            "retro ralmspec, row rollback, every guess": lambda: RaLMSpecRetro(model, retriever, encoder,
                                                                               adaptive=False, rollback="row"),
        }
        results = {}
        for batch, prompt in prompts.items():
            print(f"RETRO greedy x{batch}: {retriever.ntotal} chunks of {L}, K={retro.config.n_neighbours}, "
                  f"prefetch {s} ...", flush=True)
            rows = measure(variants, prompt, gen, config.repeats * RETRO_REPEATS, server_cpu_reader(deployment),
                           time_start=True)
            annotate_retro(rows, f"retro prefetch {s} serial", cores_of(config))
            summary = overlap_summary(rows[f"retro prefetch {s} serial"], rows[f"retro prefetch {s} overlapped"])
            summary["ralmspec"] = retro_ralmspec_summary(rows)
            results[f"greedy x{batch}"] = {"rows": rows, "summary": {**summary, "prefetch": s, "chunk_len": L}}
    return results


def retro_ralmspec_summary(rows: dict[str, dict]) -> dict:
    """RETRO's speculative runs (adaptive, and decoding on every guess) against exact serial retrieval."""
    exact = rows["retro exact (prefetch 0)"]
    out = {}
    for name in ("retro ralmspec", "retro ralmspec, every guess", "retro ralmspec, row rollback, every guess"):
        r, st = rows[name], rows[name]["stats"]
        out[name] = {"tokens_per_s": r["tokens_per_s"], "speedup": r["tokens_per_s"] / exact["tokens_per_s"],
                     "cpu_per_token_vs_exact": r["cpu_ms_per_token"] / exact["cpu_ms_per_token"],
                     "guessed": st["verified"], "held": st["accepted"], "rollbacks": st["rollbacks"],
                     "wasted": st["wasted"],
                     "rows_failed": sum(failed for _, failed in st["windows"]),
                     "rows_checked": sum(rows_ for rows_, _ in st["windows"]),
                     "same_tokens": r["tokens_digest"] == exact["tokens_digest"]}
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


def rows_table(results: dict) -> str:
    lines = ["| scenario | model / retrieval | tokens/s | wall s | model s | encode s | blocked on retrieval s "
             "| retrieval s | calls | calls/token | worker CPU s | servers CPU s | CPU ms/token | hidden "
             "| CPU ceiling |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for section, scenarios in results.items():
        for scenario, result in scenarios.items():
            for name, r in result["rows"].items():
                st = r["stats"]
                lines.append(f"| {section} {scenario} | {name} | {r['tokens_per_s']:.1f} | {r['seconds']:.3f} | "
                             f"{st['compute_s']:.3f} | {st['encode_s']:.3f} | {st['wait_s']:.3f} | "
                             f"{st['retrieval_s']:.3f} | {st['retrieval_calls']} | {r['calls_per_token']:.3f} | "
                             f"{r['worker_cpu_s']:.2f} | {r['server_cpu_s']:.2f} | {r['cpu_ms_per_token']:.2f} | "
                             f"{share(r.get('hidden_fraction'))} | "
                             f"{share(r.get('ceiling'))} |")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    lines = ["| model | scenario | serial tokens/s | overlapped tokens/s | speed-up | retrieval s (serial) "
             "| hidden (whole call) | hidden (decode steps) | hidden (counters) | CPU ceiling | serial-work ceiling "
             "| same tokens |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    labels = {"knnlm": "kNN-LM ({overlap})", "retro": "RETRO (prefetch {prefetch})"}
    for section, scenarios in results.items():
        for scenario, result in scenarios.items():
            s = result["summary"]
            steps = f"{s['steps_hidden_fraction']:.0%}" if "steps_hidden_fraction" in s else "-"
            lines.append(f"| {labels[section].format(**s)} | {scenario} | {s['serial_tokens_per_s']:.1f} | "
                         f"{s['overlap_tokens_per_s']:.1f} | {s['speedup']:.2f}x | {s['retrieval_s_serial']:.3f} | "
                         f"{s['hidden_fraction']:.0%} | {steps} | {s['counters_hidden_fraction']:.0%} | "
                         f"{s['ceiling']:.0%} | {s['serial_work_ceiling']:.0%} | "
                         f"{'yes' if s['same_tokens'] else 'NO'} |")
    return "\n".join(lines)


def ralmspec_table(results: dict) -> str:
    """Speculative retrieval against serial retrieval, one line per greedy scenario."""
    lines = ["| kNN-LM | serial tokens/s | RaLMSpec tokens/s (adaptive) | stride 2 | guessed steps held, adaptive / "
             "stride 2 | serial windows (adaptive) | LM's guess, asynchronous (adaptive): tokens/s, held, serial "
             "windows | calls/token, serial / adaptive / stride 2 | CPU ms/token, serial / adaptive / stride 2 | "
             "same tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for scenario, result in results.get("knnlm", {}).items():
        s, rows = result["summary"], result["rows"]
        serial, adaptive, forced = rows["knn-lm serial"], rows["knn-lm ralmspec"], rows["knn-lm ralmspec stride 2"]
        same = s["ralmspec_same_tokens"] and s["stride_2_same_tokens"] and s.get("lm_guess_same_tokens", True)
        lm_guess = "-" if "lm_guess_speedup" not in s else (
            f"{rows['knn-lm ralmspec lm guess']['tokens_per_s']:.1f} ({s['lm_guess_speedup']:.2f}x), "
            f"{s['lm_guess_hit_rate']:.0%}, {s['lm_guess_serial_windows']:.0%}")
        lines.append(
            f"| {scenario} | {serial['tokens_per_s']:.1f} | {adaptive['tokens_per_s']:.1f} "
            f"({s['ralmspec_speedup']:.2f}x) | "
            f"{forced['tokens_per_s']:.1f} ({s['stride_2_speedup']:.2f}x) | {s['hit_rate']:.0%} / "
            f"{s['stride_2_hit_rate']:.0%} | {s['serial_windows']:.0%} | {lm_guess} | "
            f"{serial['calls_per_token']:.3f} / "
            f"{adaptive['calls_per_token']:.3f} / {forced['calls_per_token']:.3f} | "
            f"{serial['cpu_ms_per_token']:.2f} / {adaptive['cpu_ms_per_token']:.2f} / "
            f"{forced['cpu_ms_per_token']:.2f} | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def early_table(results: dict) -> str:
    """Each step's request sent once the keys exist (before the last feed-forward block and the head)
    against serial retrieval (sent after the forward): the same work and requests, one line per scenario."""
    lines = ["| kNN-LM | serial tokens/s | early request tokens/s | speed-up | CPU ms/token, serial / early | "
             "same tokens |", "|---|---:|---:|---:|---:|---|"]
    for scenario, result in results.get("knnlm", {}).items():
        s, rows = result["summary"], result["rows"]
        serial, early = rows["knn-lm serial"], rows["knn-lm early request"]
        lines.append(f"| {scenario} | {serial['tokens_per_s']:.1f} | {early['tokens_per_s']:.1f} | "
                     f"{s['early_speedup']:.2f}x | {serial['cpu_ms_per_token']:.2f} / "
                     f"{early['cpu_ms_per_token']:.2f} | "
                     f"{'yes' if s['early_same_tokens'] else 'NO'} |")
    return "\n".join(lines)


def retro_ralmspec_table(results: dict) -> str:
    """RETRO's speculative retrieval per chunk against exact serial retrieval, one line per batch size."""
    lines = ["| RETRO | exact serial tokens/s | RaLMSpec (adaptive) tokens/s | every guess tokens/s | every guess, "
             "row rollback tokens/s | chunks decoded on a guess, held / guessed (adaptive; every guess) | rows whose "
             "guess failed (every guess) | row rollbacks, row-steps replayed (row rollback) | same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for scenario, result in results.get("retro", {}).items():
        exact = result["rows"]["retro exact (prefetch 0)"]
        a, e, r = (result["summary"]["ralmspec"][n] for n in
                   ("retro ralmspec", "retro ralmspec, every guess", "retro ralmspec, row rollback, every guess"))
        same = a["same_tokens"] and e["same_tokens"] and r["same_tokens"]
        lines.append(f"| {scenario} | {exact['tokens_per_s']:.1f} | {a['tokens_per_s']:.1f} ({a['speedup']:.2f}x) | "
                     f"{e['tokens_per_s']:.1f} ({e['speedup']:.2f}x) | {r['tokens_per_s']:.1f} ({r['speedup']:.2f}x) | "
                     f"{a['held']} / {a['guessed']}; {e['held']} / {e['guessed']} | "
                     f"{e['rows_failed']} of {e['rows_checked']} | {r['rollbacks']}, {r['wasted']} | "
                     f"{'yes' if same else 'NO'} |")
    return "\n".join(lines)


def bars(results: dict, server_cpus: tuple[int, ...]) -> list[dict]:
    """The speed bar, per exact decoder of kNN-LM greedy over 8 prompts: tokens/s at least BAR_SPEEDUP x
    serial retrieval's, the same tokens, and CPU per token (this process and the servers) no more than
    serial's. Each decoder with its figures, the servers' cores, and its verdict: PASS or MISS where the
    servers had cores of their own (`server_cpus`), else none (`pass` None: the bar is judged with the model
    on one core and the servers on the other). Empty when the scenario did not run."""
    rows = results.get("knnlm", {}).get(BAR_SCENARIO, {}).get("rows")
    if rows is None:
        return []
    serial = rows["knn-lm serial"]
    out = []
    for name, r in rows.items():
        if name in ("lm (no retrieval)", "knn-lm serial"):
            continue
        speedup = r["tokens_per_s"] / serial["tokens_per_s"]
        cpu, same = r["cpu_ms_per_token"] / serial["cpu_ms_per_token"], r["same_tokens_as_serial"]
        met = speedup >= BAR_SPEEDUP and cpu <= 1.0 and same
        out.append({"decoder": name, "speedup": speedup, "cpu_per_token_vs_serial": cpu, "same_tokens": same,
                    "server_cpus": list(server_cpus), "pass": met if server_cpus else None,
                    "verdict": ("PASS" if met else "MISS") if server_cpus else NOT_JUDGED})
    return out


def bars_table(found: list[dict]) -> str:
    """The bar's table, and a last line: met by which decoders, missed by every one, or no verdict."""
    if not found:
        return f"(no bar: kNN-LM {BAR_SCENARIO} did not run; it needs --models knnlm and 8 in --batches)"
    lines = [f"Bar: kNN-LM {BAR_SCENARIO}, an exact decoder at >= {BAR_SPEEDUP}x serial retrieval's tokens/s, "
             "with the same tokens and no more CPU per token:", "",
             "| decoder | tokens/s over serial's | CPU/token over serial's | same tokens | |",
             "|---|---:|---:|---|---|"]
    lines += [f"| {b['decoder']} | {b['speedup']:.2f}x | {b['cpu_per_token_vs_serial']:.2f}x | "
              f"{'yes' if b['same_tokens'] else 'NO'} | {b['verdict']} |" for b in found]
    met = [b["decoder"] for b in found if b["pass"]]
    if any(b["pass"] is None for b in found):
        lines += ["", "no verdict: model and servers shared every core; the bar is judged with the servers on cores "
                  "of their own (--server-cpus 1)"]
    else:
        lines += ["", f"bar met by: {', '.join(met)}" if met else "bar missed by every exact decoder"]
    return "\n".join(lines)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "model_cpus": sorted(os.sched_getaffinity(0)),
            "cpus": os.cpu_count(), "machine": platform.machine(), "load_average_1m": os.getloadavg()[0]}


def run(config: BenchConfig) -> dict:
    """Loads the run, serves each datastore in turn, measures, returns every number."""
    check_run(config.run, config.models)
    if config.server_cpus:  # the model on the cores the servers leave, as if they ran on other machines
        model_cpus = tuple(sorted(os.sched_getaffinity(0) - set(config.server_cpus)))
        if not model_cpus:
            sys.exit(f"--server-cpus {format_cpus(config.server_cpus)} leaves no core for the model")
        pin(model_cpus)
    torch.set_num_threads(config.threads)
    tokenizer, heldout, lm, retro = load_models(config.run, config.models)
    max_len = getattr(lm.config, "max_len", None) if lm else None  # RETRO's positions have no limit
    if max_len and config.prompt_len + config.new_tokens > max_len:
        sys.exit(f"prompt_len + new_tokens = {config.prompt_len + config.new_tokens} exceeds the LM's "
                 f"max_len {max_len}")
    prompts = {b: make_prompts(heldout.tokens, b, config.prompt_len) for b in config.batches}
    greedy = GenerateConfig(max_new_tokens=config.new_tokens, eos_id=None)
    results = {}
    if "knnlm" in config.models:
        scenarios = {f"greedy x{b}": (prompt, greedy) for b, prompt in prompts.items()}
        if config.beams:
            beam = GenerateConfig(strategy="beam", num_beams=config.beams, length_penalty=0.0,
                                  max_new_tokens=config.new_tokens, eos_id=None)
            beam_prompt = make_prompts(heldout.tokens, config.beam_prompts, config.prompt_len)
            scenarios[f"beam {config.beams} x{config.beam_prompts}"] = (beam_prompt, beam)
        results["knnlm"] = bench_knnlm(config, lm, scenarios)
    if "retro" in config.models:
        results["retro"] = bench_retro(config, retro, tokenizer, prompts, greedy)
    for section, scenarios in results.items():
        serial = "knn-lm serial" if section == "knnlm" else "retro exact (prefetch 0)"
        for result in scenarios.values():
            digest = result["rows"][serial]["tokens_digest"]
            for r in result["rows"].values():
                r["same_tokens_as_serial"] = r.pop("tokens_digest") == digest
    return {"config": {**asdict(config), "run": str(config.run), "out": str(config.out)},
            "environment": environment(),
            "models": {name: asdict(m.config) for name, m in (("lm", lm), ("retro", retro)) if m is not None},
            "results": results, "bars": bars(results, config.server_cpus)}


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True,
                        help="a run folder as `lm-worker demo` or `pipeline` makes it (RUN/data, RUN/lm, RUN/retro, "
                             "RUN/knnlm-datastore, RUN/retro-datastore)")
    parser.add_argument("--out", type=Path, help="output directory (default RUN/bench)")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated: the numbers of prompts decoded together")
    parser.add_argument("--prompt-len", type=positive, default=64)
    parser.add_argument("--new-tokens", type=positive, default=64)
    parser.add_argument("--beams", type=zero_or_positive, default=4,
                        help="kNN-LM beam search width (0: no beam search)")
    parser.add_argument("--beam-prompts", type=positive, default=2, help="prompts decoded by beam search")
    parser.add_argument("--models", type=model_names, default=tuple(MODEL_FILES), help="comma-separated: knnlm, retro")
    parser.add_argument("--k", type=positive, default=16, help="kNN-LM neighbours per step")
    parser.add_argument("--nprobe", type=int, default=0, help="0: the datastore's default")
    parser.add_argument("--lam", type=float, default=0.25)
    parser.add_argument("--knn-temperature", type=float, default=0.0,
                        help="kNN-LM softmax temperature (0: the run's choice, RUN/report/temperature.json, else 1)")
    parser.add_argument("--prefetch", type=int, default=-1, help="RETRO prefetch s (-1: chunk_len // 2)")
    parser.add_argument("--repeats", type=positive,
                        help="timed runs per variant, median reported (default 5; --quick: 2)")
    parser.add_argument("--via", choices=("router", "fan-out"), default="fan-out",
                        help="the client fans out to the shards itself (as lm-worker does), or goes through the router")
    parser.add_argument("--server-cpus", default="",
                        help="cores for the servers, e.g. 1; the model runs on the others (default: all share all)")
    parser.add_argument("--quick", action="store_true", help="2 repeats, unless --repeats says otherwise")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        parser.error(f"--batches must list positive numbers, got {args.batches!r}")
    return BenchConfig(run=args.run, out=args.out or args.run / "bench", batches=batches, prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, beams=args.beams, beam_prompts=args.beam_prompts,
                       models=args.models, k=args.k, nprobe=args.nprobe, lam=args.lam,
                       knn_temperature=args.knn_temperature or run_temperature(args.run),
                       prefetch=args.prefetch, via=args.via,
                       repeats=args.repeats if args.repeats is not None else (2 if args.quick else 5),
                       server_cpus=server_cpus(parser, args.server_cpus))


def positive(text: str) -> int:
    """An argparse type: an integer of 1 or more."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def zero_or_positive(text: str) -> int:
    """An argparse type: an integer of 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}")
    return int(text)


def model_names(text: str) -> tuple[str, ...]:
    """An argparse type: --models as a tuple of known model names, at least one."""
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in MODEL_FILES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model {unknown[0]!r} (choose from {', '.join(MODEL_FILES)})")
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one of {', '.join(MODEL_FILES)}")
    return names


def server_cpus(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    """--server-cpus as a tuple of cores; () when not given."""
    try:
        return parse_cpus(text) if text else ()
    except ValueError as err:
        parser.error(f"--server-cpus: {err}")


def run_temperature(run: Path) -> float:
    """The kNN-LM temperature `lm-worker pipeline` chose for this run, 1.0 if it chose none."""
    path = run / "report" / "temperature.json"
    return float(json.loads(path.read_text())["chosen"]) if path.exists() else 1.0


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        results = run(config)
    except ProcessGone as err:
        sys.exit(f"decoding.py: {err}")
    env = results["environment"]
    cores = (f"model on cores {format_cpus(tuple(env['model_cpus']))}, servers on "
             f"{format_cpus(config.server_cpus)}" if config.server_cpus else "model and servers sharing every core")
    print(f"\ntorch {env['torch']} on {env['torch_threads']} thread(s), {env['cpus']} CPUs ({cores}), "
          f"retrieval via {config.via}, 1-min load average after timing {env['load_average_1m']:.2f}")
    beam = f", beam search over {config.beam_prompts}" if config.beams else ", no beam search"
    print(f"prompts of {config.prompt_len} held-out tokens, {config.new_tokens} new tokens; greedy over "
          f"{', '.join(map(str, config.batches))} prompts{beam}; median of "
          f"{config.repeats} runs "
          f"(RETRO: {config.repeats * RETRO_REPEATS})\n")
    print(rows_table(results["results"]))
    print()
    print(summary_table(results["results"]))
    print()
    print(ralmspec_table(results["results"]))
    print()
    print(early_table(results["results"]))
    print()
    print(retro_ralmspec_table(results["results"]))
    for scenario, result in results["results"].get("knnlm", {}).items():
        s = result["summary"]
        print(f"kNN-LM {scenario}, ralmspec: {s['hit_rate']:.0%} of the guessed steps held; "
              f"{s['ralmspec_speedup']:.2f}x serial's tokens/s at {s['cpu_per_token_vs_serial']:.2f}x its CPU per "
              f"token, same tokens: {'yes' if s['ralmspec_same_tokens'] else 'NO'}; {s['serial_windows']:.0%} of "
              f"its windows were serial steps. At stride 2: {s['stride_2_hit_rate']:.0%} held, "
              f"{s['stride_2_speedup']:.2f}x serial's tokens/s, same tokens: "
              f"{'yes' if s['stride_2_same_tokens'] else 'NO'}")
        if "lm_guess_speedup" in s:
            print(f"kNN-LM {scenario}, ralmspec guessing the LM's token (asynchronous): {s['lm_guess_hit_rate']:.0%} "
                  f"of the guessed steps held; {s['lm_guess_speedup']:.2f}x serial's tokens/s, same tokens: "
                  f"{'yes' if s['lm_guess_same_tokens'] else 'NO'}; {s['lm_guess_serial_windows']:.0%} of its "
                  f"windows were serial steps")
        if "guesses_held" in s:
            print(f"kNN-LM {scenario}, speculative: {s['rows_guessed']} rows guessed, the LM's argmax was the "
                  f"token chosen for {s['guesses_held']:.0%} of them; it was for every row on "
                  f"{s['steps_all_held']:.0%} of the steps")
    print()
    print(bars_table(results["bars"]))
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / "decoding.json"
    path.write_text(json.dumps(results, indent=2))
    plot_decoding(results["results"], path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
