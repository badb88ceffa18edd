"""The Python API: ``score`` a model on data, returning a typed ``ScoreResult``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from . import __version__
from .data import Preprocessing, open_dataset
from .engine import bytes_per_sample, per_sample_traces, tensor_columns
from .errors import MinsharpError
from .group import (folded_inputs, folded_view, group_sharpness, log_scale_names,
                    rescaling_group)
from .ir import Network
from .onnx_import import ImportedModel, import_model
from .runtime import FIDELITY_RTOL, OrtUnavailable, check_fidelity, cuda_usable, make_forward
from .trace_graph.memory import graph_bytes_per_sample

SCORE_SCHEMA = "minsharp-ref/score/v1"
DEFAULT_MEMORY_BUDGET = 1024 ** 3  # bytes
DEFAULT_BATCH_SIZE = 256
DEFAULT_BATCH_BYTES = 128 * 1024 ** 2  # per batch, for the default batch size
#: Samples of the first batch on which the IR and onnxruntime logits are compared.
FIDELITY_SAMPLES = 64
PRECISIONS = {"float64": np.float64, "float32": np.float32}
ENGINES = ("numpy", "onnxruntime")
#: default precision per engine: the reference in float64, the fast engine in float32
DEFAULT_PRECISION = {"numpy": "float64", "onnxruntime": "float32"}
#: Samples of the first batch that the float64 NumPy engine re-scores to certify a fast run,
#: and the largest relative deviation of a per-tensor trace it accepts (``engine_check``).
ENGINE_CHECK_SAMPLES = 64
ENGINE_CHECK_RTOL = 1e-4


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


@dataclass
class TraceSums:
    """Running float64 sums over samples of the per-sample trace vector v (one entry per
    parameter tensor), of v vᵀ (for standard errors), and of loss and correct predictions."""

    columns: int
    n: int = 0
    total: np.ndarray = None  # type: ignore[assignment]
    outer: np.ndarray = None  # type: ignore[assignment]
    loss: float = 0.0
    correct: int = 0  # correct predictions (not counted for mse)

    def __post_init__(self):
        self.total = np.zeros(self.columns)
        self.outer = np.zeros((self.columns, self.columns))

    def add(self, v: np.ndarray):
        self.n += len(v)
        self.total += v.sum(axis=0)
        self.outer += v.T @ v

    def merge(self, other: "TraceSums"):
        """Add another shard's sums (the sums of consecutive samples after these)."""
        self.n += other.n
        self.total += other.total
        self.outer += other.outer
        self.loss += other.loss
        self.correct += other.correct

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.n

    def stderr(self, weights: np.ndarray) -> float:
        """Standard error of Σ_j w_j mean_j over samples (delta method with w = gradient)."""
        if self.n < 2:
            return float("nan")
        cov = (self.outer - self.n * np.outer(self.mean, self.mean)) / (self.n - 1)
        return float(math.sqrt(max(weights @ cov @ weights, 0.0) / self.n))


def batch_size_for(network: Network, memory_budget: int, requested: Optional[int],
                   precision: str = "float64", engine: str = "numpy", provider: str = "cpu") -> int:
    """The requested batch size, lowered so that the ENGINE_WORKERS batches in flight fit
    the budget together. By default, at most 256 samples, and on the CPU about
    DEFAULT_BATCH_BYTES of engine memory per batch: small batches stay in cache (LeNet: ~40
    samples for the NumPy engine, ~20 for the trace graph, which measured about 10% fewer
    CPU seconds than at 80). The trace graph on CUDA (``provider`` "cuda", or "auto" where
    CUDA loads) runs faster on large batches: as many as fit."""
    if requested is not None and requested < 1:
        raise MinsharpError(f"--batch-size must be at least 1, not {requested}")
    if memory_budget <= 0:
        raise MinsharpError(f"--memory-budget must be positive, not {memory_budget}")
    itemsize = np.dtype(PRECISIONS.get(precision, np.float64)).itemsize
    per_sample = (bytes_per_sample(network, itemsize) if engine == "numpy"
                  else graph_bytes_per_sample(network, itemsize)) * ENGINE_WORKERS
    if per_sample > memory_budget:
        raise MinsharpError(f"one sample in each of the {ENGINE_WORKERS} engine workers needs "
                            f"about {per_sample / 2 ** 20:.1f} MiB, more than --memory-budget "
                            f"({memory_budget / 2 ** 20:.1f} MiB)")
    fit = memory_budget // per_sample
    on_cpu = engine == "numpy" or provider == "cpu" or (provider == "auto" and not cuda_usable())
    cache_sized = DEFAULT_BATCH_BYTES * ENGINE_WORKERS // per_sample if on_cpu else fit
    default = max(1, min(DEFAULT_BATCH_SIZE, cache_sized))
    return int(min(requested or default, fit))


