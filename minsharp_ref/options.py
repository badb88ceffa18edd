"""The options of a scoring run, validated once (``RunOptions``).

The CLI (``minsharp_ref.cli_options``) and the Python API build one ``RunOptions``; it is
passed unchanged to the engine backends (``minsharp_ref.backends``), the shards
(``shards.score_shard``) and the Dask workers. Every check happens in ``__post_init__``,
before any work: a bad value raises ``MinsharpError`` with one line naming the option.
"""

from __future__ import annotations

import difflib
import numbers
import os
from dataclasses import dataclass, fields, replace
from typing import Optional

from .errors import MinsharpError

ENGINES = ("numpy", "onnxruntime")
PRECISIONS = ("float64", "float32")
PROVIDERS = ("auto", "cuda", "cpu", "numpy")
LOSS_KINDS = ("cross-entropy", "binary", "mse")
#: default precision per engine: the reference in float64, the fast engine in float32
DEFAULT_PRECISION = {"numpy": "float64", "onnxruntime": "float32"}
DEFAULT_MEMORY_BUDGET = 1024 ** 3  # bytes, for all the batches in flight together


def available_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count``
    where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS, Windows)
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunOptions:
    """How a scoring run computes (not which model or data): frozen, picklable, validated.

    * ``engine``: "numpy" (the float64 reference) or "onnxruntime" (the trace graph);
    * ``precision``: of the back-propagated signals (and of the NumPy engine's IR forward
      with provider "auto" or "numpy"), "float64" or "float32" (sums are float64 either
      way); None: the engine's default (``DEFAULT_PRECISION``);
    * ``provider``: "auto", "cuda", "cpu" or "numpy". The NumPy engine's forward: "auto"
      and "numpy" run the IR's forward (float64 by default; onnxruntime on the CPU only
      checks the import on the first batch); "cpu" and "cuda" take onnxruntime's
      activations (in the model's precision, usually float32). The onnxruntime engine: the device of the trace
      graph ("auto": CUDA where it loads, else the CPU; "numpy" is refused);
    * ``workers``: batches processed at once, one per thread (default: the cores this
      process may use). The numbers do not depend on it (docs/cli.md, "Workers");
    * ``batch_size``: samples per batch (None: from ``memory_budget``); ``memory_budget``:
      bytes for all the batches in flight together;
    * ``diagonal``, ``per_sample``: also return the exact Hessian diagonal, each sample's
      trace contributions;
    * ``loss``: "cross-entropy", "binary" or "mse" overrides the head's (None keeps it).
    """

    engine: str = "numpy"
    precision: Optional[str] = None
    provider: str = "auto"
    workers: Optional[int] = None
    batch_size: Optional[int] = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    diagonal: bool = False
    per_sample: bool = False
    loss: Optional[str] = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise MinsharpError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.precision is None:
            object.__setattr__(self, "precision", DEFAULT_PRECISION[self.engine])
        if self.precision not in PRECISIONS:
            raise MinsharpError(f"--precision must be float64 or float32, not {self.precision!r}")
        if self.provider not in PROVIDERS:
            raise MinsharpError(f"unknown provider {self.provider!r}; choose one of "
                                f"{', '.join(PROVIDERS)}")
        if self.engine == "onnxruntime" and self.provider == "numpy":
            raise MinsharpError("--provider numpy runs no onnxruntime: use --engine numpy, or "
                                "--provider auto, cuda or cpu with --engine onnxruntime")
        if self.workers is None:
            object.__setattr__(self, "workers", available_cores())
        object.__setattr__(self, "workers", _check_int("--workers", self.workers, 1))
        if self.batch_size is not None:
            object.__setattr__(self, "batch_size", _check_int("--batch-size", self.batch_size, 1))
        object.__setattr__(self, "memory_budget", _check_int(
            "--memory-budget", self.memory_budget, 1, "a positive number of bytes"))
        for name in ("diagonal", "per_sample"):
            if not isinstance(getattr(self, name), bool):
                raise MinsharpError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.loss is not None and self.loss not in LOSS_KINDS:
            raise MinsharpError(f"--loss must be one of {', '.join(LOSS_KINDS)}, not {self.loss!r}")

    @classmethod
    def of(cls, **options) -> "RunOptions":
        """``RunOptions(**options)``, where a misspelt name fails with one line (the closest
        option named) instead of a TypeError."""
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
                raise MinsharpError(f"unknown run option {name!r}{hint}")
        return cls(**options)

    def but(self, **changes) -> "RunOptions":
        """A copy with ``changes`` (validated like the original)."""
        return replace(self, **changes)


def _check_int(option: str, value, least: int, what: str = "") -> int:
    """``value`` as an int, refused unless an integer (not a bool) of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise MinsharpError(f"{option} must be {what or f'at least {least}'}, not {value!r}")
    return int(value)
