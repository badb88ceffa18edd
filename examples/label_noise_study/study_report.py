"""kendall.md and the figure of the label-noise study, from its records (results.json)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import study_measures

FIGURE = "measures_vs_gap.png"
MARKERS = {"lenet": "o", "mlp": "s"}
LABELS = {"trace": "naive trace Tr H", "minimum_sharpness": "minimum sharpness",
          "normalised_sharpness": "normalised sharpness",
          "neuron_minimum_sharpness": "neuron-wise minimum sharpness",
          "lambda_max": "λ_max", "lambda_max_at_alpha_star": "λ_max at α*"}


def kendall(records: list[dict], measure: str, target: str) -> tuple[float, float, int]:
    """(τ, two-sided p, n) of scipy.stats.kendalltau (τ-b) between a measure and a target."""
    from scipy.stats import kendalltau

    pairs = [(r[measure], r[target]) for r in records
             if r.get(measure) is not None and r.get(target) is not None]
    if len(pairs) < 3:
        return math.nan, math.nan, len(pairs)
    result = kendalltau([p[0] for p in pairs], [p[1] for p in pairs])
    return float(result.statistic), float(result.pvalue), len(pairs)


def _cell(tau: float, p: float) -> str:
    return "n/a" if math.isnan(tau) else f"{tau:+.2f} (p {p:.1g})"


def _table(records: list[dict], measures: list[str], target: str) -> list[str]:
    groups = [(a, [r for r in records if r["architecture"] == a])
              for a in sorted({r["architecture"] for r in records})]
    groups.append(("pooled", records))
    head = "| measure | " + " | ".join(f"{name} (n = {len(rs)})" for name, rs in groups) + " |"
    lines = [head, "|---" * (len(groups) + 1) + "|"]
    for m in measures:
        cells = [_cell(*kendall(rs, m, target)[:2]) for _, rs in groups]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def kendall_markdown(records: list[dict]) -> str:
    """Kendall τ of each measure with the accuracy gap and the loss gap, per architecture and
    pooled: over the trained networks, then over them and their rescaled copies."""
    measures = study_measures.present(records)
    originals = [r for r in records if not r["rescaled"]]
    out = ["# Kendall τ between each measure and the generalisation gap", "",
           "τ-b (scipy.stats.kendalltau) with its two-sided p-value; n = networks.", "",
           "## Accuracy gap (train − test accuracy), trained networks", ""]
    out += _table(originals, measures, "gap")
    out += ["", "## Loss gap (test − train cross-entropy), trained networks", ""]
    out += _table(originals, measures, "loss_gap")
    out += ["", "## Accuracy gap, trained networks and their α-rescaled copies", "",
            "Each copy computes the same function (same gap); a scale-invariant measure keeps "
            "its value, a scale-dependent one moves and its τ drops.", ""]
    out += _table(records, measures, "gap")
    return "\n".join(out) + "\n"


def summary_markdown(records: list[dict]) -> str:
    """Per architecture and noise level: the means over seeds of the trained networks'
    epochs, accuracies, gap and measures."""
    import numpy as np

    measures = study_measures.present(records)
    originals = [r for r in records if not r["rescaled"]]
    cols = ["epochs", "train_accuracy", "test_accuracy", "gap", "loss_gap"] + measures
    out = ["# Means over seeds of the trained networks", "",
           "| architecture | noise | n | reached 0.99 | " + " | ".join(f"`{c}`" for c in cols) + " |",
           "|---" * (len(cols) + 4) + "|"]
    for key in sorted({(r["architecture"], r["noise"]) for r in originals}):
        rs = [r for r in originals if (r["architecture"], r["noise"]) == key]
        cells = [f"{np.mean([r[c] for r in rs]):.4g}" for c in cols]
        reached = sum(bool(r.get("reached_target")) for r in rs)
        out.append(f"| {key[0]} | {key[1]:.0%} | {len(rs)} | {reached} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is not what a results file should have
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def figure(records: list[dict], path: Path) -> None:
    """One panel per measure against the accuracy gap, log y; colour = label noise, marker =
    architecture, a larger hollow marker = the α-rescaled copy, joined to its original by a
    grey line (a ring around its original where the measure is scale-invariant)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = study_measures.present(records)
    cols = min(3, len(measures))
    rows = math.ceil(len(measures) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows + 0.5), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis")
    key = lambda r: (r["architecture"], r["noise"], r["seed"])  # noqa: E731
    copies = {key(r): r for r in records if r["rescaled"]}
    for ax, m in zip(axes.flat, measures):
        for r in records:
            if r["rescaled"]:
                continue
            colour = cmap(r["noise"])
            ax.scatter(r["gap"], r[m], marker=MARKERS.get(r["architecture"], "^"), color=colour, s=30)
            c = copies.get(key(r))
            if c is not None:
                ax.plot([r["gap"], c["gap"]], [r[m], c[m]], color="0.7", lw=0.6, zorder=0)
                ax.scatter(c["gap"], c[m], marker=MARKERS.get(c["architecture"], "^"),
                           facecolors="none", edgecolors=colour, s=90, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("gap (train − test accuracy)")
        originals = [r for r in records if not r["rescaled"]]
        tau_o, tau_all = kendall(originals, m, "gap")[0], kendall(records, m, "gap")[0]
        ax.set_title(f"{LABELS.get(m, m)}\npooled τ {tau_o:+.2f} (with copies {tau_all:+.2f})",
                     fontsize=9)
    for ax in list(axes.flat)[len(measures):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], ls="", marker=mk, color="k", label=a) for a, mk in MARKERS.items()]
    handles.append(plt.Line2D([], [], ls="", marker="o", markersize=9, markerfacecolor="none",
                              color="k", label="α-rescaled copy (same function)"))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8,
               frameon=False)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, 100))
    fig.colorbar(sm, ax=axes, shrink=0.8, label="random labels (%)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    _write_atomic(path, buf.getvalue())


def write_report(records: list[dict], out: Path) -> None:
    _write_atomic(out / "kendall.md", kendall_markdown(records).encode())
    _write_atomic(out / "summary.md", summary_markdown(records).encode())
    figure(records, out / FIGURE)
