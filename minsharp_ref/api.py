"""The Python API: ``score`` a model on data, returning a typed ``ScoreResult``; the results
and their summary (per-layer traces, naive trace, minimum sharpness). The pass over the data
itself is ``scoring.traces_over``, re-exported here."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import __version__
from .data import Preprocessing, open_dataset
from .engine import tensor_columns
from .errors import MinsharpError
from .group import folded_view, group_sharpness, log_scale_names, rescaling_group
from .ir import Network
from .onnx_import import ImportedModel, import_model
from .runtime import FIDELITY_RTOL
from .options import RunOptions
from .scoring import (DEFAULT_MEMORY_BUDGET, DEFAULT_PRECISION, ENGINES, TraceSums,  # noqa: F401
                      batch_size_for, traces_over)  # traces_over, batch_size_for: public here too

SCORE_SCHEMA = "minsharp-ref/score/v1"


@dataclass(frozen=True)
class LayerResult:
    index: int
    name: str
    kind: str
    weight: str
    bias: Optional[str]
    weight_shape: tuple[int, ...]
    trace_weight: float
    trace_bias: Optional[float]
    alpha: Optional[float]


@dataclass(frozen=True)
class ScoreResult:
    """Everything ``score`` reports; ``to_dict`` gives the versioned JSON document."""

    model: dict
    data: dict
    provider: str
    engine: str
    precision: str
    engine_check: Optional[dict]
    layers: tuple[LayerResult, ...]
    trace: float
    trace_stderr: float
    minimum_sharpness: float
    minimum_sharpness_stderr: Optional[float]
    solver: dict
    loss: Optional[float]
    accuracy: Optional[float]
    postprocessing: tuple[str, ...]
    fidelity: dict
    warnings: tuple[str, ...]
    timings: dict = field(compare=False)
    measures: Optional[dict] = None
    #: the loss whose Hessian was traced: "cross-entropy", "binary" or "mse"
    loss_kind: str = "cross-entropy"
    #: standard error of ``loss`` over samples (None without labels)
    loss_stderr: Optional[float] = None
    #: with a Dask client: scheduler, workers, shards, shard_size, seconds (docs/dask.md)
    distributed: Optional[dict] = field(default=None, compare=False)
    #: with ``diagonal=True``: initializer name → exact diag H (mean over samples); not in JSON
    diagonal: Optional[dict] = field(default=None, repr=False, compare=False)
    #: with ``per_sample=True``: initializer name → (N,) contributions, and "trace"; not in JSON
    per_sample: Optional[dict] = field(default=None, repr=False, compare=False)
    #: α* = e^{ℓ*} per free class of the rescaling group (docs/method.md section 9)
    classes: tuple[dict, ...] = ()
    #: networks with BatchNorm: the folded parametrisation that minimum sharpness is
    #: computed on (docs/method.md section 10): its layers, naive trace and standard error
    folded: Optional[dict] = None
    #: which forward produced the activations the traces are computed from, and in which
    #: precision: "numpy-float64" (the IR, float64 end to end), "onnxruntime-cpu-float32"
    #: (the NumPy engine on onnxruntime's activations), "trace-graph-cpu-float32", ...
    forward: str = "numpy-float64"

    def to_dict(self) -> dict:
        doc = {"schema": SCORE_SCHEMA, "minsharp_ref_version": __version__}
        doc.update(asdict(self))
        del doc["diagonal"], doc["per_sample"]
        doc["layers"] = [dict(asdict(l), weight_shape=list(l.weight_shape)) for l in self.layers]
        doc["postprocessing"] = list(self.postprocessing)
        doc["warnings"] = list(self.warnings)
        return json_safe(doc)


def json_safe(value):
    """Plain JSON types: tuples as lists, numpy scalars as Python numbers, NaN/Inf as null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def with_loss(imported: ImportedModel, loss: Optional[str]) -> ImportedModel:
    """The model with its loss kind overridden (``--loss``); None keeps the head's."""
    from dataclasses import replace

    from .onnx_import.head import LOSS_KINDS

    if loss is None or loss == imported.network.loss:
        return imported
    if loss not in LOSS_KINDS:
        raise MinsharpError(f"--loss must be one of {', '.join(LOSS_KINDS)}, not {loss!r}")
    k = imported.network.num_classes
    if loss == "binary" and k != 1:
        raise MinsharpError(f"--loss binary needs a single logit; the model has {k} outputs")
    if loss == "cross-entropy" and k < 2:
        raise MinsharpError("--loss cross-entropy needs at least 2 logits; the model has 1")
    return replace(imported, network=replace(imported.network, loss=loss))


