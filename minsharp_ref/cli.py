"""The ``minsharp-ref`` command line (Typer).

Exit codes: 0 success; 1 a gate failed (``--max-sharpness``); 2 usage or input error, with
one line ``error: …`` on stderr and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import MinsharpError
from . import cli_options as O
from .cli_options import parse_bytes  # noqa: F401 (public here before cli_options)
from .cli_io import check_output_dir, npz_bytes, run_guarded, write_atomically  # noqa: F401
from .cli_spectrum import spectrum
from .progress import Phases

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Exact Hessian traces and minimum sharpness of ReLU networks from ONNX.")


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    return O.numbers(text, option, float)


def _ints(text: Optional[str], option: str) -> Optional[list[int]]:
    return O.numbers(text, option, int)


@app.command()
def score(
    model: Path = typer.Argument(..., help="ONNX model file."),
    data: Path = typer.Option(..., "--data", help=".npz data file (Keras mnist layout or x/y)."),
    split: O.Split = "train",
    x_key: O.XKey = None,
    y_key: O.YKey = None,
    mean: O.Mean = None,
    std: O.Std = None,
    limit: O.Limit = None,
    batch_size: O.BatchSize = None,
    memory_budget: O.MemoryBudget = "1G",
    provider: O.Provider = "auto",
    precision: O.Precision = None,
    workers: O.Workers = None,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned JSON report here."),
    diag_path: Optional[Path] = typer.Option(None, "--diag", help="Write the exact Hessian diagonal of every parameter tensor (.npz keyed by initializer name, float64)."),
    per_sample_path: Optional[Path] = typer.Option(None, "--per-sample", help="Write each sample's trace contributions (.npz keyed by initializer name, plus 'trace')."),
    measures: bool = typer.Option(False, "--measures", help="Also report normalised sharpness and the per-layer traces at alpha*."),
    input_shape: O.InputShape = None,
    max_sharpness: Optional[float] = typer.Option(None, "--max-sharpness", help="Exit 1 when minimum sharpness exceeds this."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no report: only errors and failed gates on stderr (the JSON and the exit code stay)."),
    output_format: str = typer.Option("table", "--format", help="Standard output: table (rich on a terminal, plain text otherwise) | markdown (a summary for a CI job page) | json."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Score JSON of the last release (same data and options) to compare with; exit 2 when not comparable."),
    max_increase: Optional[str] = typer.Option(None, "--max-increase", help="Gate: exit 1 when minimum sharpness exceeds the baseline's by more than this: 10% (relative) or 2.5 (absolute)."),
    gate: Optional[str] = typer.Option(None, "--gate", help="More gated quantities against the baseline, e.g. trace,loss:2%,accuracy:0.01 (accuracy gates a decrease; no threshold: --max-increase's)."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Count only worsenings beyond K standard errors of the difference."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a figure of the per-layer traces (naive and at alpha*, log scale; with the baseline's): FILE.png or FILE.svg. Needs matplotlib: " + O.install_hint("plot") + "."),
    loss: O.Loss = None,
    engine: O.Engine = "numpy",
    dask: Optional[str] = typer.Option(None, "--dask", help="Score on a Dask cluster: a scheduler address (tcp://host:8786) or local:N (N worker processes on this machine). Needs " + O.install_hint("dask") + "; see docs/dask.md."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Samples per shard (default with --dask: 8 batches; without: one shard)."),
    scatter_data: bool = typer.Option(False, "--scatter-data", help="With --dask: read the samples here and ship them to the workers (for workers that cannot read DATA)."),
):
    """Exact per-layer Hessian traces and the minimum sharpness of MODEL on DATA."""

    def body() -> int:
        from . import gates as G
        from .api import json_safe
        from .api import score as run_score
        from .plot import check_plot_path, plot_bytes
        from .report import Output, score_blocks, score_markdown

        options = O.run_options(engine, precision, provider, workers, batch_size, memory_budget,
                                diagonal=diag_path is not None or measures,
                                per_sample=per_sample_path is not None, loss=loss)
        data_kwargs = O.data_options(split, x_key, y_key, mean, std, limit, input_shape)
        if max_sharpness is not None and not max_sharpness >= 0:
            raise MinsharpError(f"--max-sharpness must be a non-negative number, not {max_sharpness}")
        if output_format not in ("table", "markdown", "json"):
            raise MinsharpError(f"--format must be table, markdown or json, not {output_format!r}")
        thresholds = G.parse_gates(gate, max_increase, sigma, baseline is not None)
        base_doc, base_sha = G.load_baseline(baseline) if baseline is not None else (None, None)
        plot_format = check_plot_path(plot) if plot is not None else None
        for out in (json_path, diag_path, per_sample_path, plot):
            if out is not None:
                check_output_dir(out)
        output = Output(quiet)
        if scatter_data and dask is None:
            raise MinsharpError("--scatter-data needs --dask")
        cluster = contextlib.nullcontext()
        if dask is not None:
            from .distributed import connect

            cluster = connect(dask)
        with Phases(enabled=not quiet) as phases:
            if dask is not None:
                phases.start("dask")  # connecting, or starting local:N's workers
            with cluster as client:
                phases.start("import")
                on_start, progress = phases.samples("scoring" if dask is None else "shards")
                result = run_score(model, data, **data_kwargs, options=options,
                                   measures=measures, progress=progress, on_start=on_start,
                                   client=client, shard_size=shard_size, scatter_data=scatter_data,
                                   on_phase=phases.maybe_slow)
                phases.done()
        doc = json_safe(G.with_gates(result.to_dict(), baseline, base_doc, base_sha, thresholds,
                                     sigma, max_sharpness))
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
        if diag_path is not None:
            write_atomically(diag_path, npz_bytes(result.diagonal))
        if per_sample_path is not None:
            write_atomically(per_sample_path, npz_bytes(result.per_sample))
        if json_path is not None:
            write_atomically(json_path, text)
        if plot is not None:
            write_atomically(plot, plot_bytes(doc, plot_format, base_doc))
        if output_format == "json":
            output.text(text.rstrip("\n"))
        elif output_format == "markdown":
            output.text(score_markdown(doc))
        else:
            output.report(score_blocks(doc))
        for w in doc["warnings"]:
            output.warning(w)
        failed = [g for g in doc.get("gates", []) if not g["passed"]]
        for g in failed:
            output.failure(g["message"])
        return 1 if failed else 0

    run_guarded(debug, body)


@app.command()
def rescale(
    model: Path = typer.Argument(..., help="ONNX model file."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the rescaled model."),
    alpha: Optional[str] = typer.Option(None, help="α per parameterised layer, comma-separated (product 1); networks with branches or BatchNorm: tensor=α per free class (or one α per class, in the score report's order)."),
    normalize: bool = typer.Option(False, help="Divide --alpha by its geometric mean."),
    random: bool = typer.Option(False, "--random", help="Draw α log-uniformly (see --spread, --seed)."),
    neurons: bool = typer.Option(False, "--neurons", help="Neuron-wise rescaling with random γ per unit/channel."),
    seed: int = typer.Option(0, help="Seed for --random and --neurons."),
    spread: float = typer.Option(6.0, help="Decades spanned by random α or γ."),
    data: Optional[Path] = typer.Option(None, "--data", help="Check on a batch of this .npz (default: random inputs)."),
    split: O.Split = "train",
    x_key: O.XKey = None,
    mean: O.Mean = None,
    std: O.Std = None,
    input_shape: O.InputShape = None,
    debug: bool = typer.Option(False, "--debug"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
    to_neuron_minimum: bool = typer.Option(False, "--to-neuron-minimum", help="Rescale every unit/channel to the minimiser of the neuron-wise minimum sharpness on --data (docs/method.md section 13): the written model's naive trace is that value."),
    limit: O.Limit = None,
    engine: O.Engine = "numpy",
    precision: O.Precision = None,
    provider: O.Provider = "auto",
    workers: O.Workers = None,
    batch_size: O.BatchSize = None,
    memory_budget: O.MemoryBudget = "1G",
):
    """Write a function-preserving rescaling of MODEL (docs/method.md section 5, or section 12 with --neurons;
    networks with branches or BatchNorm: --random or --alpha per class over the group of docs/method.md section 9).

    Both models run in onnxruntime on the same batch; nothing is written unless their logits
    agree to float32 tolerance."""

    def body() -> int:
        import math

        import numpy as np

        from .onnx_import import import_model

        from .group import folded_view, rescaling_group
        from .report import Output
        from .rescale import (alpha_parameters, apply_to_proto, check_alpha, class_log_scales,
                              group_parameters, logits_agree, neuron_parameters, random_alpha, random_log_scales,
                              uses_group)
        from .runtime import FIDELITY_RTOL, OrtForward

        imported = import_model(model, _ints(input_shape, "--input-shape"))
        network = imported.network
        rng = np.random.default_rng(seed)
        chosen = [name for name, on in (("--alpha", alpha is not None), ("--random", random),
                                        ("--neurons", neurons),
                                        ("--to-neuron-minimum", to_neuron_minimum)) if on]
        if len(chosen) != 1:
            raise MinsharpError("give exactly one of --alpha, --random, --neurons or --to-neuron-minimum")
        if spread <= 0:
            raise MinsharpError(f"--spread must be positive, not {spread:g}")
        if to_neuron_minimum:
            from .data import Preprocessing
            from .neuron_measure import to_neuron_minimum as neuron_minimum

            options = O.run_options(engine, precision, provider, workers, batch_size,
                                    memory_budget)
            kw = O.data_options(split, x_key, None, mean, std, limit, input_shape)
            params, what = neuron_minimum(imported, data, Preprocessing(kw["mean"], kw["std"]),
                                          options=options, split=split, x_key=x_key, limit=limit)
        elif uses_group(network):  # DAG or BatchNorm: one ℓ per class of tied tensors
            if neurons or normalize:
                raise MinsharpError("this network has branches or BatchNorm: --random, or "
                                    "--alpha with one scale per class of tied tensors")
            group = rescaling_group(network)
            ell = random_log_scales(group, rng, spread) if random else class_log_scales(
                group, alpha, rescaling_group(folded_view(network) or network).names)
            params = group_parameters(network, ell, group)
            what = "scale per class " + ", ".join(
                f"{name}={math.exp(v):.6g}" for name, v in zip(group.names, ell))
        elif neurons:
            params = neuron_parameters(network, rng, spread)
            what = f"neuron-wise rescaling, γ log-uniform over {spread:g} decades (seed {seed})"
        else:
            a = check_alpha(network, _floats(alpha, "--alpha"), normalize) if alpha is not None \
                else random_alpha(len(network.param_layers), rng, spread)
            params = alpha_parameters(network, a)
            what = "alpha " + ", ".join(f"{v:.17g}" for v in a)
        new_proto = apply_to_proto(imported.proto, params)
        x, source = _check_batch(network, data, split, x_key, mean, std, rng)
        before = OrtForward(imported.proto, network, "cpu")(x)[0]
        after = OrtForward(new_proto, network.with_parameters(params), "cpu")(x)[0]
        ok, diff = logits_agree(before, after, FIDELITY_RTOL)
        if not ok:
            raise MinsharpError(f"the rescaled model's logits differ by {diff:.3g} (tolerance "
                                f"{FIDELITY_RTOL:g}) on {source}: not written")
        write_atomically(output, new_proto.SerializeToString())
        Output(quiet).text(f"{what}\nlogits agree to {diff:.2g} (tolerance {FIDELITY_RTOL:g}) "
                           f"on {source}\nwrote {output}")
        return 0

    run_guarded(debug, body)


def _check_batch(network, data, split, x_key, mean, std, rng, size: int = 64):
    """A batch to compare logits on: the first samples of --data, or standard normal inputs."""
    from .data import Preprocessing, load_batches

    if data is None:
        return rng.standard_normal((size,) + network.input_shape), f"{size} random inputs"
    prep = Preprocessing(_floats(mean, "--mean"), _floats(std, "--std"))
    xs, info = load_batches(data, network.input_shape, prep, size, split, x_key, size)
    return xs[0], f"{info['samples']} samples of {data}"


@app.command()
def invariance(
    model: Path = typer.Argument(..., help="ONNX model file."),
    data: Path = typer.Option(..., "--data", help=".npz data file."),
    split: O.Split = "train",
    x_key: O.XKey = None,
    mean: O.Mean = None,
    std: O.Std = None,
    limit: int = typer.Option(1000, help="Samples to score (held in memory for all trials)."),
    batch_size: O.BatchSize = None,
    provider: O.Provider = "auto",
    engine: O.Engine = "numpy",
    precision: O.Precision = None,
    workers: O.Workers = None,
    memory_budget: O.MemoryBudget = "1G",
    trials: int = typer.Option(50, help="Number of α draws."),
    seed: int = typer.Option(0, help="Seed of the hypothesis draws."),
    spread: float = typer.Option(6.0, help="Decades spanned by the drawn α (at least 6 recommended)."),
    rtol: Optional[float] = typer.Option(None, help="Tolerance on the relative MS deviation (default 1e-9 for the float64 reference, 1e-4 otherwise)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the versioned JSON report here."),
    input_shape: O.InputShape = None,
    debug: bool = typer.Option(False, "--debug"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no report: only errors (the JSON and the exit code stay)."),
    y_key: O.YKey = None,
    loss: O.Loss = None,
    neurons: bool = typer.Option(False, "--neurons", help="Draw neuron-wise rescalings (one factor per unit/channel) and check the neuron-wise minimum sharpness instead (docs/method.md section 13)."),
):
    """Check that minimum sharpness does not move under α-scale transformations drawn by
    hypothesis, while the naive trace does (with --neurons: the neuron-wise minimum sharpness
    under neuron-wise rescalings, while the layer-wise one and the naive trace move). Exit 1
    when it moves by more than --rtol."""

    def body() -> int:
        from .api import batch_size_for, with_loss
        from .data import Preprocessing, check_labels_against_loss, load_batches
        from .invariance import check_invariance
        from .onnx_import import import_model
        from .report import Output, invariance_blocks, neuron_invariance_blocks

        options = O.run_options(engine, precision, provider, workers, batch_size, memory_budget,
                                loss=loss)
        kw = O.data_options(split, x_key, y_key, mean, std, limit, input_shape)
        if trials < 1:
            raise MinsharpError(f"--trials must be at least 1, not {trials}")
        if spread <= 0:
            raise MinsharpError(f"--spread must be positive, not {spread:g}")
        if json_path is not None:
            check_output_dir(json_path)
        with Phases(enabled=not quiet) as phases:
            phases.start("import")
            imported = with_loss(import_model(model, kw["input_shape"]), options.loss)
            network = imported.network
            prep = Preprocessing(kw["mean"], kw["std"])
            bs = batch_size_for(network, options.memory_budget, options.batch_size,
                                options.precision, options.engine, options.provider)
            labels = check_labels_against_loss(data, split, x_key, y_key, limit,
                                               network.num_classes, network.loss)
            # held in memory: every trial re-scores the same batches
            xs, info = load_batches(data, network.input_shape, prep, bs, split, x_key, limit)
            info["y_key"] = labels
            phases.start("trials", trials, "trials")
            check = check_invariance
            if neurons:
                from .neuron_invariance import check_neuron_invariance as check
            result = check(imported, xs, options=options, trials=trials, seed=seed,
                           spread=spread, rtol=rtol, data_info=info,
                           on_trial=lambda _: phases.advance())
        if json_path is not None:
            write_atomically(json_path, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
        output = Output(quiet)
        output.report(neuron_invariance_blocks(result, info["samples"]) if neurons
                      else invariance_blocks(result, info["samples"]))
        for w in result.warnings:
            output.warning(w)
        return 0 if result.passed else 1

    run_guarded(debug, body)


@app.command()
def verify(
    model: Path = typer.Argument(..., help="ONNX model file."),
    data: Path = typer.Option(..., "--data", help=".npz data file."),
    expected: Path = typer.Option(..., "--expected", help="Their numbers: minsharp-ref/expected/v1 or our score JSON."),
    expected_diag: Optional[Path] = typer.Option(None, "--expected-diag", help="Their Hessian diagonals (.npz keyed by initializer name)."),
    split: O.Split = "train",
    x_key: O.XKey = None,
    y_key: O.YKey = None,
    mean: O.Mean = None,
    std: O.Std = None,
    limit: O.Limit = None,
    batch_size: O.BatchSize = None,
    provider: O.Provider = "auto",
    engine: O.Engine = "numpy",
    precision: O.Precision = None,
    workers: O.Workers = None,
    memory_budget: O.MemoryBudget = "1G",
    input_shape: O.InputShape = None,
    rtol: list[str] = typer.Option([], "--rtol", help=f"Relative tolerance (default {1e-5:g}); 'quantity:value' overrides one quantity."),
    atol: list[str] = typer.Option([], "--atol", help=f"Absolute tolerance (default {1e-8:g}); 'quantity:value' overrides one."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the comparison report here."),
    debug: bool = typer.Option(False, "--debug"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, no report: only errors (the JSON and the exit code stay)."),
    loss: O.Loss = None,
):
    """Compare another framework's traces (and diagonals) with ours. Exit 0 all pass, 1 any
    fail, 2 input error."""

    def body() -> int:
        from .api import score as run_score
        from .verify import (DEFAULT_ATOL, DEFAULT_RTOL, VERIFY_SCHEMA, compare, data_mismatches,
                             load_expected, load_expected_diagonal, parse_tolerances, table_rows)
        from .report import Output, verify_blocks

        options = O.run_options(engine, precision, provider, workers, batch_size, memory_budget,
                                diagonal=expected_diag is not None, loss=loss)
        data_kwargs = O.data_options(split, x_key, y_key, mean, std, limit, input_shape)
        rtols = parse_tolerances(rtol, "--rtol", DEFAULT_RTOL)
        atols = parse_tolerances(atol, "--atol", DEFAULT_ATOL)
        theirs = load_expected(expected)
        theirs_diag = load_expected_diagonal(expected_diag) if expected_diag else None
        if json_path is not None:
            check_output_dir(json_path)
        with Phases(enabled=not quiet) as phases:
            phases.start("import")
            on_start, progress = phases.samples()
            result = run_score(model, data, **data_kwargs, options=options,
                               progress=progress, on_start=on_start, on_phase=phases.maybe_slow)
        notes = data_mismatches(result, theirs)
        rows = compare(result, theirs, result.diagonal, theirs_diag, rtols, atols)
        failed = [r for r in rows if r.status in ("FAIL", "UNKNOWN")]
        missing = [r for r in rows if r.status == "MISSING"]
        summary = (f"{'FAIL' if failed else 'PASS'}: {len(rows) - len(failed) - len(missing)} "
                   f"passed, {len(failed)} failed, {len(missing)} not provided by theirs "
                   f"({result.data['samples']} samples, {result.provider})")
        output = Output(quiet)
        output.report(verify_blocks(notes, table_rows(rows), summary))
        for w in result.warnings:
            output.warning(w)
        if json_path is not None:
            from .api import json_safe

            doc = {"schema": VERIFY_SCHEMA, "minsharp_ref_version": __version__,
                   "model": result.model, "data": result.data, "loss_kind": result.loss_kind,
                   "expected": str(expected),
                   "data_mismatches": notes, "rtol": rtols, "atol": atols,
                   "rows": [r.__dict__ for r in rows], "passed": not failed,
                   "warnings": list(result.warnings)}
            write_atomically(json_path, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
        return 1 if failed else 0

    run_guarded(debug, body)


@app.command("export-trace-graph")
def export_trace_graph(
    model: Path = typer.Argument(..., help="ONNX model file."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the trace graph (.onnx)."),
    precision: str = typer.Option("float32", help="float32 or float64 (every tensor of the graph)."),
    diag: bool = typer.Option(False, "--diag", help="Also output the batch sums of the exact Hessian diagonal of every parameter tensor."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape for models with dynamic input dimensions."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Write the trace graph of MODEL: the exact per-sample Hessian-trace computation as one
    ONNX graph that any ONNX runtime can run (docs/trace-graph.md)."""

    def body() -> int:
        from .onnx_import import import_model
        from .trace_graph.export import trace_graph_bytes

        check_output_dir(output)
        imported = import_model(model, _ints(input_shape, "--input-shape"))
        data = trace_graph_bytes(imported.network, precision, diag)
        write_atomically(output, data)
        typer.echo(f"wrote {output} ({len(data) / 2 ** 20:.1f} MiB, {precision}"
                   f"{', with the Hessian diagonal' if diag else ''}; passes onnx.checker full check)")
        return 0

    run_guarded(debug, body)


app.command()(spectrum)


@app.command()
def version():
    """Print the version."""
    typer.echo(f"minsharp-ref {__version__}")


def main() -> None:
    """Console entry point: usage errors too become one ``error: …`` line and exit code 2."""
    try:  # recent typer vendors click; older releases use click itself
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exceptions

    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        code = 2
    except click_exceptions.UsageError as exc:
        typer.echo(f"error: {exc.format_message()} (see --help)", err=True)
        code = 2
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        code = 2
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
