"""What every `retriever-server` command shares: one-line errors, option groups, address files."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from retriever_server.cluster.cpus import parse_cpus, pin
from retriever_server.cluster.supervisor import orphaned
from retriever_server.security.config import ClientSecurity, ServerSecurity
from retriever_server.serving.failover import FailoverPolicy
from retriever_server.wire.request import Limits

PROG = "retriever-server"
INT32_MAX = (1 << 31) - 1  # what the wire's int32 fields (max_k, replica) and gRPC's int options hold
MAX_REQUEST_MB = 2047  # gRPC's receive limit is an int32 of bytes (2 GiB less 1 byte at most)
MAX_THREADS = 4096
log = logging.getLogger(__name__)
RAY_ADDRESS_HELP = ("Ray cluster to run on: this address (auto: the one `ray start` made on this machine), else "
                    "RAY_ADDRESS (as under `ray job submit`), else a new local cluster that ends with the command; "
                    "a cluster that does not answer fails within RETRIEVER_RAY_CONNECT_TIMEOUT seconds (30)")


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with no usage dump."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cpus_arg(text: str) -> tuple[int, ...]:
    """argparse type for `--cpus 2,3` / `--cpus 0-3`."""
    try:
        return parse_cpus(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_in(text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} must be in [{low}, {high}], got {value}")
    return value


def port_arg(text: str) -> int:
    """argparse type for a port to bind: 0 (a free one) to 65535."""
    return _int_in(text, 0, 65535, "a port")


def optional_port_arg(text: str) -> int:
    """argparse type for a port that may be off: -1 (off), 0 (a free one) to 65535."""
    return _int_in(text, -1, 65535, "a port (-1: off)")


def non_negative_int(text: str) -> int:
    """argparse type for a number of 0 or more (a seed)."""
    return _int_in(text, 0, (1 << 32) - 1, "the number")


def positive_int(text: str) -> int:
    """argparse type for a count of at least 1."""
    return _int_in(text, 1, 1 << 31, "the count")


def int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high]; its error names `what` and the value given."""

    def parse(text: str) -> int:
        return _int_in(text, low, high, what)

    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def non_negative_float(text: str) -> float:
    """argparse type for seconds or milliseconds: a finite number of 0 or more (not nan or inf)."""
    if not 0 <= (value := _float(text)) < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type for CPUs or seconds that must be more than 0: finite (not nan or inf)."""
    if not 0 < (value := _float(text)) < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def key_value(text: str) -> tuple[str, str]:
    """argparse type for NAME=VALUE."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a name before '=', got {text!r}")
    return key, value


def add_limits(p: argparse.ArgumentParser) -> None:
    """--max-k, --max-batch, --max-request-mb and --max-inflight, with the server defaults."""
    d, count = Limits(), int_in(1, INT32_MAX, "the count")
    p.add_argument("--max-k", type=count, default=d.max_k, help="largest k a request may ask for")
    p.add_argument("--max-batch", type=count, default=d.max_batch, help="most queries in one request")
    p.add_argument("--max-request-mb", type=int_in(1, MAX_REQUEST_MB, "MiB"), default=d.max_request_bytes >> 20,
                   help=f"largest request, MiB: 1 to {MAX_REQUEST_MB} ({MAX_REQUEST_MB - 1} "
                        "where shards take 1 MiB more than their router)")
    p.add_argument("--max-inflight", type=count, default=d.max_inflight, help="requests served at once")


def check_room_for_shards(args: argparse.Namespace) -> None:
    """CliError for a --max-request-mb that leaves the shards behind a router no room for the 1 MiB more
    they take (what the router adds to a request it forwards) under gRPC's limit."""
    from retriever_server.serving.router import FORWARD_SLACK

    slack = FORWARD_SLACK >> 20
    if args.max_request_mb > MAX_REQUEST_MB - slack:
        raise CliError(f"--max-request-mb {args.max_request_mb}: with shards behind a router at most "
                       f"{MAX_REQUEST_MB - slack} (each shard takes {slack} MiB more than the router)")


def add_threads(p: argparse.ArgumentParser, help_text: str) -> None:
    """--threads: FAISS OpenMP threads, 0 (FAISS's default) to MAX_THREADS."""
    count = int_in(0, MAX_THREADS, "a thread count (0: FAISS's default)")
    p.add_argument("--threads", type=count, default=0, help=help_text)


def add_server_security(p: argparse.ArgumentParser, reread: bool = True) -> None:
    """--tls-cert, --tls-key, --tls-ca, --auth-token-file, --insecure and --reflection of a server."""
    g = p.add_argument_group("security (a non-loopback --host needs TLS and a token, or --insecure)")
    g.add_argument("--tls-cert", type=Path, help="the server's certificate chain (PEM): TLS on the port")
    g.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    g.add_argument("--tls-ca", type=Path, help="require client certificates signed by this CA (mutual TLS)")
    g.add_argument("--auth-token-file", type=Path,
                   help="accepted bearer tokens, one per line; calls must carry one (health excepted). " + (
                       "Re-read when it changes or on SIGHUP, as are the TLS files" if reread else
                       "Read once, with the TLS files: the actors serve copies of them; deploy again to rotate"))
    g.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback address without TLS or without a token anyway")
    g.add_argument("--reflection", action="store_true", help="offer gRPC server reflection (off by default)")


