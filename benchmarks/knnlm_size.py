"""kNN-LM perplexity against datastore size (Khandelwal et al., ICLR 2020, section 4.2) on a pipeline run.

On a run directory laid out as `lm-worker pipeline` / `lm-worker demo` write it, with the run's LM
frozen, it measures test perplexity of kNN-LM over datastores of growing size:

- "train prefix": the first N rows of the train split's kNN-LM source (RUN/knnlm-source), for each
  `--prefixes` N below the train split's size;
- "train": the whole train split (RUN/knnlm-datastore when it holds exactly that source, else built);
- "train+retro": the train split's keys and the keys the same frozen LM gives the "retro" split
  (RUN/data/retro: training-side documents the LM never saw), encoded by the pipeline's encode job
  (`run_encode_job`, the same windows) into OUT/retro-source. This is the largest real datastore
  available without training the LM again.

The derived sources are parts indexes (`retriever_server.datastore.row_parts`) over the existing key
and value files, in row order, so the union's next-token values line up with its keys by
construction (and are checked against the token streams); only a prefix's last partial part is
copied. Each is built as the pipeline builds RUN/knnlm-datastore (`build_source`: `build_datastore`
with the `auto` factory, the run's shard count, stored keys) and searched in this process
(`InProcessRetriever`, the reference `knnlm_eval.py` checks the service against).

Every size is evaluated as the pipeline's eval stage evaluates: kNN-LM's temperature is chosen on
the validation text (RUN/data/valid) over the pipeline's temperatures by `tune_temperature` (each
validation batch is searched once and replayed for every temperature: neighbours do not depend on
it), then `evaluate_knnlm` scores the first `--tokens` test tokens (RUN/data/test) for every λ,
with the pipeline's k and nprobe (capped at a small datastore's list count). The reported kNN-LM
perplexity is the best λ's on the test tokens, as the pipeline's report gives it; the λ chosen on
the validation text, and the test perplexity at that λ, are reported beside it. The base LM's
perplexity is λ = 0 of the same evaluation (identical for every size).

    python benchmarks/knnlm_size.py --run RUN [--tokens 0] [--prefixes 10000,30000,100000]
        [--temperature tune|pipeline|T] [--out bench_out/knnlm_size]

Writes OUT/knnlm_size.json and OUT/knnlm_size.png (perplexity against datastore keys, log x) and
prints a markdown table. Sources, datastores and the retro split's keys are kept in OUT and reused (a datastore
when its rows, shards, encoder and factory, `--factory` resolved as the build resolves it, are this run's).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# The retrieval of a batch runs while the model computes the next one: the model's OpenMP threads
# sleep between operations instead of spinning for those cores (as `knnlm_eval.py`). Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from lm_worker.data.token_store import RETRO_SPLIT, TokenStore  # noqa: E402
from lm_worker.evaluation.config import EvalConfig  # noqa: E402
from lm_worker.evaluation.knnlm_eval import KnnEvalResult, evaluate_knnlm  # noqa: E402
from lm_worker.jobs.encode_job import run_encode_job  # noqa: E402
from lm_worker.jobs.encode_plan import EncodeJobConfig  # noqa: E402
from lm_worker.models.checkpoint import load_checkpoint  # noqa: E402
from lm_worker.models.fingerprint import model_fingerprint  # noqa: E402
from lm_worker.pipeline.config import PipelineConfig  # noqa: E402
from lm_worker.pipeline.eval_stage import tune_temperature  # noqa: E402
from lm_worker.pipeline.stages import connect_ray  # noqa: E402
from lm_worker.retrieval.config import RetrievalConfig  # noqa: E402
from lm_worker.retrieval.in_process import InProcessRetriever  # noqa: E402
from lm_worker.sources.build import build_source  # noqa: E402
from lm_worker.sources.source import PARTS_LAYOUT, SourceInfo, read_source, start_source  # noqa: E402
from retriever_server.datastore.index import resolve_factory  # noqa: E402
from retriever_server.datastore.manifest import read_manifest  # noqa: E402
from retriever_server.datastore.row_parts import PartedArray, open_rows, write_parts_index  # noqa: E402

log = logging.getLogger("knnlm_size")

TRAIN_PREFIX, TRAIN, TRAIN_RETRO = "train prefix", "train", "train+retro"
RETRO_ALONE = "retro alone"  # the retro split's keys without the train split's: content against size


@dataclass(frozen=True)
class SizeBenchConfig:
    """What to measure. 0 (or "") takes the pipeline's setting for this run (RUN/report/eval.json)."""

    run: Path
    out: Path = Path("bench_out/knnlm_size")
    tokens: int = 0  # test tokens scored per size (0: the whole test split, as the pipeline)
    valid_tokens: int = 0  # validation tokens the temperature and λ are chosen on (0: all, as the pipeline)
    prefixes: tuple[int, ...] = (10_000, 30_000, 100_000)
    retro: bool = True  # add the train+retro datastore
    retro_alone: bool = False  # and the retro split's keys alone
    temperature: str = "tune"  # "tune" per size on validation text, "pipeline" (its choice), or a number
    k: int = 0
    nprobe: int = 0
    shards: int = 0
    factory: str = "auto"
    encode_workers: int = 0
    batch_size: int = 8
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    progress: bool = True

    @property
    def checkpoint(self) -> Path:
        return self.run / "lm" / "checkpoint.pt"

    @property
    def data(self) -> Path:
        return self.run / "data"