@dataclass
class EngineRun:
    """What one pass over the data produced."""

    sums: TraceSums
    provider: str
    fidelity: Optional[float]
    timings: dict
    diagonal_sum: Optional[dict] = None  # initializer name → Σ over samples of diag H
    per_sample: Optional[np.ndarray] = None  # (N, tensors), columns of tensor_columns
    warnings: list = field(default_factory=list)
    engine: str = "numpy"
    precision: str = "float64"  # what actually ran
    engine_check: Optional[dict] = None  # the fast engine's certification

    @property
    def diagonal(self) -> Optional[dict]:
        """Initializer name → diag H (mean over samples)."""
        return None if self.diagonal_sum is None else \
            {k: v / self.sums.n for k, v in self.diagonal_sum.items()}


#: Batches processed at once, each by one worker thread with single-threaded BLAS (numpy's
#: elementwise work is single-threaded, so two workers use both cores). Fixed, not the
#: machine's core count, so that the batch size and every result are the same everywhere.
ENGINE_WORKERS = 2


@dataclass
class _Batch:
    x: np.ndarray
    logits: np.ndarray
    traces: np.ndarray
    diagonal: Optional[dict]
    seconds: tuple[float, float]  # forward, engine


class _InLine:
    """An executor that runs each job at once on the calling thread (``traces_over`` with
    a thread budget)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        try:
            future.set_result(fn(*args))
        except MinsharpError as exc:
            future.set_exception(exc)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def traces_over(imported: ImportedModel, xs: Iterable[np.ndarray], labels: Optional[np.ndarray],
                provider: str, progress: Optional[Callable[[int], None]] = None,
                precision: Optional[str] = None, check: bool = True, diagonal: bool = False,
                per_sample: bool = False, engine: str = "numpy", first_sample: int = 0,
                threads: Optional[int] = None) -> EngineRun:
    """Run forward + engine over batches, ENGINE_WORKERS batches at a time (one on CUDA; at
    most ``threads``), and accumulate the results in float64 in batch order (the result does
    not depend on the number of threads). ``engine`` "onnxruntime" runs the trace graph,
    certified on its first samples by the float64 NumPy engine (``certify``); its checks run
    on a thread of their own beside the batches, or in line when ``threads`` is given.
    ``first_sample``: the index of the first sample in the data set (for error messages)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    network = imported.network
    if engine not in ENGINES:
        raise MinsharpError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    precision = precision or DEFAULT_PRECISION[engine]
    if precision not in PRECISIONS:
        raise MinsharpError(f"--precision must be float64 or float32, not {precision!r}")
    columns = len(tensor_columns(network))
    folded = None
    if engine == "onnxruntime":
        from .trace_graph.runner import TraceGraphRunner

        folded = folded_view(network)  # BatchNorm: its columns follow the original ones
        runner = TraceGraphRunner(network, provider, precision, diagonal)
        provider_used, precision, workers = runner.provider, runner.precision, runner.workers

        def job(x: np.ndarray) -> _Batch:
            t0 = time.perf_counter()
            traces, logits, diag = runner(x)
            return _Batch(x, logits, traces, diag, (0.0, time.perf_counter() - t0))
    else:
        dtype = PRECISIONS[precision]
        signal_network = network if dtype == np.float64 else network.astype(dtype)
        folded = folded_view(network)  # BatchNorm: also the folded network's traces
        signal_folded = folded if folded is None or dtype == np.float64 else folded.astype(dtype)
        forward = make_forward(imported.proto, network, provider, threads=1)
        provider_used, workers = forward.name, ENGINE_WORKERS

        def job(x: np.ndarray) -> _Batch:
            t0 = time.perf_counter()
            logits, inputs = forward(x)
            if not np.all(np.isfinite(logits)):
                return _Batch(x, logits, np.empty(0), None, (0.0, 0.0))
            t1 = time.perf_counter()
            traces, diag = per_sample_traces(signal_network, inputs, logits, dtype, diagonal=True) \
                if diagonal else (per_sample_traces(signal_network, inputs, logits, dtype), None)
            if folded is not None:  # columns after the original ones
                traces = np.hstack([traces, per_sample_traces(
                    signal_folded, folded_inputs(network, folded, inputs), logits, dtype)])
            return _Batch(x, logits, traces, diag, (t1 - t0, time.perf_counter() - t1))

    sums = TraceSums(columns + (0 if folded is None else len(tensor_columns(folded))))
    t_forward = t_engine = 0.0
    fidelity = engine_check = None
    diag_sums: Optional[dict] = None
    rows = []
    held: list = []  # the first samples and their fast traces, for the engine check
    warnings = [runner.warning] if engine == "onnxruntime" and runner.warning else []

    def collect(wait: bool):
        """The results of the checks that have finished (with ``wait``, of all of them)."""
        nonlocal fidelity, engine_check, fidelity_job, checking
        if fidelity_job is not None and (wait or fidelity_job.done()):
            fidelity, fidelity_job = fidelity_job.result(), None
        if checking is not None and (wait or checking.done()):
            engine_check, checking = checking.result(), None

    def consume(batch: _Batch):
        nonlocal check, diag_sums, t_forward, t_engine, checking, fidelity_job, fidelity
        if not np.all(np.isfinite(batch.logits)):
            bad = int(np.argmax(~np.isfinite(batch.logits).all(axis=1)))
            raise MinsharpError(f"the logits are NaN/Inf for sample {first_sample + sums.n + bad}: "
                                "the network overflows on this input")
        if check:
            m = FIDELITY_SAMPLES
            if engine == "onnxruntime":  # checks beside the batches (docs/method.md, section 11)
                fidelity_job = checker.submit(check_fidelity, imported.proto, network, batch.x[:m])
            else:
                try:
                    fidelity = check_fidelity(imported.proto, network, batch.x[:m],
                                              batch.logits[:m] if provider_used != "numpy" else None)
                except OrtUnavailable as exc:
                    warnings.append(f"import fidelity not checked: {exc}")
            check = False
        if (engine == "onnxruntime" and engine_check is None and checking is None
                and np.all(np.isfinite(batch.traces))):
            held.append((batch.x, batch.traces))  # until ENGINE_CHECK_SAMPLES are held
            if sum(len(x) for x, _ in held) >= ENGINE_CHECK_SAMPLES:
                checking = checker.submit(certify, network, *map(np.concatenate, zip(*held)))
        collect(wait=False)  # a failed check stops the run as soon as it is known
        if not np.all(np.isfinite(batch.traces)):
            raise MinsharpError("the traces overflow (NaN/Inf) in the batch starting at sample "
                                f"{first_sample + sums.n}")
        if batch.diagonal is not None:
            diag_sums = batch.diagonal if diag_sums is None else \
                {k: diag_sums[k] + v for k, v in batch.diagonal.items()}
        sums.add(batch.traces)
        if per_sample:
            rows.append(batch.traces[:, :columns])
        t_forward += batch.seconds[0]
        t_engine += batch.seconds[1]
        if labels is not None:
            loss, correct = loss_and_correct(batch.logits, labels[sums.n - len(batch.x):sums.n],
                                             network.loss)
            sums.loss += loss
            sums.correct += correct
        if progress:
            progress(len(batch.x))

    if threads is not None:
        workers = min(workers, threads)
    fidelity_job = checking = None  # the onnxruntime engine's checks, on their own thread
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool, \
            (ThreadPoolExecutor(1) if threads is None else _InLine()) as checker:
        pending: deque = deque()
        for x in xs:
            pending.append(pool.submit(job, x))
            if len(pending) >= max(workers, 2):  # the next batch is read while one runs
                consume(pending.popleft().result())
        while pending:
            consume(pending.popleft().result())
        collect(wait=True)
    if sums.n == 0:
        raise MinsharpError("no samples to score")
    if engine == "onnxruntime" and engine_check is None:  # fewer samples than the check takes
        engine_check = certify(network, *map(np.concatenate, zip(*held)))
    return EngineRun(
        sums, provider_used, fidelity, {"forward_s": t_forward, "engine_s": t_engine},
        diag_sums,
        np.concatenate(rows) if per_sample else None, warnings, engine, precision, engine_check)