def server_security_of(args: argparse.Namespace) -> ServerSecurity:
    """The `ServerSecurity` of a server command's flags."""
    return ServerSecurity(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
                          token_file=args.auth_token_file, insecure=args.insecure, reflection=args.reflection)


def add_client_security(p: argparse.ArgumentParser, prefix: str = "", what: str = "the server") -> None:
    """--tls-ca, --tls-cert, --tls-key, --tls-server-name and --auth-token-file of a client (with `prefix`)."""
    g = p.add_argument_group(f"security of the calls to {what}")
    g.add_argument(f"--{prefix}tls-ca", type=Path, help=f"verify {what} with this CA (PEM): TLS on")
    g.add_argument(f"--{prefix}tls-cert", type=Path, help="this client's certificate, for mutual TLS (PEM)")
    g.add_argument(f"--{prefix}tls-key", type=Path, help="the private key of that certificate (PEM)")
    g.add_argument(f"--{prefix}tls-server-name",
                   help="the name the server's certificate carries, when it is not the host dialled")
    g.add_argument(f"--{prefix}auth-token-file", type=Path,
                   help="the bearer token to send (the file's first line); default: RETRIEVER_AUTH_TOKEN")
    g.add_argument(f"--{prefix}allow-plaintext-token", action="store_true",
                   help="send the token without TLS to an address that is not loopback (refused otherwise: "
                        "anyone on the way could read it)")


def client_security_of(args: argparse.Namespace, prefix: str = "") -> ClientSecurity:
    """The `ClientSecurity` of a command's client flags (with `prefix`)."""
    values, dest = vars(args), prefix.replace("-", "_")
    return ClientSecurity(tls_ca=values[f"{dest}tls_ca"], tls_cert=values[f"{dest}tls_cert"],
                          tls_key=values[f"{dest}tls_key"], server_name=values[f"{dest}tls_server_name"],
                          token_file=values[f"{dest}auth_token_file"],
                          plaintext_token=values[f"{dest}allow_plaintext_token"], flags=prefix)


def add_server(p: argparse.ArgumentParser, metrics: bool = True, health_note: str = "") -> None:
    """Where a server listens, how it is secured, how it stops, and its limits; `health_note` ends the
    help of --health-port."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_arg, default=0, help="port to bind; 0 picks a free one")
    if metrics:
        p.add_argument("--metrics-port", type=optional_port_arg, default=0,
                       help="Prometheus /metrics port; 0 picks a free one, -1 turns metrics off")
        p.add_argument("--metrics-host", default="127.0.0.1",
                       help="address the metrics port binds (default 127.0.0.1: off other machines)")
    p.add_argument("--health-port", type=optional_port_arg, default=-1,
                   help="also answer health checks, and nothing else, in plaintext on this port (for probes that "
                        "cannot do TLS); 0 picks a free one, -1 (default) none" + health_note)
    p.add_argument("--health-host", default="127.0.0.1",
                   help="address the health port binds (default 127.0.0.1; 0.0.0.0 for the kubelet's probes)")
    p.add_argument("--address-file", type=Path, help="write the bound address here as JSON once listening")
    p.add_argument("--cpus", type=cpus_arg, default=(),
                   help="run on these cores only, e.g. 2,3 or 2-5 (default: any); with --datastore alone, "
                        "every shard and the router")
    p.add_argument("--grace", type=non_negative_float, default=5.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--drain-delay", type=non_negative_float, default=1.0,
                   help="seconds between health turning NOT_SERVING on SIGTERM and the port closing")
    add_limits(p)
    add_server_security(p)


def add_failover(p: argparse.ArgumentParser) -> None:
    """--hedge-delay-ms and --no-hedge: how the router moves between a shard's replicas."""
    g = p.add_argument_group("failover between a shard's replicas")
    g.add_argument("--hedge-delay-ms", type=non_negative_float,
                   help="send a second attempt to the next replica when the first has not answered in this "
                        "long (default: the p95 of the shard's recent answers, within 20 ms to 1 s)")
    g.add_argument("--no-hedge", action="store_true", help="no second attempts: fail over on errors and "
                   "attempt timeouts alone")


def check_failover(args: argparse.Namespace) -> None:
    """CliError for --hedge-delay-ms with --no-hedge: a delay for hedges that are never sent."""
    if args.no_hedge and args.hedge_delay_ms is not None:
        raise CliError("--hedge-delay-ms and --no-hedge: a hedge delay is for hedges, which --no-hedge turns off; "
                       "give one of them")