@dataclass(frozen=True)
class Settings:
    """The pipeline's evaluation settings for the run, with the config's overrides applied."""

    k: int
    nprobe: int
    temperatures: tuple[float, ...]
    shards: int
    encode_workers: int
    pipeline_temperature: float | None  # RUN/report/temperature.json's choice, if the pipeline made one
    from_report: bool


@dataclass(frozen=True)
class SizeSpec:
    """One datastore to measure: its rows, what they are, and the source and datastore folders."""

    name: str
    kind: str  # TRAIN_PREFIX, TRAIN, RETRO_ALONE or TRAIN_RETRO
    keys: int
    source: Path
    datastore: Path


@dataclass
class SizeRow:
    """Every figure of one datastore size."""

    name: str
    source: str
    keys: int
    factory: str = ""
    nlist: int = 0
    nprobe: int = 0
    built_seconds: float = 0.0  # 0 when reused
    temperature: float = 0.0
    valid_best_by_temperature: dict[str, float] = field(default_factory=dict)
    valid_lambda: float = 0.0
    valid_perplexity: float = 0.0
    test_tokens: int = 0
    best_lambda: float = 0.0
    knn_perplexity: float = 0.0
    base_perplexity: float = 0.0
    change_pct: float = 0.0
    test_perplexity_at_valid_lambda: float = 0.0
    perplexity_by_lambda: dict[str, float] = field(default_factory=dict)
    tune_seconds: float = 0.0
    eval_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# The run and the pipeline's settings
# ---------------------------------------------------------------------------------------------

def check_run(config: SizeBenchConfig) -> None:
    """Exits with a message naming every piece of RUN that is missing."""
    needed = {config.checkpoint: "the base LM (RUN/lm)",
              config.run / "knnlm-source" / "source.json": "the train split's kNN-LM source",
              config.data / "valid" / "documents.json": "the validation split the pipeline cuts from heldout",
              config.data / "test" / "documents.json": "the test split"}
    if config.retro:
        needed[config.data / RETRO_SPLIT / "documents.json"] = "the retro split (or pass --no-retro)"
    exit_if_missing(config.run, needed)


def exit_if_missing(run_dir: Path, needed: dict[Path, str]) -> None:
    """Exits with a message naming every file of `needed` (path: what it is) that RUN lacks."""
    missing = [f"  {path}: {what}" for path, what in needed.items() if not path.is_file()]
    if missing:
        raise SystemExit(f"error: {run_dir} is not a complete pipeline run; missing:\n" + "\n".join(missing))


