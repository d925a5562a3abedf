"""Where a deployment's shard replicas go on a Ray cluster: a deterministic plan over its nodes.

Replica 0 of every shard is placed first, then replica 1, and so on, each on a node that does not
hold its shard yet, preferring the node with the fewest replicas, then the first (worker nodes before
the head node, which also runs the cluster's own services). Where every such node is full, replicas
placed earlier move to make room (an augmenting path of a maximum matching of replicas to the nodes'
CPUs), so that an early choice never takes the only nodes a later replica could use: the plan keeps
as many of a shard's replicas on different nodes as any plan can. So shards spread one per node while
there are nodes, a shard's replicas land on different nodes, and a replica shares a node with its
shard's, with a warning, only when no plan keeps them apart.

Example:
    >>> plan_placement(cluster_nodes(), shards=2, replicas=2, cpus_per_shard=1)
    {(0, 0): 'a1...', (1, 0): 'b2...', (0, 1): 'b2...', (1, 1): 'c3...'}
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import ray

from retriever_server.datastore.manifest import shard_name

log = logging.getLogger(__name__)
HEAD_RESOURCE = "node:__internal_head__"
Unit = tuple[int, int]  # (shard, replica)


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
        ValueError: `cpus_per_shard` is not a finite number above 0.
    """
    if not (math.isfinite(cpus_per_shard) and cpus_per_shard > 0):
        raise ValueError(f"cpus_per_shard must be a finite number of CPUs > 0, got {cpus_per_shard}")
    rank = {n.node_id: i for i, n in enumerate(nodes)}
    slots = {n.node_id: int((n.cpus + 1e-9) // cpus_per_shard) for n in nodes}
    if sum(slots.values()) < shards * replicas:
        raise _no_room(nodes, shards, replicas, cpus_per_shard)
    on: dict[str, list[Unit]] = {node: [] for node in rank}  # the replicas each node holds
    plan: dict[Unit, str] = {}
    units = [(s, r) for r in range(replicas) for s in range(shards)]
    shared = [unit for unit in units if not _place(unit, on, plan, slots, rank)]
    for s, r in shared:  # no plan keeps these apart from their shard's other replicas (see `_place`)
        fits = [node for node in rank if len(on[node]) < slots[node]]
        best = min(fits, key=lambda node: (len(on[node]), rank[node]))
        log.warning("%s replica %d shares node %s with another replica of its shard: %d nodes with room "
                    "for %d replicas", shard_name(s), r, best, len(fits), replicas)
        on[best].append((s, r))
        plan[s, r] = best
    return dict(sorted(plan.items(), key=lambda item: (item[0][1], item[0][0])))


def _place(unit: Unit, on: dict[str, list[Unit]], plan: dict[Unit, str], slots: dict[str, int],
           rank: dict[str, int]) -> bool:
    """Puts `unit` on a node not holding its shard, the emptiest free one first; where those are full,
    moves replicas placed earlier along the shortest chain that ends on a free node (an augmenting path,
    found breadth first). False when there is none: none appears later either, as placing other replicas
    changes the nodes' holdings only outside the nodes this search reached."""
    def open_to(shard: int) -> list[str]:
        """The nodes not reached yet that may take a replica of `shard`, the emptiest first."""
        return sorted((node for node in rank if node not in came and slots[node]
                       and all(s != shard for s, _ in on[node])), key=lambda node: (len(on[node]), rank[node]))

    came: dict[str, tuple[str | None, Unit]] = {}  # node -> (the node its new replica comes from, that replica)
    queue = deque[str]()
    for node in open_to(unit[0]):
        came[node] = (None, unit)
        queue.append(node)
    while queue:
        node = queue.popleft()
        if len(on[node]) < slots[node]:
            _shift(node, came, on, plan)
            return True
        for other in on[node]:
            for dest in open_to(other[0]):
                came[dest] = (node, other)
                queue.append(dest)
    return False


def _shift(node: str, came: dict[str, tuple[str | None, Unit]], on: dict[str, list[Unit]],
           plan: dict[Unit, str]) -> None:
    """Moves each replica of the chain that ends on `node` one node on, the new replica joining first."""
    while True:
        source, moved = came[node]
        on[node].append(moved)
        plan[moved] = node
        if source is None:
            return
        on[source].remove(moved)
        node = source
