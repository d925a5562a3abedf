"""`retriever-server deploy`, `undeploy` and `lookup`: a datastore served on a Ray cluster."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from retriever_server.cli.address_file import prepare_address_file, remove_address, write_address
from retriever_server.cli.common import (
    PROG,
    CliError,
    add_limits,
    add_server_security,
    add_threads,
    check_room_for_shards,
    interrupt,
    limits_of,
    non_negative_float,
    positive_float,
    positive_int,
    server_security_of,
)
from retriever_server.datastore.manifest import read_manifest
from retriever_server.serving.shard import ShardOptions
from retriever_server.wire.untrusted import one_line


def _add_ray_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address, or auto for the cluster `ray start` made on this machine; "
                                     "default: RAY_ADDRESS, else (deploy: a new local cluster; deploy --detached, "
                                     "undeploy and lookup: the cluster on this machine); a cluster that does not "
                                     "answer fails within RETRIEVER_RAY_CONNECT_TIMEOUT seconds (30)")
    p.add_argument("--namespace", type=_namespace, default="retrieval-datastore",
                   help="Ray namespace of the deployment's actors")


def _namespace(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a Ray namespace cannot be empty")
    return text


def add_parsers(command) -> None:
    """Adds `deploy`, `undeploy` and `lookup` to the command parsers."""
    d = command("deploy", "serve a datastore on a Ray cluster as named actors",
                "Every shard replica and a router run as Ray actors named NAME/shard-I/replica-R and NAME/router "
                "(one shard per node where possible, a shard's replicas on different nodes), and the router's "
                "address is printed. Without --detached it serves until Ctrl-C or SIGTERM, then stops them; "
                "with it, the command returns and the actors serve until `undeploy`.")
    d.add_argument("--datastore", type=Path, required=True, help="datastore directory, at this path on every node")
    d.add_argument("--name", default="retrieval", help="deployment name (default retrieval)")
    d.add_argument("--replicas", type=positive_int, default=1, help="replicas per shard, on different nodes")
    d.add_argument("--cpus-per-shard", type=positive_float, default=1.0, help="CPUs each shard replica reserves")
    d.add_argument("--host", help="address each server binds (default: its node's IP)")
    d.add_argument("--detached", action="store_true",
                   help="return once serving and leave the actors running (needs a running cluster: "
                        "`ray start --head`, never one the command starts)")
    _add_ray_target(d)
    d.add_argument("--num-cpus", type=positive_int,
                   help="CPUs of the local Ray cluster deploy starts without --address or RAY_ADDRESS, or with "
                        "--address local (not with --detached, which joins a running cluster)")
    d.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256, at load")
    add_threads(d, "FAISS OpenMP threads per replica (0: FAISS default)")
    d.add_argument("--no-metrics", action="store_true", help="no Prometheus /metrics port on the servers")
    d.add_argument("--grace", type=non_negative_float, default=5.0,
                   help="seconds in-flight requests get when stopping")
    d.add_argument("--timeout", type=positive_float, default=300.0, help="seconds every actor gets to turn SERVING")
    d.add_argument("--address-file", type=Path, help="write the router's address here as JSON once serving")
    add_limits(d)
    add_server_security(d, reread=False)

    u = command("undeploy", "drain and stop the actors of a deployment on a Ray cluster")
    u.add_argument("--name", required=True, help="deployment name")
    _add_ray_target(u)
    u.add_argument("--grace", type=non_negative_float, default=5.0, help="seconds in-flight requests get")

    lk = command("lookup", "print the router address of a deployment on a Ray cluster")
    lk.add_argument("name", help="deployment name")
    _add_ray_target(lk)


def run_deploy(args: argparse.Namespace) -> int:
    """Deploys the datastore; serves until interrupted, or returns at once with --detached."""
    from retriever_server.cluster.connect import LOCAL, cluster_target, connect  # Ray: imported where used
    from retriever_server.cluster.ray_security import check_exposure
    from retriever_server.cluster.ray_serving import RayDeployment, RayServeConfig, check_name_free, ray_address
    from retriever_server.cluster.supervisor import uninterrupted

    signal.signal(signal.SIGTERM, interrupt)  # from the start, as Ctrl-C: "interrupted", what started stopped
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup, a closed terminal is nothing to it
        signal.signal(signal.SIGHUP, interrupt)  # else it ended the command with no stop at all
    check_room_for_shards(args)
    own_cluster = cluster_target(args.address, existing=args.detached) == LOCAL  # one that ends with the command
    if args.detached and own_cluster:
        given = f"--address {LOCAL}" if args.address else f"RAY_ADDRESS={LOCAL}"
        raise CliError(f"--detached leaves the deployment serving after this command, but with {given} the command "
                       "starts a Ray cluster of its own, which ends with it: start one with `ray start --head` and "
                       "pass its address (--address HOST:PORT, or --address auto on its head)")
    if args.num_cpus and not own_cluster:
        raise CliError(f"--num-cpus sizes the local cluster deploy starts; with "
                       f"{'--detached' if args.detached else '--address' if args.address else 'RAY_ADDRESS'} it "
                       "joins a running one")
    if not args.name or "/" in args.name:  # the config would name its field
        raise CliError(f"--name {args.name!r}: a deployment's name is non-empty and holds no '/' (its actors are "
                       "named NAME/...)")
    config = RayServeConfig(
        datastore=args.datastore.resolve(), name=args.name, namespace=args.namespace, replicas=args.replicas,
        cpus_per_shard=args.cpus_per_shard, host=args.host, detached=args.detached, metrics=not args.no_metrics,
        limits=limits_of(args), options=ShardOptions(verify=not args.no_verify, threads=args.threads),
        grace_s=args.grace, startup_timeout_s=args.timeout, log_level=args.log_level,
        security=server_security_of(args))
    read_manifest(config.datastore)  # fail fast, before joining or starting a cluster
    check_exposure(config.host, config.security, config.secrets_dir)
    prepare_address_file(args.address_file, remove_stale=False)
    # detached actors need a lasting cluster; the actors' own logs stay in Ray's (their errors come back here)
    connect(args.address, args.num_cpus, existing=args.detached, log_to_driver=False, lasting=args.detached)
    signal.signal(signal.SIGTERM, interrupt)  # again: a local cluster's ray.init sets its own (an exit, status 15)
    check_name_free(args.name, args.namespace)  # a running deployment of that name keeps its address file...
    remove_address(args.address_file, stale=True)  # ...else the file there is a stopped one's
    deployment = RayDeployment(config)
    deployment.start()  # on an interrupt here, start() stops what it started
    detached = False
    try:
        router = deployment.router_address
        for (shard, replica), node in sorted(deployment.placements.items()):
            print(f"{args.name}/shard-{shard}/replica-{replica}: node {node}")
        print(f"{args.name}: router {router} (Ray cluster {ray_address()}, namespace {args.namespace})", flush=True)
        write = _address_writer(args, deployment)
        write(router)
        if args.detached:
            detached = True
            print(f"detached; stop it with: {PROG} undeploy --name {args.name}")
            return 0
        why = deployment.wait(on_address=write)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the way to stop a deploy that serves; a detached one is
        if args.detached:  # stopped before it said so: it is undone, and the command was interrupted
            raise
        return 0
    finally:
        if not detached:  # serving until now, or a detached deploy that failed or was stopped on its way
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a second Ctrl-C, SIGTERM or hangup (it often comes
            with uninterrupted():  # twice) does not cut the drain short
                try:
                    deployment.stop()
                finally:
                    remove_address(args.address_file)
    raise CliError(f"stopped: {why}")


def _address_writer(args: argparse.Namespace, deployment) -> Callable[[str], None]:
    """What writes deploy's address file with the router's address: again only where it changed (Ray
    restarted the router on another port), with the shards' addresses asked of the router then."""
    from retriever_server.cluster.ray_serving import DeploymentError

    written: list[str] = []

    def write(address: str) -> None:
        if written and address == written[-1]:
            return
        try:
            shards = deployment.shard_addresses
            write_address(args.address_file, address, None, shards=shards, name=args.name, namespace=args.namespace,
                          **({"pid": None} if args.detached else {}))  # detached: no process
        except (DeploymentError, OSError) as err:
            if not written:  # the first write: deploy has not said it serves yet
                raise
            print(f"{args.name}: router moved to {address}; the address file is not rewritten yet "
                  f"({one_line(str(err), 300)}): trying again at the next check", file=sys.stderr, flush=True)
            return
        if written:
            print(f"{args.name}: router moved to {address}", flush=True)
        written.append(address)

    return write


def run_undeploy(args: argparse.Namespace) -> int:
    """Drains and stops a deployment's actors."""
    from retriever_server.cluster.connect import connect
    from retriever_server.cluster.ray_serving import undeploy

    signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C (the actors are killed, drained or not)
    connect(args.address, existing=True)
    count = undeploy(args.name, namespace=args.namespace, grace_s=args.grace)
    print(f"stopped {args.name}: {count} actors")
    return 0


def run_lookup(args: argparse.Namespace) -> int:
    """Prints a deployment's router address."""
    from retriever_server.cluster.connect import connect
    from retriever_server.cluster.ray_serving import lookup

    signal.signal(signal.SIGTERM, interrupt)
    connect(args.address, existing=True)
    print(lookup(args.name, namespace=args.namespace))
    return 0
