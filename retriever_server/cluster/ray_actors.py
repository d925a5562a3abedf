"""The Ray actors that serve a datastore: a shard replica and the router, each a gRPC server.

An actor runs the shard server or the router (`grpc.aio`) on an asyncio loop in a thread of its
own process, on an ephemeral port of `host` (its node's IP when None). The router finds the
replicas by their actor names. A replica that Ray restarts (its node died) gives the router, found
by name too, its new address; the router sends to it once it answers as the same shard.
`ray_serving.RayDeployment` creates, places and names these actors; `stop_actors` drains and kills them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import ray

from retriever_server.cluster.ray_secrets import Secrets, materialize, relocated, sweep
from retriever_server.datastore.manifest import shard_name
from retriever_server.logs import configure_logging
from retriever_server.security.config import TOKEN_ENV
from retriever_server.serving.event_loop import LoopThread
from retriever_server.serving.router import RouterConfig, start_router
from retriever_server.serving.service import RunningServer
from retriever_server.serving.shard_server import ShardServerConfig, start_shard_server

log = logging.getLogger(__name__)


class _ServerActor:
    """What both actors share: the loop, the running server, its address, describe and drain."""

    running: RunningServer

    def __init__(self, host: str | None, log_level: str, secrets: Secrets | None):
        # the servers authenticate with their own files alone, never with the token of the user who deployed
        # (a Ray worker inherits its environment from the raylet, which may have it from the driver)
        os.environ.pop(TOKEN_ENV, None)
        configure_logging(log_level)
        self.host = host or ray.util.get_node_ip_address()
        self.loop = LoopThread("grpc-loop")  # where the gRPC server lives
        self.secrets_dir = materialize(secrets)  # this actor's copies of its certificates and token, if any

    def address(self) -> str:
        return self.running.address

    @ray.method(max_task_retries=0)
    def started(self) -> str:
        """The address, once the constructor returned; fails at once if it raised (never retried)."""
        return self.running.address

    def ready(self) -> bool:
        """True while SERVING: from the end of the constructor until `stop()`."""
        return not self.running.service.draining

    def describe(self) -> dict:
        return {"address": self.running.address, "metrics_port": self.running.metrics_port,
                "node_id": ray.get_runtime_context().get_node_id()}

    def stop(self, grace_s: float) -> None:
        """Drains: NOT_SERVING, new requests refused, in-flight ones get `grace_s` seconds; then removes
        the actor's copies of its secrets."""
        if not self.running.service.draining:
            self.loop.run(self.running.drain(grace=grace_s))
        self._forget_secrets()

    def _forget_secrets(self) -> None:
        if self.secrets_dir is not None:
            shutil.rmtree(self.secrets_dir, ignore_errors=True)
            self.secrets_dir = None

    def _failed_to_start(self) -> None:
        """A constructor that raised: no `stop()` will come, so its loop and its copies of the secrets go now."""
        self.loop.close()
        self._forget_secrets()


@ray.remote
class ShardReplica(_ServerActor):
    """One replica of one shard; `server.host` is replaced by `host` (None: the node's IP)."""

    def __init__(self, server: ShardServerConfig, host: str | None, router: str, namespace: str, log_level: str,
                 secrets: Secrets | None = None):
        super().__init__(host, log_level, secrets)
        self.server = dataclasses.replace(server, host=self.host, security=relocated(server.security, self.secrets_dir))
        try:
            self.running = self.loop.run(start_shard_server(self.server))
        except BaseException:
            self._failed_to_start()
            raise
        self._tell_router(router, namespace)

    def _tell_router(self, name: str, namespace: str) -> None:
        """Gives the router this replica's address when it runs already: this replica was restarted."""
        try:
            router = ray.get_actor(name, namespace=namespace)
        except ValueError:
            return  # a first start: the router asks every replica its address when it starts
        shard, replica = self.server.shard, self.server.replica
        log.warning("%s replica %d restarted on node %s at %s", shard_name(shard), replica,
                    ray.get_runtime_context().get_node_id(), self.running.address)
        router.replace_replica.remote(shard, replica, self.running.address)


@ray.remote
class RouterActor(_ServerActor):
    """The router over the replicas named `replicas[shard][replica]`; `router.shards` and
    `router.host` are replaced by their addresses and `host` (None: the node's IP)."""

    def __init__(self, router: RouterConfig, replicas: list[list[str]], namespace: str, host: str | None,
                 log_level: str, secrets: Secrets | None = None):
        super().__init__(host, log_level, secrets)
        try:
            handles = [[ray.get_actor(name, namespace=namespace) for name in names] for names in replicas]
            addresses = [ray.get([h.address.remote() for h in shard]) for shard in handles]
            config = dataclasses.replace(router, shards=tuple(tuple(a) for a in addresses), host=self.host,
                                         security=relocated(router.security, self.secrets_dir),
                                         shard_security=relocated(router.shard_security, self.secrets_dir))
            self.running = self.loop.run(start_router(config))
        except BaseException:
            self._failed_to_start()
            raise

    def replicas(self) -> list[list[str]]:
        """The replica addresses the router sends to now, per shard."""
        return [list(s.addresses) for s in self.running.service.sets]

    def replace_replica(self, shard: int, replica: int, address: str, timeout_s: float = 10.0) -> None:
        """Sends to `address` for that replica from now on, once it answers GetInfo as that shard."""
        old = self.loop.run(self.running.service.replace_replica(shard, replica, address, timeout_s))
        if old is not None:
            log.warning("router: %s replica %d moved from %s to %s", shard_name(shard), replica, old, address)


def stop_actors(handles: list, grace_s: float, up: list | None = None) -> None:
    """Stops these actors of a deployment: kills at once those not in `up` (default: all are up), whose drain
    call would wait for them to start; then drains the others, the first (the router) before the rest, each
    given `grace_s`, and kills them, a drain cut short (Ctrl-C, SIGTERM) too."""
    drained = handles if up is None else [h for h in handles if any(h is u for u in up)]
    try:
        for handle in handles:
            if not any(handle is d for d in drained):
                ray.kill(handle, no_restart=True)
    finally:
        try:
            for group in (drained[:1], drained[1:]):
                refs = [h.stop.remote(grace_s) for h in group]
                if refs:
                    ray.wait(refs, num_returns=len(refs), timeout=grace_s + 10.0)
        finally:
            for handle in drained:
                ray.kill(handle, no_restart=True)
            sweep()  # on this node, the copies of secrets of actors killed before (the next actor to start sweeps too)
