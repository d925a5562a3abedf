"""RETRO perplexity against the size of the datastore its neighbours come from, the model frozen.

On a run directory laid out as `lm-worker pipeline` / `lm-worker demo` write it (RUN/retro: RETRO
trained with neighbours from RUN/retro-datastore, the train split's chunks), it evaluates the test
split as the pipeline's eval stage does, with neighbours drawn from datastores of growing size and
no retraining:

- "train prefix": the first N chunks of the train split (RUN/retro-source), for each `--prefixes` N
  below its size;
- "train": the whole train split (RUN/retro-datastore when it holds exactly that source, else built);
- "train+retro": the train split's chunks and the retro split's (RUN/data/retro, the text RETRO was
  trained on, which the test split never overlaps), embedded by the pipeline's encode job with the
  same chunk encoder into OUT/retro-chunks. The largest RETRO store the run gives without training
  anything again.

Stores are built as the pipeline builds its own (`build_source`: `auto` factory, the run's shard
count, stored keys) and searched in this process (`InProcessRetriever`) with the pipeline's RETRO
retrieval: k = n_neighbours, its nprobe (capped at a small store's lists), exact re-rank of
8·n_neighbours candidates. Each size reports perplexity with the neighbours and with them withheld
(the same model and tokens; identical for every size). With `--knnlm` (knnlm_size.py's JSON on the
same run) the plot puts kNN-LM's change beside RETRO's; a JSON made on another run, another test split
or another cap on the test tokens (its `--tokens` against this run's) is left out with a warning.

    python benchmarks/retro_size.py --run RUN [--tokens 0] [--prefixes 4000,12000]
        [--knnlm bench_out/knnlm_size/knnlm_size.json] [--out bench_out/retro_size]

Writes OUT/retro_size.json and OUT/quality_size.png (change in perplexity against the tokens of text
each store holds, log x) and prints a markdown table. Sources and datastores are kept in OUT and reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from knnlm_size import built, ensure_datastore, exit_if_missing, joined_source, pipeline_config, ray_for
from tqdm.auto import tqdm

from lm_worker.data.token_store import RETRO_SPLIT, TokenStore
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.encoders.registry import chunk_encoder_for
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.retro_eval import RetroEvalResult, evaluate_retro
from lm_worker.jobs.encode_job import run_encode_job
from lm_worker.jobs.encode_plan import EncodeJobConfig
from lm_worker.models.checkpoint import load_checkpoint
from lm_worker.pipeline.config import PipelineConfig
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.sources.source import SourceInfo, read_source
from retriever_server.datastore.manifest import read_manifest

log = logging.getLogger("retro_size")

TRAIN_PREFIX, TRAIN, TRAIN_RETRO = "train prefix", "train", "train+retro"
RERANK_PER_NEIGHBOUR = 8  # the pipeline re-ranks 8·n_neighbours candidates


@dataclass(frozen=True)
class RetroSizeConfig:
    """What to measure. 0 takes the pipeline's setting for this run (RUN/report/eval.json)."""

    run: Path
    out: Path = Path("bench_out/retro_size")
    tokens: int = 0  # test tokens scored per size (0: the pipeline's eval_tokens, 0 there: all)
    prefixes: tuple[int, ...] = (4_000, 12_000)
    retro: bool = True  # add the train+retro store
    knnlm: Path | None = Path("bench_out/knnlm_size/knnlm_size.json")
    context_len: int = 0  # the evaluation's windows (multiples of the chunk length)
    stride: int = 0
    nprobe: int = 0
    shards: int = 0
    factory: str = "auto"
    encode_workers: int = 0
    batch_size: int = 8
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    progress: bool = True


@dataclass(frozen=True)
class Settings:
    """The pipeline's RETRO settings for the run."""

    n_neighbours: int
    nprobe: int
    shards: int
    context_len: int
    stride: int
    tokens: int
    encoder: str
    encode_workers: int


@dataclass
class RetroRow:
    """Every figure of one datastore size."""

    name: str
    source: str
    chunks: int
    factory: str = ""
    nlist: int = 0
    nprobe: int = 0
    built_seconds: float = 0.0  # 0 when reused
    tokens: int = 0
    perplexity: float = 0.0
    perplexity_without: float = 0.0
    change_pct: float = 0.0
    eval_seconds: float = 0.0