def pipeline_config(run_dir: Path, what: str) -> dict:
    """The config the pipeline ran RUN with (its report's), or {} with a warning that `what` falls back
    to `PipelineConfig`'s defaults."""
    report = run_dir / "report" / "eval.json"
    ran = json.loads(report.read_text())["meta"]["config"] if report.is_file() else {}
    if not ran:
        log.warning("%s not found: using PipelineConfig's defaults for %s", report, what)
    return ran


def pipeline_settings(config: SizeBenchConfig) -> Settings:
    """k, nprobe, temperatures, shards and encode workers as the pipeline ran on RUN (its report's
    config), else `PipelineConfig`'s defaults; the config's non-zero fields win."""
    defaults = PipelineConfig()
    ran = pipeline_config(config.run, "k, nprobe and the temperatures")
    knn = ran.get("knn", asdict(defaults.knn))
    chosen = config.run / "report" / "temperature.json"
    return Settings(k=config.k or int(knn["k"]), nprobe=config.nprobe or int(knn["nprobe"]),
                    temperatures=tuple(float(t) for t in ran.get("temperatures", defaults.temperatures)),
                    shards=config.shards or int(ran.get("shards", defaults.shards)),
                    encode_workers=config.encode_workers or max(int(ran.get("encode_workers", 2)), 1),
                    pipeline_temperature=json.loads(chosen.read_text())["chosen"] if chosen.is_file() else None,
                    from_report=bool(ran))


def check_model(model: torch.nn.Module, train: SourceInfo) -> None:
    """Exits when the LM is not the one whose keys fill RUN/knnlm-source (retrained since)."""
    if model_fingerprint(model) != train.encoder_fingerprint:
        raise SystemExit(f"error: {train.directory}'s keys were made by {train.encoder_fingerprint}, not by the "
                         f"LM in the run's checkpoint: encode the source again")


# ---------------------------------------------------------------------------------------------
# Sources: the retro split's keys, prefixes and the union as parts indexes over existing files
# ---------------------------------------------------------------------------------------------

def encode_retro_split(config: SizeBenchConfig, settings: Settings, train: SourceInfo) -> SourceInfo:
    """The retro split's kNN-LM source, by the pipeline's encode job with the train source's windows
    (OUT/retro-source; finished parts of an earlier run are kept)."""
    job = EncodeJobConfig(kind="knnlm", data=config.data, split=RETRO_SPLIT, checkpoint=config.checkpoint,
                          context_len=int(train.details["context_len"]), stride=int(train.details["stride"]),
                          workers=settings.encode_workers, progress=config.progress)
    info = run_encode_job(job, config.out / "retro-source")
    if info.encoder_fingerprint != train.encoder_fingerprint or info.dimension != train.dimension:
        raise SystemExit(f"error: the retro split's keys ({info.encoder_fingerprint}, d={info.dimension}) are not "
                         f"the train source's ({train.encoder_fingerprint}, d={train.dimension})")
    return info


def row_files(path: Path) -> list[tuple[Path, int]]:
    """The .npy files that hold an array's rows, in order, with their row counts."""
    array = open_rows(path)
    if isinstance(array, PartedArray):
        return [(p, int(b - a)) for p, a, b in zip(array.paths, array.offsets[:-1], array.offsets[1:])]
    return [(Path(path).absolute(), len(array))]


def first_rows(files: list[tuple[Path, int]], n: int, tail: Path) -> list[Path]:
    """Files holding the first n rows of the files' concatenation: whole files while they fit, then the
    rows still missing copied from the next one into `tail`."""
    out, left = [], n
    for path, rows in files:
        if left == 0:
            break
        if rows <= left:
            out.append(path)
            left -= rows
            continue
        np.save(tail, np.load(path, mmap_mode="r")[:left])
        out.append(tail)
        left = 0
    if left:
        raise ValueError(f"the files hold {n - left} rows, {n} were asked for")
    return out