def certify(network: Network, x: np.ndarray, traces: np.ndarray) -> dict:
    """The fast engine's certificate: its first ENGINE_CHECK_SAMPLES samples re-scored by
    the float64 NumPy engine; the largest relative deviation of a per-tensor trace (mean
    over those samples; every column, a BatchNorm network's folded view's included),
    |fast − ref| / |ref|, must be at most ENGINE_CHECK_RTOL (a tensor
    whose reference trace is 0 counts its absolute deviation relative to the total)."""
    m = ENGINE_CHECK_SAMPLES
    logits, inputs = network.forward(x[:m], keep_inputs=True)
    ref = per_sample_traces(network, inputs, logits)
    folded = folded_view(network)
    if folded is not None:  # BatchNorm: the folded parametrisation's columns are checked too
        ref = np.hstack([ref, per_sample_traces(folded, folded_inputs(network, folded, inputs),
                                                logits)])
    ref = ref.mean(axis=0)
    fast = traces[:m].mean(axis=0)
    scale = np.where(ref != 0, np.abs(ref), max(float(np.abs(ref).sum()), np.finfo(float).tiny))
    deviation = float(np.max(np.abs(fast - ref) / scale))
    # rounded to 2 significant digits: a diagnostic that must not depend on thread timing
    deviation = float(f"{deviation:.2g}")
    if not deviation <= ENGINE_CHECK_RTOL:
        raise MinsharpError(f"engine check failed: the onnxruntime engine's per-tensor traces "
                            f"differ from the float64 NumPy engine's by {deviation:.3g} "
                            f"(relative, on the first {min(m, len(x))} samples; "
                            f"tolerance {ENGINE_CHECK_RTOL:g}); use --engine numpy")
    return {"max_relative_deviation": deviation, "samples": int(min(m, len(x))),
            "tolerance": ENGINE_CHECK_RTOL}


