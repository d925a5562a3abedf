"""The CPU-cost benchmark's figure: per (nq, k), the service's CPU per request by process, beside the
same search in process and the floor that any service on Python gRPC pays on top of it.

One panel per (nq, k), each on its own scale. In each: the in-process search (the sharded reference),
then the router path and the client's fan-out as stacks (shards, router, client), each with a black
tick at in-process + its floor: where a service adding exactly the bare gRPC cost would stand.

    python benchmarks/cpu_cost_plot.py bench_out/cpu_cost.json    # writes bench_out/cpu_cost.png

`cpu_cost.py` draws it after each run.
"""

from __future__ import annotations

import sys
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replot import replot  # noqa: E402

PATHS = (("router", "router"), ("fan_out", "fan-out"))
COLOURS = {"in-process": "#4c72b0", "shards": "#55a868", "router": "#dd8452", "client": "#8172b3"}


def stacks(row: dict) -> dict[str, dict[str, float]]:
    """The bars of one (nq, k) row of cpu_cost.json: CPU ms per request of each part, by bar
    ("in-process", "router", "fan-out"); a path's parts sum to its service total."""
    out = {"in-process": {"in-process": row["in_process_sharded"]["total"]}}
    for key, label in PATHS:
        side = row[key]
        shards = sum(v for name, v in side.items() if name.startswith("shard "))
        out[label] = {"shards": shards, "router": side.get("router", 0.0), "client": side["client"]}
    return out


def ceilings(row: dict) -> dict[str, float]:
    """Per path, in-process CPU + the path's floor: a service that added only bare gRPC's cost."""
    reference = row["in_process_sharded"]["total"]
    return {label: reference + row[f"floor_{key}"]["total"] for key, label in PATHS}


def plot_costs(rows: list[dict], path: Path) -> None:
    """Writes the figure of cpu_cost.json's rows (one panel per (nq, k)) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, nqs = sorted({r["k"] for r in rows}), sorted({r["nq"] for r in rows})
    fig, axes = plt.subplots(len(ks), len(nqs), figsize=(3.2 * len(nqs), 3.3 * len(ks)), squeeze=False)
    by_cell = {(r["nq"], r["k"]): r for r in rows}
    for (i, k), (j, nq) in product(enumerate(ks), enumerate(nqs)):  # row per k, column per nq
        ax, row = axes[i][j], by_cell.get((nq, k))
        if row is None:
            ax.set_axis_off()
            continue
        bars, ticks = stacks(row), ceilings(row)
        for x, (label, parts) in enumerate(bars.items()):
            bottom = 0.0
            for part, ms in parts.items():
                ax.bar(x, ms, bottom=bottom, width=0.6, color=COLOURS[part], label=part)
                bottom += ms
            if label in ticks:
                ax.hlines(ticks[label], x - 0.38, x + 0.38, colors="black", linewidth=2, label="in-process + floor")
        ax.set_xticks(range(len(bars)), list(bars))
        ax.set_title(f"nq={nq}, k={k}\nefficiency: router {row['router_efficiency']:.2f}, "
                     f"fan-out {row['fan_out_efficiency']:.2f}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if j == 0:
            ax.set_ylabel("CPU ms per request")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), frameon=False)
    fig.suptitle("Search service CPU per request by process, against the same search in process")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    replot(argv, "cpu_cost_plot.py", __doc__.split("\n\n")[0], "rows", plot_costs)


if __name__ == "__main__":
    main()