KEPT_DETAILS = ("context_len", "stride", "encoder_checkpoint", "eos_id")  # what a joined source's rows share


def joined_source(sources: list[SourceInfo], rows: int, out_dir: Path) -> SourceInfo:
    """A source (kNN-LM or RETRO) of the first `rows` rows of `sources` one after another (row ids in
    that order), written as parts indexes over their key and payload files; reused when it is already
    there."""
    first = sources[0]
    if (out_dir / "source.json").is_file():
        old = read_source(out_dir)
        if old.rows == rows and old.encoder_fingerprint == first.encoder_fingerprint:
            return old
    out_dir = start_source(out_dir)
    details = {name: first.details[name] for name in KEPT_DETAILS if name in first.details}
    info = SourceInfo(out_dir, first.kind, rows, first.dimension, first.tokenizer_fingerprint,
                      first.encoder_fingerprint, chunk_len=first.chunk_len,
                      details={**details, "layout": PARTS_LAYOUT, "joined": [str(s.directory) for s in sources],
                               "rows_of": [s.rows for s in sources]})
    name = info.payload[0]
    keys = first_rows([f for s in sources for f in row_files(s.keys_path)], rows, out_dir / "keys-tail.npy")
    payload = first_rows([f for s in sources for f in row_files(s.payload[1])], rows, out_dir / f"{name}-tail.npy")
    write_parts_index(info.keys_path, keys)
    write_parts_index(info.payload[1], payload)
    info.write()
    return info


def check_values(source: SourceInfo, stores: list[TokenStore]) -> None:
    """Raises ValueError unless row i's value is the token after position i of the streams, in order."""
    expected = np.concatenate([np.asarray(s.tokens[1:]) for s in stores])[:source.rows]
    if not np.array_equal(np.asarray(source.open_payload()), expected):
        raise ValueError(f"{source.directory}: the values do not follow the token streams row for row")


def size_specs(config: SizeBenchConfig, shards: int, train: SourceInfo, retro: SourceInfo | None) -> list[SizeSpec]:
    """The datastores to measure, smallest first. The whole train split's is RUN/knnlm-datastore when
    that holds exactly the train source in `shards` shards, built as this benchmark builds (never rebuilt here)."""
    stores = config.out / "stores"
    specs = [SizeSpec(f"prefix-{n}", TRAIN_PREFIX, n, stores / f"prefix-{n}" / "source",
                      stores / f"prefix-{n}" / "datastore") for n in sorted(set(config.prefixes)) if 0 < n < train.rows]
    pipeline_store = config.run / "knnlm-datastore"
    reuse = config.factory == "auto" and built(pipeline_store, train, shards, config.factory)
    specs.append(SizeSpec(TRAIN, TRAIN, train.rows, train.directory,
                          pipeline_store if reuse else stores / TRAIN / "datastore"))
    if retro is not None and config.retro_alone:
        specs.append(SizeSpec("retro-alone", RETRO_ALONE, retro.rows, retro.directory,
                              stores / "retro-alone" / "datastore"))
    if retro is not None:
        specs.append(SizeSpec(TRAIN_RETRO, TRAIN_RETRO, train.rows + retro.rows, stores / TRAIN_RETRO / "source",
                              stores / TRAIN_RETRO / "datastore"))
    return specs


# ---------------------------------------------------------------------------------------------
# Datastores
# ---------------------------------------------------------------------------------------------

def built(datastore: Path, source: SourceInfo, shards: int, factory: str) -> bool:
    """Whether `datastore` already holds this source's rows, keys and shard count, in the index `factory`
    gives (resolved as the build resolves it: "auto" sized for the rows and dimension)."""
    if not (datastore / "manifest.json").is_file():
        return False
    manifest = read_manifest(datastore)
    return (manifest.ntotal == source.rows and len(manifest.shards) == shards
            and manifest.metadata.get("encoder") == source.encoder_fingerprint
            and manifest.factory == resolve_factory(factory, source.rows, manifest.dimension))


