"""The engine backends behind one small protocol (docs/method.md sections 6, 7 and 11):

* ``prepare(first_x)``: build what the engine needs (sessions, cast networks) and start
  the checks of the first batch ``first_x`` (the import-fidelity check; for the fast
  engine also its certificate's float64 reference);
* ``run(x) -> BatchResult``: the logits, per-sample traces (and diagonal batch sums) of a
  batch; called from ``workers`` threads at once, each batch on one thread;
* ``check(batch)``: the first batch's checks (the first call), then whether any finished
  check failed; ``finish()`` waits for them and returns (fidelity, engine certificate).

``NumpyBackend`` is the float64 reference (the IR's float64 forward by default);
``TraceGraphBackend`` the trace graph in onnxruntime, certified on its first batch by the
NumPy engine. Each backend owns its worker count and its memory model (bytes per sample
of one batch). ``scoring.traces_over`` runs either without knowing which.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .certificate import RTOL, Reference, certify, column_groups
from .engine import bytes_per_sample, per_sample_traces, tensor_columns
from .errors import MinsharpError
from .folded_traces import traces_with_folded
from .group import folded_inputs, folded_view
from .ir import Network
from .onnx_import import ImportedModel
from .options import RunOptions
from .plan import traversal_plan
from .runtime import NumpyForward, OrtUnavailable, check_fidelity, make_forward

#: Samples of the first batch on which the IR and onnxruntime logits are compared.
FIDELITY_SAMPLES = 64
#: At most this many samples of the first batch (all of it when smaller) are re-scored by
#: the float64 NumPy engine to certify a fast run, and the largest relative deviation of a
#: per-tensor trace it accepts (``compare_traces``; below the floor, see certificate.py).
ENGINE_CHECK_SAMPLES = 64
ENGINE_CHECK_RTOL = RTOL
DTYPES = {"float64": np.float64, "float32": np.float32}


@dataclass
class BatchResult:
    """What an engine computed for one batch ``x``: float64 ``logits`` (N, K), per-sample
    ``traces`` (N, columns), the ``diagonal`` batch sums (or None) and the seconds of its
    forward and of the rest."""

    x: np.ndarray
    logits: np.ndarray
    traces: np.ndarray
    diagonal: Optional[dict]
    seconds: tuple[float, float]


@dataclass
class Checks:
    """The checks' outcome: the fidelity's largest scaled difference (None: not checked),
    the fast engine's certificate, and warnings (a check that could not run)."""

    fidelity: Optional[float] = None
    engine_check: Optional[dict] = None
    warnings: list = field(default_factory=list)


def fidelity_or_warning(imported: ImportedModel, x: np.ndarray, ref_logits: np.ndarray,
                        ort_logits: Optional[np.ndarray], checks: Checks) -> None:
    """The import-fidelity check of ``x`` into ``checks``: an onnxruntime that cannot load
    or run the model is a warning (the check did not run) in both engines; an unfaithful
    import raises."""
    try:
        checks.fidelity = check_fidelity(imported.proto, imported.network, x, ort_logits,
                                         ref_logits)
    except OrtUnavailable as exc:
        checks.warnings.append(f"import fidelity not checked: {exc}")


class NumpyBackend:
    """The NumPy engine (docs/method.md section 3). Its forward: the IR in the signals'
    precision (``provider`` auto or numpy: by default float64 end to end; onnxruntime on the
    CPU checks the import on the first batch against the IR's float64 logits), or
    onnxruntime's activations (``provider`` cpu or cuda)."""

    engine = "numpy"

    def __init__(self, imported: ImportedModel, options: RunOptions, check: bool):
        self.imported, self.options, self.check_first = imported, options, check
        self.network = imported.network
        self.precision = options.precision
        self.workers = options.workers
        self.warnings: list[str] = []
        self.checks = Checks()

    @staticmethod
    def bytes_per_sample(network: Network, precision: str) -> int:
        return bytes_per_sample(network, np.dtype(DTYPES[precision]).itemsize)

    def prepare(self, first_x: np.ndarray) -> None:
        network = self.network
        dtype = DTYPES[self.precision]
        self.dtype = dtype
        self.plan = traversal_plan(network)
        self.folded = folded_view(network)
        self.signal_network = network if dtype == np.float64 else network.astype(dtype)
        self.signal_folded = (self.folded if self.folded is None or dtype == np.float64
                              else self.folded.astype(dtype))
        provider = self.options.provider
        # the IR's forward in the signals' precision: float64 end to end by default
        self.forward = (NumpyForward(self.signal_network, dtype) if provider in ("auto", "numpy")
                        else make_forward(self.imported.proto, network, provider, threads=1))
        self.provider = self.forward.name
        self.forward_label = (f"numpy-{self.precision}" if self.provider == "numpy" else
                              f"onnxruntime-{self.provider}-{np.dtype(network.input_dtype).name}")

    def run(self, x: np.ndarray) -> BatchResult:
        t0 = time.perf_counter()
        logits, inputs = self.forward(x)
        if not np.all(np.isfinite(logits)):
            return BatchResult(x, logits, np.empty(0), None, (0.0, 0.0))
        t1 = time.perf_counter()
        if self.folded is None:
            out = per_sample_traces(self.signal_network, inputs, logits, self.dtype,
                                    self.options.diagonal, self.plan)
            traces, diag = out if self.options.diagonal else (out, None)
        else:  # the folded view's columns after the original ones, from the same signals
            traces, traces_folded, diag = traces_with_folded(
                self.signal_network, self.signal_folded, inputs, logits, self.dtype,
                self.options.diagonal)
            traces = np.hstack([traces, traces_folded])
        return BatchResult(x, logits, traces, diag, (t1 - t0, time.perf_counter() - t1))

    def check(self, batch: BatchResult) -> None:
        if self.check_first and np.all(np.isfinite(batch.logits)):
            m = FIDELITY_SAMPLES
            if self.provider == "numpy":  # onnxruntime's logits against ours (float64)
                ours = batch.logits[:m] if self.dtype == np.float64 else None
                fidelity_or_warning(self.imported, batch.x[:m], ours, None, self.checks)
            else:  # ours (the IR's float64) against onnxruntime's
                fidelity_or_warning(self.imported, batch.x[:m], None, batch.logits[:m], self.checks)
        self.check_first = False

    def finish(self) -> Checks:
        return self.checks

    def close(self) -> None:
        pass


