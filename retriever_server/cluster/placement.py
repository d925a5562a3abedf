"""Where a deployment's shard replicas go on a Ray cluster: a deterministic plan over its nodes.

Replica 0 of every shard is placed first, then replica 1, and so on. In each round the shards get
nodes that do not hold them yet (a maximum matching over the nodes' free CPUs, so that one shard's
choice does not take the only node another could use), preferring the node with the fewest replicas,
then the first (worker nodes before the head node, which also runs the cluster's own services). So
shards spread one per node while there are nodes, a shard's replicas land on different nodes, and a
replica shares a node with its shard's, with a warning, only when its round has no such node left.

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
        spread = _spread(shards, room, load, held, rank, cpus_per_shard)
        for s in sorted(range(shards), key=lambda s: s not in spread):  # the spread ones first: their room is kept
            fits = [node for node in rank if room[node] >= cpus_per_shard - 1e-9]
            if not fits:
                raise _no_room(nodes, shards, replicas, cpus_per_shard)
            best = spread[s] if s in spread else min(fits, key=lambda node: (s in held[node], load[node], rank[node]))
            if s in held[best]:
                log.warning("%s replica %d shares node %s with another replica of its shard: %d nodes with room "
                            "for %d replicas", shard_name(s), r, best, len(fits), replicas)
            plan[s, r] = best
            room[best] -= cpus_per_shard
            load[best] += 1
            held[best].add(s)
    return plan


def _spread(shards: int, room: dict[str, float], load: dict[str, int], held: dict[str, set[int]],
            rank: dict[str, int], cpus: float) -> dict[int, str]:
    """One replica of as many shards as can have one on a node not holding that shard yet: a maximum
    matching of shards to the nodes' free slots (augmenting paths), each shard trying the nodes with the
    fewest replicas first. A greedy pass alone can fill the one node a later shard could use."""
    slots = {node: int((room[node] + 1e-9) // cpus) for node in rank}
    taken: dict[str, list[int]] = {node: [] for node in rank}
    chosen: dict[int, str] = {}

    def place(s: int, seen: set[str]) -> bool:
        """Puts shard s on a node, moving a shard placed earlier to another node if that makes room."""
        free = [node for node in rank if s not in held[node] and node not in seen and slots[node]]
        for node in sorted(free, key=lambda node: (load[node] + len(taken[node]), rank[node])):
            seen.add(node)
            if len(taken[node]) >= slots[node]:
                moved = next((other for other in list(taken[node]) if place(other, seen)), None)
                if moved is None:
                    continue
                taken[node].remove(moved)  # `place` put it on another node
            taken[node].append(s)
            chosen[s] = node
            return True
        return False

    for s in range(shards):
        place(s, set())
    return chosen