def check_run(config: RetroSizeConfig) -> None:
    """Exits with a message naming every piece of RUN that is missing."""
    needed = {config.run / "retro" / "checkpoint.pt": "the trained RETRO model (RUN/retro)",
              config.run / "lm" / "checkpoint.pt": "the base LM (an LM chunk encoder loads it)",
              config.run / "retro-source" / "source.json": "the train split's RETRO source",
              config.run / "data" / "tokenizer.json": "the corpus tokenizer",
              config.run / "data" / "test" / "documents.json": "the test split"}
    if config.retro:
        needed[config.run / "data" / RETRO_SPLIT / "documents.json"] = "the retro split (or pass --no-retro)"
    exit_if_missing(config.run, needed)


def pipeline_settings(config: RetroSizeConfig) -> Settings:
    """The run's RETRO retrieval and windows (its report's config, else `PipelineConfig`'s defaults)."""
    ran = pipeline_config(config.run, "RETRO's retrieval and windows")
    defaults = asdict(PipelineConfig())

    def setting(name: str):
        return ran.get(name, defaults[name])

    return Settings(n_neighbours=int(setting("n_neighbours")), nprobe=config.nprobe or int(setting("retro_nprobe")),
                    shards=config.shards or int(setting("shards")),
                    context_len=config.context_len or int(setting("context_len")),
                    stride=config.stride or int(setting("stride")), tokens=config.tokens or int(setting("eval_tokens")),
                    encoder=str(setting("retro_encoder")),
                    encode_workers=config.encode_workers or max(int(setting("encode_workers")), 1))


def encode_retro_chunks(config: RetroSizeConfig, settings: Settings, train: SourceInfo) -> SourceInfo:
    """The retro split's chunks as a RETRO source, by the pipeline's encode job with the train source's
    encoder and chunk length (OUT/retro-chunks; finished parts of an earlier run are kept)."""
    job = EncodeJobConfig(kind="retro", data=config.run / "data", split=RETRO_SPLIT,
                          checkpoint=config.run / "lm" / "checkpoint.pt", encoder=settings.encoder,
                          chunk_len=train.chunk_len, workers=settings.encode_workers, progress=config.progress)
    info = run_encode_job(job, config.out / "retro-chunks")
    if info.encoder_fingerprint != train.encoder_fingerprint or info.chunk_len != train.chunk_len:
        raise SystemExit(f"error: the retro split's chunks ({info.encoder_fingerprint}, chunk_len {info.chunk_len}) "
                         f"are not encoded as the train source's ({train.encoder_fingerprint}, {train.chunk_len})")
    return info


def sources(config: RetroSizeConfig, settings: Settings, train: SourceInfo) -> list[tuple[str, str, SourceInfo, Path]]:
    """(name, kind, source, datastore folder) of every size, smallest first."""
    stores = config.out / "stores"
    sizes = []
    for n in sorted(set(config.prefixes)):
        if 0 < n < train.rows:
            folder = stores / f"prefix-{n}"
            sizes.append((f"prefix-{n}", TRAIN_PREFIX, joined_source([train], n, folder / "source"),
                          folder / "datastore"))
    own = config.run / "retro-datastore"
    reuse = config.factory == "auto" and built(own, train, settings.shards, config.factory)
    sizes.append((TRAIN, TRAIN, train, own if reuse else stores / TRAIN / "datastore"))
    if config.retro:
        retro = encode_retro_chunks(config, settings, train)
        union = joined_source([train, retro], train.rows + retro.rows, stores / TRAIN_RETRO / "source")
        sizes.append((TRAIN_RETRO, TRAIN_RETRO, union, stores / TRAIN_RETRO / "datastore"))
    return sizes


def evaluate_size(config: RetroSizeConfig, settings: Settings, name: str, kind: str, datastore: Path, model,
                  encoder, test: TokenStore) -> RetroRow:
    """RETRO's test perplexity with neighbours from one store, and with them withheld."""
    manifest = read_manifest(datastore)
    k = settings.n_neighbours
    nprobe = min(settings.nprobe, manifest.nlist) if manifest.nlist else 0
    retrieval = RetrievalConfig(k=k, nprobe=nprobe, exact_rerank=True,
                                rerank_candidates=min(RERANK_PER_NEIGHBOUR * k, manifest.ntotal))
    evaluation = EvalConfig(context_len=settings.context_len, stride=settings.stride, batch_size=config.batch_size,
                            max_tokens=settings.tokens, retrieval=retrieval)
    row = RetroRow(name, kind, manifest.ntotal, manifest.factory, manifest.nlist, nprobe)
    with InProcessRetriever(datastore, retrieval) as retriever:
        result: RetroEvalResult = evaluate_retro(model, test, retriever, encoder, evaluation, progress=config.progress)
    row.tokens, row.eval_seconds = result.tokens, result.seconds
    row.perplexity, row.perplexity_without = result.perplexity, result.perplexity_without
    row.change_pct = 100.0 * (result.perplexity / result.perplexity_without - 1.0)
    log.info("%s: %d chunks, perplexity %.3f (without neighbours %.3f, %+.1f%%)", name, row.chunks, row.perplexity,
             row.perplexity_without, row.change_pct)
    return row