def ensure_datastore(source: SourceInfo, datastore: Path, shards: int, factory: str, progress: bool) -> float:
    """Builds the source's datastore as the pipeline builds its own, unless it is there; the seconds it took."""
    if built(datastore, source, shards, factory):
        log.info("reusing %s", datastore)
        return 0.0
    started = time.perf_counter()
    datastore.parent.mkdir(parents=True, exist_ok=True)
    build_source(source.directory, datastore, shards=shards, factory=factory, overwrite=datastore.exists(),
                 progress=progress)
    seconds = time.perf_counter() - started
    log.info("built %s: %d rows in %.1f s", datastore, source.rows, seconds)
    return seconds


@contextlib.contextmanager
def ray_for(run_dir: Path) -> Iterator[None]:
    """The pipeline's Ray connection for the block; a local cluster it starts is stopped afterwards."""
    import ray

    ours = not ray.is_initialized()
    connect_ray(PipelineConfig(run=run_dir))
    try:
        yield
    finally:
        if ours:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

class ReplayingRetriever:
    """A retriever that answers a batch of queries it has searched before from memory, so the
    temperature sweep searches each validation batch once (its neighbours do not depend on T)."""

    def __init__(self, inner):
        self.inner, self.memory = inner, {}
        self.config, self.dimension, self.ntotal = inner.config, inner.dimension, inner.ntotal
        self.metadata = inner.metadata

    @staticmethod
    def _key(keys: np.ndarray, exclude) -> str:
        return hashlib.sha1(np.ascontiguousarray(keys, dtype=np.float32).tobytes() + repr(exclude).encode()).hexdigest()

    def knn(self, keys: np.ndarray, exclude=None):
        return self.submit_knn(keys, exclude).result()

    def submit_knn(self, keys: np.ndarray, exclude=None) -> Future:
        key = self._key(keys, exclude)
        if key in self.memory:
            future: Future = Future()
            future.set_result(self.memory[key])
            return future
        future = self.inner.submit_knn(keys, exclude)
        future.add_done_callback(lambda done: self._remember(key, done))
        return future

    def _remember(self, key: str, done: Future) -> None:
        if done.exception() is None:
            self.memory[key] = done.result()


def choose_temperature(config: SizeBenchConfig, settings: Settings, spec: SizeSpec, lm, valid: TokenStore,
                       retriever, evaluation: EvalConfig) -> tuple[float, dict[float, float]]:
    """kNN-LM's temperature for this datastore: chosen on validation text by the pipeline's
    `tune_temperature`, the pipeline's own choice, or the config's number."""
    if config.temperature == "pipeline":
        if settings.pipeline_temperature is None:
            raise SystemExit(f"error: {config.run}/report/temperature.json not found: the pipeline chose none")
        return settings.pipeline_temperature, {}
    if config.temperature != "tune":
        return float(config.temperature), {}
    tuning = PipelineConfig(run=config.out / "stores" / spec.name / "tuning", temperatures=settings.temperatures)
    (tuning.run / "report").mkdir(parents=True, exist_ok=True)
    (tuning.run / "report" / "temperature.json").unlink(missing_ok=True)  # never a choice made for another store
    choice = tune_temperature(tuning, lm, valid, retriever, evaluation)
    return choice.temperature, choice.by_temperature


