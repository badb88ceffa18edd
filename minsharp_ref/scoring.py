"""One pass over the data: an engine backend (``backends``) runs the batches, ``workers``
at a time, and their results are accumulated in float64 in batch order, so that the
numbers do not depend on the worker count (docs/method.md sections 6, 7 and 11; the
checks of the first batch are the backend's). ``api.score`` and the per-shard function
(``shards.score_shard``) both run it; ``batch_size_for`` and ``workers_for`` size the
batches and the workers from the memory budget (docs/cli.md, "Workers and memory")."""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from .backends import (BACKENDS, DTYPES, ENGINE_CHECK_RTOL, ENGINE_CHECK_SAMPLES,  # noqa: F401
                       FIDELITY_SAMPLES, BatchResult, Checks)
from .engine import tensor_columns
from .errors import MinsharpError
from .group import folded_view
from .ir import Network
from .onnx_import import ImportedModel
from .options import (DEFAULT_MEMORY_BUDGET, DEFAULT_PRECISION, ENGINES,  # noqa: F401
                      RunOptions)
from .runtime import cuda_usable

PRECISIONS = DTYPES
DEFAULT_BATCH_SIZE = 256
DEFAULT_BATCH_BYTES = 128 * 1024 ** 2  # per batch, for the default batch size


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
    """The batch size, from the batch size asked for and the memory budget alone (never the
    worker count, so that the batch boundaries and every number are the same for any
    number of workers): the requested size, lowered so that one batch fits the budget. By
    default, at most 256 samples, and on the CPU about DEFAULT_BATCH_BYTES of engine memory
    per batch: small batches stay in cache (LeNet: ~40 samples for the NumPy engine, ~20
    for the trace graph, which measured about 10% fewer CPU seconds than at 80). The trace
    graph on CUDA (``provider`` "cuda", or "auto" where CUDA loads) runs faster on large
    batches: as many as fit. ``workers_for`` then runs as many batches at once as fit."""
    if requested is not None and requested < 1:
        raise MinsharpError(f"--batch-size must be at least 1, not {requested}")
    if memory_budget <= 0:
        raise MinsharpError(f"--memory-budget must be positive, not {memory_budget}")
    per_sample = BACKENDS[engine].bytes_per_sample(network, precision)
    if per_sample > memory_budget:
        raise MinsharpError(f"one sample needs about {per_sample / 2 ** 20:.1f} MiB of engine "
                            f"memory, more than --memory-budget "
                            f"({memory_budget / 2 ** 20:.1f} MiB)")
    fit = memory_budget // per_sample
    on_cpu = engine == "numpy" or provider == "cpu" or (provider == "auto" and not cuda_usable())
    cache_sized = DEFAULT_BATCH_BYTES // per_sample if on_cpu else fit
    default = max(1, min(DEFAULT_BATCH_SIZE, cache_sized))
    return int(min(requested or default, fit))


