"""`lm-worker`: the LM side of the system.

    lm-worker prepare  --out RUN/data [--corpus stdlib|DIR|FILE.jsonl]     # split, tokenizer, tokens
                       [--max-retro-tokens N]                              # + text the LM never sees
    lm-worker train    --kind lm|retro --data RUN/data --out RUN/lm        # checkpoints, loss plot
                       [--init-from RUN/lm --split retro]                  # RETRO retro-fitted onto the LM
    lm-worker encode   knnlm|retro --data RUN/data --out RUN/knnlm-source  # datastore sources
    lm-worker build    RUN/knnlm-source --out RUN/knnlm-datastore          # the Ray build job
    lm-worker neighbours --source RUN/retro-source --data RUN/data --datastore RUN/retro-datastore
    lm-worker eval     --data RUN/data --lm CKPT --knnlm-datastore DS [--retro CKPT --retro-datastore DS]
    lm-worker generate --checkpoint CKPT --data RUN/data --datastore DS --prompt TEXT [--strategy beam]
    lm-worker attention --retro CKPT --data RUN/data --datastore DS --out attention.png
    lm-worker pipeline --run RUN                                           # all of the above, resumable
    lm-worker demo [--quick]                      # the pipeline at demo sizes, on a local Ray cluster
    lm-worker retrieval-demo                      # MiniLM chunks of the stdlib, 2 shards, recall vs brute force

Where a command retrieves, `--target HOST:PORT` (a router, or shards comma-separated) uses running
servers, and `--datastore DIR` serves that datastore locally (every shard and a router) for the
duration of the command. Each command's parser and code live in one module of this package:
`prepare` (prepare, train), `sources` (encode, build, neighbours), `evaluate` (eval), `generate`
(generate, attention) and `pipeline` (pipeline, demo, retrieval-demo); `common` holds what they share.

Imports: lm_worker, retriever_server.cluster.launcher
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import threading

# gRPC's C core prints its own INFO lines (a failed TLS handshake, say) unless told its documented default,
# ERROR; set before gRPC loads, so that a failed call is the command's one error line (a user's setting wins)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from lm_worker.cli import evaluate, generate, pipeline, prepare, sources  # noqa: E402
from lm_worker.cli.common import PROG, Parser, retrieval_flags  # noqa: E402

log = logging.getLogger(__name__)
FAMILIES = {"eval": ("knnlm-", "retro-"), "generate": ("",)}  # commands whose servers may share this machine


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = Parser(prog=PROG, description="LM workers that retrieve from the datastore over gRPC.")
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO",
                        metavar="LEVEL", help="DEBUG, INFO (default), WARNING or ERROR; goes before the command")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars; goes before the command")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    prepare.add_parsers(sub)
    sources.add_parsers(sub)
    evaluate.add_parser(sub)
    generate.add_parsers(sub)
    pipeline.add_parsers(sub)
    return parser


def servers_on_this_machine(args: argparse.Namespace) -> bool:
    """Whether the command retrieves from servers on this machine: a datastore it serves itself
    (--datastore) or a loopback --target."""
    from lm_worker.retrieval.service import is_loopback

    for family in FAMILIES.get(args.command, ()):
        flags = retrieval_flags(args, family)
        if flags.datastore is not None or (flags.target and is_loopback(flags.target)):
            return True
    return False


def share_cores_with_servers(args: argparse.Namespace) -> None:
    """While eval or generate compute, the servers they query on this machine search on the same
    cores: the model's OpenMP threads then sleep between operations instead of spinning for the
    cores the servers need (OMP_WAIT_POLICY=PASSIVE, set before torch loads; a user's own setting
    wins). With remote servers the default spin-then-sleep is faster and stays."""
    if args.command in FAMILIES and "OMP_WAIT_POLICY" not in os.environ and servers_on_this_machine(args):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        log.info("servers share this machine's cores: OMP_WAIT_POLICY=PASSIVE for the model's threads")


def hide_library_progress_bars() -> None:
    """--no-progress for the bars Hugging Face libraries draw too (transformers' "Loading weights" as the
    MiniLM encoder loads): HF_HUB_DISABLE_PROGRESS_BARS, which they read on import, here and in the
    processes this command starts, and their switches where they are imported already."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:  # it read the variable on import, and transformers reads its state
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def stdout_is_gone() -> bool:
    """Whether stdout's reader has gone: a write left in its buffer fails again as it is flushed, and with
    nothing left there (python -u) a pipe without its reader polls as an error. A BrokenPipeError of another
    pipe leaves stdout as it was."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no such descriptor (a captured stdout), or no poll here
        return False


def quiet_broken_pipe() -> int:
    """Ends quietly when the reader of stdout has gone (`... | head`)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lm-worker`: runs one command; user errors print one line and return 1, and
    output cut short by its reader (`lm-worker --help | head`) ends quietly."""
    try:
        return run_command(build_parser().parse_args(argv))
    except BrokenPipeError as err:
        if stdout_is_gone():
            return quiet_broken_pipe()
        print(f"{PROG}: error: {err}", file=sys.stderr)  # another pipe's (the parser's own is stdout)
        return 1


def run_command(args: argparse.Namespace) -> int:
    """Runs a parsed command line."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if args.no_progress:
        hide_library_progress_bars()
    from lm_worker.retrieval.errors import SERVICE_ERRORS, shown

    # SIGTERM (`kill`, `ray job stop`) unwinds as Ctrl-C does: jobs stopped, "interrupted", exit 130
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        share_cores_with_servers(args)  # reads the targets: a bad one is the command's error line
        args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, *SERVICE_ERRORS) as err:
        if isinstance(err, BrokenPipeError) and stdout_is_gone():
            raise  # stdout's reader has gone: `main` ends quietly
        print(f"{PROG} {args.command}: error: {shown(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread and previous is not None:  # None: a handler not set from Python, left as it was
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