def evaluate_size(config: SizeBenchConfig, settings: Settings, spec: SizeSpec, lm, valid: TokenStore,
                  test: TokenStore, window: tuple[int, int]) -> SizeRow:
    """Temperature and λ on the validation text, then every λ on the test tokens, for one datastore."""
    manifest = read_manifest(spec.datastore)
    nprobe = min(settings.nprobe, manifest.nlist) if manifest.nlist else 0
    retrieval = RetrievalConfig(k=min(settings.k, manifest.ntotal), nprobe=nprobe)
    evaluation = EvalConfig(context_len=window[0], stride=window[1], batch_size=config.batch_size,
                            max_tokens=config.tokens, retrieval=retrieval)
    on_valid = replace(evaluation, max_tokens=config.valid_tokens)
    row = SizeRow(spec.name, spec.kind, manifest.ntotal, manifest.factory, manifest.nlist, nprobe)
    with InProcessRetriever(spec.datastore, retrieval) as searcher:
        replaying = ReplayingRetriever(searcher)
        started = time.perf_counter()
        temperature, by_t = choose_temperature(config, settings, spec, lm, valid, replaying, on_valid)
        chosen = evaluate_knnlm(lm, valid, replaying, replace(on_valid, temperature=temperature), progress=False)
        row.tune_seconds = time.perf_counter() - started
        replaying.memory.clear()
        result = evaluate_knnlm(lm, test, searcher, replace(evaluation, temperature=temperature),
                                progress=config.progress)
    fill_row(row, temperature, by_t, chosen, result)
    log.info("%s: %d keys, T=%g, best λ %g: perplexity %.3f (base %.3f, %+.1f%%)", spec.name, row.keys,
             temperature, row.best_lambda, row.knn_perplexity, row.base_perplexity, row.change_pct)
    return row


def fill_row(row: SizeRow, temperature: float, by_t: dict[float, float], valid: KnnEvalResult,
             test: KnnEvalResult) -> None:
    """The validation choices and the test figures into `row`."""
    row.temperature, row.valid_best_by_temperature = temperature, {str(t): p for t, p in by_t.items()}
    row.valid_lambda, row.valid_perplexity = valid.best_lambda, valid.best_perplexity
    row.test_tokens, row.eval_seconds = test.tokens, test.seconds
    row.best_lambda, row.knn_perplexity, row.base_perplexity = test.best_lambda, test.best_perplexity, \
        test.base_perplexity
    row.change_pct = 100.0 * (test.best_perplexity / test.base_perplexity - 1.0)
    row.test_perplexity_at_valid_lambda = test.perplexity[valid.best_lambda]
    row.perplexity_by_lambda = {str(lam): p for lam, p in test.perplexity.items()}


# ---------------------------------------------------------------------------------------------
# The whole run, the table and the plot
# ---------------------------------------------------------------------------------------------

def prepare_sources(config: SizeBenchConfig, settings: Settings, train: SourceInfo) -> list[tuple[SizeSpec,
                                                                                                SourceInfo]]:
    """Every size's spec and source, the retro split encoded first when asked for."""
    retro = encode_retro_split(config, settings, train) if config.retro else None
    pairs = []
    streams = [TokenStore.open(config.data / "train")] + ([TokenStore.open(config.data / RETRO_SPLIT)] if retro else [])
    for spec in size_specs(config, settings.shards, train, retro):
        if spec.kind in (TRAIN, RETRO_ALONE):
            pairs.append((spec, train if spec.kind == TRAIN else retro))
            continue
        joined = 1 if spec.kind == TRAIN_PREFIX else 2
        source = joined_source([train, retro][:joined], spec.keys, spec.source)
        check_values(source, streams[:joined])
        pairs.append((spec, source))
    return pairs