@dataclass(frozen=True)
class Summary:
    layers: list[LayerResult]
    trace: float
    trace_stderr: float
    minimum_sharpness: float
    minimum_sharpness_stderr: Optional[float]
    solver: dict
    loss: Optional[float]
    accuracy: Optional[float]
    warnings: list[str]
    classes: list[dict] = field(default_factory=list)
    folded: Optional[dict] = None
    loss_stderr: Optional[float] = None
    #: per layer of the scored parametrisation (the folded one with BatchNorm): the traces
    #: at the minimiser, t_p/α_p² and u_p/c_p² (section 9; they sum to MS); None when dead
    traces_at_alpha: list[dict] = field(default_factory=list)


def _layer_results(network: Network, t, u, alpha) -> list[LayerResult]:
    return [LayerResult(
        index=i + 1, name=layer.nodes[0], kind=layer.kind, weight=layer.weight_name,
        bias=layer.bias_name if layer.bias is not None else None,
        weight_shape=tuple(int(s) for s in layer.weight.shape),
        trace_weight=float(t[i]), trace_bias=float(u[i]) if layer.bias is not None else None,
        alpha=None if alpha is None else float(alpha[i]))
        for i, layer in enumerate(network.param_layers)]


def _layer_traces(network: Network, values: np.ndarray):
    """(t, u): weight and bias trace per parameterised layer from the column means."""
    d = len(network.param_layers)
    t, u = np.zeros(d), np.zeros(d)
    for (layer, which, _), value in zip(tensor_columns(network), values):
        (t if which == "weight" else u)[layer] = value
    return t, u


def summarise(imported: ImportedModel, sums: TraceSums, has_labels: bool) -> Summary:
    """Per-layer results, naive trace and minimum sharpness from the sums: over the
    rescaling group of docs/method.md section 9, on the folded network when there is
    BatchNorm (section 10; its columns follow the original ones, see ``traces_over``)."""
    network = imported.network
    cols = tensor_columns(network)
    mean = sums.mean
    folded = folded_view(network)
    scored = folded or network
    offset = 0 if folded is None else len(cols)
    scored_cols = tensor_columns(scored)
    t, u = _layer_traces(scored, mean[offset:offset + len(scored_cols)])
    group = rescaling_group(scored)
    ms = group_sharpness(group, t, u)
    warnings = []
    for l in ms.dead_layers:
        warnings.append(f'layer {l + 1} ("{scored.param_layers[l].nodes[0]}") has zero weight '
                        f"trace (a dead layer): minimum sharpness {ms.value:.6g} is an infimum, "
                        "not attained by any rescaling")
    if not ms.converged:
        warnings.append(f"the minimum-sharpness solver stopped after {ms.iterations} steps with "
                        f"relative gradient {ms.gradient_norm:.2g}")
    scales = ms.layer_scales(group)
    alpha = None if scales is None else scales[0]
    scored_layers = _layer_results(scored, t, u, alpha)
    if folded is None:
        layers = scored_layers
    else:
        layers = _layer_results(network, *_layer_traces(network, mean[:len(cols)]), None)
    ms_se = None
    if scales is not None:  # envelope theorem: ∂MS/∂t_p = 1/α_p², ∂MS/∂u_p = 1/c_p²
        grad = np.zeros(sums.columns)
        for j, (l, w, _) in enumerate(scored_cols):
            grad[offset + j] = 1 / scales[0][l] ** 2 if w == "weight" else 1 / scales[1][l] ** 2
        ms_se = sums.stderr(grad)
    solver = {"method": ms.method, "iterations": ms.iterations, "gradient_norm": ms.gradient_norm,
              "converged": ms.converged, "problem": "chain" if group.is_chain else "dag",
              "free_classes": group.size}
    loss = sums.loss / sums.n if has_labels else None
    acc = sums.correct / sums.n if has_labels and network.loss != "mse" else None
    original = np.zeros(sums.columns)
    original[:len(cols)] = 1.0
    folded_doc = None
    if folded is not None:
        weights = np.zeros(sums.columns)
        weights[offset:] = 1.0
        folded_doc = {"layers": scored_layers, "trace": float(mean[offset:].sum()),
                      "trace_stderr": sums.stderr(weights)}
    at_alpha = [{"weight": None if scales is None else float(t[p] / scales[0][p] ** 2),
                 "bias": None if scales is None or layer.bias is None
                 else float(u[p] / scales[1][p] ** 2)}
                for p, layer in enumerate(scored.param_layers)]
    return Summary(layers, float(mean[:len(cols)].sum()), sums.stderr(original), ms.value,
                   ms_se, solver, loss, acc, warnings, log_scale_names(group, ms), folded_doc,
                   sums.loss_stderr if has_labels else None, at_alpha)