def workers_for(network: Network, options: RunOptions, batch_size: int) -> int:
    """How many batches of ``batch_size`` run at once: ``options.workers``, lowered so that
    the batches in flight fit ``options.memory_budget`` together (at least one: a batch
    fits by ``batch_size_for``). The numbers do not depend on it."""
    per_batch = BACKENDS[options.engine].bytes_per_sample(network, options.precision) * batch_size
    return int(max(1, min(options.workers, options.memory_budget // max(per_batch, 1))))


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
    #: which forward produced the activations: "numpy-float64" (the IR in float64),
    #: "onnxruntime-cpu-float32", "trace-graph-cpu-float32", ...
    forward: str = "numpy-float64"
    workers: int = 1  # batches that ran at once (the numbers do not depend on it)

    @property
    def diagonal(self) -> Optional[dict]:
        """Initializer name → diag H (mean over samples)."""
        return None if self.diagonal_sum is None else \
            {k: v / self.sums.n for k, v in self.diagonal_sum.items()}


class Accumulator:
    """The float64 sums of a pass, batch after batch in batch order (each batch checked for
    NaN/Inf first): traces, their outer products, losses, diagonals, per-sample rows."""

    def __init__(self, columns: int, originals: int, labels: Optional[np.ndarray], loss: str,
                 per_sample: bool, first_sample: int,
                 progress: Optional[Callable[[int], None]]):
        self.sums = TraceSums(columns)
        self.originals, self.labels, self.loss = originals, labels, loss
        self.rows: Optional[list] = [] if per_sample else None
        self.first_sample, self.progress = first_sample, progress
        self.diagonal: Optional[dict] = None
        self.seconds = [0.0, 0.0]

    def add(self, batch: BatchResult) -> None:
        n = self.sums.n
        if not np.all(np.isfinite(batch.logits)):
            bad = int(np.argmax(~np.isfinite(batch.logits).all(axis=1)))
            raise MinsharpError(f"the logits are NaN/Inf for sample {self.first_sample + n + bad}: "
                                "the network overflows on this input")
        if not np.all(np.isfinite(batch.traces)):
            raise MinsharpError("the traces overflow (NaN/Inf) in the batch starting at sample "
                                f"{self.first_sample + n}")
        if batch.diagonal is not None:
            self.diagonal = batch.diagonal if self.diagonal is None else \
                {k: self.diagonal[k] + v for k, v in batch.diagonal.items()}
        self.sums.add(batch.traces)
        if self.rows is not None:
            self.rows.append(batch.traces[:, :self.originals])
        self.seconds[0] += batch.seconds[0]
        self.seconds[1] += batch.seconds[1]
        if self.labels is not None:
            self.sums.add_losses(*losses_and_correct(batch.logits, self.labels[n:self.sums.n],
                                                     self.loss))
        if self.progress:
            self.progress(len(batch.x))


def in_order(pool: ThreadPoolExecutor, fn: Callable, xs: Iterable, workers: int) -> Iterator:
    """``fn`` over ``xs`` on ``pool``, ``workers`` at a time (and the next batch read while
    they run), the results yielded in the order of ``xs``."""
    pending: deque = deque()
    try:
        for x in xs:
            pending.append(pool.submit(fn, x))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # an error stops the run: the batches not started yet are not run
        for future in pending:
            future.cancel()


def traces_over(imported: ImportedModel, xs: Iterable[np.ndarray], labels: Optional[np.ndarray],
                options: Union[RunOptions, str, None] = None,
                progress: Optional[Callable[[int], None]] = None, *, check: bool = True,
                first_sample: int = 0, **legacy) -> EngineRun:
    """Run an engine backend (``options.engine``) over the batches ``xs``, ``workers`` of
    them at a time, each on one thread with single-threaded BLAS, and add their results in
    float64 in batch order: the result does not depend on the number of workers. ``check``:
    run the first batch's checks (import fidelity; the onnxruntime engine certifies its
    first batch in any case). ``first_sample``: the index of the first sample in the data
    set (for error messages). ``options`` may also be a provider name, with the other run
    options as keywords (``precision=``, ``engine=``, ``threads=`` for ``workers``, ...)."""
    from threadpoolctl import threadpool_limits

    if not isinstance(options, RunOptions):
        if "threads" in legacy:
            legacy["workers"] = legacy.pop("threads")
        options = RunOptions.of(provider=options or "auto", **legacy)
    elif legacy:
        raise MinsharpError(f"give the run options in RunOptions, not as {', '.join(legacy)}")
    network = imported.network
    columns = len(tensor_columns(network))
    folded = folded_view(network)  # BatchNorm: the folded network's columns follow the original ones
    acc = Accumulator(columns + (0 if folded is None else len(tensor_columns(folded))), columns,
                      labels, network.loss, options.per_sample, first_sample, progress)
    xs = iter(xs)
    first = next(xs, None)
    if first is None:
        raise MinsharpError("no samples to score")
    backend = BACKENDS[options.engine](imported, options, check)
    with threadpool_limits(1, user_api="blas"):
        try:
            backend.prepare(first)
            workers = min(backend.workers, workers_for(network, options, len(first)))
            with ThreadPoolExecutor(workers) as pool:
                for batch in in_order(pool, backend.run, chain([first], xs), workers):
                    acc.add(batch)
                    backend.check(batch)
            checks = backend.finish()
        finally:
            backend.close()
    return EngineRun(
        acc.sums, backend.provider, checks.fidelity,
        {"forward_s": acc.seconds[0], "engine_s": acc.seconds[1]}, acc.diagonal,
        np.concatenate(acc.rows) if acc.rows is not None else None,
        backend.warnings + checks.warnings, options.engine, backend.precision,
        checks.engine_check, backend.forward_label, workers)


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
