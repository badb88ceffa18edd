"""Shards: a scoring run split into ranges of consecutive samples (docs/method.md
section 7, "Shards").

Every quantity of the report is a sum over samples: the per-tensor traces v, their outer
products v vᵀ for the standard errors (section 6), the loss, the correct predictions and
the Hessian diagonal. ``score_shard`` scores one range of samples and returns these float64
sums (an ``EngineRun``); ``merge`` adds the shards' sums in shard order. A local run is
``score_shard`` over the whole range; a Dask run (``minsharp_ref.distributed``) is the same
function over each shard, on the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .options import RunOptions
from .scoring import EngineRun, TraceSums, traces_over
from .data import Dataset, Preprocessing, batches, check_finite, check_labels, open_dataset
from .errors import MinsharpError
from .onnx_import import ImportedModel

#: Default shard: this many batches (the batch size follows from the memory budget).
SHARD_BATCHES = 8


@dataclass(frozen=True)
class DataSpec:
    """Where a shard reads its samples and how it prepares them (picklable)."""

    path: str
    split: str
    x_key: str
    y_key: Optional[str]
    limit: Optional[int]
    preprocessing: Preprocessing
    batch_size: int

    def open(self) -> Dataset:
        return open_dataset(self.path, self.split, self.x_key, self.y_key, self.limit)


def shard_ranges(samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges of at most ``shard_size`` samples."""
    if shard_size < 1:
        raise MinsharpError(f"--shard-size must be at least 1, not {shard_size}")
    return [(a, min(a + shard_size, samples)) for a in range(0, samples, shard_size)]


def score_shard(model: ImportedModel, spec: DataSpec, start: int, stop: int,
                options: RunOptions, rows: Optional[Dataset] = None,
                progress: Optional[Callable[[int], None]] = None) -> EngineRun:
    """Score samples ``start`` .. ``stop`` of the data set: check them (NaN/Inf, label
    range), run the engine over them in batches of ``spec.batch_size`` (``traces_over``
    with ``options``, unchanged) and return their float64 sums. The
    samples come from ``rows`` when given (read and shipped by a Dask client), else from
    the file. The fidelity check runs on the first batch of the data set (shard 0)."""
    dataset = spec.open() if rows is None else rows
    try:
        check_finite(dataset, start, stop)
        labels = dataset.labels(start, stop)
        check_labels(dataset, model.network.num_classes, model.network.loss, labels, start)
        xs = batches(dataset, model.network.input_shape, spec.preprocessing, spec.batch_size,
                     start, stop)
        return traces_over(model, xs, labels, options, progress, check=start == 0,
                           first_sample=start)
    finally:
        dataset.close()


def merge(runs: list[EngineRun]) -> EngineRun:
    """The shards' results added in shard order (a single shard is returned as it is).
    The forward, fidelity and engine check are shard 0's (every shard of the onnxruntime
    engine certifies its own first samples); a warning says when shards used different
    forwards (a mixed cluster)."""
    if len(runs) == 1:
        return runs[0]
    sums = TraceSums(runs[0].sums.columns)
    for run in runs:
        sums.merge(run.sums)
    diagonal = None
    if runs[0].diagonal_sum is not None:
        diagonal = {k: np.zeros_like(v) for k, v in runs[0].diagonal_sum.items()}
        for run in runs:
            for k, v in run.diagonal_sum.items():
                diagonal[k] += v
    per_sample = None if runs[0].per_sample is None else np.concatenate([r.per_sample for r in runs])
    timings = {k: sum(r.timings[k] for r in runs) for k in runs[0].timings}
    warnings = list(dict.fromkeys(w for r in runs for w in r.warnings))
    providers = list(dict.fromkeys(r.provider for r in runs))
    if len(providers) > 1:
        counts = ", ".join(f"{p} ({sum(r.provider == p for r in runs)} shards)" for p in providers)
        warnings.append(f"the shards ran on different forwards: {counts}")
    first = runs[0]
    return EngineRun(sums, first.provider, first.fidelity, timings, diagonal, per_sample, warnings,
                     first.engine, first.precision, first.engine_check, first.forward,
                     max(r.workers for r in runs))
