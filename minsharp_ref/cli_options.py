"""The options every command that scores data shares, declared once (Typer ``Annotated``
aliases): the data options (``--split``, ``--x-key``, ``--y-key``, ``--mean``, ``--std``,
``--limit``, ``--input-shape``, ``--loss``) and the run options (``--engine``,
``--precision``, ``--provider``, ``--workers``, ``--batch-size``, ``--memory-budget``).

A command declares them as parameters, e.g. ``split: Split = "train"``, and turns them
into values with ``run_options`` (a validated ``RunOptions``) and ``data_options`` (the
keywords of ``api.score``): same names, same defaults, same errors in every command.

Help texts go through rich markup: write a literal ``[extra]`` as ``escape("[extra]")``.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .errors import MinsharpError
from .options import DEFAULT_MEMORY_BUDGET, RunOptions


def escape(text: str) -> str:
    """``text`` with its square brackets shown literally by rich (``[dask]`` is markup)."""
    return text.replace("[", "\\[")


def install_hint(extra: str) -> str:
    """The pip command that installs an extra, as a help text shows it."""
    return escape(f"pip install 'minsharp-ref[{extra}]'")


# ------------------------------------------------------------------------- data options
Split = Annotated[str, typer.Option("--split", help="train or test (Keras layout).")]
XKey = Annotated[Optional[str], typer.Option("--x-key", help="Key of the inputs in the .npz.")]
YKey = Annotated[Optional[str], typer.Option(
    "--y-key", help="Key of the labels (optional; found as score finds them).")]
Mean = Annotated[Optional[str], typer.Option(
    "--mean", help="Mean to subtract: a scalar or one per channel, comma-separated.")]
Std = Annotated[Optional[str], typer.Option(
    "--std", help="Std to divide by: a scalar or one per channel.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N samples.")]
InputShape = Annotated[Optional[str], typer.Option(
    "--input-shape", help="Per-sample input shape, e.g. 1,28,28, for models whose input has "
                          "dynamic dimensions.")]
Loss = Annotated[Optional[str], typer.Option(
    "--loss", help="cross-entropy | binary | mse: the loss whose Hessian is traced (default: "
                   "what the model's head suggests; see docs/exporting.md).")]

# -------------------------------------------------------------------------- run options
Engine = Annotated[str, typer.Option(
    "--engine", help="numpy (float64 reference, default) | onnxruntime (the trace graph on "
                     "--provider's device, float32 unless --precision float64; certified on "
                     "its first batch, at most 64 samples).")]
Precision = Annotated[Optional[str], typer.Option(
    "--precision", help="Precision of the back-propagated signals (and of the IR's forward "
                        "with --provider auto or numpy): float64 (reference) or float32 (sums "
                        "stay float64). Default: float64 for --engine numpy, float32 for "
                        "--engine onnxruntime.")]
Provider = Annotated[str, typer.Option(
    "--provider", help="auto | cuda | cpu | numpy. --engine numpy: auto and numpy run the "
                       "IR's float64 forward (float64 end to end; onnxruntime checks the "
                       "import on the first batch), cpu and cuda take onnxruntime's "
                       "activations. --engine onnxruntime: the trace graph's device (auto: "
                       "CUDA where it loads).")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", help="Batches processed at once, one per core (default: the cores this "
                      "process may use; fewer when the batches in flight would exceed "
                      "--memory-budget). The numbers do not depend on it.")]
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", help="Samples per batch (default: up to 256, about 128 MiB of engine "
                         "memory; lowered so that one batch fits --memory-budget).")]
MemoryBudget = Annotated[str, typer.Option(
    "--memory-budget", help="Engine memory for all the batches in flight together, e.g. "
                            "512M, 2G.")]


def parse_bytes(text: str, option: str = "--memory-budget") -> int:
    """A size like 512M, 2G, 1.5GiB or 1000000 in bytes."""
    units = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[:-1] if unit else t) * units[unit]
    except ValueError:
        raise MinsharpError(f"{option} {text!r} is not a size like 512M or 2G") from None
    if value <= 0:
        raise MinsharpError(f"{option} must be positive, not {text!r}")
    return int(value)


def numbers(text: Optional[str], option: str, kind=float) -> Optional[list]:
    """A comma-separated option value as a list of floats (or ints)."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise MinsharpError(f"{option} must be comma-separated {what}, not {text!r}") from None


def run_options(engine: str = "numpy", precision: Optional[str] = None, provider: str = "auto",
                workers: Optional[int] = None, batch_size: Optional[int] = None,
                memory_budget: str = "1G", diagonal: bool = False, per_sample: bool = False,
                loss: Optional[str] = None) -> RunOptions:
    """The run options of a command, validated (one line naming the option on error)."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else parse_bytes(memory_budget)
    return RunOptions(engine=engine, precision=precision, provider=provider, workers=workers,
                      batch_size=batch_size, memory_budget=budget, diagonal=diagonal,
                      per_sample=per_sample, loss=loss)


def data_options(split: str = "train", x_key: Optional[str] = None, y_key: Optional[str] = None,
                 mean: Optional[str] = None, std: Optional[str] = None,
                 limit: Optional[int] = None, input_shape: Optional[str] = None) -> dict:
    """The data options of a command as keywords of ``api.score`` (parsed)."""
    if limit is not None and limit < 1:
        raise MinsharpError(f"--limit must be at least 1, not {limit}")
    return dict(split=split, x_key=x_key, y_key=y_key, mean=numbers(mean, "--mean"),
                std=numbers(std, "--std"), limit=limit,
                input_shape=numbers(input_shape, "--input-shape", int))
