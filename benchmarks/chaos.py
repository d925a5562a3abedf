"""Chaos benchmark: the retrieval service under faults, one table of requests sent, failed and wrong.

Everything runs on this machine, on loopback, on a run directory as `lm-worker demo --quick` makes
it (made first when RUN is missing): its base LM, held-out split and kNN-LM datastore (real LM keys).
A `LocalDeployment` serves the datastore as 2 shards x 2 replicas behind a router (`retriever-server
serve`'s processes, supervised: a replica that dies is restarted on its port), and the faults are:

- **replica killed every few seconds during a kNN-LM evaluation**: SIGKILL to one replica whose
  sibling is serving, every `--kill-every` seconds, while `lm_worker.evaluation` scores the held-out
  tokens through the router. Wrong: perplexities that differ from the fault-free run's (same
  deployment, before the kills).
- **replica SIGSTOPped**: one replica of shard 0 hangs; `--requests` searches through the router and
  as many through the client's own fan-out, each with a 1 s deadline. Reported: the p99 each adds to
  the fault-free run's, beside the hedge delay (the router's from its /metrics, the client's from
  its replica set).
- **replica restarted**: one killed while a client keeps searching; the seconds until the supervisor
  has it serving again and until it answers searches (from its /metrics).
- **64 concurrent clients past max-inflight**: the router admits 16 at once; the rest must get
  RESOURCE_EXHAUSTED, nothing else. Reported: the router's peak RSS.
- **fuzz**: `--fuzz` malformed requests (`fuzz.py`) to the router and to a shard; failed: a status
  outside ANSWERED (UNKNOWN, INTERNAL), or a server not SERVING afterwards; wrong: the valid request's
  answer changed.
- **build killed at random points**: `retriever-server build` killed (its whole process group, SIGKILL)
  at a random moment of a build, then run again to completion; failed: a half-published datastore or
  a resume that fails; wrong: a checksum unlike the uninterrupted build's.

Beside the table, two bounds and the cost of security:

- the worst request within the documented limits (`Limits`: every query excluding the most ids and
  ranges a query may, as many queries as the totals allow) against the same search without
  exclusions, through the router (bar: at most 2x);
- the CPU the shards spend after a deadline passes, for a search far longer than its deadline
  (bar: at most 100 ms);
- CPU seconds per request of every process (client, router, shards, from /proc), plaintext against
  TLS with a bearer token on every hop.

    python benchmarks/chaos.py [--run runs/demo-quick] [--out bench_out] [--quick]

Writes OUT/chaos.json. Exits 1 when a fault row has a failed or wrong request, or a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the model shares the cores with the servers

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from decoding import process_cpu_s  # noqa: E402
from fuzz import ANSWERED, call, fuzzed  # noqa: E402
from knnlm_eval import BenchConfig, check_run, eval_config  # noqa: E402

from lm_worker.data.token_store import TokenStore  # noqa: E402
from lm_worker.evaluation.knnlm_eval import evaluate_knnlm  # noqa: E402
from lm_worker.models.checkpoint import load_checkpoint  # noqa: E402
from lm_worker.retrieval.service import ServiceRetriever  # noqa: E402
from retriever_server.cluster.launcher import LocalDeployment  # noqa: E402
from retriever_server.cluster.supervisor import Child, RestartPolicy  # noqa: E402
from retriever_server.datastore.manifest import DatastoreError, read_manifest, verify_shard  # noqa: E402
from retriever_server.security.certs import make_ca, make_leaf, write_private  # noqa: E402
from retriever_server.security.config import ClientSecurity, ServerSecurity  # noqa: E402
from retriever_server.serving.client import Exclude, RetrieverClient, RetrieverError, make_request  # noqa: E402
from retriever_server.serving.grpc_setup import health_status  # noqa: E402
from retriever_server.wire.request import Limits  # noqa: E402

ROUTER_INFLIGHT = 16


@dataclass(frozen=True)
class ChaosConfig:
    """What to run, and how much of each fault."""

    run: Path = Path("runs/demo-quick")
    out: Path = Path("bench_out")
    tokens: int = 2048  # held-out tokens of the kNN-LM evaluation
    kill_every_s: float = 3.0
    kills: int = 8  # replicas killed during the kNN-LM evaluation
    requests: int = 300  # per client kind, with a replica SIGSTOPped
    clients: int = 64  # concurrent, against a router admitting ROUTER_INFLIGHT
    fuzz: int = 2400  # malformed requests, half to the router and half to a shard
    build_kills: int = 5  # builds killed, each then run again to the end
    seed: int = 0


QUICK = ChaosConfig(tokens=512, kill_every_s=1.0, kills=2, requests=200, fuzz=400, build_kills=1)  # --quick


@dataclass
class Row:
    """One fault: requests sent, failed (an error the fault caused) and wrong (an answer unlike the
    fault-free one), and what else was seen."""

    fault: str
    sent: int
    failed: int
    wrong: int
    detail: str
    numbers: dict = field(default_factory=dict)


def log(message: str) -> None:
    print(message, flush=True)


def ensure_run(run: Path) -> None:
    """Makes RUN with `lm-worker demo --quick` unless it holds a complete run already."""
    if (run / "knnlm-datastore" / "manifest.json").is_file() and (run / "lm" / "checkpoint.pt").is_file():
        return
    log(f"{run} has no complete run: making one with lm-worker demo --quick (a few minutes)")
    subprocess.run([sys.executable, "-m", "lm_worker.cli", "demo", "--quick", "--run", str(run)], check=True)


def wait_all_serving(deployment: LocalDeployment, seconds: float = 60) -> None:
    """Waits (at most `seconds`) until every replica is serving, so that the next fault starts clean."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not all(serving(c) for replicas in deployment.shards for c in replicas):
        time.sleep(0.05)