class TraceGraphBackend:
    """The onnxruntime engine: the trace graph (docs/trace-graph.md) in one session, run by
    ``workers`` threads (one on CUDA), certified on its first batch: ``first_batch_checks``
    (the float64 IR forward, fidelity and reference traces) starts on a thread of its own as
    soon as the first batch is read, beside the session's creation."""

    engine = "onnxruntime"

    def __init__(self, imported: ImportedModel, options: RunOptions, check: bool):
        from .trace_graph import check_supported

        check_supported(imported.network)
        self.imported, self.options, self.check_fidelity = imported, options, check
        self.network = imported.network
        self.checker = ThreadPoolExecutor(1)
        self.first: Optional[Future] = None  # first_batch_checks
        self.comparing: Optional[Future] = None  # compare_traces
        self.checks = Checks()
        self.warnings: list[str] = []

    @staticmethod
    def bytes_per_sample(network: Network, precision: str) -> int:
        from .trace_graph.memory import graph_bytes_per_sample

        return graph_bytes_per_sample(network, np.dtype(DTYPES[precision]).itemsize)

    def prepare(self, first_x: np.ndarray) -> None:
        from .trace_graph.runner import TraceGraphRunner

        self.first = self.checker.submit(first_batch_checks, self.imported, first_x,
                                         self.check_fidelity)
        o = self.options
        self.runner = TraceGraphRunner(self.network, o.provider, o.precision, o.diagonal,
                                       workers=o.workers)
        self.provider, self.precision = self.runner.provider, self.runner.precision
        self.workers = self.runner.workers
        self.forward_label = f"trace-graph-{self.provider}-{self.precision}"
        if self.runner.warning:
            self.warnings.append(self.runner.warning)

    def run(self, x: np.ndarray) -> BatchResult:
        t0 = time.perf_counter()
        traces, logits, diag = self.runner(x)
        return BatchResult(x, logits, traces, diag, (0.0, time.perf_counter() - t0))

    def check(self, batch: BatchResult) -> None:
        if self.comparing is None and self.checks.engine_check is None and \
                np.all(np.isfinite(batch.traces)):  # the first batch
            self.comparing = self.checker.submit(compare_traces, self.first, batch.traces)
        self._collect(wait=False)  # a failed check stops the run as soon as it is known

    def _collect(self, wait: bool) -> None:
        if self.first is not None and (wait or self.first.done()):
            checks, self.first = self.first.result(), None
            self.checks.fidelity = checks.fidelity
            self.checks.warnings += checks.warnings
        if self.comparing is not None and (wait or self.comparing.done()):
            self.checks.engine_check, self.comparing = self.comparing.result(), None

    def finish(self) -> Checks:
        self._collect(wait=True)
        return self.checks

    def close(self) -> None:
        for future in (self.first, self.comparing):
            if future is not None:
                future.cancel()
        self.checker.shutdown(wait=True)


BACKENDS = {"numpy": NumpyBackend, "onnxruntime": TraceGraphBackend}


def first_batch_checks(imported: ImportedModel, x: np.ndarray, fidelity: bool) -> Checks:
    """The onnxruntime engine's checks of its first batch ``x``, from one float64 forward
    of its first samples: with ``fidelity`` the import-fidelity check of its first
    FIDELITY_SAMPLES samples, and ``reference_traces`` of its first ENGINE_CHECK_SAMPLES
    samples with their column names and parametrisations (a ``certificate.Reference``, in
    ``engine_check["reference"]`` until ``compare_traces`` replaces it)."""
    network = imported.network
    m = max(FIDELITY_SAMPLES, ENGINE_CHECK_SAMPLES)
    logits, inputs = network.forward(x[:m], keep_inputs=True)
    checks = Checks()
    if fidelity:
        f = FIDELITY_SAMPLES
        fidelity_or_warning(imported, x[:f], logits[:f], None, checks)
    e = ENGINE_CHECK_SAMPLES
    ref = reference_traces(network, logits[:e], [None if a is None else a[:e] for a in inputs])
    folded = folded_view(network)
    parts = [tensor_columns(network)] + ([] if folded is None else [tensor_columns(folded)])
    checks.engine_check = {"reference": Reference(
        ref, tuple(name for part in parts for _, _, name in part),
        column_groups([len(part) for part in parts]))}
    return checks


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


def compare_traces(checks: Future, traces: np.ndarray) -> dict:
    """The fast engine's certificate (``certificate.certify``, docs/method.md section 11):
    the per-tensor traces of the fast engine (``traces``, the samples that ``checks``, the
    future of ``first_batch_checks``, scored with the float64 NumPy engine, first), each
    within ENGINE_CHECK_RTOL of its reference trace or, below the floor share of its
    parametrisation's total trace, of the floor; the ``engine_check`` dict, or an error."""
    certificate = certify(checks.result().engine_check["reference"], traces)
    if certificate.failed is not None:
        raise MinsharpError(certificate.message())
    return certificate.as_dict()
