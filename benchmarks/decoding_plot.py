"""The decoding benchmark's figure: each decoder's tokens/s over serial retrieval's, per scenario.

One panel per model (kNN-LM against `knn-lm serial`, RETRO against exact RETRO, prefetch 0): a group of
bars per scenario (greedy x1, x8, x32, beam...), one per decoder, the dashed line at 1 being serial
retrieval; a diamond marks the same model with no retrieval at all, the speed any hiding of retrieval
could at most reach.

    python benchmarks/decoding_plot.py bench_out/decoding/decoding.json   # writes .../decoding.png

`decoding.py` draws it after each run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replot import replot  # noqa: E402

REFERENCES = {"knnlm": "knn-lm serial", "retro": "retro exact (prefetch 0)"}
WITHOUT_RETRIEVAL = {"knnlm": "lm (no retrieval)", "retro": "retro (no retrieval)"}
TITLES = {"knnlm": "kNN-LM, against serial retrieval", "retro": "RETRO, against exact serial retrieval"}


def speedups(scenarios: dict, section: str) -> dict[str, dict[str, float]]:
    """{scenario: {decoder: its tokens/s over the reference's}} for one section of decoding.json's
    results (the reference and the no-retrieval row included, at 1 and at their own ratio)."""
    reference = REFERENCES[section]
    out = {}
    for scenario, result in scenarios.items():
        rows = result["rows"]
        base = rows[reference]["tokens_per_s"]
        out[scenario] = {name: row["tokens_per_s"] / base for name, row in rows.items()}
    return out


def plot_decoding(results: dict, path: Path) -> None:
    """Writes the figure of decoding.json's `results` (one panel per model) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in REFERENCES if results.get(s)]
    if not sections:
        raise ValueError("no kNN-LM or RETRO results to draw")
    fig, axes = plt.subplots(1, len(sections), figsize=(7.5 * len(sections), 5.4), squeeze=False)
    for ax, section in zip(axes[0], sections):
        ratios = speedups(results[section], section)
        per_scenario = list(ratios.values())
        skip = {REFERENCES[section], WITHOUT_RETRIEVAL[section]}
        decoders = list(dict.fromkeys(name for r in per_scenario for name in r if name not in skip))  # first seen first
        width = 0.8 / max(1, len(decoders))
        for i, name in enumerate(decoders):
            xs = [x for x, r in enumerate(per_scenario) if name in r]
            ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], [per_scenario[x][name] for x in xs],
                   width=width, label=name)
        alone = [(x, r[WITHOUT_RETRIEVAL[section]]) for x, r in enumerate(per_scenario)
                 if WITHOUT_RETRIEVAL[section] in r]
        if alone:
            ax.plot(*zip(*alone), "kD", label="no retrieval (the ceiling)")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(ratios)), list(ratios))
        ax.set(ylabel="tokens/s over serial retrieval's", title=TITLES[section])
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    replot(argv, "decoding_plot.py", __doc__.split("\n\n")[0], "results", plot_decoding)


if __name__ == "__main__":
    main()
