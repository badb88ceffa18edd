"""``minsharp-ref spectrum``: the exact Hessian spectrum (docs/method.md section 14), with
the data options every command that reads data shares (``cli_options``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import cli_options as O
from .cli_io import check_output_dir, npz_bytes, run_guarded, write_atomically
from .errors import MinsharpError
from .progress import Phases


def spectrum(
    model: Path = typer.Argument(..., help="ONNX model file."),
    data: Path = typer.Option(..., "--data", help=".npz data file (Keras mnist layout or x/y)."),
    split: O.Split = "train",
    x_key: O.XKey = None,
    y_key: O.YKey = None,
    mean: O.Mean = None,
    std: O.Std = None,
    limit: O.Limit = None,
    input_shape: O.InputShape = None,
    loss: O.Loss = None,
    batch_size: O.BatchSize = None,
    workers: O.Workers = None,
    memory_budget: Annotated[str, typer.Option("--memory-budget", help="Memory for the forward activations kept between products, e.g. 512M, 2G; beyond it every product re-reads the data.")] = "1G",
    top: int = typer.Option(1, "--top", help="Number of largest eigenvalues (Lanczos)."),
    smallest: bool = typer.Option(False, "--smallest", help="Also the smallest (most negative) eigenvalue."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="Top eigenvalue of each tensor's diagonal block."),
    matrix: str = typer.Option("hessian", "--matrix", help="hessian | ggn (the Gauss-Newton matrix)."),
    density: Optional[Path] = typer.Option(None, "--density", help="Plot the spectral density (stochastic Lanczos quadrature): FILE.png or FILE.svg (the plot extra)."),
    eigenvectors: Optional[Path] = typer.Option(None, "--eigenvectors", help="Write the top eigenvectors (.npz keyed by initializer name, shape (top, *tensor shape))."),
    tol: float = typer.Option(1e-8, "--tol", help="Lanczos relative tolerance."),
    max_iter: Optional[int] = typer.Option(None, "--max-iter", help="Lanczos restarts at most (default: ARPACK's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the start vector (and of --check's and --density's random vectors)."),
    check: bool = typer.Option(False, "--check", help="Check the operator's diagonal and Hutchinson trace against score's exact ones."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report (minsharp-ref/spectrum/v1) here."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no report: only errors."),
):
    """Exact Hessian spectrum of MODEL's mean loss on DATA: top eigenvalues, the smallest, per-tensor blocks, density."""

    def body() -> int:
        from .api import json_safe
        from .plot import check_plot_path
        from .report import Output
        from .spectrum import density_plot_bytes
        from .spectrum_run import DEFAULT_BATCH_SIZE as DEFAULT_SPECTRUM_BATCH
        from .spectrum_run import DataOptions, SpectrumOptions, run_spectrum, spectrum_blocks

        density_format = check_plot_path(density) if density is not None else None
        for out in (json_path, eigenvectors, density):
            if out is not None:
                check_output_dir(out)
        output = Output(quiet)
        kw = O.data_options(split, x_key, y_key, mean, std, limit, input_shape)
        if batch_size is not None and batch_size < 1:
            raise MinsharpError(f"--batch-size must be at least 1, not {batch_size}")
        d = DataOptions(str(data), split, x_key, y_key, kw["mean"], kw["std"], limit,
                        batch_size or DEFAULT_SPECTRUM_BATCH, O.parse_bytes(memory_budget),
                        O.run_options(workers=workers).workers)  # validated; default: the cores
        o = SpectrumOptions(top=top, smallest=smallest, per_tensor=per_tensor, matrix=matrix,
                            tol=tol, max_iter=max_iter, seed=seed, density=density is not None,
                            check=check)
        with Phases(enabled=not quiet) as phases:
            phases.start("import")
            state = {"phase": None}

            def progress(phase: str, count: int, estimate: int) -> None:
                if phase != state["phase"]:
                    state["phase"], state["base"] = phase, count - 1
                    phases.start(phase, max(estimate - count + 1, 1), "products")
                phases.advance(1)

            run = run_spectrum(model, d, o, loss=loss, input_shape=kw["input_shape"],
                               progress=progress)
            phases.done()
        doc = json_safe(run.doc)
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
        if eigenvectors is not None:
            write_atomically(eigenvectors, npz_bytes(run.eigenvectors))
        if density is not None:
            write_atomically(density, density_plot_bytes(*run.density, density_format,
                                                         f"{doc['matrix']} spectral density"))
        if json_path is not None:
            write_atomically(json_path, text)
        output.report(spectrum_blocks(doc))
        failed = [k for k, c in doc.get("check", {}).items() if not c["passed"]]
        for k in failed:
            output.failure(f"--check: the {k} check failed")
        return 1 if failed else 0

    run_guarded(debug, body)