def failover_of(args: argparse.Namespace) -> FailoverPolicy:
    """The `FailoverPolicy` of --hedge-delay-ms and --no-hedge (checked: `check_failover`)."""
    check_failover(args)
    delay = None if args.hedge_delay_ms is None else args.hedge_delay_ms / 1000
    return FailoverPolicy(hedge=not args.no_hedge, hedge_delay_s=delay)


def failover_args(args: argparse.Namespace) -> list[str]:
    """--hedge-delay-ms and --no-hedge as given (checked: `check_failover`), to pass on to a router process."""
    check_failover(args)
    given = [] if args.hedge_delay_ms is None else ["--hedge-delay-ms", str(args.hedge_delay_ms)]
    return given + (["--no-hedge"] if args.no_hedge else [])


def health_port_of(args: argparse.Namespace) -> int | None:
    """--health-port as servers take it: None for -1 (none)."""
    return None if args.health_port < 0 else args.health_port


def limits_of(args: argparse.Namespace) -> Limits:
    """The `Limits` of the --max-* flags."""
    return Limits(max_k=args.max_k, max_batch=args.max_batch, max_request_bytes=args.max_request_mb << 20,
                  max_inflight=args.max_inflight)


def metrics_port_of(args: argparse.Namespace) -> int | None:
    """--metrics-port as servers take it: None for -1 (off)."""
    return None if args.metrics_port < 0 else args.metrics_port


@contextlib.contextmanager
def metrics_port_named(args: argparse.Namespace) -> Iterator[None]:
    """Rewords a failed bind of the metrics port (an OSError from the socket, with an errno and no file
    name) as a CliError naming --metrics-port, as the gRPC and health ports' messages name theirs."""
    try:
        yield
    except OSError as err:
        if err.errno is None or err.filename is not None or args.metrics_port < 0:
            raise
        raise CliError(f"--metrics-port {args.metrics_port}: could not bind the metrics port {args.metrics_host}:"
                       f"{args.metrics_port} ({err.strerror or err})") from None


def with_metrics(address: str, metrics_port: int | None) -> str:
    """'ADDRESS (metrics on port N)', or the address alone."""
    return address + (f" (metrics on port {metrics_port})" if metrics_port else "")


def pin_to_cpus(args: argparse.Namespace) -> None:
    """Runs this server on the cores of --cpus, if given (CliError where the system refuses them)."""
    if args.cpus:
        try:
            pin(args.cpus)
        except ValueError as err:
            raise CliError(f"--cpus: {err}") from None


def stdout_to_devnull() -> None:
    """Points stdout at /dev/null once its reader has gone, so that Python's own flush at exit (of what
    could not be written) raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != sys.stdout.fileno():
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: unwinds like Ctrl-C, so a deployment stops and every child drains."""
    raise KeyboardInterrupt


async def run_until_signal(running, args: argparse.Namespace) -> None:
    """Announces a started server, serves until SIGTERM or SIGINT, then drains it.

    Raises:
        CliError: the server failed to become ready (a shard that cannot load, shards that are not
            one datastore).
    """
    from retriever_server.cli.address_file import remove_address, write_address  # which imports this module

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.reload_security)
    write_address(args.address_file, running.address, running.metrics_port, health_port=running.health_port)
    try:
        print(f"listening on {with_metrics(running.address, running.metrics_port)}", flush=True)
    except BrokenPipeError:  # `... | true`: nobody learns where it listens, so nothing may stay listening
        stdout_to_devnull()
        await running.drain(0, 0)
        remove_address(args.address_file)
        raise CliError("stdout was closed before the server could say where it listens (its reader is gone): "
                       "stopped") from None
    stopper = asyncio.ensure_future(stop.wait())
    watcher = asyncio.ensure_future(stop_when_orphaned(stop))
    done, _ = await asyncio.wait({stopper, running.ready}, return_when=asyncio.FIRST_COMPLETED)
    if running.ready in done and running.ready.exception() is not None:
        await running.drain(0)
        remove_address(args.address_file)  # no server behind it any more
        raise CliError(str(running.ready.exception()))
    await stopper
    if watcher.done():  # the parent is gone: nothing routes here any more, so no grace either
        await running.drain(0, 0)
        remove_address(args.address_file)
        return
    watcher.cancel()
    await running.drain(args.grace, args.drain_delay)
    remove_address(args.address_file)


async def stop_when_orphaned(stop: asyncio.Event, poll_s: float = 0.5) -> None:
    """Sets `stop` once the process that started this one as a supervised child (`serve`, a
    LocalDeployment) has died, however it died: its children never outlive it."""
    while not stop.is_set():
        if orphaned():
            log.warning("the process that started this server is gone: stopping")
            stop.set()
            return
        await asyncio.sleep(poll_s)
