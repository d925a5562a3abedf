"""A datastore served on a Ray cluster: shard replicas and a router as named Ray actors.

Each shard replica is an actor that opens its shard and serves it with the shard server (`grpc.aio`
on an event loop in a thread of the actor) on `host`, the node's IP by default, on an ephemeral
port; the router actor fans out over the replicas. The actors are named `NAME/shard-I/replica-R`
and `NAME/router` in one namespace, so any driver connected to the cluster finds the router with
`lookup(NAME)`. Shards go one per node where the cluster has the nodes, and a shard's replicas go
to different nodes; each actor is pinned with a soft node affinity. When a node dies, Ray restarts
its replicas elsewhere and each restarted replica gives the router its new address; meanwhile the
router fails over to the other replicas. The datastore must be at the same path on every node.

Example:
    >>> with RayDeployment(RayServeConfig(Path("ds"), name="wiki", replicas=2)) as deployment:
    ...     client = RetrieverClient(deployment.router_address)
    >>> lookup("wiki")  # from any driver on the cluster, while it is deployed
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from retriever_server.cluster.connect import connect, free_resources
from retriever_server.cluster.placement import NodeSlot, PlacementError, cluster_nodes, plan_placement
from retriever_server.cluster.ray_actors import RouterActor, ShardReplica, stop_actors
from retriever_server.cluster.ray_security import DeploymentSecurity, plan_security
from retriever_server.cluster.supervisor import uninterrupted
from retriever_server.datastore.manifest import read_manifest
from retriever_server.security.config import ClientSecurity, ServerSecurity
from retriever_server.serving.router import RouterConfig, shard_limits
from retriever_server.serving.shard import ShardOptions
from retriever_server.serving.shard_server import ShardServerConfig
from retriever_server.wire.request import Limits
from retriever_server.wire.untrusted import one_line

log = logging.getLogger(__name__)
DEFAULT_NAMESPACE = "retrieval-datastore"
WAIT_REPORT_S = 30.0  # how often a deployment whose actors are not up yet says so


class DeploymentError(RuntimeError):
    """A deployment could not start, be found or be stopped; the message names it and says why."""


@dataclass(frozen=True)
class RayServeConfig:
    """What to serve on the cluster and how.

    `name` and `namespace` name the actors; `cpus_per_shard` is what each replica reserves (the
    placement packs nodes by it), `router_cpus` what the router does. `host` None binds each server
    to its node's IP. `detached` actors outlive the driver that started them (until `undeploy`).
    `max_restarts` -1 lets Ray restart a replica whose node dies as often as it happens. `metrics`
    gives each server a Prometheus port; `limits` and `options` go to every shard server (the
    router takes `limits` too, and its shards accept what it forwards: `shard_limits`); `grace_s` is
    what in-flight requests get when stopping.

    Security: `security` protects the router's port with the user's certificate and tokens (files the
    driver reads; the actors get them as constructor arguments, so no node needs them on disk).
    Servers bound to a node's IP need TLS and a token there, or `security.insecure`; with
    `secrets_dir` instead, the deployment secures its router's port itself with its own CA and token,
    written there for its clients (`client_security`). Whenever the router's port is secured, the hops
    from the router to the shards are mutual TLS with a token of the deployment's own
    (`hop_credentials`).
    """

    datastore: Path
    name: str = "retrieval"
    namespace: str = DEFAULT_NAMESPACE
    replicas: int = 1
    cpus_per_shard: float = 1.0
    router_cpus: float = 0.0
    host: str | None = None
    detached: bool = False
    max_restarts: int = -1
    metrics: bool = True
    limits: Limits = field(default_factory=Limits)
    options: ShardOptions = field(default_factory=ShardOptions)
    grace_s: float = 5.0
    startup_timeout_s: float = 300.0
    log_level: str = "WARNING"
    security: ServerSecurity = field(default_factory=ServerSecurity)
    secrets_dir: Path | None = None

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be non-empty and without '/', got {self.name!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not 0 < self.cpus_per_shard < math.inf or not 0 <= self.router_cpus < math.inf:
            raise ValueError(f"cpus_per_shard must be finite and > 0, router_cpus finite and >= 0, got "
                             f"{self.cpus_per_shard}, {self.router_cpus}")
        _check_seconds(startup_timeout_s=self.startup_timeout_s)
        _check_seconds(grace_s=self.grace_s, zero=True)


def _check_seconds(zero: bool = False, **seconds: float) -> None:
    """ValueError naming the argument unless each is a finite number of seconds above 0 (or 0 with `zero`)."""
    for name, value in seconds.items():
        if not (0 <= value if zero else 0 < value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of seconds {'>= 0' if zero else '> 0'}, got {value}")


def router_actor_name(name: str) -> str:
    return f"{name}/router"


def replica_actor_name(name: str, shard: int, replica: int) -> str:
    return f"{name}/shard-{shard}/replica-{replica}"


def _failure(err: BaseException) -> str:
    """One line on why an actor failed: the last line of the cause Ray reports, less its class name."""
    cause = getattr(err, "cause", None) or err
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if lines else type(cause).__name__


def ray_address() -> str:
    """The address of the connected cluster, for `--address` or RAY_ADDRESS elsewhere."""
    return ray.get_runtime_context().gcs_address


def running_deployments(namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """The names of the deployments with a router actor in `namespace`."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"][:-len("/router")] for a in actors
                  if a["namespace"] == namespace and a["name"].endswith("/router"))


