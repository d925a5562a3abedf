"""`lm-worker`: the LM side of the system. `lm-worker demo` runs the end-to-end demo."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

PROG = "lm-worker"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LM workers that retrieve from the datastore over gRPC.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="encode the stdlib, build 2 shards, serve them, query over gRPC")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the demo keeps what it builds")
    d.add_argument("--keys", type=int, default=12000, help="stdlib chunks in the datastore (>= 9984 for IVFPQ)")
    d.add_argument("--queries", type=int, default=500, help="held-out chunks used as queries")
    return parser


def _snippet(text: str, width: int = 96) -> str:
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" ...")


def _print_report(report) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lm-worker`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from lm_worker.demo import DemoConfig, run_demo

    try:
        report = run_demo(DemoConfig(out=args.out, n_keys=args.keys, n_queries=args.queries))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    _print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