def run(config: SizeBenchConfig) -> dict:
    """Encodes, builds and evaluates every size; writes OUT/knnlm_size.json and .png; returns the results."""
    check_run(config)
    started = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    settings = pipeline_settings(config)
    train = read_source(config.run / "knnlm-source")
    lm = load_checkpoint(config.checkpoint, device=config.device).model.eval()
    check_model(lm, train)
    valid, test = TokenStore.open(config.data / "valid"), TokenStore.open(config.data / "test")
    window = (int(train.details["context_len"]), int(train.details["stride"]))
    with ray_for(config.run):
        pairs = prepare_sources(config, settings, train)
        built_s = {spec.name: ensure_datastore(source, spec.datastore, settings.shards, config.factory,
                                               config.progress) for spec, source in pairs}
    rows = []
    for spec, _ in tqdm(pairs, desc="datastore sizes", unit="size", disable=not config.progress):
        rows.append(evaluate_size(config, settings, spec, lm, valid, test, window))
        rows[-1].built_seconds = built_s[spec.name]
    results = {"config": {**asdict(config), "run": str(config.run), "out": str(config.out)},
               "settings": asdict(settings), "window": {"context_len": window[0], "stride": window[1]},
               "splits": {name: len(store) for name, store in (("valid", valid), ("test", test))},
               "train_keys": train.rows, "retro_keys": pairs[-1][1].rows - train.rows if config.retro else 0,
               "rows": [asdict(r) for r in rows], "pipeline_report": pipeline_report(config.run),
               "seconds": time.perf_counter() - started,
               "environment": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "device": config.device}}
    (config.out / "knnlm_size.json").write_text(json.dumps(results, indent=2, default=str))
    plot(rows, config.out / "knnlm_size.png", test_tokens=rows[0].test_tokens)
    return results


def pipeline_report(run_dir: Path) -> dict | None:
    """The kNN-LM figures of the pipeline's own evaluation (RUN/report/eval.json), if it made one."""
    path = run_dir / "report" / "eval.json"
    knn = json.loads(path.read_text()).get("knnlm") if path.is_file() else None
    return None if knn is None else {**{name: knn[name] for name in ("tokens", "base_perplexity", "best_lambda",
                                                                      "best_perplexity", "temperature", "k")},
                                     "lambdas_from": knn.get("lambdas_from", "")}


def agreement(results: dict) -> str:
    """Whether the whole train split's row reproduces the pipeline's report, when both scored the same tokens."""
    ref, train = results["pipeline_report"], next(r for r in results["rows"] if r["source"] == TRAIN)
    if ref is None or ref["tokens"] != train["test_tokens"] or ref["temperature"] != train["temperature"]:
        return "the pipeline's report scored other tokens or chose another temperature: not compared"
    ours = train["test_perplexity_at_valid_lambda"] if ref["lambdas_from"] else train["knn_perplexity"]  # its λ's
    same = math.isclose(ref["best_perplexity"], ours, rel_tol=1e-6) and \
        math.isclose(ref["base_perplexity"], train["base_perplexity"], rel_tol=1e-6)
    verdict = "AGREE" if same else "DIFFER"
    return (f"the train row against the pipeline's report (its service, LM worker actors): {verdict} (report: base "
            f"{ref['base_perplexity']:.3f}, kNN-LM {ref['best_perplexity']:.3f} at λ={ref['best_lambda']:g}"
            f"{' chosen on ' + ref['lambdas_from'] if ref['lambdas_from'] else ''}, "
            f"T={ref['temperature']:g})")


