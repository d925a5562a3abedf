"""Each process of a benchmark on cores of its own, for wall-clock ratios on a machine with enough cores
(the GPU machine: 16), and the wall-clock table `cpu_cost.py --pin` prints.

On 2 cores the client, the router and the shards share the cores and wall-clock ratios measure how they
share them; with a core pair each, a request's wall time is the service's own latency.

    plan = core_plan(sorted(os.sched_getaffinity(0)), shards=2)  # {"client": (0, 1), "router": (2, 3), ...}
    pin_process(pid, plan["router"])             # every thread of the process, and the threads it starts later
"""

from __future__ import annotations

import os
from pathlib import Path

CORES_EACH = 2  # a process's gRPC threads and its search (or the client's merge) side by side


def core_plan(cores: list[int], shards: int) -> dict[str, tuple[int, ...]]:
    """Disjoint cores, taken in order from `cores` (those this process may use), for the client (this
    process and the in-process references), the router and each shard, `CORES_EACH` apiece.

    Raises:
        ValueError: fewer than (2 + shards) * CORES_EACH cores.
    """
    roles = ["client", "router", *[f"shard {i}" for i in range(shards)]]
    if len(cores) < CORES_EACH * len(roles):
        raise ValueError(f"pinning {len(roles)} processes to {CORES_EACH} cores each needs "
                         f"{CORES_EACH * len(roles)} cores; this process may use {len(cores)}")
    cores = sorted(cores)
    return {role: tuple(cores[CORES_EACH * i:CORES_EACH * (i + 1)]) for i, role in enumerate(roles)}


def pin_process(pid: int, cores: tuple[int, ...]) -> None:
    """Confines every thread of process `pid` to `cores`; threads it starts later inherit them."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def threads_on(pid: int) -> set[tuple[int, ...]]:
    """The distinct core sets the threads of process `pid` may run on."""
    sets = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            sets.add(tuple(sorted(os.sched_getaffinity(int(task.name)))))
        except ProcessLookupError:
            pass
    return sets


def wall_table(rows: list[dict]) -> str:
    """Wall ms per request of each side of `cpu_cost.py`'s cells, and the service's ratios to the
    in-process references and the floor (lower is better for the service)."""
    lines = ["Wall ms per request, each process on cores of its own; ratio = service / reference.", "",
             "| nq | k | in-process sharded | in-process parallel | router | fan-out | floor router | floor fan-out "
             "| router / sharded | fan-out / sharded | router / parallel | router / floor |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sharded, parallel = r["in_process_sharded"]["wall_ms"], r["in_process_parallel"]["wall_ms"]
        router, fan_out = r["router"]["wall_ms"], r["fan_out"]["wall_ms"]
        floor_router, floor_fan_out = r["floor_router"]["wall_ms"], r["floor_fan_out"]["wall_ms"]
        lines.append(f"| {r['nq']} | {r['k']} | {sharded:.2f} | {parallel:.2f} | {router:.2f} | {fan_out:.2f} | "
                     f"{floor_router:.2f} | {floor_fan_out:.2f} | {router / sharded:.2f} | {fan_out / sharded:.2f} | "
                     f"{router / parallel:.2f} | {router / floor_router:.2f} |")
    return "\n".join(lines)
