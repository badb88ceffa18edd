"""The fast engine's certificate (docs/method.md section 11, "Certification"): the per-tensor
traces of the onnxruntime engine on the first batch against the float64 NumPy engine's.

Each parametrisation p (the network's tensors, then, for a network with BatchNorm, its
folded view's; docs/method.md section 10) has its total trace T_p = Σ_{j ∈ p} |t_j| of the
reference. Tensor j (reference trace t_j, fast trace f_j, both means over the compared
samples) is judged against

    scale_j = max(|t_j|, φ · T_p),        φ = FLOOR = ε_float32 = 2⁻²³ ≈ 1.19e-7,

and the run is certified when, for every tensor,

    deviation_j = |f_j − t_j| / scale_j ≤ RTOL (10⁻⁴),                          (1)
    and, when t_j ≠ 0, |f_j − t_j| / |t_j| ≤ FLOORED_LIMIT (10⁻²).                (2)

(1) holds each tensor to RTOL of its own trace, except a tensor carrying less than φ of its
parametrisation's total (``floored``), held to RTOL·φ·T_p: float32 cannot resolve the total
better than about φ·T_p, and a signal that vanishes through many layers leaves such tensors
only 3 to 4 correct float32 digits. A tensor carrying at least φ of the total is within
2·RTOL of its own trace, so no significant tensor is passed wrong. (2) bounds the floored
tensors relative to themselves: the minimum sharpness weighs every layer by its share at
the optimum, not of the naive trace (D·(Π t_d)^{1/D} without biases, docs/method.md
section 5), so a floored tensor off by δ moves it by at most about δ times that share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

#: the largest accepted deviation (1), relative to max(|t_j|, FLOOR · T_p)
RTOL = 1e-4
#: φ: share of the total trace below which a tensor is judged against the floor
FLOOR = float(np.finfo(np.float32).eps)
#: (2): a floored tensor's largest accepted deviation relative to its own trace
FLOORED_LIMIT = 1e-2


def _round2(value: float) -> float:
    """Two significant digits: a diagnostic that must not depend on thread timing."""
    return float(f"{value:.2g}")


@dataclass(frozen=True)
class Reference:
    """The float64 NumPy engine's per-sample traces (N, columns) of the first batch, the
    name of each column and the (start, stop) column range of each parametrisation."""

    traces: np.ndarray
    names: tuple[str, ...]
    groups: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Tensor:
    """One column's verdict."""

    name: str
    share: float  # |t_j| / T_p
    deviation: float  # |f_j − t_j| / scale_j, (1)
    relative_deviation: float  # |f_j − t_j| / |t_j| (inf when t_j = 0 ≠ f_j, 0 when both 0)
    floored: bool  # |t_j| < φ · T_p

    @property
    def passed(self) -> bool:
        return self.deviation <= RTOL and not (
            self.floored and np.isfinite(self.relative_deviation)
            and self.relative_deviation > FLOORED_LIMIT)

    def as_dict(self) -> dict:
        rel = self.relative_deviation
        return {"tensor": self.name, "share": _round2(self.share),
                "deviation": _round2(self.deviation),
                "relative_deviation": _round2(rel) if np.isfinite(rel) else None}


@dataclass(frozen=True)
class Certificate:
    """The verdicts of every column on ``samples`` samples."""

    tensors: tuple[Tensor, ...]
    samples: int

    @property
    def worst(self) -> Tensor:
        """The tensor with the largest deviation (1) (the first on ties)."""
        return max(self.tensors, key=lambda t: t.deviation)

    @property
    def worst_floored(self) -> Optional[Tensor]:
        """The floored tensor with the largest deviation relative to itself, or None."""
        floored = [t for t in self.tensors if t.floored and np.isfinite(t.relative_deviation)]
        return max(floored, key=lambda t: t.relative_deviation) if floored else None

    @property
    def failed(self) -> Optional[Tensor]:
        """The first tensor that fails (1) or (2): the worst by (1) if it fails (1), else
        the worst floored one; None when certified."""
        for t in (self.worst, self.worst_floored):
            if t is not None and not t.passed:
                return t
        return None

    def as_dict(self) -> dict:
        """The JSON ``engine_check`` (docs/json.md)."""
        floored = self.worst_floored
        return {"max_relative_deviation": _round2(self.worst.deviation),
                "samples": int(self.samples), "tolerance": RTOL, "floor": FLOOR,
                "floored_limit": FLOORED_LIMIT,
                "floored_tensors": sum(t.floored for t in self.tensors),
                "worst": self.worst.as_dict(),
                "worst_floored": None if floored is None else floored.as_dict()}

    def message(self) -> str:
        """The one-line error of a failed certificate."""
        t = self.failed
        assert t is not None
        where = (f"on the first {self.samples} samples; tolerance {RTOL:g} of the tensor's "
                 f"trace, or of {FLOOR:.3g} × the total trace for a tensor below that share")
        if t.deviation > RTOL:
            return (f"engine check failed: the onnxruntime engine's per-tensor traces differ "
                    f"from the float64 NumPy engine's by {_round2(t.deviation):.3g} "
                    f"(relative, {where}; worst tensor {t.name!r}, {t.share:.2g} of the "
                    f"total); use --engine numpy")
        return (f"engine check failed: the onnxruntime engine's trace of {t.name!r} "
                f"({t.share:.2g} of the total, below the floor) differs from the float64 NumPy "
                f"engine's by {_round2(t.relative_deviation):.3g} of itself (limit "
                f"{FLOORED_LIMIT:g}, on the first {self.samples} samples); use --engine numpy")


def certify(reference: Reference, fast: np.ndarray) -> Certificate:
    """The certificate of the fast engine's per-sample traces ``fast`` (its first rows are
    the reference's samples) against ``reference``: (1) and (2) of the module docstring,
    on the per-tensor means over the reference's samples."""
    m = len(reference.traces)
    ref = reference.traces.mean(axis=0)
    got = np.asarray(fast[:m], np.float64).mean(axis=0)
    tensors = []
    for start, stop in reference.groups:
        total = float(np.abs(ref[start:stop]).sum())
        floor = max(FLOOR * total, np.finfo(float).tiny)
        for j in range(start, stop):
            t, diff = abs(float(ref[j])), abs(float(got[j] - ref[j]))
            rel = diff / t if t > 0 else (0.0 if diff == 0 else float("inf"))
            tensors.append(Tensor(reference.names[j], t / total if total > 0 else 0.0,
                                  diff / max(t, floor), rel, t < floor))
    return Certificate(tuple(tensors), m)


def column_groups(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(start, stop) of consecutive parametrisations with ``sizes`` columns each."""
    bounds = np.cumsum([0, *sizes])
    return tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]))
