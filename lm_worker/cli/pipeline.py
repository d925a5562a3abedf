"""`lm-worker pipeline`, `demo` and `retrieval-demo`: the whole LM side on the built-in corpus."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from lm_worker.cli.common import add_ray_address, check_flags, check_folder, check_out_kind, int_in, shown_text
from lm_worker.encoders.registry import ENCODERS
from lm_worker.retrieval.demo import MIN_KEYS

RETRO_INITS = ("lm", "scratch")
RETRO_INIT_HELP = ("lm: retro-fit RETRO onto the trained base LM (frozen; only CCA and the neighbour encoder "
                   "train); scratch: train RETRO's own decoder from random weights")
BUDGET_HELP = ("a split's token budget: whole documents are taken until it is spent, so the last one can "
               "carry the split past it (eval.json records both)")
ENCODER_HELP = "RETRO's frozen chunk encoder: MiniLM, or the base LM's key at each chunk's last token"


def add_parsers(sub) -> None:
    """Adds `pipeline`, `demo` and `retrieval-demo`."""
    pl = sub.add_parser("pipeline", help="prepare, train, encode, build, serve, evaluate: the whole LM side "
                                         "(about 50 minutes on 2 cores)")
    pl.add_argument("--run", type=Path, default=Path("runs/stdlib"))
    pl.add_argument("--train-tokens", type=int, default=800_000, help=BUDGET_HELP)
    pl.add_argument("--heldout-tokens", type=int, default=40_000, help=BUDGET_HELP)
    pl.add_argument("--retro-tokens", type=int, default=3_200_000,
                    help="tokens of documents the LM never sees, which retro-fitted RETRO trains on (0: the LM's own)")
    pl.add_argument("--lm-steps", type=int, default=500)
    pl.add_argument("--retro-steps", type=int, default=1600)
    pl.add_argument("--preset", choices=("tiny", "small", "gpu"), default="small")
    add_ray_address(pl)
    pl.add_argument("--workers", type=int, default=2,
                    help="Ray Data encode actors (at least one) and LM worker actors (0: evaluate in this process)")
    pl.add_argument("--retro-encoder", choices=ENCODERS, default="lm", help=ENCODER_HELP)
    pl.add_argument("--retro-init", choices=RETRO_INITS, default="lm", help=RETRO_INIT_HELP)
    pl.set_defaults(handler=run_pipeline_command)

    d = sub.add_parser("demo", help="the whole pipeline at CPU sizes on the built-in corpus (about 5 minutes on "
                                    "2 cores, --quick under 1; a second run reuses what the first built)")
    d.add_argument("--run", type=Path, help="where the demo keeps what it builds (default runs/demo, "
                                            "runs/demo-quick with --quick)")
    d.add_argument("--quick", action="store_true",
                   help="every stage at the smallest sizes that still show each part working (under a minute)")
    add_ray_address(d)
    d.add_argument("--workers", type=int, default=2, help="Ray Data encode actors and LM worker actors")
    d.add_argument("--retro-encoder", choices=ENCODERS, default="lm", help=ENCODER_HELP)
    d.add_argument("--retro-init", choices=RETRO_INITS, default="lm", help=RETRO_INIT_HELP)
    d.set_defaults(handler=run_demo)

    rd = sub.add_parser("retrieval-demo", help="encode the stdlib, build 2 shards, serve them, query over gRPC")
    rd.add_argument("--out", type=Path, default=Path("runs/retrieval-demo"), help="where it keeps what it builds")
    rd.add_argument("--keys", type=int_in(MIN_KEYS), default=12000,
                    help=f"stdlib chunks in the datastore (at least {MIN_KEYS}, whose {MIN_KEYS // 39} inverted lists "
                         "the examples probe; >= 9984 for SQ8 codes, below that IVF-Flat)")
    rd.add_argument("--queries", type=int, default=500, help="held-out chunks used as queries")
    rd.set_defaults(handler=run_retrieval_demo)


def _print_report(report) -> None:
    print("\n" + report.summary)
    if report.samples is not None:
        print(shown_text(report.samples.read_text()))  # a model's text: no terminal escapes
    written = [report.report / "summary.md", report.eval_json, *report.plots, report.samples]
    print("\n".join(f"written: {p}" for p in written if p is not None))


def _announce(config, stock, what: str) -> None:
    """Says before the work starts what will run, and about how long it takes where `config` runs the
    sizes that time was measured at (`stock`, where it runs and how it shows progress apart)."""
    from dataclasses import replace

    if config != replace(stock, run=config.run, address=config.address, progress=config.progress):
        config = replace(config, expected_minutes=None)  # other sizes, workers or models: not measured
    print(f"{what}: {config.describe()}", flush=True)


def check_run(run: Path) -> None:
    """Refuses a --run that cannot be a run folder: a file, or a folder of one of its parts (a datastore, a
    source, a prepared corpus, a checkpoint folder)."""
    check_folder(run, "--run")
    check_out_kind(run, "--run", ("other files",), "a run folder")


def run_pipeline_command(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from lm_worker.pipeline.config import PipelineConfig
    from lm_worker.pipeline.run import run_pipeline

    check_flags(*((flag, value, value >= 0, ">= 0") for flag, value in (
                    ("--train-tokens", args.train_tokens), ("--heldout-tokens", args.heldout_tokens),
                    ("--retro-tokens", args.retro_tokens), ("--workers", args.workers))),
                ("--lm-steps", args.lm_steps, args.lm_steps >= 1, ">= 1"),
                ("--retro-steps", args.retro_steps, args.retro_steps >= 1, ">= 1"))
    if args.train_tokens == 0 and args.retro_tokens and args.retro_init == "lm":  # scratch: RETRO trains on train
        raise ValueError(f"--train-tokens 0 trains the LM on every training document, which leaves none for "
                         f"--retro-tokens {args.retro_tokens}: give a --train-tokens budget, or --retro-tokens 0")
    check_run(args.run)
    base = PipelineConfig()
    config = replace(base, run=args.run, max_train_tokens=args.train_tokens, max_heldout_tokens=args.heldout_tokens,
                     max_retro_tokens=args.retro_tokens,
                     lm=replace(base.lm, steps=args.lm_steps, preset=args.preset),
                     retro=replace(base.retro, steps=args.retro_steps, preset=args.preset),
                     address=args.address, encode_workers=args.workers, eval_workers=args.workers,
                     retro_encoder=args.retro_encoder, retro_init=args.retro_init, progress=not args.no_progress)
    _announce(config, base, f"pipeline into {config.run}")
    _print_report(run_pipeline(config))


def run_demo(args: argparse.Namespace) -> None:
    from lm_worker.pipeline.config import PipelineConfig
    from lm_worker.pipeline.run import run_pipeline

    check_flags(("--workers", args.workers, args.workers >= 0, ">= 0"))
    sizes = PipelineConfig.quick if args.quick else PipelineConfig.demo
    run = args.run or Path("runs/demo-quick" if args.quick else "runs/demo")
    check_run(run)
    config = sizes(run, address=args.address, encode_workers=args.workers, eval_workers=args.workers,
                   retro_encoder=args.retro_encoder, retro_init=args.retro_init, progress=not args.no_progress)
    _announce(config, sizes(run), f"{'quick ' if args.quick else ''}demo into {config.run}")
    _print_report(run_pipeline(config))


def _snippet(text: str, width: int = 96) -> str:
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" ...")


def run_retrieval_demo(args: argparse.Namespace) -> None:
    from lm_worker.retrieval.demo import DemoConfig, foreign_to_demo, run_demo

    check_flags(("--queries", args.queries, args.queries >= 1, ">= 1"))
    check_folder(args.out, "--out")
    what = "a retrieval-demo folder (source/, datastore/)"
    if not (args.out.is_dir() and {p.name for p in args.out.iterdir()} <= {"source", "datastore"}):
        check_out_kind(args.out, "--out", (), what)
    elif foreign := foreign_to_demo(args.out):  # the demo rewrites source/'s arrays and rebuilds datastore/
        raise ValueError(f"--out {args.out} holds {foreign}, not {what}: give another folder")
    report = run_demo(DemoConfig(out=args.out, n_keys=args.keys, n_queries=args.queries, progress=not args.no_progress))
    info = report.info
    print(f"\ndatastore {report.datastore}: {info.ntotal} chunks, {info.factory}, {info.metric}, "
          f"{len(info.shards)} shards, version {info.datastore_version}")
    print(f"router {report.router}\n")
    print("| nprobe | recall@10 | recall@10, exact re-rank of 100 |")
    print("|---:|---:|---:|")
    for nprobe, (plain, reranked) in report.recall.items():
        print(f"| {nprobe} | {plain:.3f} | {reranked:.3f} |")
    for query, neighbours in report.examples:
        print(f"\nheld-out chunk: {_snippet(query)}")
        for n in neighbours:
            print(f"  {n.distance:7.4f}  {n.document:<40} {_snippet(n.text, 70)}")
