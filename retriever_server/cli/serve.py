"""`retriever-server serve` and `router`: one shard, a router, or a whole datastore on this machine."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from retriever_server.cli.address_file import prepare_address_file, remove_address, write_address
from retriever_server.cli.common import (
    INT32_MAX,
    CliError,
    add_client_security,
    add_failover,
    add_server,
    add_threads,
    check_failover,
    check_room_for_shards,
    client_security_of,
    failover_args,
    failover_of,
    health_port_of,
    int_in,
    limits_of,
    metrics_port_named,
    metrics_port_of,
    pin_to_cpus,
    positive_float,
    positive_int,
    run_until_signal,
    server_security_of,
    with_metrics,
)
from retriever_server.cluster.launcher import LocalDeployment
from retriever_server.datastore.manifest import read_manifest
from retriever_server.security.config import ServerSecurity
from retriever_server.security.tls import check_pem
from retriever_server.serving.fanout import parse_shards
from retriever_server.serving.router import FORWARD_SLACK, RouterConfig, start_router
from retriever_server.serving.shard import ShardOptions
from retriever_server.serving.shard_server import ShardServerConfig, start_shard_server

# The --health-host values whose port answers on 127.0.0.1, where serve checks its children (not [::1],
# 127.0.0.2, or "::", which takes IPv4 only where the system maps it).
PROBED_HEALTH_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")
STARTUP_TIMEOUT_S = 300.0  # --startup-timeout's default
STOP_SLACK_S = 5.0  # what a stopping process gets beyond its --drain-delay and --grace before it is killed


def add_parsers(command) -> None:
    """Adds `serve` and `router` to the command parsers."""
    s = command("serve", "serve one shard, or every shard and a router",
                "With --shard, serves that shard. Without it, runs every shard (x --replicas) and a router "
                "over them as local processes, restarting any that exits (with backoff, on its port); "
                "--port, --metrics-port and --address-file then apply to the router, and SIGTERM drains "
                "them all.")
    s.add_argument("--datastore", type=Path, required=True, help="datastore directory (holds manifest.json)")
    s.add_argument("--shard", type=int, help="shard number; omit to serve the whole datastore locally")
    s.add_argument("--replica", type=int_in(0, INT32_MAX, "a replica number"), default=0,
                   help="replica number reported by GetInfo")
    s.add_argument("--replicas", type=positive_int, default=1, help="without --shard: replicas per shard")
    s.add_argument("--gpu", action="store_true", help="hold the index on the GPU (faiss GPU build)")
    s.add_argument("--no-mmap", action="store_true", help="read the index into memory instead of mapping it")
    s.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256, at load")
    s.add_argument("--no-restart", action="store_true", help="without --shard: do not restart a process that "
                   "exits; stop when the router or every replica of a shard has exited")
    s.add_argument("--startup-timeout", type=positive_float, default=STARTUP_TIMEOUT_S,
                   help="without --shard: seconds from the start within which every shard, then the router, must "
                        "turn SERVING, one deadline for them all (default 300; a large datastore's sha256 check "
                        "takes longer, or give --no-verify)")
    add_threads(s, "FAISS OpenMP threads per shard (0: with --cpus, one per core given; with --datastore alone, "
                   "the machine's cores shared among the shard processes; else FAISS's default)")
    s.add_argument("--no-pin-shards", action="store_true",
                   help="without --shard: let each shard process run on any of the cores (default: with no more "
                        "shard processes than cores, each runs on its own share of them, which keeps its caches "
                        "warm)")
    add_server(s, health_note=". With --datastore alone, this is the router's, and even with -1 the router "
                              "answers health checks on a port it picks on 127.0.0.1, which serve watches (the "
                              "shards pick theirs there too); the router's port is in --address-file as "
                              "health_port")
    add_failover(s)

    r = command("router", "serve the Retriever API in front of shards")
    r.add_argument("--shards", required=True, help="HOST:PORT per shard, comma-separated; replicas joined by |")
    add_server(r)
    add_failover(r)
    add_client_security(r, "shard-", "the shards")


def shard_threads(args: argparse.Namespace) -> int:
    """A shard process's FAISS threads: --threads, else one per core of --cpus (FAISS, loaded before the
    process is pinned, counts every core of the machine), else 0 (FAISS's default)."""
    return args.threads or len(args.cpus or ())


def run_serve(args: argparse.Namespace) -> int:
    """Serves --shard, or (without it) the whole datastore as local processes."""
    shards = len(read_manifest(args.datastore).shards)  # fail fast, before binding anything
    if args.shard is not None and not 0 <= args.shard < shards:
        raise CliError(f"--shard {args.shard} out of range: {args.datastore} has {shards} shards")
    security = server_security_of(args)
    security.check(args.host)  # before loading anything
    check_pem(security.tls_cert, security.tls_key, security.tls_ca)  # a mismatch found before any process starts
    if args.shard is None:
        check_local(args)
    else:
        check_lone_shard(args)
    prepare_address_file(args.address_file)
    if args.shard is None:
        return _serve_local(args, security)
    pin_to_cpus(args)
    config = ShardServerConfig(
        datastore=args.datastore, shard=args.shard, host=args.host, port=args.port,
        metrics_port=metrics_port_of(args), replica=args.replica, limits=limits_of(args),
        options=ShardOptions(mmap=not args.no_mmap, verify=not args.no_verify, gpu=args.gpu,
                             threads=shard_threads(args)),
        security=security, metrics_host=args.metrics_host, health_port=health_port_of(args),
        health_host=args.health_host,
    )

    async def main() -> None:
        with metrics_port_named(args):
            running = await start_shard_server(config, wait_loaded=False)
        await run_until_signal(running, args)

    asyncio.run(main())
    return 0


def check_local(args: argparse.Namespace) -> None:
    """Without --shard, before anything starts: CliError for a --max-request-mb that leaves no room for a
    shard's 1 MiB more, a --health-host the launcher cannot probe the router's health port on (it asks
    127.0.0.1: a loopback or wildcard address), conflicting failover flags, or a --replica number (one
    shard's server's)."""
    check_room_for_shards(args)
    check_failover(args)
    if args.replica:
        raise CliError(f"--replica {args.replica} numbers one shard's server (with --shard); without --shard, "
                       "--replicas says how many of each shard to start")
    if args.health_port >= 0 and args.health_host not in PROBED_HEALTH_HOSTS:
        raise CliError(f"--health-host {args.health_host}: without --shard the router's health port must "
                       "answer on 127.0.0.1, where serve checks it: give 127.0.0.1 (or localhost), or 0.0.0.0, or "
                       "run each shard and a `router`")


def check_lone_shard(args: argparse.Namespace) -> None:
    """With --shard: CliError for the flags of a whole local deployment (its replicas, their supervision and
    start-up deadline, the cores they share, the router's failover), which a lone shard would ignore."""
    given = [flag for flag, is_given in (
        ("--replicas", args.replicas != 1), ("--no-restart", args.no_restart),
        ("--startup-timeout", args.startup_timeout != STARTUP_TIMEOUT_S), ("--no-pin-shards", args.no_pin_shards),
        ("--hedge-delay-ms", args.hedge_delay_ms is not None), ("--no-hedge", args.no_hedge)) if is_given]
    if given:
        many = len(given) > 1
        raise CliError(f"{' and '.join(given)} {'apply' if many else 'applies'} only without --shard (to the shards "
                       f"and the router serve starts then): --shard {args.shard} serves that shard alone; drop "
                       f"{'them' if many else 'it'}")


def child_args(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The flags `serve` without --shard passes on: (to each shard server, to the router).

    The router takes --metrics-port and a fixed --health-port as given; shards get an ephemeral metrics
    port, or none with -1, and
    a request limit FORWARD_SLACK (1 MiB) above the router's, so that nothing the router accepts is refused
    by a shard.
    """
    common = ["--grace", str(args.grace), "--drain-delay", str(args.drain_delay), "--max-k", str(args.max_k),
              "--max-batch", str(args.max_batch), "--max-inflight", str(args.max_inflight),
              "--metrics-host", args.metrics_host]
    shard = [*common, "--metrics-port", "-1" if args.metrics_port < 0 else "0", "--threads", str(args.threads),
             "--max-request-mb", str(args.max_request_mb + (FORWARD_SLACK >> 20))]  # as `shard_limits` does
    shard += ["--gpu"] if args.gpu else []
    shard += ["--no-mmap"] if args.no_mmap else []
    shard += ["--no-verify"] if args.no_verify else []
    health = ["--health-port", str(args.health_port), "--health-host", args.health_host] if args.health_port >= 0 \
        else []  # else one the router picks on 127.0.0.1, as the shards do
    return tuple(shard), (*common, "--metrics-port", str(args.metrics_port), "--max-request-mb",
                          str(args.max_request_mb), *health, *failover_args(args))


def _announce(deployment: LocalDeployment, address_file: Path | None) -> None:
    """Prints every process's address (and metrics port) and writes the router's address file."""
    for process in deployment.processes():
        print(f"{process.name}: {with_metrics(process.address, process.metrics_port)}")
    print(f"logs in {deployment.log_dir}")
    router = deployment.router
    print(f"serving at {router.address} (the router; Ctrl-C or SIGTERM stops every process)", flush=True)
    write_address(address_file, router.address, router.metrics_port, shards=deployment.shard_addresses,
                  health_port=router.health_port)


def _interrupt_once(signum: int, frame: object) -> None:
    """SIGTERM or SIGINT: unwinds like Ctrl-C, once; from then on both are ignored, so that the stop it
    starts (each process given --drain-delay and --grace) is not cut short by a second one."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _serve_local(args: argparse.Namespace, security: ServerSecurity) -> int:
    shard_args, router_args = child_args(args)
    deployment = LocalDeployment(args.datastore, replicas=args.replicas, host=args.host, router_port=args.port,
                                 extra_args=shard_args, router_args=router_args, log_level=args.log_level,
                                 log_format=args.log_format, cpus=args.cpus, security=security,
                                 restart=not args.no_restart, pin_shards=not args.no_pin_shards,
                                 stop_timeout_s=args.drain_delay + args.grace + STOP_SLACK_S,
                                 startup_timeout_s=args.startup_timeout)
    signal.signal(signal.SIGTERM, _interrupt_once)
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGHUP, lambda *_: deployment.reload_security())  # passed on, as each server takes it
    deployment.start()  # on an interrupt here, start() stops what it started
    try:
        _announce(deployment, args.address_file)
        why = deployment.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a clean stop
        deployment.stop()
        return 0
    except BaseException:  # stdout's reader gone (`serve | head -1`), or anything else: nothing left running
        deployment.stop()
        raise
    finally:
        remove_address(args.address_file)
    raise CliError(f"stopped: {why}")


def run_router(args: argparse.Namespace) -> int:
    """Serves a router in front of the --shards addresses."""
    pin_to_cpus(args)
    try:
        shards = tuple(tuple(s) for s in parse_shards(args.shards))
    except ValueError as err:
        raise CliError(str(err)) from None
    config = RouterConfig(shards=shards, host=args.host, port=args.port, metrics_port=metrics_port_of(args),
                          limits=limits_of(args), security=server_security_of(args),
                          shard_security=client_security_of(args, "shard-"), metrics_host=args.metrics_host,
                          health_port=health_port_of(args), health_host=args.health_host,
                          failover=failover_of(args))
    config.security.check(args.host)
    config.shard_security.check()
    prepare_address_file(args.address_file)

    async def main() -> None:
        with metrics_port_named(args):
            running = await start_router(config, wait_ready=False)
        await run_until_signal(running, args)

    asyncio.run(main())
    return 0