def scrape(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode().splitlines()


def search_counts(port: int) -> dict[str, float]:
    """Searches a server has answered since it started, by status, from its /metrics."""
    counts: dict[str, float] = {}
    for line in scrape(port):
        if line.startswith("retriever_requests_total{") and 'method="Search"' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def hedge_delays(port: int) -> dict[str, float]:
    """The router's current hedge delay per shard, from its /metrics."""
    return {line.split('shard="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in scrape(port) if line.startswith("retriever_hedge_delay_seconds{")}


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def serving(child: Child) -> bool:
    return child.serving and not child.exited()


# --- the faults ------------------------------------------------------------------------------------


class Killer(threading.Thread):
    """SIGKILLs one replica every `every_s` seconds, only ever one whose sibling is serving."""

    def __init__(self, deployment: LocalDeployment, every_s: float, seed: int):
        super().__init__(daemon=True)
        self.deployment, self.every_s = deployment, every_s
        self.rng = np.random.default_rng(seed)
        self.stopping = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.stopping.wait(self.every_s):
            shards = self.deployment.shards
            choices = [(s, r) for s, replicas in enumerate(shards) for r in range(len(replicas))
                       if all(serving(c) for c in replicas)]
            if choices:
                shard, replica = choices[int(self.rng.integers(len(choices)))]
                self.deployment.kill(shard=shard, replica=replica)
                self.kills += 1


def knnlm_under_kills(config: ChaosConfig, deployment: LocalDeployment) -> Row:
    """The evaluation once fault-free, then again and again while replicas are killed, until
    `config.kills` kills have happened; every faulty pass must give the fault-free perplexities."""
    bench = BenchConfig(run=config.run, tokens=config.tokens, batch_size=1)  # one window per request
    check_run(bench)
    loaded = load_checkpoint(bench.checkpoint, device="cpu")
    store, manifest = TokenStore.open(bench.heldout), read_manifest(bench.datastore)
    evaluation = eval_config(bench, manifest.metadata, getattr(loaded.config, "max_len", None))
    port = deployment.router.metrics_port
    passes, differ = 0, 0
    with ServiceRetriever(deployment.router_address, evaluation.retrieval) as retriever:
        started = time.monotonic()
        clean = evaluate_knnlm(loaded.model, store, retriever, evaluation, progress=False)
        log(f"  fault-free: {clean.tokens} tokens in {time.monotonic() - started:.1f} s, perplexity "
            f"{clean.base_perplexity:.4f} -> {clean.best_perplexity:.4f}")
        before = search_counts(port)
        killer = Killer(deployment, config.kill_every_s, config.seed)
        killer.start()
        try:
            while killer.kills < config.kills:
                faulty = evaluate_knnlm(loaded.model, store, retriever, evaluation, progress=False)
                passes += 1
                differ += int(faulty.perplexity != clean.perplexity)
        finally:
            killer.stopping.set()
            killer.join()
    after = search_counts(port)
    sent = int(sum(after.values()) - sum(before.values()))
    failed = sent - int(after.get("OK", 0) - before.get("OK", 0))
    return Row(f"replica killed every {config.kill_every_s:g} s during kNN-LM eval", sent, failed, differ,
               f"{killer.kills} kills over {passes} passes of {clean.tokens} tokens; perplexity "
               f"{clean.best_perplexity:.6f} at λ={clean.best_lambda:g} fault-free; passes with any λ's perplexity "
               f"different: {differ}", {"kills": killer.kills, "passes": passes, "tokens": clean.tokens,
                                        "fault_free_perplexity": clean.perplexity})


def timed_searches(client: RetrieverClient, queries: np.ndarray, expected: np.ndarray, n: int) -> dict:
    """`n` searches with a 1 s deadline: latencies, failures by code, wrong answers."""
    latencies, failures, wrong = [], {}, 0
    for _ in range(n):
        started = time.perf_counter()
        try:
            found = client.search(queries, k=10, timeout=1.0)
            wrong += int(not np.array_equal(found.ids, expected))
        except RetrieverError as err:
            failures[err.code.name] = failures.get(err.code.name, 0) + 1
        latencies.append(time.perf_counter() - started)
    return {"p50_ms": 1000 * float(np.percentile(latencies, 50)), "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "failures": failures, "wrong": wrong}


def hung_replica(config: ChaosConfig, deployment: LocalDeployment, queries: np.ndarray,
                 expected: np.ndarray) -> list[Row]:
    rows = []
    with RetrieverClient(deployment.router_address) as router, RetrieverClient(deployment.shard_addresses) as fan_out:
        for name, client in (("router", router), ("fan-out", fan_out)):
            clean = timed_searches(client, queries, expected, config.requests)
            hung = deployment.shards[0][0].popen.pid
            os.kill(hung, signal.SIGSTOP)
            try:
                stopped = timed_searches(client, queries, expected, config.requests)
            finally:
                os.kill(hung, signal.SIGCONT)
            if name == "router":
                delay_ms = 1000 * hedge_delays(deployment.router.metrics_port)["shard-00000"]
            else:
                delay_ms = 1000 * client.sets[0].hedge_delay(client.failover)
            added = stopped["p99_ms"] - clean["p99_ms"]
            ok = added <= delay_ms + 50
            rows.append(Row(f"replica SIGSTOPped, 1 s deadline ({name})", config.requests,
                            sum(stopped["failures"].values()), stopped["wrong"],
                            f"p99 {clean['p99_ms']:.1f} -> {stopped['p99_ms']:.1f} ms: +{added:.1f} ms; hedge delay "
                            f"{delay_ms:.1f} ms (+50 ms bar: {'met' if ok else 'MISSED'})",
                            {"fault_free": clean, "stopped": stopped, "hedge_delay_ms": delay_ms,
                             "added_p99_ms": added, "bar_met": ok}))
    return rows


def restarted_replica(deployment: LocalDeployment, queries: np.ndarray, expected: np.ndarray) -> Row:
    child = deployment.shards[1][0]
    pid = child.popen.pid
    sent = failed = wrong = 0
    with RetrieverClient(deployment.router_address, timeout=5) as client:
        killed = time.monotonic()
        deployment.kill(shard=1, replica=0)
        serving_s = answering_s = None
        while time.monotonic() - killed < 30 and answering_s is None:
            sent += 1
            try:
                wrong += int(not np.array_equal(client.search(queries, k=10).ids, expected))
            except RetrieverError:
                failed += 1
            if serving_s is None and child.popen.pid != pid and serving(child):
                serving_s = time.monotonic() - killed
            if serving_s is not None and search_counts(child.metrics_port).get("OK", 0) > 0:
                answering_s = time.monotonic() - killed
            time.sleep(0.01)
    ok = answering_s is not None and answering_s <= 10
    return Row("replica killed, restarted by the supervisor", sent, failed, wrong,
               f"serving again after {serving_s or float('nan'):.1f} s, answering searches after "
               f"{answering_s or float('nan'):.1f} s (10 s bar: {'met' if ok else 'MISSED'})",
               {"serving_s": serving_s, "answering_s": answering_s, "bar_met": ok})


def crowd(config: ChaosConfig, deployment: LocalDeployment, queries: np.ndarray, expected: np.ndarray) -> Row:
    counts: dict[str, int] = {}
    wrong = 0
    lock = threading.Lock()
    peak = [rss_mib(deployment.router.popen.pid)]
    done = threading.Event()

    def client_loop() -> None:
        nonlocal wrong
        with RetrieverClient(deployment.router_address, timeout=30) as client:
            for _ in range(10):
                try:
                    found = client.search(queries, k=100)
                    code, bad = "OK", not np.array_equal(found.ids[:, :10], expected)
                except RetrieverError as err:
                    code, bad = err.code.name, False
                with lock:
                    counts[code] = counts.get(code, 0) + 1
                    wrong += int(bad)

    def watch() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_mib(deployment.router.popen.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client_loop) for _ in range(config.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    failed = sum(n for code, n in counts.items() if code not in ("OK", "RESOURCE_EXHAUSTED"))
    return Row(f"{config.clients} concurrent clients, router max-inflight {ROUTER_INFLIGHT}", sum(counts.values()),
               failed, wrong, f"{counts.get('OK', 0)} answered, {counts.get('RESOURCE_EXHAUSTED', 0)} "
               f"RESOURCE_EXHAUSTED; router peak RSS {peak[0]:.0f} MiB",
               {"codes": counts, "router_peak_rss_mib": peak[0]})


def fuzz(config: ChaosConfig, deployment: LocalDeployment, queries: np.ndarray) -> Row:
    rng = np.random.default_rng(config.seed)
    base = make_request(queries[:3], k=5, payloads=["values"]).SerializeToString()
    targets = [deployment.router_address, deployment.shards[0][0].address]
    channels = [grpc.insecure_channel(a) for a in targets]
    codes: dict[str, int] = {}
    try:
        before = [channel.unary_unary("/retrieval.v1.Retriever/Search")(base, timeout=10) for channel in channels]
        for i in range(config.fuzz):
            code, _ = call(channels[i % 2], fuzzed(rng, base))
            codes[code.name] = codes.get(code.name, 0) + 1
        after = [channel.unary_unary("/retrieval.v1.Retriever/Search")(base, timeout=10) for channel in channels]
    finally:
        for channel in channels:
            channel.close()
    down = [a for a in targets if health_status(a) != "SERVING"]
    failed = sum(n for code, n in codes.items() if grpc.StatusCode[code] not in ANSWERED) + len(down)
    return Row("fuzz (router and a shard)", config.fuzz, failed, int(before != after),
               ", ".join(f"{code} {n}" for code, n in sorted(codes.items())) + f"; not SERVING after: {len(down)}",
               {"codes": codes, "not_serving": down})


def build_command(config: ChaosConfig, out: Path) -> list[str]:
    source = config.run / "knnlm-source"
    return [sys.executable, "-m", "retriever_server.cli", "build", str(source / "keys.parts.json"), "--out", str(out),
            "--payload", f"values={source / 'values.parts.json'}", "--shards", "4", "--factory", "IVF256,PQ8",
            "--seed", "0", "--num-cpus", "2", "--no-progress"]


def run_build(config: ChaosConfig, out: Path, kill_after_s: float | None = None) -> tuple[int, float]:
    """Runs the build CLI in a session of its own; with `kill_after_s`, SIGKILLs the session then."""
    started = time.monotonic()
    process = subprocess.Popen(build_command(config, out), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process.returncode, time.monotonic() - started


def published_whole(out: Path) -> bool:
    """The directory is absent, or a datastore whose every file matches the manifest."""
    if not out.exists():
        return True
    try:
        for shard in read_manifest(out).shards:
            verify_shard(out, shard)
    except (DatastoreError, OSError, ValueError):
        return False
    return True


def killed_builds(config: ChaosConfig) -> Row:
    work = config.out / "chaos-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    code, clean_s = run_build(config, work / "clean")
    reference = read_manifest(work / "clean").checksum if code == 0 else None
    rng = np.random.default_rng(config.seed)
    failed = wrong = 0
    kills = []
    for trial in range(config.build_kills):
        out = work / f"killed-{trial}"
        at = float(rng.uniform(0.5, 0.8 * clean_s))  # the last part of a CLI build is Ray shutting down
        run_build(config, out, kill_after_s=at)
        whole = published_whole(out)
        finished = out.exists() and whole  # killed after it published (while Ray shut down)
        code = 0 if finished else run_build(config, out)[0]
        resumed = code == 0 and published_whole(out)
        failed += int(not whole or not resumed)
        checksum = read_manifest(out).checksum if resumed else None
        wrong += int(checksum != reference)
        kills.append({"kill_after_s": at, "whole_after_kill": whole, "published_before_kill": finished,
                      "resumed": resumed, "checksum": checksum})
        shutil.rmtree(out, ignore_errors=True)
    moments = ", ".join(f"{k['kill_after_s']:.1f}" for k in kills)
    published = sum(k["published_before_kill"] for k in kills)
    return Row("build killed at a random point, then run again", config.build_kills, failed, wrong,
               f"uninterrupted build {clean_s:.1f} s; killed after {moments} s ({published} after publishing); "
               f"checksums equal to the uninterrupted build's: {sum(k['checksum'] == reference for k in kills)}"
               f"/{len(kills)}",
               {"clean_s": clean_s, "reference_checksum": reference, "trials": kills})


# --- bounds and the cost of security -----------------------------------------------------------------


def most_per_query(nq: int, ntotal: int, limits: Limits, width: int, rng: np.random.Generator) -> list[Exclude]:
    """Per query, the most ids and ranges (`width` rows each) a query may exclude, spread over the id space."""
    excludes = []
    for _ in range(nq):
        ids = rng.choice(ntotal, limits.max_excluded_per_query, replace=False)
        starts = np.sort(rng.choice(ntotal - width, limits.max_excluded_ranges_per_query, replace=False))
        excludes.append(Exclude(ids=ids.tolist(), ranges=[(int(s), int(s) + width) for s in starts]))
    return excludes


def own_documents(nq: int, ntotal: int, width: int, rng: np.random.Generator) -> list[Exclude]:
    """Per query, one range of `width` rows: its own document, as kNN-LM and RETRO evaluations exclude."""
    return [Exclude(ranges=[(int(s), int(s) + width)]) for s in rng.integers(0, ntotal - width, nq)]


def paired_medians(plain, excluded, repeats: int = 11) -> tuple[float, float]:
    """Median seconds of two calls timed in turn (so that both see the same machine), `repeats` each."""
    seconds: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for timed, times in zip((plain, excluded), seconds):
            started = time.perf_counter()
            timed()
            times.append(time.perf_counter() - started)
    return float(np.median(seconds[0])), float(np.median(seconds[1]))


def excluded_found(ids: np.ndarray, excludes: list[Exclude]) -> int:
    """Queries answered with a row they excluded."""
    return sum(bool(np.isin(row, e.ids).any() or any(((row >= s) & (row < t)).any() for s, t in e.ranges))
               for row, e in zip(ids, excludes))


def around_themselves(rows: np.ndarray, ntotal: int, width: int) -> list[Exclude]:
    """Per query (a datastore row), the `width` rows around its own: a document holding the query,
    whose rows are among its nearest neighbours (the case kNN-LM's own-document exclusion is for)."""
    starts = np.clip(rows - width // 2, 0, ntotal - width)
    return [Exclude(ranges=[(int(s), int(s) + width)]) for s in starts]


def exclusion_costs(deployment: LocalDeployment, keys: np.ndarray, rows: np.ndarray, ntotal: int) -> list[dict]:
    """Requests with exclusions against the same search without them, through the router: the worst
    within the limits (each query excluding the most it may, as many queries as the totals allow),
    one such query alone, and own-document ranges (the common case). `keys` are datastore rows `rows`."""
    limits = Limits()
    worst_nq = min(limits.max_excluded // limits.max_excluded_per_query,
                   limits.max_excluded_ranges // limits.max_excluded_ranges_per_query)
    rng = np.random.default_rng(1)
    cases = [("most ids and wide ranges per query, most queries", worst_nq,
              most_per_query(worst_nq, ntotal, limits, 1000, rng)),
             ("most ids and narrow ranges per query, most queries", worst_nq,
              most_per_query(worst_nq, ntotal, limits, 4, rng)),
             ("most ids and wide ranges, one query", 1, most_per_query(1, ntotal, limits, 1000, rng)),
             ("own document (200 rows) per query", 1024, own_documents(1024, ntotal, 200, rng)),
             ("own document (5000 rows) per query", 1024, own_documents(1024, ntotal, 5000, rng)),
             ("5000 rows around the query's own", 1024, around_themselves(rows[:1024], ntotal, 5000))]
    rows = []
    with RetrieverClient(deployment.router_address, timeout=60) as client:
        for name, nq, excludes in cases:
            queries = keys[:nq]
            found = client.search(queries, k=10, exclude_per_query=excludes)
            plain_s, with_s = paired_medians(partial(client.search, queries, k=10),
                                             partial(client.search, queries, k=10, exclude_per_query=excludes))
            rows.append({"case": name, "nq": nq, "excluded_ids": sum(len(e.ids) for e in excludes),
                         "excluded_ranges": sum(len(e.ranges) for e in excludes), "plain_ms": 1000 * plain_s,
                         "excluded_ms": 1000 * with_s, "ratio": with_s / plain_s,
                         "queries_with_an_excluded_row": excluded_found(found.ids, excludes)})
    return rows


def work_past_deadline(deployment: LocalDeployment, keys: np.ndarray) -> dict:
    """A search of many seconds with a 0.2 s deadline: how long after the deadline any shard process
    was still busy (using at least 20 ms of CPU in the 50 ms before; /proc sampled every 5 ms), and the
    CPU they used after it beyond what they use idle."""
    pids = [c.popen.pid for replicas in deployment.shards for c in replicas]
    idle_from = sum(process_cpu_s(p) for p in pids)
    time.sleep(2.0)
    idle = sum(process_cpu_s(p) for p in pids) - idle_from
    queries = np.repeat(keys[:64], 64, axis=0)  # (4096, d)
    with RetrieverClient(deployment.router_address) as client:
        started = time.monotonic()
        try:
            client.search(queries, k=1024, nprobe=1024, timeout=0.2)
            code = "OK"
        except RetrieverError as err:
            code = err.code.name
        deadline = started + 0.2
        samples = []  # (seconds after the deadline, CPU seconds of each shard process)
        while time.monotonic() < deadline + 2.0:
            samples.append((time.monotonic() - deadline, [process_cpu_s(p) for p in pids]))
            time.sleep(0.005)
    busy_until = 0.0
    for i, (t, cpu) in enumerate(samples):
        earlier = next((c for u, c in reversed(samples[:i]) if u <= t - 0.05), None)
        if earlier is not None and any(now - then >= 0.02 for now, then in zip(cpu, earlier)):
            busy_until = max(busy_until, t)
    first = next(c for t, c in samples if t >= 0)
    after = sum(samples[-1][1]) - sum(first) - idle
    return {"code": code, "busy_after_deadline_ms": 1000 * busy_until, "shard_cpu_after_deadline_ms": 1000 * after,
            "idle_cpu_2s_ms": 1000 * idle, "bar_met": code == "DEADLINE_EXCEEDED" and busy_until <= 0.1}


def private_pki(directory: Path) -> tuple[ServerSecurity, ClientSecurity]:
    """A CA, a server certificate for 127.0.0.1 and a token: both sides of a secured router."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("chaos CA")
    server = make_leaf(ca, "router", ["127.0.0.1", "localhost"])
    files = {name: write_private(directory / name, data) for name, data in
             (("ca.pem", ca.cert_pem), ("server.pem", server.cert_pem), ("server.key", server.key_pem),
              ("tokens", b"chaos-benchmark-token\n"))}
    return (ServerSecurity(tls_cert=files["server.pem"], tls_key=files["server.key"], token_file=files["tokens"]),
            ClientSecurity(tls_ca=files["ca.pem"], token_file=files["tokens"]))


def cpu_per_request(datastore: Path, queries: np.ndarray, server: ServerSecurity, client_side: ClientSecurity,
                    n: int) -> dict:
    """CPU ms per request of the client, the router and each shard, over `n` searches."""
    with LocalDeployment(datastore, security=server) as deployment, \
            RetrieverClient(deployment.router_address, security=client_side) as client:
        for _ in range(20):
            client.search(queries, k=10)
        processes = {"router": deployment.router.popen.pid,
                     **{f"shard {s}": r[0].popen.pid for s, r in enumerate(deployment.shards)}}
        before = {name: process_cpu_s(pid) for name, pid in processes.items()}
        mine = time.process_time()
        for _ in range(n):
            client.search(queries, k=10)
        used = {"client": time.process_time() - mine,
                **{name: process_cpu_s(pid) - before[name] for name, pid in processes.items()}}
    per = {name: 1000 * seconds / n for name, seconds in used.items()}
    return {**per, "total": sum(per.values())}


def security_cost(config: ChaosConfig, datastore: Path, keys: np.ndarray) -> dict:
    server, client_side = private_pki(config.out / "chaos-pki")
    n = max(config.requests, 100)
    table = {}
    for nq in (1, 64):
        queries = keys[:nq]
        table[f"nq={nq}"] = {"plaintext": cpu_per_request(datastore, queries, ServerSecurity(), ClientSecurity(), n),
                             "TLS + token": cpu_per_request(datastore, queries, server, client_side, n)}
    return table


# --- the report ----------------------------------------------------------------------------------------


def fault_table(rows: list[Row]) -> str:
    lines = ["| fault | sent | failed | wrong | seen |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r.fault} | {r.sent} | {r.failed} | {r.wrong} | {r.detail} |" for r in rows]
    return "\n".join(lines)


def exclusion_ok(case: dict) -> bool:
    """An exclusion case's bars: at most twice the time without exclusions, and no excluded row answered."""
    return case["ratio"] <= 2.0 and not case["queries_with_an_excluded_row"]


def exclusion_table(cases: list[dict]) -> str:
    lines = ["| exclusions, through the router, k=10 | nq | ids | ranges | without ms | with ms | ratio (bar 2x) "
             "| answered with an excluded row | bars |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {c['case']} | {c['nq']} | {c['excluded_ids']} | {c['excluded_ranges']} | {c['plain_ms']:.1f} | "
              f"{c['excluded_ms']:.1f} | {c['ratio']:.2f} | {c['queries_with_an_excluded_row']} | "
              f"{'met' if exclusion_ok(c) else 'MISSED'} |" for c in cases]
    return "\n".join(lines)


def security_table(costs: dict) -> str:
    names = ["client", "router", "shard 0", "shard 1", "total"]
    lines = ["| request | hops | " + " | ".join(f"{n} CPU ms" for n in names) + " |",
             "|---|---|" + "---:|" * len(names)]
    for request, sides in costs.items():
        for side, per in sides.items():
            lines.append(f"| {request}, k=10 | {side} | " + " | ".join(f"{per[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def run(config: ChaosConfig) -> dict:
    ensure_run(config.run)
    datastore = config.run / "knnlm-datastore"
    manifest = read_manifest(datastore)
    keys = np.concatenate([np.load(datastore / s.name / "keys.npy", mmap_mode="r")[:512] for s in manifest.shards])
    key_rows = np.concatenate([np.arange(s.id_start, s.id_start + 512) for s in manifest.shards])
    rng = np.random.default_rng(config.seed)
    queries = (keys[rng.choice(len(keys), 8, replace=False)] + rng.normal(0, 0.01, (8, keys.shape[1]))).astype(
        np.float32)
    config.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    policy = RestartPolicy(first_delay_s=0.2)
    log(f"datastore {datastore}: {manifest.ntotal} rows, {len(manifest.shards)} shards ({manifest.factory}); "
        f"serving it as 2 replicas per shard behind a router")
    with LocalDeployment(datastore, replicas=2, restart_policy=policy,
                         router_args=("--max-inflight", str(ROUTER_INFLIGHT))) as deployment:
        with RetrieverClient(deployment.router_address) as client:
            expected = client.search(queries, k=10).ids
        log("kNN-LM evaluation, fault-free and with replicas killed")
        rows.append(knnlm_under_kills(config, deployment))
        wait_all_serving(deployment)
        log("a replica SIGSTOPped")
        rows.extend(hung_replica(config, deployment, queries, expected))
        log("a replica killed and restarted")
        rows.append(restarted_replica(deployment, queries, expected))
        wait_all_serving(deployment)
        log(f"{config.clients} concurrent clients")
        rows.append(crowd(config, deployment, queries, expected))
        log("fuzz")
        rows.append(fuzz(config, deployment, queries))
        log("the worst request within the limits, and work past a deadline")
        worst = exclusion_costs(deployment, keys, key_rows, manifest.ntotal)
        deadline = work_past_deadline(deployment, keys)
    log("builds killed at random points")
    rows.append(killed_builds(config))
    log("CPU per request, plaintext and with TLS and a token")
    costs = security_cost(config, datastore, keys)
    return {"config": {**asdict(config), "run": str(config.run), "out": str(config.out)},
            "environment": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "datastore": {"path": str(datastore), "ntotal": manifest.ntotal, "factory": manifest.factory},
            "faults": [asdict(r) for r in rows], "exclusions": worst, "deadline": deadline,
            "security_cpu_ms": costs, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def report(results: dict) -> bool:
    """Prints the tables; whether every fault row and bar is clean."""
    rows = [Row(**r) for r in results["faults"]]
    exclusions, deadline = results["exclusions"], results["deadline"]
    log("\n" + fault_table(rows))
    log("\n" + exclusion_table(exclusions))
    log(f"a search far past its 0.2 s deadline ({deadline['code']}): shards busy until "
        f"{deadline['busy_after_deadline_ms']:.0f} ms after it (bar 100 ms: "
        f"{'met' if deadline['bar_met'] else 'MISSED'}), {deadline['shard_cpu_after_deadline_ms']:.0f} ms CPU after "
        f"it over idle")
    log("\nCPU per request, every process, from /proc:\n" + security_table(results["security_cpu_ms"]))
    missed = [f"fault row {r.fault!r}" for r in rows
              if not (r.failed == 0 and r.wrong == 0 and r.numbers.get("bar_met", True))]
    missed += [f"exclusions {e['case']!r}" for e in exclusions if not exclusion_ok(e)]
    missed += [] if deadline["bar_met"] else ["the deadline"]
    log("\nevery bar met" if not missed else "\nbars missed (exit status 1): " + "; ".join(missed))
    return not missed


def parse_args(argv: list[str] | None = None) -> ChaosConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=ChaosConfig.run, help="run directory (made by lm-worker demo --quick "
                                                                     "when missing)")
    p.add_argument("--out", type=Path, default=ChaosConfig.out)
    p.add_argument("--tokens", type=int,
                   help=f"held-out tokens of the kNN-LM evaluation (default {ChaosConfig.tokens})")
    p.add_argument("--kill-every", type=float, help=f"seconds between kills (default {ChaosConfig.kill_every_s})")
    p.add_argument("--kills", type=int, help=f"kills during the kNN-LM evaluation (default {ChaosConfig.kills})")
    p.add_argument("--requests", type=int, help=f"default {ChaosConfig.requests}")
    p.add_argument("--fuzz", type=int, help=f"default {ChaosConfig.fuzz}")
    p.add_argument("--build-kills", type=int, help=f"default {ChaosConfig.build_kills}")
    p.add_argument("--quick", action="store_true",
                   help="fewer tokens, requests and kills (a smoke run); the options given still apply")
    args = p.parse_args(argv)
    base = QUICK if args.quick else ChaosConfig(args.run, args.out)
    given = {"tokens": args.tokens, "kill_every_s": args.kill_every, "kills": args.kills, "requests": args.requests,
             "fuzz": args.fuzz, "build_kills": args.build_kills}
    return replace(base, run=args.run, out=args.out, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    results = run(config)
    clean = report(results)
    path = config.out / "chaos.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    log(f"\nwrote {path}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