def run(config: RetroSizeConfig) -> dict:
    """Encodes, builds and evaluates every size; writes OUT/retro_size.json and the plot; returns the results."""
    check_run(config)
    started = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    settings = pipeline_settings(config)
    train = read_source(config.run / "retro-source")
    tokenizer = Tokenizer.load(config.run / "data" / "tokenizer.json")
    encoder = chunk_encoder_for(train.encoder_metadata, tokenizer, lm_checkpoint=config.run / "lm" / "checkpoint.pt",
                                device=config.device)
    with ray_for(config.run):
        sizes = sources(config, settings, train)
        built_s = {name: ensure_datastore(source, store, settings.shards, config.factory, config.progress)
                   for name, _, source, store in sizes}
    model = load_checkpoint(config.run / "retro" / "checkpoint.pt", device=config.device).model.eval()
    test = TokenStore.open(config.run / "data" / "test")
    rows = []
    for name, kind, _, store in tqdm(sizes, desc="datastore sizes", unit="size", disable=not config.progress):
        rows.append(evaluate_size(config, settings, name, kind, store, model, encoder, test))
        rows[-1].built_seconds = built_s[name]
    knnlm = knnlm_beside(config.knnlm, config.run, len(test), settings.tokens)
    results = {"config": {**asdict(config), "run": str(config.run), "out": str(config.out),
                          "knnlm": str(config.knnlm) if config.knnlm else None},
               "settings": asdict(settings), "train_chunks": train.rows, "chunk_len": train.chunk_len,
               "rows": [asdict(r) for r in rows],
               "pipeline_report": pipeline_report(config.run), "seconds": time.perf_counter() - started,
               "environment": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "device": config.device}}
    (config.out / "retro_size.json").write_text(json.dumps(results, indent=2, default=str))
    plot(rows, train.chunk_len, knnlm, config.out / "quality_size.png")
    return results


def capped(max_tokens: int, test_tokens: int) -> int:
    """The test tokens a cap of `max_tokens` (0: none) leaves of a split of `test_tokens`."""
    return min(max_tokens, test_tokens) if max_tokens > 0 else test_tokens


def knnlm_beside(path: Path | None, run_dir: Path, test_tokens: int, max_tokens: int) -> dict | None:
    """knnlm_size.py's results at `path`, when they scored the same test text as this run: the same run
    folder, a test split of `test_tokens` tokens, and the same cap on the tokens scored (`max_tokens`, 0:
    all); else None, with a warning saying why (a default --knnlm may hold another run's)."""
    if path is None or not path.is_file():
        return None
    knnlm = json.loads(path.read_text())
    ran, why = knnlm.get("config", {}), ""
    if not ran.get("run") or Path(ran["run"]).resolve() != Path(run_dir).resolve():
        why = f"it was made on run {ran.get('run')}, not {run_dir}"
    elif knnlm.get("splits", {}).get("test") != test_tokens:
        why = f"its test split had {knnlm.get('splits', {}).get('test')} tokens, this run's {test_tokens}"
    elif capped(ran.get("tokens", 0), test_tokens) != capped(max_tokens, test_tokens):
        why = (f"it scored the first {capped(ran.get('tokens', 0), test_tokens)} test tokens, this run the first "
               f"{capped(max_tokens, test_tokens)} (pass the same --tokens to both)")
    if why:
        log.warning("not plotting kNN-LM beside RETRO from %s: %s", path, why)
        return None
    return knnlm


def pipeline_report(run_dir: Path) -> dict | None:
    """The RETRO figures of the pipeline's own evaluation (RUN/report/eval.json), if it made one."""
    path = run_dir / "report" / "eval.json"
    retro = json.loads(path.read_text()).get("retro") if path.is_file() else None
    return None if retro is None else {name: retro[name] for name in ("tokens", "perplexity", "perplexity_without")}


def agreement(results: dict) -> str:
    """Whether the train row reproduces the pipeline's report (its service and LM worker actors)."""
    ref, train = results["pipeline_report"], next(r for r in results["rows"] if r["source"] == TRAIN)
    if ref is None or ref["tokens"] != train["tokens"]:
        return "the pipeline's report scored other tokens: not compared"
    same = all(math.isclose(ref[name], train[name], rel_tol=1e-6) for name in ("perplexity", "perplexity_without"))
    return (f"the train row against the pipeline's report (its service, LM worker actors): "
            f"{'AGREE' if same else 'DIFFER'} (report: {ref['perplexity']:.3f} with neighbours, "
            f"{ref['perplexity_without']:.3f} without)")


