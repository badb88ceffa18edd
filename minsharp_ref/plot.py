"""``score --plot FILE.png|.svg``: one figure of the per-layer traces, naive (t_d + u_d) and
at the minimising rescaling α* (t_d/α*_d² + u_d/c*_d², docs/method.md section 5,
Proposition 2; their sum is the minimum sharpness), on a log scale, with the baseline's
bars beside them. matplotlib is the optional extra ``[plot]``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from .errors import MinsharpError

FORMATS = {".png": "png", ".svg": "svg"}
#: figure size in inches and PNG resolution: 800 × 450 pixels
SIZE = (8.0, 4.5)
DPI = 100


def check_plot_path(path) -> str:
    """The format for ``path``, or a one-line error when it is unsupported or matplotlib is
    missing (checked before scoring)."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise MinsharpError(f"--plot {path}: the file name must end in .png or .svg")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MinsharpError("--plot needs matplotlib, the plot extra: pip install "
                            "'minsharp-ref[plot]' (or matplotlib)") from None
    return fmt


def layer_traces(doc: dict) -> tuple[list[float], list[Optional[float]]]:
    """Per layer: the naive trace t_d + u_d and the trace at α* (None for a dead layer)."""
    naive, at_alpha, c = [], [], 1.0
    for layer in doc["layers"]:
        t, u, a = layer["trace_weight"], layer.get("trace_bias") or 0.0, layer.get("alpha")
        naive.append(t + u)
        if a is None:
            at_alpha.append(None)
            continue
        c *= a
        at_alpha.append(t / a ** 2 + u / c ** 2)
    return naive, at_alpha


def plot_bytes(doc: dict, fmt: str, baseline: Optional[dict] = None) -> bytes:
    """The figure as PNG or SVG bytes (matplotlib's Agg backend, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI)
    ax = fig.add_subplot()
    series = [("naive", doc, "tab:blue", None), ("baseline naive", baseline, "tab:blue", "//"),
              ("at α*", doc, "tab:orange", None), ("baseline at α*", baseline, "tab:orange", "//")]
    series = [s for s in series if s[1] is not None]
    width = 0.8 / len(series)
    n = len(doc["layers"])
    for k, (label, source, colour, hatch) in enumerate(series):
        naive, at_alpha = layer_traces(source)
        values = naive if "naive" in label else at_alpha
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(values))]
        ys = [v if v is not None and v > 0 else float("nan") for v in values]
        ax.bar(xs, ys, width, label=label, color=colour, alpha=0.45 if hatch else 0.9,
               hatch=hatch, edgecolor="black" if hatch else colour, linewidth=0.5)
    ax.set_yscale("log")
    ax.set_xticks(range(n), [f"{l.get('index', i + 1)}: {l.get('name', '')}"
                             for i, l in enumerate(doc["layers"])],
                  rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    ax.set_ylabel("Hessian trace (weights + bias)")
    title = "\n".join(f"{prefix}{Path(d['model']['path']).name}: minimum sharpness "
                      f"{d['minimum_sharpness']:.4g}, naive trace {d['trace']:.4g}"
                      for prefix, d in (("", doc), ("baseline ", baseline)) if d is not None)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()
