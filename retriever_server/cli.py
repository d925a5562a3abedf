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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np

from retriever_server.logs import configure_logging
from retriever_server.request import Limits

PROG = "retriever-server"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
log = logging.getLogger(__name__)


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _cpus(text: str) -> tuple[int, ...]:
    from retriever_server.cpus import parse_cpus

    try:
        return parse_cpus(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def _add_limits(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.add_argument("--max-k", type=int, default=d.max_k, help="largest k a request may ask for")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most queries in one request")
    p.add_argument("--max-request-mb", type=int, default=d.max_request_bytes >> 20, help="largest request, MiB")
    p.add_argument("--max-inflight", type=int, default=d.max_inflight, help="requests served at once")


def _add_server(p: argparse.ArgumentParser, metrics: bool = True) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    if metrics:
        p.add_argument("--metrics-port", type=int, default=0,
                       help="Prometheus /metrics port; 0 picks a free one, -1 turns metrics off")
    p.add_argument("--address-file", type=Path, help="write the bound address here as JSON once listening")
    p.add_argument("--cpus", type=_cpus, default=(),
                   help="run on these cores only, e.g. 2,3 or 2-5 (default: any); with --datastore alone, "
                        "every shard and the router")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--drain-delay", type=float, default=1.0,
                   help="seconds between health turning NOT_SERVING on SIGTERM and the port closing")
    _add_limits(p)


def _add_ray_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address; default: RAY_ADDRESS, else the cluster on this machine")
    p.add_argument("--namespace", default="retrieval-datastore", help="Ray namespace of the deployment's actors")


def _add_deploy(command) -> None:
    d = command("deploy", "serve a datastore on a Ray cluster as named actors",
                "Every shard replica and a router run as Ray actors named NAME/shard-I/replica-R and NAME/router "
                "(one shard per node where possible, a shard's replicas on different nodes), and the router's "
                "address is printed. Without --detached it serves until Ctrl-C or SIGTERM, then stops them; "
                "with it, the command returns and the actors serve until `undeploy`.")
    d.add_argument("--datastore", type=Path, required=True, help="datastore directory, at this path on every node")
    d.add_argument("--name", default="retrieval", help="deployment name (default retrieval)")
    d.add_argument("--replicas", type=int, default=1, help="replicas per shard, on different nodes")
    d.add_argument("--cpus-per-shard", type=float, default=1.0, help="CPUs each shard replica reserves")
    d.add_argument("--host", help="address each server binds (default: its node's IP)")
    d.add_argument("--detached", action="store_true",
                   help="return once serving and leave the actors running (needs a running cluster)")
    _add_ray_target(d)
    d.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster started when there is none")
    d.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256, at load")
    d.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads per replica (0: FAISS default)")
    d.add_argument("--no-metrics", action="store_true", help="no Prometheus /metrics port on the servers")
    d.add_argument("--grace", type=float, default=5.0, help="seconds in-flight requests get when stopping")
    d.add_argument("--timeout", type=float, default=300.0, help="seconds every actor gets to turn SERVING")
    d.add_argument("--address-file", type=Path, help="write the router's address here as JSON once serving")
    _add_limits(d)

    u = command("undeploy", "drain and stop the actors of a deployment on a Ray cluster")
    u.add_argument("--name", required=True, help="deployment name")
    _add_ray_target(u)
    u.add_argument("--grace", type=float, default=5.0, help="seconds in-flight requests get")

    lk = command("lookup", "print the router address of a deployment on a Ray cluster")
    lk.add_argument("name", help="deployment name")
    _add_ray_target(lk)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Sharded FAISS retrieval datastore over gRPC.")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", metavar="LEVEL",
                        help="DEBUG, INFO (default), WARNING or ERROR, any case; goes before the command")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text, or one JSON object per line; goes before the command")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, title="commands",
                                metavar="COMMAND")

    def command(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {description}")

    b = command("build", "build a sharded datastore from an (N, d) .npy matrix",
                "Runs as a Ray job: on --address, or on a local cluster started for it.")
    b.add_argument("keys", type=Path, help="(N, d) float .npy matrix; memory-mapped")
    b.add_argument("--out", type=Path, required=True, help="datastore directory to create")
    b.add_argument("--payload", type=_key_value, action="append", default=[], metavar="NAME=FILE.npy",
                   help="per-row payload array (first dimension N); repeatable")
    b.add_argument("--factory", default="auto", help='FAISS factory string (default "auto": IVFx,PQy)')
    b.add_argument("--metric", default="l2", help="l2 or ip (inner product)")
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train-size", type=int, default=0, help="codec training sample; 0 sizes it for the index")
    b.add_argument("--keep-keys", action="store_true", help="store float16 keys for exact re-ranking")
    b.add_argument("--meta", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="metadata recorded in the manifest (tokenizer, encoder, chunk length)")
    b.add_argument("--address", help="Ray cluster address; default starts a local one")
    b.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster")
    b.add_argument("--cpus-per-shard", type=int, default=1)
    b.add_argument("--overwrite", action="store_true", help="replace an existing datastore at --out")
    b.add_argument("--no-progress", action="store_true")

    s = command("serve", "serve one shard, or every shard and a router",
                "With --shard, serves that shard. Without it, runs every shard (x --replicas) and a router "
                "over them as local processes; --port, --metrics-port and --address-file then apply to "
                "the router, and SIGTERM drains them all.")
    s.add_argument("--datastore", type=Path, required=True, help="datastore directory (holds manifest.json)")
    s.add_argument("--shard", type=int, help="shard number; omit to serve the whole datastore locally")
    s.add_argument("--replica", type=int, default=0, help="replica number reported by GetInfo")
    s.add_argument("--replicas", type=int, default=1, help="without --shard: replicas per shard")
    s.add_argument("--gpu", action="store_true", help="hold the index on the GPU (faiss GPU build)")
    s.add_argument("--no-mmap", action="store_true", help="read the index into memory instead of mapping it")
    s.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256, at load")
    s.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads per shard (0: FAISS default; "
                   "with --datastore alone, the machine's cores shared among the shard processes)")
    _add_server(s)

    r = command("router", "serve the Retriever API in front of shards")
    r.add_argument("--shards", required=True, help="HOST:PORT per shard, comma-separated; replicas joined by |")
    _add_server(r)

    i = command("info", "describe a datastore directory or a running server")
    i.add_argument("target", help="datastore directory or HOST:PORT")
    i.add_argument("--json", action="store_true")

    q = command("search", "search a running server with queries from a .npy file")
    q.add_argument("target", help="HOST:PORT of a router or shard")
    q.add_argument("--queries", type=Path, required=True, help="(nq, d) float32 .npy")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--nprobe", type=int, default=0)
    q.add_argument("--rerank", action="store_true")
    q.add_argument("--payload", action="append", default=[])
    q.add_argument("--out", type=Path, help="write ids and distances to this .npz")
    _add_deploy(command)
    return parser


def _limits(args) -> Limits:
    return Limits(max_k=args.max_k, max_batch=args.max_batch, max_request_bytes=args.max_request_mb << 20,
                  max_inflight=args.max_inflight)


def _metrics_port(args) -> int | None:
    return None if args.metrics_port < 0 else args.metrics_port


def _write_address(path: Path | None, address: str, metrics_port: int | None, **more) -> None:
    """Writes the address JSON atomically, so a reader never sees half of it."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"address": address, "metrics_port": metrics_port, "pid": os.getpid(), **more}))
    os.replace(tmp, path)


def _with_metrics(address: str, metrics_port: int | None) -> str:
    return address + (f" (metrics on port {metrics_port})" if metrics_port else "")


async def _run_until_signal(running, args) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _write_address(args.address_file, running.address, running.metrics_port)
    print(f"listening on {_with_metrics(running.address, running.metrics_port)}", flush=True)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({stopper, running.ready}, return_when=asyncio.FIRST_COMPLETED)
    if running.ready in done and running.ready.exception() is not None:
        await running.drain(0)
        raise CliError(str(running.ready.exception()))
    await stopper
    await running.drain(args.grace, args.drain_delay)


def _cmd_build(args) -> int:
    from retriever_server.build import BuildConfig, BuildError, build_datastore

    config = BuildConfig(keys=args.keys, out=args.out, payloads={k: Path(v) for k, v in args.payload},
                         factory=args.factory, metric=args.metric, shards=args.shards, seed=args.seed,
                         train_size=args.train_size, keep_keys=args.keep_keys, overwrite=args.overwrite,
                         cpus_per_shard=args.cpus_per_shard, metadata=dict(args.meta))
    try:
        manifest = build_datastore(config, address=args.address, num_cpus=args.num_cpus,
                                   progress=not args.no_progress)
    except BuildError as err:
        raise CliError(str(err)) from None
    print(f"built {args.out}: {manifest.ntotal} rows, {len(manifest.shards)} shards, {manifest.factory}, "
          f"{manifest.metric}, version {manifest.version}")
    return 0


def _cmd_serve(args) -> int:
    from retriever_server.manifest import read_manifest

    shards = len(read_manifest(args.datastore).shards)  # fail fast, before binding anything
    if args.shard is not None and not 0 <= args.shard < shards:
        raise CliError(f"--shard {args.shard} out of range: {args.datastore} has {shards} shards")
    if args.shard is None:
        return _serve_local(args)
    _pin(args)
    from retriever_server.shard import ShardOptions
    from retriever_server.shard_server import ShardServerConfig, start_shard_server

    config = ShardServerConfig(
        datastore=args.datastore, shard=args.shard, host=args.host, port=args.port,
        metrics_port=_metrics_port(args), replica=args.replica, limits=_limits(args),
        options=ShardOptions(mmap=not args.no_mmap, verify=not args.no_verify, gpu=args.gpu, threads=args.threads),
    )

    async def main() -> None:
        running = await start_shard_server(config, wait_loaded=False)
        await _run_until_signal(running, args)

    asyncio.run(main())
    return 0


def _child_args(args) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The flags `serve` without --shard passes on: (to each shard server, to the router).

    The router takes --metrics-port as given; shards get an ephemeral metrics port, or none with -1.
    """
    common = ["--grace", str(args.grace), "--drain-delay", str(args.drain_delay), "--max-k", str(args.max_k),
              "--max-batch", str(args.max_batch), "--max-inflight", str(args.max_inflight),
              "--max-request-mb", str(args.max_request_mb)]
    shard = [*common, "--metrics-port", "-1" if args.metrics_port < 0 else "0", "--threads", str(args.threads)]
    shard += ["--gpu"] if args.gpu else []
    shard += ["--no-mmap"] if args.no_mmap else []
    shard += ["--no-verify"] if args.no_verify else []
    return tuple(shard), (*common, "--metrics-port", str(args.metrics_port))


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: unwinds like Ctrl-C, so the deployment stops and every child drains."""
    raise KeyboardInterrupt


def _announce(deployment, address_file: Path | None) -> None:
    """Prints every process's address (and metrics port) and writes the router's address file."""
    for process in deployment.processes():
        print(f"{process.name}: {_with_metrics(process.address, process.metrics_port)}")
    print(f"logs in {deployment.log_dir}", flush=True)
    router = deployment.router
    _write_address(address_file, router.address, router.metrics_port, shards=deployment.shard_addresses)


def _serve_local(args) -> int:
    from retriever_server.launcher import LocalDeployment

    shard_args, router_args = _child_args(args)
    deployment = LocalDeployment(args.datastore, replicas=args.replicas, host=args.host, router_port=args.port,
                                 extra_args=shard_args, router_args=router_args, log_level=args.log_level,
                                 log_format=args.log_format, cpus=args.cpus)
    signal.signal(signal.SIGTERM, _interrupt)
    deployment.start()  # on an interrupt here, start() stops what it started
    try:
        _announce(deployment, args.address_file)
        why = deployment.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a clean stop
        deployment.stop()
        return 0
    raise CliError(f"stopped: {why}")


def _pin(args) -> None:
    """Runs this server on the cores of --cpus, if given."""
    if args.cpus:
        from retriever_server.cpus import pin

        pin(args.cpus)


def _cmd_router(args) -> int:
    from retriever_server.fanout import parse_shards
    from retriever_server.router import RouterConfig, start_router

    _pin(args)
    try:
        shards = tuple(tuple(s) for s in parse_shards(args.shards))
    except ValueError as err:
        raise CliError(str(err)) from None
    config = RouterConfig(shards=shards, host=args.host, port=args.port, metrics_port=_metrics_port(args),
                          limits=_limits(args))

    async def main() -> None:
        running = await start_router(config, wait_ready=False)
        await _run_until_signal(running, args)

    asyncio.run(main())
    return 0


def _cmd_info(args) -> int:
    if Path(args.target).is_dir():
        from retriever_server.manifest import read_manifest

        body = read_manifest(Path(args.target)).to_json()
    else:
        from google.protobuf.json_format import MessageToDict

        from retriever_server.client import RetrieverClient

        with RetrieverClient(args.target, timeout=10) as client:
            body = MessageToDict(client.info(), preserving_proto_field_name=True,
                                 always_print_fields_with_no_presence=True)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for key in ("role", "dimension", "metric", "factory", "ntotal", "nlist", "default_nprobe", "has_keys",
                "version", "datastore_version", "checksum", "datastore_checksum"):
        if key in body:
            print(f"{key:>18}: {body[key]}")
    for shard in body.get("shards", []):
        print(f"{'shard':>18}: {shard['name']} ids [{shard['id_start']}, {shard['id_end']})")
    for payload in body.get("payloads", []):
        print(f"{'payload':>18}: {payload['name']} {payload['dtype']} {payload['row_shape']}")
    return 0


def _cmd_search(args) -> int:
    from retriever_server.client import RetrieverClient

    if not args.queries.is_file():
        raise CliError(f"queries file {args.queries} not found")
    queries = np.load(args.queries)
    with RetrieverClient(args.target) as client:
        result = client.search(queries, k=args.k, nprobe=args.nprobe, exact_rerank=args.rerank,
                               payloads=args.payload)
    if args.out:
        np.savez(args.out, ids=result.ids, distances=result.distances, **result.payloads)
    for row in range(min(len(queries), 5)):
        print(f"query {row}: ids {result.ids[row, :10].tolist()}")
        print(f"{'':>9}distances {np.round(result.distances[row, :10], 4).tolist()}")
    return 0


def _cmd_deploy(args) -> int:
    from retriever_server.manifest import read_manifest
    from retriever_server.ray_connect import connect
    from retriever_server.ray_serving import RayDeployment, RayServeConfig, ray_address
    from retriever_server.shard import ShardOptions

    config = RayServeConfig(
        datastore=args.datastore.resolve(), name=args.name, namespace=args.namespace, replicas=args.replicas,
        cpus_per_shard=args.cpus_per_shard, host=args.host, detached=args.detached, metrics=not args.no_metrics,
        limits=_limits(args), options=ShardOptions(verify=not args.no_verify, threads=args.threads),
        grace_s=args.grace, startup_timeout_s=args.timeout, log_level=args.log_level)
    read_manifest(config.datastore)  # fail fast, before joining or starting a cluster
    connect(args.address, args.num_cpus, existing=args.detached)  # detached actors need a lasting cluster
    deployment = RayDeployment(config)
    signal.signal(signal.SIGTERM, _interrupt)
    deployment.start()  # on an interrupt here, start() stops what it started
    try:
        router = deployment.router_address
        for (shard, replica), node in sorted(deployment.placements.items()):
            print(f"{args.name}/shard-{shard}/replica-{replica}: node {node}")
        print(f"{args.name}: router {router} (Ray cluster {ray_address()}, namespace {args.namespace})", flush=True)
        _write_address(args.address_file, router, None, shards=deployment.shard_addresses, name=args.name,
                       namespace=args.namespace)
        if args.detached:
            print(f"detached; stop it with: {PROG} undeploy --name {args.name}")
            return 0
        why = deployment.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a clean stop
        return 0
    finally:
        if not args.detached:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the drain short
            deployment.stop()
    raise CliError(f"stopped: {why}")


def _cmd_undeploy(args) -> int:
    from retriever_server.ray_connect import connect
    from retriever_server.ray_serving import undeploy

    connect(args.address, existing=True)
    count = undeploy(args.name, namespace=args.namespace, grace_s=args.grace)
    print(f"stopped {args.name}: {count} actors")
    return 0


def _cmd_lookup(args) -> int:
    from retriever_server.ray_connect import connect
    from retriever_server.ray_serving import lookup

    connect(args.address, existing=True)
    print(lookup(args.name, namespace=args.namespace))
    return 0


COMMANDS = {"build": _cmd_build, "serve": _cmd_serve, "router": _cmd_router, "info": _cmd_info,
            "search": _cmd_search, "deploy": _cmd_deploy, "undeploy": _cmd_undeploy, "lookup": _cmd_lookup}


def _last_line(err: BaseException) -> str:
    """The last non-empty line of an error's message (Ray's errors end with the useful one)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of `retriever-server`: runs one command; user errors print one line and return 1.

    Errors caught here (bad input, a missing or damaged datastore, a server that did not start, an
    unreachable Ray cluster or server, a file that cannot be written) never show a traceback.
    """
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    from retriever_server.client import RetrieverError
    from retriever_server.manifest import DatastoreError

    try:
        return COMMANDS[args.command](args)
    except (CliError, DatastoreError, RetrieverError, ValueError, RuntimeError, OSError) as err:
        print(f"{PROG} {args.command}: error: {_last_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