def _actor_names(name: str, namespace: str) -> list[str]:
    """The names of deployment `name`'s actors alive in `namespace`, the router first."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == namespace and a["name"].startswith(f"{name}/")]
    return sorted(names, key=lambda n: (n != router_actor_name(name), n))


def check_name_free(name: str, namespace: str) -> None:
    """DeploymentError where a deployment named `name` runs in `namespace` (connected to Ray already)."""
    if _actor_names(name, namespace):
        raise DeploymentError(f"a deployment named {name!r} already runs in namespace {namespace!r}; "
                              "undeploy it first")


def _not_found(name: str, namespace: str) -> DeploymentError:
    others = ", ".join(running_deployments(namespace)) or "none"
    return DeploymentError(f"no deployment named {name!r} in namespace {namespace!r}; running there: {others}")


def lookup(name: str, namespace: str = DEFAULT_NAMESPACE, timeout_s: float = 30.0) -> str:
    """The router address of a running deployment, found by its actor's name.

    Args:
        name: the deployment's name.
        namespace: the Ray namespace it was deployed in.
        timeout_s: how long to wait for the router to answer (it may be restarting).

    Returns:
        HOST:PORT of the router.

    Raises:
        DeploymentError: no such deployment, or its router did not answer.

    Example:
        >>> RetrieverClient(lookup("wiki")).search(queries, k=10)
    """
    _check_seconds(timeout_s=timeout_s)
    connect(existing=True)
    try:
        router = ray.get_actor(router_actor_name(name), namespace=namespace)
    except ValueError:
        raise _not_found(name, namespace) from None
    try:
        return ray.get(router.address.remote(), timeout=timeout_s)
    except ray.exceptions.RayError as err:  # dead, restarting past the timeout
        raise DeploymentError(f"the router of {name!r} did not answer: {_failure(err)}") from None


def undeploy(name: str, namespace: str = DEFAULT_NAMESPACE, grace_s: float = 5.0) -> int:
    """Drains and kills every actor of deployment `name`; returns how many there were.

    Raises:
        DeploymentError: no actor of that deployment is running in `namespace`.
    """
    _check_seconds(grace_s=grace_s, zero=True)
    connect(existing=True)
    names = _actor_names(name, namespace)
    if not names:
        raise _not_found(name, namespace)
    handles = []
    for actor in names:
        try:
            handles.append(ray.get_actor(actor, namespace=namespace))
        except ValueError:
            pass  # gone meanwhile
    stop_actors(handles, grace_s)
    log.info("undeployed %s: %d actors", name, len(handles))
    return len(handles)


class RayDeployment:
    """S shards x R replicas and a router as named actors on the connected Ray cluster.

    Example:
        >>> deployment = RayDeployment(RayServeConfig(Path("ds"), replicas=2)).start()
        >>> deployment.placements  # {(shard, replica): node_id}
        >>> deployment.stop()
    """

    def __init__(self, config: RayServeConfig):
        self.config = config
        self.shards: list[list] = []
        self.router = None
        self.plan: dict[tuple[int, int], str] = {}
        self.security: DeploymentSecurity | None = None
        self._up: list = []  # the actors that came up: the others are killed without a drain on stop()

    @property
    def client_security(self) -> ClientSecurity | None:
        """How clients reach the router: the deployment's own CA and token when it secured its port
        itself (`secrets_dir`), plaintext when nothing secures it; None when the user's own
        certificate and tokens do."""
        return self.security.client if self.security else None

    def _options(self, name: str, cpus: float, node_id: str) -> dict:
        c = self.config
        return {"name": name, "namespace": c.namespace, "lifetime": "detached" if c.detached else None,
                "num_cpus": cpus, "max_restarts": c.max_restarts,
                "max_task_retries": -1 if c.max_restarts else 0,  # calls wait for a restart to finish
                # no max_concurrency: Ray 2.60 aborts a threaded actor whose constructor raises
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}

    def _await(self, handles: list, what: list[str], cpus: float) -> list:
        """Waits for the actors `handles` (each asking for `cpus` CPUs) to come up, saying every WAIT_REPORT_S
        which are not and what the cluster has free; raises DeploymentError naming one as soon as it fails,
        or the late ones at the timeout. Those that came up are remembered (`stop()` drains them alone)."""
        timeout_s = self.config.startup_timeout_s
        started = reported = time.monotonic()
        refs = [h.started.remote() for h in handles]
        names, actors = dict(zip(refs, what)), dict(zip(refs, handles))
        pending = list(refs)
        while pending:
            now = time.monotonic()
            left = timeout_s - (now - started)
            if left <= 0:
                raise DeploymentError(f"{', '.join(names[r] for r in pending)} not up within {timeout_s:.0f}s (the "
                                      f"cluster has {free_resources()}; each takes {cpus} CPUs)")
            if now - reported >= WAIT_REPORT_S:
                reported = now
                log.warning("%s not up after %.0f s (gives up after %.0f s): the cluster has %s; each takes %s CPUs",
                            ", ".join(names[r] for r in pending), now - started, timeout_s, free_resources(), cpus)
            wait_s = min(left, reported + WAIT_REPORT_S - now)
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, wait_s))
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as err:
                    raise DeploymentError(f"{names[ref]} did not start: {_failure(err)}") from None
                self._up.append(actors[ref])
        return ray.get(refs)

    def start(self) -> RayDeployment:
        """Places and starts every replica, then the router; returns once the router is SERVING.
        Connects to Ray first unless connected already (`connect()`; detached: to a running cluster alone).

        Raises:
            DeploymentError: the name is taken, the cluster has no node for a shard, or an actor
                failed or timed out (every actor started is then stopped).
        """
        c = self.config
        self.security = plan_security(c.host, c.security, c.secrets_dir)  # before joining or starting a cluster
        connect(existing=c.detached, lasting=c.detached)  # detached actors outlive this process: never its own cluster
        num_shards = len(read_manifest(c.datastore).shards)
        check_name_free(c.name, c.namespace)
        nodes = cluster_nodes()
        try:
            self.plan = plan_placement(nodes, num_shards, c.replicas, c.cpus_per_shard)
        except PlacementError as err:
            raise DeploymentError(str(err)) from None
        try:
            self._start_actors(num_shards, nodes)
            address = self.router_address  # asked once, within the cleanup: the answer may take a while
            log.info("%s serves %s (%d shards x %d replicas) at %s", c.name, c.datastore, num_shards, c.replicas,
                     address)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_replica(self, shard: int, replica: int):
        c = self.config
        server = ShardServerConfig(datastore=c.datastore, shard=shard, replica=replica, port=0,
                                   metrics_port=0 if c.metrics else None, limits=shard_limits(c.limits),
                                   options=c.options, security=self.security.shard)
        options = self._options(replica_actor_name(c.name, shard, replica), c.cpus_per_shard, self.plan[shard, replica])
        gpus = 1 if c.options.gpu else 0  # a node without one is infeasible: the soft affinity moves on
        return ShardReplica.options(**options, num_gpus=gpus).remote(
            server, c.host, router_actor_name(c.name), c.namespace, c.log_level, self.security.shard_secrets)

    def _start_actors(self, num_shards: int, nodes: list[NodeSlot]) -> None:
        """The replicas first; the router, on the head node, once they all serve."""
        c = self.config
        names = [[replica_actor_name(c.name, s, r) for r in range(c.replicas)] for s in range(num_shards)]
        self.shards = []
        for s in range(num_shards):  # kept as each starts: a failure (an interrupt) stops those already made
            self.shards.append([])
            for r in range(c.replicas):
                self.shards[-1].append(self._start_replica(s, r))
        self._await([h for replicas in self.shards for h in replicas], sum(names, []), c.cpus_per_shard)
        heads = [n.node_id for n in nodes if n.head]
        router_node = heads[0] if heads else ray.get_runtime_context().get_node_id()
        s = self.security
        router = RouterConfig(shards=(), port=0, metrics_port=0 if c.metrics else None, limits=c.limits,
                              security=s.router, shard_security=s.router_to_shards)
        options = self._options(router_actor_name(c.name), c.router_cpus, router_node)
        self.router = RouterActor.options(**options).remote(router, names, c.namespace, c.host, c.log_level,
                                                            s.router_secrets)
        self._await([self.router], [router_actor_name(c.name)], c.router_cpus)
        for (s, r), node in sorted(self.placements.items()):
            log.info("%s on node %s", names[s][r], node)

    @property
    def router_address(self) -> str:
        """HOST:PORT of the router (asked of its actor, so current after a restart)."""
        return self._answer(self._running_router().address.remote(), "the router")

    @property
    def shard_addresses(self) -> list[list[str]]:
        """Per shard, the addresses of its replicas that the router sends to now."""
        return self._answer(self._running_router().replicas.remote(), "the router")

    def _answer(self, refs, asked: str):
        """`ray.get(refs)` within the startup timeout; DeploymentError, naming `asked`, for Ray's errors."""
        try:
            return ray.get(refs, timeout=self.config.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise DeploymentError(f"{asked} of {self.config.name!r} did not answer in time") from None
        except ray.exceptions.RayError as err:
            raise DeploymentError(f"{asked} of {self.config.name!r} is gone: {_failure(err)}") from None

    def _running_router(self):
        if self.router is None:
            raise DeploymentError(f"the deployment {self.config.name!r} is not running (not started, or stopped)")
        return self.router

    @property
    def placements(self) -> dict[tuple[int, int], str]:
        """{(shard, replica): node_id} where each replica runs now."""
        handles = {(s, r): h for s, replicas in enumerate(self.shards) for r, h in enumerate(replicas)}
        found = self._answer([h.describe.remote() for h in handles.values()], "a shard replica")
        return {key: d["node_id"] for key, d in zip(handles, found)}

    def wait(self, poll_s: float = 2.0, on_address: Callable[[str], None] | None = None) -> str:
        """Blocks while the router actor lives (waiting out its restarts); returns why it is gone,
        e.g. when `undeploy` stopped it from another driver. `on_address` gets the router's address at
        each look (a restart of the router moves it to another port, maybe another node)."""
        while True:
            try:
                refs = [self.router.ready.remote()] + ([self.router.address.remote()] if on_address else [])
                answers = ray.get(refs, timeout=self.config.startup_timeout_s)
                if on_address:
                    on_address(answers[1])
            except ray.exceptions.RayActorError as err:
                return f"the router actor is gone: {_failure(err)}"
            except ray.exceptions.GetTimeoutError:
                log.warning("the router of %s has not answered for %.0fs", self.config.name,
                            self.config.startup_timeout_s)
            except (ray.exceptions.RaySystemError, ray.exceptions.RpcError, ray.exceptions.LocalRayletDiedError) as err:
                return f"lost touch with the Ray cluster: {_failure(err)}"  # the head or this node's raylet went away
            except ray.exceptions.RayError as err:  # the router's call raised, was cancelled, killed (OOM), lost
                why, name = one_line(_failure(err), 300), type(err).__name__
                return f"the router of {self.config.name!r} failed: {name}" + (f": {why}" if why != name else "")
            time.sleep(poll_s)

    def stop(self) -> None:
        """Kills the actors that never came up, drains the router, then the replicas, and kills every actor
        of this deployment, a drain cut short too; on the main thread, SIGINT and SIGTERM are ignored
        meanwhile (a second Ctrl-C leaves no actor running)."""
        handles = ([self.router] if self.router else []) + [h for replicas in self.shards for h in replicas]
        try:
            with uninterrupted():
                stop_actors(handles, self.config.grace_s, up=self._up)
        except ray.exceptions.RayError as err:  # not the actors' own errors (they are killed): the cluster's
            raise DeploymentError(f"could not stop the actors of {self.config.name!r} (lost touch with the Ray "
                                  f"cluster: {_failure(err)})") from None
        finally:
            self.shards, self.router, self._up = [], None, []

    def __enter__(self) -> RayDeployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