def loss_and_correct(logits: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, int]:
    """Summed loss and number of correct predictions of a batch (docs/method.md, section 1):
    cross-entropy logsumexp(z) − z_y and arg-max; binary cross-entropy of σ(z), computed as
    max(z, 0) − y·z + log(1 + e^{−|z|}), and z > 0; mse (1/K) Σ_k (z_k − y_k)², no accuracy."""
    if loss == "binary":
        z = logits[:, 0]
        bce = np.maximum(z, 0.0) - y * z + np.log1p(np.exp(-np.abs(z)))
        return float(bce.sum()), int(np.sum((z > 0) == (y == 1)))
    if loss == "mse":
        d = logits - y.reshape(logits.shape)
        return float(np.einsum("nk,nk->", d, d) / logits.shape[1]), 0
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.sum(lse - z[np.arange(len(y)), y])), int(np.sum(np.argmax(logits, axis=1) == y))


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
    return Summary(layers, float(mean[:len(cols)].sum()), sums.stderr(original), ms.value,
                   ms_se, solver, loss, acc, warnings, log_scale_names(group, ms), folded_doc)


def more_measures(network: Network, layers: list[LayerResult], diagonal: dict) -> dict:
    """``--measures``: normalised sharpness per layer and the per-layer traces at α*
    (Proposition 2: t_d/α*_d², u_d/c*_d²; all equal to MS/D without biases)."""
    from .measures import normalised_sharpness

    ns = normalised_sharpness(network, diagonal)
    at_alpha = []
    c = 1.0
    for layer in layers:
        if layer.alpha is None:
            at_alpha.append({"weight": None, "bias": None})
            continue
        c *= layer.alpha
        at_alpha.append({"weight": layer.trace_weight / layer.alpha ** 2,
                         "bias": None if layer.trace_bias is None else layer.trace_bias / c ** 2})
    return {
        "normalised_sharpness": {
            "value": sum(n.value for n in ns),
            "layers": [{"value": n.value, "lower_bound": n.lower_bound,
                        "gradient_norm": n.gradient_norm} for n in ns]},
        "traces_at_alpha": at_alpha,
    }


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
          scatter_data: bool = False) -> ScoreResult:
    """Exact per-tensor Hessian traces and the minimum sharpness of an ONNX model on data.

    ``model``: path of an .onnx file (or an ``ImportedModel``); ``data``: path of an .npz.
    With ``diagonal`` the result's ``diagonal`` attribute holds the exact Hessian diagonal of
    every parameter tensor (initializer name → array); with ``per_sample`` its ``per_sample``
    attribute holds each sample's trace contributions (initializer name → (N,), and
    ``"trace"``); with ``measures``, ``measures`` holds normalised sharpness and the traces
    at α*. ``engine``: "numpy" (the float64 reference, default) or "onnxruntime" (the trace
    graph, float32 unless ``precision="float64"``, certified against the reference on the
    first 64 samples); ``precision`` defaults to the engine's. ``loss`` ("cross-entropy",
    "binary" or "mse") overrides the loss the model's head suggests. With a Dask ``client``
    (``distributed.Client``) the samples are scored in shards of ``shard_size`` consecutive
    samples on its workers (docs/dask.md); without one, in this process (in one piece, or
    shard by shard when ``shard_size`` is given). Raises
    ``MinsharpError`` on bad input.
    """
    from .shards import SHARD_BATCHES, DataSpec, merge, score_shard, shard_ranges

    start = time.perf_counter()
    imported = model if isinstance(model, ImportedModel) else import_model(
        model, None if input_shape is None else tuple(input_shape))
    imported = with_loss(imported, loss)
    t_import = time.perf_counter() - start
    network = imported.network
    if measures and (not network.is_chain or network.has_batchnorm):
        raise MinsharpError("--measures supports chain networks without BatchNorm only")
    dataset = open_dataset(data, split, x_key, y_key, limit)
    dataset.close()
    prep = Preprocessing(mean, std)
    if engine not in ENGINES:
        raise MinsharpError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    precision = precision or DEFAULT_PRECISION[engine]
    bs = batch_size_for(network, memory_budget, batch_size, precision, engine, provider)
    path = dataset.path if client is None else dataset.path.resolve()  # workers' cwd may differ
    spec = DataSpec(str(path), split, dataset.x_key, dataset.y_key, limit, prep, bs)
    options = {"provider": provider, "precision": precision, "diagonal": diagonal or measures,
               "per_sample": per_sample, "engine": engine}
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
    sums = run.sums
    data_info = {"path": str(dataset.path), "x_key": dataset.x_key, "y_key": dataset.y_key,
                 "samples": sums.n, "preprocessing": prep.describe(dataset.x.dtype),
                 "batch_size": min(bs, sums.n), "precision": run.precision}
    summary = summarise(imported, sums, dataset.y is not None)
    timings = {"import_s": t_import, **run.timings, "total_s": time.perf_counter() - start}
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
        measures=more_measures(network, summary.layers, run.diagonal) if measures else None,
        loss_kind=network.loss, diagonal=run.diagonal, per_sample=per_sample_dict,
        classes=tuple(summary.classes), folded=summary.folded, distributed=distributed)
    return result


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
    run = traces_over(imported, xs, None, provider, precision=precision, engine=engine)
    summary = summarise(imported, run.sums, False)
    return summary.layers, summary.trace, summary.minimum_sharpness