def table(rows: list[dict]) -> str:
    lines = ["| keys | source | λ | temperature | kNN-LM ppl | base ppl | change % | λ (valid) | ppl at λ (valid) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['keys']:,} | {r['source']} | {r['best_lambda']:g} | {r['temperature']:g} | "
                     f"{r['knn_perplexity']:.3f} | {r['base_perplexity']:.3f} | {r['change_pct']:+.1f} | "
                     f"{r['valid_lambda']:g} | {r['test_perplexity_at_valid_lambda']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[SizeRow], path: Path, test_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alone = [r for r in rows if r.source == RETRO_ALONE]  # a point beside the curve, not on it
    rows = [r for r in rows if r.source != RETRO_ALONE]
    keys = [r.keys for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in alone:
        ax.semilogx([r.keys], [r.knn_perplexity], marker="D", linestyle="none", color="tab:red",
                    label="kNN-LM, the retro split's keys alone")
    ax.semilogx(keys, [r.knn_perplexity for r in rows], marker="o", label="kNN-LM, best λ on the test tokens")
    ax.semilogx(keys, [r.test_perplexity_at_valid_lambda for r in rows], marker="s", linestyle="--",
                label="kNN-LM, λ chosen on validation text")
    ax.axhline(rows[0].base_perplexity, color="grey", linestyle=":", label="base LM (no retrieval)")
    for r in rows:
        ax.annotate(r.source, (r.keys, r.knn_perplexity), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=8)
    ax.set_xlabel("datastore keys (log scale)")
    ax.set_ylabel(f"test perplexity ({test_tokens} tokens)")
    ax.set_title("kNN-LM perplexity against datastore size (frozen LM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> SizeBenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="pipeline run directory (RUN/data, RUN/lm, ...)")
    parser.add_argument("--out", type=Path, default=SizeBenchConfig.out, help="output directory")
    parser.add_argument("--tokens", type=int, default=SizeBenchConfig.tokens, help="test tokens scored (0: all)")
    parser.add_argument("--valid-tokens", type=int, default=0, help="validation tokens T and λ are chosen on (0: all)")
    parser.add_argument("--prefixes", default=",".join(map(str, SizeBenchConfig.prefixes)),
                        help="comma-separated train-split prefix sizes (those below the train split's size are kept)")
    parser.add_argument("--no-retro", action="store_true", help="leave out the train+retro datastore")
    parser.add_argument("--retro-alone", action="store_true",
                        help="add a store of the retro split's keys alone (content against size)")
    parser.add_argument("--temperature", default="tune",
                        help="'tune' (per size, on validation text, as the pipeline), 'pipeline' (its choice) or T")
    parser.add_argument("--k", type=int, default=0, help="neighbours per token (0: the pipeline's)")
    parser.add_argument("--nprobe", type=int, default=0, help="lists probed (0: the pipeline's; capped at nlist)")
    parser.add_argument("--shards", type=int, default=0, help="shards per datastore (0: the pipeline's)")
    parser.add_argument("--factory", default="auto", help="index factory of the datastores (the pipeline: auto)")
    parser.add_argument("--encode-workers", type=int, default=0, help="encode job actors (0: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass and retrieval")
    parser.add_argument("--device", default=SizeBenchConfig.device, help="where the LM runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.temperature not in ("tune", "pipeline"):
        try:
            if not float(args.temperature) > 0:
                raise ValueError
        except ValueError:
            parser.error(f"--temperature must be 'tune', 'pipeline' or a positive number, got {args.temperature!r}")
    return SizeBenchConfig(run=args.run, out=args.out, tokens=args.tokens, valid_tokens=args.valid_tokens,
                           prefixes=tuple(int(p) for p in args.prefixes.split(",") if p), retro=not args.no_retro,
                           retro_alone=args.retro_alone,
                           temperature=args.temperature, k=args.k, nprobe=args.nprobe, shards=args.shards,
                           factory=args.factory, encode_workers=args.encode_workers, batch_size=args.batch_size,
                           device=args.device, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    log.setLevel(logging.INFO)
    results = run(config)
    s = results["settings"]
    print(f"\n{config.run}: window {results['window']['context_len']}/{results['window']['stride']}, k={s['k']}, "
          f"nprobe={s['nprobe']} (capped at nlist), {s['shards']} shards, temperature: {config.temperature} "
          f"(over {s['temperatures']}); {results['rows'][0]['test_tokens']} test tokens, "
          f"{results['splits']['valid']} validation tokens; {results['seconds']:.0f} s in all\n")
    print(table(results["rows"]))
    base = {r["base_perplexity"] for r in results["rows"]}
    print(f"\nbase perplexity identical for every size: {'YES' if len(base) == 1 else 'NO'}")
    print(agreement(results))
    print(f"wrote {config.out / 'knnlm_size.json'} and {config.out / 'knnlm_size.png'}")
    return 0 if len(base) == 1 and all(math.isfinite(r["knn_perplexity"]) for r in results["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