def more_measures(network: Network, summary: Summary, diagonal: dict,
                  imported: Optional[ImportedModel] = None, rerun: Optional[Callable] = None) -> dict:
    """``--measures``: normalised sharpness per parameterised layer (docs/method.md section
    12; with BatchNorm on the original parametrisation, each γ a diagonal layer), the
    per-layer traces at the minimiser of MS (section 9: t_p/α*_p², u_p/c*_p², summing to MS;
    all equal to MS/D for a chain without biases; with BatchNorm on the folded view) and,
    given ``imported``, the neuron-wise minimum sharpness (section 13; ``rerun``: the second
    pass over the data for its standard error, see ``neuron_measure``)."""
    from .measures import normalised_sharpness

    ns = normalised_sharpness(network, diagonal)
    doc = {
        "normalised_sharpness": {
            "value": sum(n.value for n in ns),
            "layers": [{"value": n.value, "lower_bound": n.lower_bound,
                        "gradient_norm": n.gradient_norm} for n in ns]},
        "traces_at_alpha": summary.traces_at_alpha,
    }
    if imported is not None:
        from .neuron_measure import neuron_minimum_sharpness

        doc["neuron_minimum_sharpness"] = neuron_minimum_sharpness(imported, diagonal, rerun)
    return doc


def score(model, data, *, split: str = "train", x_key: Optional[str] = None,
          y_key: Optional[str] = None, mean: Optional[Sequence[float]] = None,
          std: Optional[Sequence[float]] = None, limit: Optional[int] = None,
          batch_size: Optional[int] = None, provider: str = "auto",
          memory_budget: int = DEFAULT_MEMORY_BUDGET, precision: Optional[str] = None,
          diagonal: bool = False, per_sample: bool = False, measures: bool = False,
          input_shape: Optional[Sequence[int]] = None, loss: Optional[str] = None,
          progress: Optional[Callable[[int], None]] = None,
          on_start: Optional[Callable[[int], None]] = None, engine: str = "numpy",
          client=None, shard_size: Optional[int] = None,
          scatter_data: bool = False,
          on_phase: Optional[Callable[[str], None]] = None,
          workers: Optional[int] = None,
          options: Optional[RunOptions] = None) -> ScoreResult:
    """Exact per-tensor Hessian traces and the minimum sharpness of an ONNX model on data.

    ``model``: path of an .onnx file (or an ``ImportedModel``); ``data``: path of an .npz.
    The run options (``engine``, ``precision``, ``provider``, ``workers``, ``batch_size``,
    ``memory_budget``, ``diagonal``, ``per_sample``, ``loss``) are checked before any work
    and travel as one ``RunOptions`` (or pass ``options``, a ``RunOptions``, instead of
    them). With ``diagonal`` the result's ``diagonal`` attribute holds the exact Hessian
    diagonal of every parameter tensor (initializer name → array); with ``per_sample`` its
    ``per_sample`` attribute holds each sample's trace contributions (initializer name →
    (N,), and ``"trace"``); with ``measures``, ``measures`` holds normalised sharpness and
    the traces at α*. ``engine``: "numpy" (the float64 reference, default: the IR's float64
    forward with ``provider`` "auto" or "numpy", onnxruntime's activations with "cpu" or
    "cuda") or "onnxruntime" (the trace graph, float32 unless ``precision="float64"``,
    certified against the reference on its first batch, at most 64 samples);
    ``precision`` defaults to the engine's. ``workers``: batches at once (default: the
    cores this process may use; the numbers do not depend on it). ``loss``
    ("cross-entropy", "binary" or "mse") overrides the loss the model's head suggests. With
    a Dask ``client`` (``distributed.Client``) the samples are scored in shards of
    ``shard_size`` consecutive samples on its workers (docs/dask.md); without one, in this
    process (in one piece, or shard by shard when ``shard_size`` is given).
    ``on_start(samples)`` and ``progress(n)`` report the pass over the data,
    ``on_phase("solver")`` its end (for a progress display). Raises ``MinsharpError`` on
    bad input.
    """
    from .shards import SHARD_BATCHES, DataSpec, merge, score_shard, shard_ranges

    given = dict(engine=engine, precision=precision, provider=provider, workers=workers,
                 batch_size=batch_size, memory_budget=memory_budget, diagonal=diagonal,
                 per_sample=per_sample, loss=loss)
    if options is None:
        options = RunOptions(**given)
    else:
        changed = [k for k, v in given.items() if v != RUN_DEFAULTS[k]]
        if changed:
            raise MinsharpError(f"give either options= or {', '.join(changed)}, not both")
    if measures and not options.diagonal:
        options = options.but(diagonal=True)
    start = time.perf_counter()
    imported = model if isinstance(model, ImportedModel) else import_model(
        model, None if input_shape is None else tuple(input_shape))
    imported = with_loss(imported, options.loss)
    t_import = time.perf_counter() - start
    network = imported.network
    dataset = open_dataset(data, split, x_key, y_key, limit)
    dataset.close()
    prep = Preprocessing(mean, std)
    bs = batch_size_for(network, options.memory_budget, options.batch_size, options.precision,
                        options.engine, options.provider)
    path = dataset.path if client is None else dataset.path.resolve()  # workers' cwd may differ
    spec = DataSpec(str(path), split, dataset.x_key, dataset.y_key, limit, prep, bs)
    samples = dataset.samples
    default = bs * SHARD_BATCHES if client is not None else samples
    ranges = shard_ranges(samples, default if shard_size is None else shard_size)
    if on_start:
        on_start(samples)
    distributed = None
    if client is None:
        runs = [score_shard(imported, spec, a, b, options, progress=progress) for a, b in ranges]
    else:
        from .distributed import run_shards

        runs, distributed = run_shards(client, imported, spec, ranges, options, progress, scatter_data)
    run = merge(runs)
    if on_phase:
        on_phase("solver")
    sums = run.sums
    data_info = {"path": str(dataset.path), "x_key": dataset.x_key, "y_key": dataset.y_key,
                 "samples": sums.n, "preprocessing": prep.describe(dataset.x.dtype),
                 "batch_size": min(bs, sums.n), "precision": run.precision}
    summary = summarise(imported, sums, dataset.y is not None)
    timings = {"import_s": t_import, **run.timings, "total_s": time.perf_counter() - start,
               "workers": run.workers}
    measures_doc = None
    if measures:  # the second pass (neuron-wise MS's s.e.) runs here, shard by shard
        def rerun(rescaled: ImportedModel) -> TraceSums:
            opts = options.but(diagonal=False, per_sample=False)
            return merge([score_shard(rescaled, spec, a, b, opts) for a, b in ranges]).sums

        measures_doc = more_measures(network, summary, run.diagonal, imported, rerun)
    originals = {name for _, _, name in tensor_columns(network)}  # not the folded view's
    per_sample_dict = None
    if run.per_sample is not None:  # initializer name → (N,), plus each sample's total
        per_sample_dict = {name: run.per_sample[:, i]
                           for i, (_, _, name) in enumerate(tensor_columns(network))}
        per_sample_dict["trace"] = run.per_sample.sum(axis=1)
    result = ScoreResult(
        model={"path": str(imported.path), "sha256": imported.sha256, "opset": network.opset,
               "input": network.input_name, "input_shape": list(network.input_shape),
               "logits": network.logits_name, "classes": network.num_classes},
        data=data_info, provider=run.provider, engine=run.engine, precision=run.precision,
        engine_check=run.engine_check, layers=tuple(summary.layers), trace=summary.trace,
        trace_stderr=summary.trace_stderr, minimum_sharpness=summary.minimum_sharpness,
        minimum_sharpness_stderr=summary.minimum_sharpness_stderr, solver=summary.solver,
        loss=summary.loss, accuracy=summary.accuracy, postprocessing=network.postprocessing,
        fidelity={"max_scaled_difference": run.fidelity, "tolerance": FIDELITY_RTOL},
        warnings=tuple(run.warnings + summary.warnings), timings=timings,
        measures=measures_doc, loss_kind=network.loss, loss_stderr=summary.loss_stderr,
        diagonal=None if run.diagonal is None else
        {k: v for k, v in run.diagonal.items() if k in originals},
        per_sample=per_sample_dict,
        classes=tuple(summary.classes), folded=summary.folded, distributed=distributed,
        forward=run.forward)
    return result


