"""The ``minsharp-ref`` command line (Typer).

Exit codes: 0 success; 1 a gate failed (``--max-sharpness``); 2 usage or input error, with
one line ``error: …`` on stderr and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import typer

from . import __version__
from .errors import MinsharpError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Exact Hessian traces and minimum sharpness of ReLU networks from ONNX.")


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MinsharpError(f"{option} must be a number or a comma-separated list, not {text!r}") from None


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it: never a partial file."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise MinsharpError(f"{path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_guarded(debug: bool, body: Callable[[], int]) -> None:
    """Run a command body; turn errors into one line on stderr and exit code 2."""
    try:
        code = body()
    except MinsharpError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(2)
    except Exception as exc:  # a bug or an unforeseen input: still one line, no traceback
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug "
                   "for the traceback)", err=True)
        raise typer.Exit(2)
    raise typer.Exit(code)


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self):
        self.enabled = sys.stderr.isatty()
        self.total = self.done = 0

    def start(self, total: int):
        self.total = total

    def __call__(self, n: int):
        self.done += n
        if self.enabled and self.total:
            width = 30
            filled = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} samples")
            if self.done >= self.total:
                sys.stderr.write("\r" + " " * (width + 30) + "\r")
            sys.stderr.flush()


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.6g}"


def format_score(result) -> str:
    """The human-readable report of a ScoreResult."""
    lines = [f"minsharp-ref {__version__}: {result.model['path']}"]
    d = result.data
    prep = "; ".join(d["preprocessing"]) or "no preprocessing"
    labels = f", {d['y_key']}" if d["y_key"] else ", no labels"
    lines.append(f"data: {d['path']} [{d['x_key']}{labels}], {d['samples']} samples; {prep}")
    fid = result.fidelity["max_scaled_difference"]
    lines.append(f"forward: {result.provider}; import fidelity {fid:.2g} "
                 f"(tolerance {result.fidelity['tolerance']:g})")
    if result.postprocessing:
        lines.append(f"scored the logits before post-processing: {', '.join(result.postprocessing)}")
    headers = ["#", "layer", "kind", "weight", "shape", "Tr H_W", "Tr H_b", "alpha*"]
    rows = [[str(l.index), l.name, l.kind, l.weight, "x".join(map(str, l.weight_shape)),
             _fmt(l.trace_weight), _fmt(l.trace_bias), _fmt(l.alpha)] for l in result.layers]
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    lines.append("")
    for r in [headers] + rows:
        lines.append("  ".join(c.rjust(w) if i >= 5 or i == 0 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    lines.append("")
    lines.append(f"naive trace Tr H     {result.trace:.8g}  (± {result.trace_stderr:.2g} s.e. over samples)")
    se = result.minimum_sharpness_stderr
    solver = result.solver
    how = {"closed-form": "closed form (no biases)", "dead-layer": "dead layer",
           "newton": f"Newton, {solver['iterations']} steps, gradient {solver['gradient_norm']:.1e}"}[solver["method"]]
    lines.append(f"minimum sharpness    {result.minimum_sharpness:.8g}"
                 + (f"  (± {se:.2g} s.e.)" if se is not None else "") + f"  [{how}]")
    if result.loss is not None:
        lines.append(f"loss {result.loss:.6g}   accuracy {result.accuracy:.4f}")
    t = result.timings
    lines.append(f"samples {d['samples']}   seconds {t['total_s']:.3f} "
                 f"(forward {t['forward_s']:.3f}, traces {t['engine_s']:.3f})")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


@app.command()
def score(
    model: Path = typer.Argument(..., help="ONNX model file."),
    data: Path = typer.Option(..., "--data", help=".npz data file (Keras mnist layout or x/y)."),
    split: str = typer.Option("train", help="train or test (Keras layout)."),
    x_key: Optional[str] = typer.Option(None, "--x-key", help="Key of the inputs in the .npz."),
    y_key: Optional[str] = typer.Option(None, "--y-key", help="Key of the labels (optional)."),
    mean: Optional[str] = typer.Option(None, help="Mean to subtract: a scalar or one per channel, comma-separated."),
    std: Optional[str] = typer.Option(None, help="Std to divide by: a scalar or one per channel."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per batch (default 1000, lowered to fit --memory-budget)."),
    memory_budget: str = typer.Option("1G", "--memory-budget", help="Memory for one batch of the engine, e.g. 512M, 2G."),
    provider: str = typer.Option("auto", help="auto | cuda | cpu (onnxruntime) | numpy (float64 reference forward)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned JSON report here."),
    max_sharpness: Optional[float] = typer.Option(None, "--max-sharpness", help="Exit 1 when minimum sharpness exceeds this."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """Exact per-layer Hessian traces and the minimum sharpness of MODEL on DATA."""

    def body() -> int:
        from .api import score as run_score

        progress = Progress()
        result = run_score(model, data, split=split, x_key=x_key, y_key=y_key,
                           mean=_floats(mean, "--mean"), std=_floats(std, "--std"), limit=limit,
                           batch_size=batch_size, provider=provider,
                           memory_budget=parse_bytes(memory_budget), progress=progress,
                           on_start=progress.start)
        if json_path is not None:
            write_atomically(json_path, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
        typer.echo(format_score(result))
        if max_sharpness is not None and result.minimum_sharpness > max_sharpness:
            typer.echo(f"gate failed: minimum sharpness {result.minimum_sharpness:.6g} > "
                       f"--max-sharpness {max_sharpness:g}", err=True)
            return 1
        return 0

    run_guarded(debug, body)


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[:-1] if unit else t) * units[unit]
    except ValueError:
        raise MinsharpError(f"--memory-budget {text!r} is not a size like 512M or 2G") from None
    if value <= 0:
        raise MinsharpError(f"--memory-budget must be positive, not {text!r}")
    return int(value)


@app.command()
def version():
    """Print the version."""
    typer.echo(f"minsharp-ref {__version__}")


def main():
    app()


if __name__ == "__main__":
    main()
