"""`retriever-server`: build a datastore, serve shards, run a router, describe, search.

    retriever-server build KEYS.npy --out DIR [--payload NAME=FILE.npy] [--shards S] [--keep-keys]
    retriever-server serve --datastore DIR [--shard I]    # no --shard: every shard and a router
    retriever-server router --shards HOST:PORT,HOST:PORT  # replicas of a shard joined by '|'
    retriever-server info DIR_OR_ADDRESS
    retriever-server search ADDRESS --queries Q.npy -k 10
    retriever-server deploy --datastore DIR --name NAME [--replicas R] [--detached]   # on a Ray cluster
    retriever-server lookup NAME                          # the router address of a deployment
    retriever-server undeploy --name NAME

Global options go before the command: `retriever-server --log-level DEBUG --log-format json serve ...`.
Each command's parser and code live in one module of this package: `build`, `serve` (serve, router),
`query` (info, search) and `ray_commands` (deploy, undeploy, lookup); `common` holds what they share, and
`address_file` the `--address-file` a server writes.

Imports: retrieval, retriever_server
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# gRPC's C core prints its own INFO lines (a failed TLS handshake, say) unless told its documented default,
# ERROR; set before gRPC loads, so that a failed call is the command's one error line (a user's setting wins)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from retriever_server.cli import build, query, ray_commands, serve  # noqa: E402
from retriever_server.cli.common import PROG, CliError, Parser, stdout_to_devnull  # noqa: E402
from retriever_server.datastore.manifest import DatastoreError  # noqa: E402
from retriever_server.logs import JsonFormatter, configure_logging  # noqa: E402
from retriever_server.serving.client import RetrieverError  # noqa: E402
from retriever_server.wire.untrusted import SHOWN_ERROR, one_line  # noqa: E402

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

COMMANDS = {"build": build.run, "serve": serve.run_serve, "router": serve.run_router, "info": query.run_info,
            "search": query.run_search, "deploy": ray_commands.run_deploy, "undeploy": ray_commands.run_undeploy,
            "lookup": ray_commands.run_lookup}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = Parser(prog=PROG, description="Sharded FAISS retrieval datastore over gRPC.")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", metavar="LEVEL",
                        help="DEBUG, INFO (default), WARNING or ERROR, any case; goes before the command")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text, or one JSON object per line; goes before the command")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, title="commands",
                                metavar="COMMAND")

    def command(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {description}")

    build.add_parser(command)
    serve.add_parsers(command)
    query.add_parsers(command)
    ray_commands.add_parsers(command)
    return parser


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error's message (Ray's errors end with the useful one)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def quiet_broken_pipe() -> int:
    """Ends quietly when the reader of stdout has gone (`... | head`): stdout goes to /dev/null so
    Python's own flush at exit raises nothing more."""
    stdout_to_devnull()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `retriever-server`: runs one command; user errors print one line and return 1.

    Errors caught here (bad input, a missing or damaged datastore, a server that did not start, an
    unreachable Ray cluster or server, a file that cannot be written) never show a traceback, and
    output cut short by its reader (`retriever-server info DIR | head`) ends quietly.
    """
    try:
        return run_command(build_parser().parse_args(argv))
    except BrokenPipeError:
        return quiet_broken_pipe()


def last_words(args: argparse.Namespace, line: str) -> None:
    """The command's last line, why it ended, on stderr: a JSON object under --log-format json, as every
    other line there then is (an ERROR record of the logger PROG, whatever --log-level), else the text."""
    if getattr(args, "log_format", "text") == "json":
        line = JsonFormatter().format(logging.LogRecord(PROG, logging.ERROR, __file__, 0, line, None, None))
    print(line, file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Runs a parsed command line."""
    configure_logging(args.log_level, args.log_format)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        return code
    except BrokenPipeError:
        raise
    except (CliError, DatastoreError, RetrieverError, ValueError, RuntimeError, OSError, OverflowError) as err:
        last_words(args, f"{PROG} {args.command}: error: {one_line(last_line(err), SHOWN_ERROR)}")
        return 1
    except KeyboardInterrupt:
        last_words(args, f"{PROG} {args.command}: interrupted")
        return 130
