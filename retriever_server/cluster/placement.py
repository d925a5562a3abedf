"""Where a deployment's shard replicas go on a Ray cluster: a deterministic plan over its nodes.

Replica 0 of every shard is placed first, then replica 1, and so on; each goes to the node that
does not hold its shard yet, then has the fewest replicas, then comes first (worker nodes before
the head node, which also runs the cluster's own services), among the nodes with CPUs left for it.
So shards spread one per node while there are nodes, a shard's replicas land on different nodes,
and replicas share a node, with a warning, only when there are fewer nodes than replicas.

Example:
    >>> plan_placement(cluster_nodes(), shards=2, replicas=2, cpus_per_shard=1)
    {(0, 0): 'a1...', (1, 0): 'b2...', (0, 1): 'b2...', (1, 1): 'c3...'}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from retriever_server.datastore.manifest import shard_name

log = logging.getLogger(__name__)
HEAD_RESOURCE = "node:__internal_head__"


class PlacementError(RuntimeError):
    """The cluster has no room for the deployment; the message gives what it needs and has."""


@dataclass(frozen=True)
class NodeSlot:
    """A live node of the cluster: its id, CPUs and whether it is the head."""

    node_id: str
    cpus: float
    head: bool = False
    address: str = ""


def cluster_nodes() -> list[NodeSlot]:
    """The connected cluster's live nodes, worker nodes first, each group by address then id."""
    nodes = [NodeSlot(n["NodeID"], float(n["Resources"].get("CPU", 0.0)), HEAD_RESOURCE in n["Resources"],
                      n.get("NodeManagerAddress", ""))
             for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: (n.head, n.address, n.node_id))


def _no_room(nodes: list[NodeSlot], shards: int, replicas: int, cpus: float) -> PlacementError:
    total = sum(n.cpus for n in nodes)
    return PlacementError(f"the cluster has no room for {shards} shards x {replicas} replicas of {cpus:g} CPUs each "
                          f"({shards * replicas * cpus:g} CPUs): its {len(nodes)} live nodes have {total:g} CPUs")


def plan_placement(nodes: list[NodeSlot], shards: int, replicas: int,
                   cpus_per_shard: float) -> dict[tuple[int, int], str]:
    """Chooses a node for every shard replica, spreading shards and a shard's replicas over nodes.

    Args:
        nodes: the live nodes, in order of preference (as `cluster_nodes()` gives them).
        shards: the datastore's shard count.
        replicas: replicas per shard.
        cpus_per_shard: CPUs each replica reserves; a node holds as many as its CPUs allow.

    Returns:
        {(shard, replica): node_id}.

    Raises:
        PlacementError: the nodes' CPUs cannot hold every replica.
    """
    room = {n.node_id: n.cpus for n in nodes}
    load = {n.node_id: 0 for n in nodes}
    held: dict[str, set[int]] = {n.node_id: set() for n in nodes}
    rank = {n.node_id: i for i, n in enumerate(nodes)}
    plan: dict[tuple[int, int], str] = {}
    for r in range(replicas):
        for s in range(shards):
            fits = [node for node in rank if room[node] >= cpus_per_shard - 1e-9]
            if not fits:
                raise _no_room(nodes, shards, replicas, cpus_per_shard)
            best = min(fits, key=lambda node: (s in held[node], load[node], rank[node]))
            if s in held[best]:
                log.warning("%s replica %d shares node %s with another replica of its shard: %d nodes with room "
                            "for %d replicas", shard_name(s), r, best, len(fits), replicas)
            plan[s, r] = best
            room[best] -= cpus_per_shard
            load[best] += 1
            held[best].add(s)
    return plan
