"""The evaluation's report: a markdown table, eval.json, and the plot of perplexity against λ.

Example:
    >>> print(write_report(Path("run/eval"), knn_result, retro_result, meta={"data": "run/data"}))
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from lm_worker.data.token_store import write_text_atomically
from lm_worker.evaluation.config import perplexity
from lm_worker.evaluation.knnlm_eval import KnnEvalResult
from lm_worker.evaluation.retro_eval import RetroEvalResult

log = logging.getLogger(__name__)


def _change(ppl: float, base: float) -> str:
    return f"{100 * (ppl / base - 1):+.1f}%" if math.isfinite(ppl) and math.isfinite(base) and base else "n/a"


def _pointer_settings(meta: dict) -> str:
    """The pointer settings in an evaluation's meta (`pointer_steps`, `pointer_agreement`,
    `pointer_crowd`) as "N=8, θ=0.9, M=3 "; "" when it names none."""
    parts = [f"{name}={meta[key]:g}" for name, key in (("N", "pointer_steps"), ("θ", "pointer_agreement"),
                                                       ("M", "pointer_crowd")) if meta.get(key)]
    return ", ".join(parts) + " " if parts else ""


def _lambda_label(knn: KnnEvalResult) -> str:
    """Where the reported λ comes from: other text (validation), or this text's own sweep, whose best is
    an optimistic figure (λ fitted to the very tokens it scores)."""
    if knn.lambdas_from:
        return f"λ={knn.best_lambda:g} chosen on {knn.lambdas_from}"
    return f"λ={knn.best_lambda:g}, best of {len(knn.perplexity)} on these tokens" if len(knn.perplexity) > 1 \
        else f"λ={knn.best_lambda:g}"


def report_table(knn: KnnEvalResult | None, retro: RetroEvalResult | None, meta: dict | None = None) -> str:
    """The markdown table: each model's perplexity and its change against its own base
    (the LM for kNN-LM; RETRO with its neighbours withheld for RETRO). With pointers, the kNN-LM row
    names their settings (from `meta`) and the share of positions followed instead of searched."""
    lines = ["| model | tokens | perplexity | vs base |", "|---|---:|---:|---:|"]
    if knn is not None:
        lines.append(f"| base LM | {knn.tokens} | {knn.base_perplexity:.3f} | base |")
        followed = 1 - knn.searched / knn.tokens if knn.tokens else 0.0
        pointers = (f", {knn.searched} positions searched; pointers {_pointer_settings(meta or {})}followed "
                    f"{100 * followed:.1f}%: λ={knn.followed_lambda:g}, T={knn.followed_temperature:g}") \
            if 0 < knn.searched < knn.tokens else ""
        lines.append(f"| kNN-LM ({_lambda_label(knn)}, k={knn.k}, T={knn.temperature:g}{pointers}) | {knn.tokens} | "
                     f"{knn.best_perplexity:.3f} | {_change(knn.best_perplexity, knn.base_perplexity)} |")
    if retro is not None:
        lines.append(f"| RETRO, neighbours withheld | {retro.tokens} | {retro.perplexity_without:.3f} | base |")
        lines.append(f"| RETRO (K={retro.n_neighbours}) | {retro.tokens} | {retro.perplexity:.3f} | "
                     f"{_change(retro.perplexity, retro.perplexity_without)} |")
    return "\n".join(lines) + "\n"


def _plot_lambdas(knn: KnnEvalResult, path: Path) -> None:
    """Perplexity against λ, the base LM as a line, the reported λ marked (and, where it was chosen on other
    text, this text's own best beside it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lambdas = sorted(knn.perplexity)
    fig = Figure(figsize=(6.8, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pointers = 0 < knn.searched < knn.tokens
    ax.plot(lambdas, [knn.perplexity[lam] for lam in lambdas], "o-",
            label="kNN-LM, one λ at every position" if pointers else "kNN-LM")
    if pointers:  # the followed positions' λ swept, the searched ones' at their best
        searched = knn.searched_nll[knn.best_lambda]
        ax.plot(lambdas, [perplexity(searched + knn.followed_nll[lam], knn.tokens) for lam in lambdas], "s--",
                label=f"λ at followed positions (T={knn.followed_temperature:g}); searched at λ={knn.best_lambda:g}")
    ax.axhline(knn.base_perplexity, color="grey", linestyle="--", label=f"base LM alone ({knn.base_perplexity:.2f})")
    followed = f", followed λ={knn.followed_lambda:g}" if pointers else ""
    how = f"chosen on {knn.lambdas_from}" if knn.lambdas_from else "best"
    own = min(lambdas, key=lambda lam: knn.perplexity[lam])  # the sweep's own best on these tokens
    if knn.lambdas_from and not pointers and own != knn.best_lambda:  # one the reported figure does not take
        ax.plot([own], [knn.perplexity[own]], "o", markerfacecolor="none", markeredgecolor="black", markersize=12,
                label=f"best on these tokens (not used): λ={own:g}, {knn.perplexity[own]:.2f}")
    elif knn.lambdas_from and not pointers:
        how += ", also the best on these tokens"
    ax.plot([knn.followed_lambda if pointers else knn.best_lambda], [knn.best_perplexity], "r*", markersize=14,
            label=f"{how}: λ={knn.best_lambda:g}{followed}, {knn.best_perplexity:.2f} "
                  f"({-100 * knn.relative_reduction:+.1f}%)")
    ax.set_xlabel("λ: p = λ·p_kNN + (1 − λ)·p_LM")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"kNN-LM over {knn.tokens} held-out tokens (k={knn.k}, T={knn.temperature:g})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _json_safe(value):
    """Non-finite floats as None (JSON has no inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_report(out_dir: Path, knn: KnnEvalResult | None, retro: RetroEvalResult | None, meta: dict) -> str:
    """Writes OUT/eval.json (every number; non-finite as null), OUT/table.md and, with a kNN-LM result,
    OUT/ppl_vs_lambda.png (without one, an earlier run's is removed); each file whole or as it was. Returns
    the table's text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "knnlm": knn.to_dict() if knn else None, "retro": retro.to_dict() if retro else None}
    table = report_table(knn, retro, meta)
    plot = out / "ppl_vs_lambda.png"
    if knn is not None:  # each file whole or as it was: through a temporary name beside it
        drawn = out / f".ppl_vs_lambda.{os.getpid()}.tmp.png"
        _plot_lambdas(knn, drawn)
        os.replace(drawn, plot)
    else:
        plot.unlink(missing_ok=True)  # an earlier run's, of a kNN-LM this report does not hold
    write_text_atomically(out / "eval.json", json.dumps(_json_safe(body), indent=2, default=str))
    write_text_atomically(out / "table.md", table)
    log.info("wrote the evaluation report to %s", out)
    return table
