"""One pass over the data: forward and trace engine per batch (ENGINE_WORKERS batches at a
time), float64 accumulation in batch order, the import-fidelity check and, for the fast
engine, its certification against the float64 NumPy engine (docs/method.md sections 6, 7
and 11). ``api.score`` and the per-shard function (``shards.score_shard``) both run it."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Iterable, Optional

import numpy as np

from .certificate import RTOL, Reference, certify, column_groups
from .engine import bytes_per_sample, per_sample_traces, tensor_columns
from .errors import MinsharpError
from .folded_traces import traces_with_folded
from .group import folded_inputs, folded_view
from .ir import Network
from .onnx_import import ImportedModel
from .runtime import OrtUnavailable, check_fidelity, cuda_usable, make_forward
from .trace_graph.memory import graph_bytes_per_sample

DEFAULT_MEMORY_BUDGET = 1024 ** 3  # bytes
DEFAULT_BATCH_SIZE = 256
DEFAULT_BATCH_BYTES = 128 * 1024 ** 2  # per batch, for the default batch size
#: Samples of the first batch on which the IR and onnxruntime logits are compared.
FIDELITY_SAMPLES = 64
PRECISIONS = {"float64": np.float64, "float32": np.float32}
ENGINES = ("numpy", "onnxruntime")
#: default precision per engine: the reference in float64, the fast engine in float32
DEFAULT_PRECISION = {"numpy": "float64", "onnxruntime": "float32"}
#: At most this many samples of the first batch (all of it when smaller) are re-scored by
#: the float64 NumPy engine to certify a fast run, and the largest relative deviation of a
#: per-tensor trace it accepts (``engine_check``).
ENGINE_CHECK_SAMPLES = 64
ENGINE_CHECK_RTOL = RTOL  # below the floor, see certificate.py


@dataclass
class TraceSums:
    """Running float64 sums over samples of the per-sample trace vector v (one entry per
    parameter tensor), of v vᵀ (for standard errors), of the per-sample loss and its square
    (for the loss's standard error) and of correct predictions (docs/method.md section 6)."""

    columns: int
    n: int = 0
    total: np.ndarray = None  # type: ignore[assignment]
    outer: np.ndarray = None  # type: ignore[assignment]
    loss: float = 0.0
    loss_squares: float = 0.0  # Σ over samples of the squared per-sample loss
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
        self.loss_squares += other.loss_squares
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

    def add_losses(self, losses: np.ndarray, correct: int):
        """Add a batch's per-sample losses and its number of correct predictions."""
        self.loss += float(losses.sum())
        self.loss_squares += float(losses @ losses)
        self.correct += correct

    @property
    def loss_stderr(self) -> float:
        """Standard error of the mean loss over samples: the sample standard deviation of
        the per-sample losses over √n, s² = (Σ ℓ² − n·mean²)/(n − 1) (NaN for n < 2)."""
        if self.n < 2:
            return float("nan")
        mean = self.loss / self.n
        return math.sqrt(max(self.loss_squares - self.n * mean * mean, 0.0) / (self.n - 1) / self.n)


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
    certified on its first batch (at most ENGINE_CHECK_SAMPLES samples) by the float64
    NumPy engine (``first_batch_checks``, ``compare_traces``); its checks run on a thread of
    their own, started on the first batch as soon as it is read (beside building the session
    and the batches), or in line when ``threads`` is given.
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
    folded = folded_view(network)  # BatchNorm: the folded network's columns follow the original ones
    stack = ExitStack()  # exited last: the checks' thread, then the BLAS thread limit
    stack.enter_context(threadpool_limits(1, user_api="blas"))
    first_checks = None  # the onnxruntime engine's checks of the first batch, on their own thread
    if engine == "onnxruntime":
        from .trace_graph import check_supported
        from .trace_graph.runner import TraceGraphRunner

        check_supported(network)
        # the checks of the first batch start at once, beside the session's creation
        checker = stack.enter_context(ThreadPoolExecutor(1) if threads is None else _InLine())
        xs = iter(xs)
        first = next(xs, None)
        if first is not None:
            first_checks = checker.submit(first_batch_checks, imported, first, check)
            check = False
            xs = chain([first], xs)
        try:
            runner = TraceGraphRunner(network, provider, precision, diagonal)
        except BaseException:
            if first_checks is not None:
                first_checks.cancel()
            stack.close()
            raise
        provider_used, precision, workers = runner.provider, runner.precision, runner.workers

        def job(x: np.ndarray) -> _Batch:
            t0 = time.perf_counter()
            traces, logits, diag = runner(x)
            return _Batch(x, logits, traces, diag, (0.0, time.perf_counter() - t0))
    else:
        dtype = PRECISIONS[precision]
        signal_network = network if dtype == np.float64 else network.astype(dtype)
        signal_folded = folded if folded is None or dtype == np.float64 else folded.astype(dtype)
        forward = make_forward(imported.proto, network, provider, threads=1)
        provider_used, workers = forward.name, ENGINE_WORKERS

        def job(x: np.ndarray) -> _Batch:
            t0 = time.perf_counter()
            logits, inputs = forward(x)
            if not np.all(np.isfinite(logits)):
                return _Batch(x, logits, np.empty(0), None, (0.0, 0.0))
            t1 = time.perf_counter()
            if folded is None:
                traces, diag = per_sample_traces(signal_network, inputs, logits, dtype, diagonal=True) \
                    if diagonal else (per_sample_traces(signal_network, inputs, logits, dtype), None)
            else:  # the folded view's columns after the original ones, from the same signals
                traces, traces_folded, diag = traces_with_folded(
                    signal_network, signal_folded, inputs, logits, dtype, diagonal)
                traces = np.hstack([traces, traces_folded])
            return _Batch(x, logits, traces, diag, (t1 - t0, time.perf_counter() - t1))

    sums = TraceSums(columns + (0 if folded is None else len(tensor_columns(folded))))
    t_forward = t_engine = 0.0
    fidelity = engine_check = None
    diag_sums: Optional[dict] = None
    rows = []
    warnings = [runner.warning] if engine == "onnxruntime" and runner.warning else []

    def collect(wait: bool):
        """The results of the checks that have finished (with ``wait``, of all of them)."""
        nonlocal fidelity, engine_check, first_checks, checking
        if first_checks is not None and (wait or first_checks.done()):
            fidelity, first_checks = first_checks.result()[0], None
        if checking is not None and (wait or checking.done()):
            engine_check, checking = checking.result(), None

    def consume(batch: _Batch):
        nonlocal check, diag_sums, t_forward, t_engine, checking, fidelity
        if not np.all(np.isfinite(batch.logits)):
            bad = int(np.argmax(~np.isfinite(batch.logits).all(axis=1)))
            raise MinsharpError(f"the logits are NaN/Inf for sample {first_sample + sums.n + bad}: "
                                "the network overflows on this input")
        if check:  # the NumPy engine's (the onnxruntime engine's started with the run)
            m = FIDELITY_SAMPLES
            try:
                fidelity = check_fidelity(imported.proto, network, batch.x[:m],
                                          batch.logits[:m] if provider_used != "numpy" else None)
            except OrtUnavailable as exc:
                warnings.append(f"import fidelity not checked: {exc}")
            check = False
        if (first_checks is not None and checking is None and engine_check is None  # first batch
                and np.all(np.isfinite(batch.traces))):
            checking = checker.submit(compare_traces, first_checks, batch.traces)
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
            sums.add_losses(*losses_and_correct(batch.logits, labels[sums.n - len(batch.x):sums.n],
                                                network.loss))
        if progress:
            progress(len(batch.x))

    if threads is not None:
        workers = min(workers, threads)
    checking = None
    with stack, ThreadPoolExecutor(workers) as pool:
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
    return EngineRun(
        sums, provider_used, fidelity, {"forward_s": t_forward, "engine_s": t_engine},
        diag_sums,
        np.concatenate(rows) if per_sample else None, warnings, engine, precision, engine_check)


def first_batch_checks(imported: ImportedModel, x: np.ndarray,
                       fidelity: bool) -> tuple[Optional[float], Reference]:
    """The onnxruntime engine's checks of its first batch ``x``, from one float64 forward
    of its first samples: with ``fidelity`` the import-fidelity check of its first
    FIDELITY_SAMPLES samples (else None), and ``reference_traces`` of its first
    ENGINE_CHECK_SAMPLES samples, with their column names and parametrisations."""
    network = imported.network
    m = max(FIDELITY_SAMPLES, ENGINE_CHECK_SAMPLES)
    logits, inputs = network.forward(x[:m], keep_inputs=True)
    diff = None
    if fidelity:
        f = FIDELITY_SAMPLES
        diff = check_fidelity(imported.proto, network, x[:f], ref_logits=logits[:f])
    e = ENGINE_CHECK_SAMPLES
    ref = reference_traces(network, logits[:e], [None if a is None else a[:e] for a in inputs])
    folded = folded_view(network)
    parts = [tensor_columns(network)] + ([] if folded is None else [tensor_columns(folded)])
    return diff, Reference(ref, tuple(name for part in parts for _, _, name in part),
                           column_groups([len(part) for part in parts]))


def reference_traces(network: Network, logits: np.ndarray, inputs: list) -> np.ndarray:
    """The float64 NumPy engine's per-sample traces from the IR's float64 forward (``logits``,
    layer ``inputs``), every column: what ``compare_traces`` checks the fast engine by. A
    BatchNorm network's folded columns come from a backward pass through the folded network
    itself, not from ``traces_with_folded``: the certificate stays independent of that
    shortcut."""
    ref = per_sample_traces(network, inputs, logits)
    folded = folded_view(network)
    if folded is not None:  # BatchNorm: the folded parametrisation's columns are checked too
        ref = np.hstack([ref, per_sample_traces(folded, folded_inputs(network, folded, inputs),
                                                logits)])
    return ref


def compare_traces(checks, traces: np.ndarray) -> dict:
    """The fast engine's certificate (``certificate.certify``, docs/method.md section 11):
    the per-tensor traces of the fast engine (``traces``, the samples that ``checks``, the
    future of ``first_batch_checks``, scored with the float64 NumPy engine, first), each
    within ENGINE_CHECK_RTOL of its reference trace or, below the floor share of its
    parametrisation's total trace, of the floor; the ``engine_check`` dict, or an error."""
    certificate = certify(checks.result()[1], traces)
    if certificate.failed is not None:
        raise MinsharpError(certificate.message())
    return certificate.as_dict()


def losses_and_correct(logits: np.ndarray, y: np.ndarray, loss: str) -> tuple[np.ndarray, int]:
    """Per-sample losses (float64, shape (N,)) and the number of correct predictions of a
    batch (docs/method.md, section 1): cross-entropy logsumexp(z) − z_y and arg-max; binary
    cross-entropy of σ(z), computed as max(z, 0) − y·z + log(1 + e^{−|z|}), and z > 0; mse
    (1/K) Σ_k (z_k − y_k)², no accuracy."""
    if loss == "binary":
        z = logits[:, 0]
        bce = np.maximum(z, 0.0) - y * z + np.log1p(np.exp(-np.abs(z)))
        return bce, int(np.sum((z > 0) == (y == 1)))
    if loss == "mse":
        d = logits - y.reshape(logits.shape)
        return np.einsum("nk,nk->n", d, d) / logits.shape[1], 0
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return lse - z[np.arange(len(y)), y], int(np.sum(np.argmax(logits, axis=1) == y))
