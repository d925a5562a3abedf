"""What 10^8 and 10^9 keys need, projected from the per-row costs `scale.py` measured.

Reads `scale.json` (its two largest sizes) and prints, for kNN-LM per-token retrieval and RETRO
per-chunk retrieval, the nodes, RAM and disk per node, build hours, q/s per node and network bytes
per query at each target size. The model, every step of it stated in the output:

- **disk per row**: the index's code (d bytes with `auto`'s SQ8 codec, measured at 384-d and
  scaled with d) and id (8 bytes), the float16 key an exact re-rank reads (2·d bytes), the payload;
- **RAM per node**: the index files of its rows (kept in the page cache: a search touches its lists
  at random) plus the measured anonymous memory of each shard process; keys stay on disk, read at
  re-rank;
- **build**: the measured add rows/s per core, and the measured training seconds grown as two-level
  k-means grows (training rows ∝ nlist, distances per row ∝ √nlist);
- **query CPU**: the measured CPU per query at nq=64, k=10 (every process), grown from the largest
  size with the exponent measured between the two largest sizes, scaled with d, and with the
  default nprobe where `auto` raises it past 16,384 lists (as if every CPU second were list scanning:
  an upper bound);
- **nodes**: as many as the tighter of disk and RAM requires, each `--node-cores` cores, `--node-ram`
  GiB and `--node-disk` TB, one shard each; every query visits every shard, so the cluster's q/s is
  all its cores over the CPU seconds of one query;
- **network per query**: the query (4·d bytes) to every shard, and from every shard k ids and
  distances (12 bytes each) plus k payloads.

    python benchmarks/scale_plan.py [--scale bench_out/scale/scale.json]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from retriever_server.datastore.index import default_nprobe

MEASURED_DIM = 384  # scale.py's keys


@dataclass(frozen=True)
class Workload:
    """One way of using the datastore."""

    name: str
    dim: int  # key dimension
    k: int  # neighbours per query
    payload_bytes: int  # per row
    queries_per: str  # what issues one query


WORKLOADS = (
    Workload("kNN-LM (per token)", 1024, 1024, 4, "token"),  # the kNN-LM paper's 1024-d keys, next-token ids
    Workload("RETRO (per chunk)", 768, 2, 4 * 64, "64-token chunk"),  # BERT-size keys, the chunk's 64 tokens
)


@dataclass(frozen=True)
class Node:
    cores: int = 16
    ram_gib: float = 128.0
    disk_tb: float = 4.0


def nlist_for(n: float) -> int:
    """`auto`'s list count: the power of two nearest 4·√N, at most 65,536."""
    return min(65536, 2 ** round(math.log2(4 * math.sqrt(n))))


def measured(path: Path) -> tuple[dict, dict]:
    """The two largest sizes of a scale.py run."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: run python benchmarks/scale.py --quick (or a full run) first, or give "
                         "--scale")
    results = sorted(json.loads(path.read_text())["results"], key=lambda r: r["rows"])
    if len(results) < 2:
        raise SystemExit(f"{path} holds {len(results)} size(s); the plan needs two (run scale.py --quick at least)")
    return results[-2], results[-1]


def cpu_ms_per_query(r: dict) -> float:
    return next(c["cpu_ms"] for c in r["queries"] if c["nq"] == 64 and c["k"] == 10) / 64


def plan(small: dict, large: dict, w: Workload, n: float, node: Node) -> dict:
    scale_d = w.dim / MEASURED_DIM
    index_b = large["disk_bytes_per_row"] - 2 * MEASURED_DIM  # code + id + lists' share, at 384-d
    index_b = (index_b - 8) * scale_d + 8
    row_b = index_b + 2 * w.dim + w.payload_bytes
    exponent = math.log(cpu_ms_per_query(large) / cpu_ms_per_query(small)) / math.log(large["rows"] / small["rows"])
    probes = default_nprobe(nlist_for(n)) / large["default_nprobe"]
    cpu_ms = cpu_ms_per_query(large) * (n / large["rows"]) ** exponent * scale_d * probes
    anon_gib = max(large["shard_anon_mib"]) / 1024
    nodes_disk = n * row_b / (node.disk_tb * 1e12)
    nodes_ram = n * index_b / ((node.ram_gib - 4) * 2 ** 30)  # 4 GiB left to the system and the shard processes
    nodes = max(1, math.ceil(max(nodes_disk, nodes_ram)))
    train_growth = (nlist_for(n) / nlist_for(large["rows"])) ** 1.5
    build_h = (large["train_s"] * train_growth + n / large["add_rows_per_s_per_core"] / (nodes * node.cores)) / 3600
    return {"workload": w.name, "rows": n, "nodes": nodes, "nlist": nlist_for(n),
            "nprobe": default_nprobe(nlist_for(n)),
            "disk_tb_per_node": n * row_b / nodes / 1e12, "ram_gib_per_node": n * index_b / nodes / 2 ** 30 + anon_gib,
            "build_hours": build_h, "cpu_ms_per_query": cpu_ms,
            "qps": nodes * node.cores * 1000 / cpu_ms, "cpu_exponent": exponent,
            "net_bytes_per_query": nodes * (4 * w.dim + w.k * (12 + w.payload_bytes)), "row_bytes": row_b}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=Path, default=Path("bench_out/scale/scale.json"))
    parser.add_argument("--node-cores", type=int, default=Node.cores)
    parser.add_argument("--node-ram", type=float, default=Node.ram_gib, help="GiB")
    parser.add_argument("--node-disk", type=float, default=Node.disk_tb, help="TB")
    args = parser.parse_args(argv)
    small, large = measured(args.scale)
    node = Node(args.node_cores, args.node_ram, args.node_disk)
    print(f"from {args.scale}: {small['rows']} and {large['rows']} rows measured; nodes of {node.cores} cores, "
          f"{node.ram_gib:.0f} GiB RAM, {node.disk_tb:.0f} TB disk; one shard per node")
    print("| workload | rows | nlist, nprobe | bytes/row | nodes | disk TB/node | RAM GiB/node | build hours "
          "| CPU ms/query | q/s (cluster) | network bytes/query |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in WORKLOADS:
        for n in (1e8, 1e9):
            p = plan(small, large, w, n, node)
            print(f"| {p['workload']} | {n:.0e} | {p['nlist']}, {p['nprobe']} | {p['row_bytes']:.0f} | {p['nodes']} | "
                  f"{p['disk_tb_per_node']:.2f} | {p['ram_gib_per_node']:.1f} | {p['build_hours']:.1f} | "
                  f"{p['cpu_ms_per_query']:.2f} | {p['qps']:.0f} | {p['net_bytes_per_query']:.0f} |")
    print(f"\nquery CPU grows as N^{p['cpu_exponent']:.2f} between the measured sizes (nq=64, k=10, every process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