#: the defaults of ``score``'s run-option keywords (to refuse them beside ``options=``)
RUN_DEFAULTS = dict(engine="numpy", precision=None, provider="auto", workers=None,
                    batch_size=None, memory_budget=DEFAULT_MEMORY_BUDGET, diagonal=False,
                    per_sample=False, loss=None)


def score_arrays(model, x: np.ndarray, *, provider: str = "numpy", batch_size: int = 1000,
                 precision: Optional[str] = None, engine: str = "numpy",
                 loss: Optional[str] = None):
    """Score an in-memory input array already preprocessed and in the model's input shape
    (N, *input_shape). ``model`` is an .onnx path, a ModelProto or an ImportedModel;
    ``loss`` overrides the loss the head suggests.
    Returns (list of LayerResult, naive trace, minimum sharpness). For tests and other
    frameworks' code."""
    import onnx

    from .onnx_import import convert

    if isinstance(model, onnx.ModelProto):
        imported = ImportedModel(Path("<memory>"), "", model, convert(model))
    elif isinstance(model, ImportedModel):
        imported = model
    else:
        imported = import_model(model)
    imported = with_loss(imported, loss)
    x = np.asarray(x)
    if x.ndim < 1 or tuple(x.shape[1:]) != tuple(imported.network.input_shape) or len(x) == 0:
        raise MinsharpError(f"input of shape {x.shape}; the model expects (N, "
                            f"{', '.join(map(str, imported.network.input_shape))})")
    xs = (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    run = traces_over(imported, xs, None, RunOptions(engine=engine, precision=precision,
                                                     provider=provider))
    summary = summarise(imported, run.sums, False)
    return summary.layers, summary.trace, summary.minimum_sharpness