def table(rows: list[dict]) -> str:
    lines = ["| chunks | source | factory, nprobe | RETRO ppl | without neighbours | change % |",
             "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['chunks']:,} | {r['source']} | {r['factory']}, {r['nprobe']} | {r['perplexity']:.3f} | "
                     f"{r['perplexity_without']:.3f} | {r['change_pct']:+.1f} |")
    return "\n".join(lines)


def plot(rows: list[RetroRow], chunk_len: int, knnlm: dict | None, path: Path) -> None:
    """Change in test perplexity against the text a store holds (tokens: a kNN-LM row is one, a RETRO
    row one chunk of `chunk_len`): RETRO's, and kNN-LM's when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.semilogx([r.chunks * chunk_len for r in rows], [r.change_pct for r in rows], marker="o",
                label=f"RETRO, neighbours from the store (a row: a chunk of {chunk_len} tokens)")
    for r in rows:
        ax.annotate(r.source, (r.chunks * chunk_len, r.change_pct), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    if knnlm is not None:
        for r in (r for r in knnlm["rows"] if r["source"] == "retro alone"):  # beside the curve, not on it
            ax.semilogx([r["keys"]], [r["change_pct"]], marker="D", linestyle="none", color="tab:red",
                        label="kNN-LM, the retro split's keys alone")
        k_rows = [r for r in knnlm["rows"] if r["source"] != "retro alone"]
        ax.semilogx([r["keys"] for r in k_rows], [r["change_pct"] for r in k_rows], marker="s",
                    label="kNN-LM, best λ (a row: one token)")
        for r in k_rows:
            ax.annotate(r["source"], (r["keys"], r["change_pct"]), textcoords="offset points", xytext=(0, -12),
                        ha="center", fontsize=8)
    ax.axhline(0.0, color="grey", linestyle=":", label="no retrieval")
    ax.set_xlabel("tokens of text in the datastore (log scale)")
    ax.set_ylabel("test perplexity change against no retrieval (%)")
    ax.set_title("Perplexity against datastore size (models frozen)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> RetroSizeConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="pipeline run directory (RUN/data, RUN/retro, ...)")
    parser.add_argument("--out", type=Path, default=RetroSizeConfig.out, help="output directory")
    parser.add_argument("--tokens", type=int, default=0, help="test tokens scored (0: the pipeline's)")
    parser.add_argument("--prefixes", default=",".join(map(str, RetroSizeConfig.prefixes)),
                        help="comma-separated train-split chunk counts (those below the train split's are kept)")
    parser.add_argument("--no-retro", action="store_true", help="leave out the train+retro store")
    parser.add_argument("--knnlm", type=Path, default=RetroSizeConfig.knnlm,
                        help="knnlm_size.py's JSON on the same run, plotted beside RETRO when it is there")
    parser.add_argument("--context-len", type=int, default=0, help="window (0: the pipeline's)")
    parser.add_argument("--stride", type=int, default=0, help="tokens scored per window (0: the pipeline's)")
    parser.add_argument("--nprobe", type=int, default=0, help="lists probed (0: the pipeline's; capped at nlist)")
    parser.add_argument("--shards", type=int, default=0, help="shards per datastore (0: the pipeline's)")
    parser.add_argument("--factory", default="auto", help="index factory of the stores (the pipeline: auto)")
    parser.add_argument("--encode-workers", type=int, default=0, help="encode job actors (0: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default=RetroSizeConfig.device, help="where RETRO and its encoder run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return RetroSizeConfig(run=args.run, out=args.out, tokens=args.tokens,
                           prefixes=tuple(int(p) for p in args.prefixes.split(",") if p), retro=not args.no_retro,
                           knnlm=args.knnlm, context_len=args.context_len, stride=args.stride, nprobe=args.nprobe,
                           shards=args.shards, factory=args.factory, encode_workers=args.encode_workers,
                           batch_size=args.batch_size, device=args.device, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    log.setLevel(logging.INFO)
    results = run(config)
    s = results["settings"]
    print(f"\n{config.run}: RETRO with {s['n_neighbours']} neighbours, nprobe={s['nprobe']} (capped at nlist), "
          f"exact re-rank of {RERANK_PER_NEIGHBOUR * s['n_neighbours']}, {s['shards']} shards; "
          f"{results['rows'][0]['tokens']} test tokens; the model frozen")
    print(table(results["rows"]))
    print(agreement(results))
    print(f"\nwrote {config.out / 'retro_size.json'} and {config.out / 'quality_size.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
