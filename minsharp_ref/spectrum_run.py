"""``minsharp-ref spectrum``: one run from a model and a data file to the versioned JSON
document ``minsharp-ref/spectrum/v1`` (docs/json.md) and its eigenvectors
(docs/method.md section 14)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from . import __version__
from .errors import MinsharpError
from .group import folded_view, group_sharpness, rescaling_group
from .hvp_operator import DEFAULT_BATCH_SIZE, DEFAULT_CACHE_BYTES, HessianOperator
from .rescale import group_parameters
from .spectrum import (DEFAULT_TOL, LANCZOS_STEPS, Eigenpair, check_against_score, extreme_eigenpairs,
                       file_source, load_network, slq_density)

SPECTRUM_SCHEMA = "minsharp-ref/spectrum/v1"


@dataclass(frozen=True)
class SpectrumOptions:
    """What to compute (the command's options)."""

    top: int = 1
    smallest: bool = False
    per_tensor: bool = False
    matrix: str = "hessian"
    tol: float = DEFAULT_TOL
    max_iter: Optional[int] = None
    seed: int = 0
    density: bool = False
    density_runs: int = 4
    density_steps: int = 40
    check: bool = False
    alpha_star: bool = True


@dataclass(frozen=True)
class DataOptions:
    """Where the samples come from (the data options of ``score``)."""

    data: str
    split: str = "train"
    x_key: Optional[str] = None
    y_key: Optional[str] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    limit: Optional[int] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    cache_bytes: int = DEFAULT_CACHE_BYTES
    workers: Optional[int] = None  # batches multiplied at once (default: the cores available)


@dataclass
class SpectrumRun:
    doc: dict
    eigenvectors: dict = field(default_factory=dict)  # initializer name → (k, *shape)
    density: Optional[tuple[np.ndarray, np.ndarray]] = None


def _score(model, d: DataOptions, loss, input_shape, diagonal: bool):
    from .api import score

    return score(model, d.data, split=d.split, x_key=d.x_key, y_key=d.y_key, mean=d.mean,
                 std=d.std, limit=d.limit, provider="numpy", diagonal=diagonal, loss=loss,
                 input_shape=input_shape, workers=d.workers)


def rescaled_to_alpha_star(network, result):
    """The network at its minimum-sharpness point α* (docs/method.md section 14): the
    scored parametrisation (the folded view with BatchNorm, section 10) with every tensor
    rescaled by the group element ℓ* of section 9. None when the minimum is not attained
    (a dead layer)."""
    scored = folded_view(network) or network
    layers = result.layers if result.folded is None else result.folded["layers"]
    t = np.array([l.trace_weight for l in layers])
    u = np.array([l.trace_bias or 0.0 for l in layers])
    group = rescaling_group(scored)
    ms = group_sharpness(group, t, u)
    if ms.log_scale is None:
        return None
    params = group_parameters(scored, np.asarray(ms.log_scale), group)
    return scored.with_parameters(params)


def run_spectrum(model, d: DataOptions, o: SpectrumOptions, loss: Optional[str] = None,
                 input_shape: Optional[Sequence[int]] = None,
                 progress: Optional[Callable[[str, int], None]] = None) -> SpectrumRun:
    """Everything ``spectrum`` reports. ``progress(phase, products, estimate)`` is called
    after every product (for a progress display; ``estimate``: an upper estimate of the
    count at the end of the phase)."""
    start = time.perf_counter()
    network, imported = load_network(model, loss, input_shape)
    if o.matrix not in ("hessian", "ggn"):
        raise MinsharpError(f"--matrix must be hessian or ggn, not {o.matrix!r}")
    if o.tol < 0 or not np.isfinite(o.tol):
        raise MinsharpError(f"--tol must be a non-negative number, not {o.tol}")
    if o.top < 1:
        raise MinsharpError(f"--top must be at least 1, not {o.top}")
    source, info = file_source(network, d.data, d.split, d.x_key, d.y_key, d.mean, d.std,
                               d.limit, d.batch_size)
    if o.matrix == "hessian" and info["y_key"] is None:
        raise MinsharpError(f"{d.data}: no labels; the Hessian needs them (pass --y-key, or "
                            "--matrix ggn, which does not)")
    scored = _score(imported, d, None, None, diagonal=o.check)
    op = _Counted(HessianOperator(network, source, o.matrix, d.cache_bytes, workers=d.workers), progress)
    timings: dict = {}

    def timed(name, fn, pairs: int = 1):
        t0 = time.perf_counter()
        op.phase = name
        op.cap = op.count + pairs * (LANCZOS_STEPS + 11)  # an upper estimate, for time left
        out = fn()
        timings[f"{name}_s"] = time.perf_counter() - t0
        return out

    top = timed("top", lambda: extreme_eigenpairs(op, o.top, "LA", o.tol, o.max_iter, o.seed),
                o.top)
    smallest = None
    if o.smallest:
        smallest = timed("smallest", lambda: extreme_eigenpairs(
            op, 1, "SA", o.tol, o.max_iter, o.seed)[0])
    per_tensor = None
    if o.per_tensor:
        per_tensor = timed("per_tensor", lambda: {
            name: extreme_eigenpairs(_Counted(op.inner.block(name), progress, op),
                                     1, "LA", o.tol, o.max_iter, o.seed)[0]
            for name in op.inner.layout.names}, len(op.inner.layout.names))
    density = None
    if o.density:
        density = timed("density", lambda: slq_density(op, o.density_runs, o.density_steps,
                                                        o.seed))
    checks = None
    if o.check:
        checks = timed("check", lambda: check_against_score(
            op, scored.diagonal, scored.trace, seed=o.seed))
    at_alpha = None
    if o.alpha_star:
        at_alpha = timed("alpha_star", lambda: _lambda_at_alpha(network, scored, source, d, o,
                                                                 progress, op))
    doc = {
        "schema": SPECTRUM_SCHEMA, "minsharp_ref_version": __version__,
        "model": scored.to_dict()["model"], "data": dict(scored.to_dict()["data"], **{
            "batch_size": info["batch_size"]}),
        "loss_kind": network.loss, "matrix": o.matrix, "samples": info["samples"],
        "parameters": int(op.shape[0]),
        "tol": o.tol, "seed": o.seed,
        "top": [p.to_dict() for p in top],
        "smallest": None if smallest is None else smallest.to_dict(),
        "lambda_max_at_alpha_star": at_alpha,
        "trace": scored.trace, "minimum_sharpness": scored.minimum_sharpness,
        "hvps": op.hvps, "timings": dict(timings, total_s=time.perf_counter() - start),
    }
    if per_tensor is not None:
        doc["per_tensor"] = {name: p.value for name, p in per_tensor.items()}
        doc["per_tensor_residual"] = {name: p.residual for name, p in per_tensor.items()}
    if checks is not None:
        doc["check"] = checks
    vectors = {name: np.stack([p.vector[s] for p in top]).reshape(
        (len(top),) + op.inner.layout.shapes[j])
        for j, (name, s) in enumerate(op.inner.slices.items())}
    if smallest is not None:
        for j, (name, s) in enumerate(op.inner.slices.items()):
            vectors[f"{name}:smallest"] = smallest.vector[s].reshape(op.inner.layout.shapes[j])
    return SpectrumRun(doc, vectors, density)


def _lambda_at_alpha(network, scored, source, d, o, progress, op) -> Optional[dict]:
    """λ_max (and its residual) of the network rescaled to α*; None when not attained."""
    rescaled = rescaled_to_alpha_star(network, scored)
    if rescaled is None:
        return None
    other = _Counted(HessianOperator(rescaled, source, o.matrix, d.cache_bytes, workers=d.workers), progress, op)
    pair: Eigenpair = extreme_eigenpairs(other, 1, "LA", o.tol, o.max_iter, o.seed)[0]
    return pair.to_dict()


class _Counted:
    """An operator wrapper that reports every product to ``progress`` and counts them all
    (blocks and the rescaled network's operator add to their parent's count)."""

    def __init__(self, inner: HessianOperator, progress, parent: Optional["_Counted"] = None):
        self.inner, self.progress, self.parent = inner, progress, parent
        self.shape, self.dtype = inner.shape, inner.dtype
        self.count = 0
        self.phase = "top" if parent is None else parent.phase
        self.cap = 0
        self.slices = inner.slices

    @property
    def hvps(self) -> int:
        return self.count

    def _tick(self):
        node = self
        while node is not None:
            node.count += 1
            node = node.parent
        if self.progress is not None:
            root = self if self.parent is None else self.parent
            self.progress(root.phase, root.count, root.cap)

    def matvec(self, v):
        out = self.inner.matvec(v)
        self._tick()
        return out

    def matmat(self, m):
        return np.stack([self.matvec(c) for c in np.asarray(m).T], axis=1)

    def _op(self):
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=self.matvec, dtype=np.float64)


def spectrum_blocks(doc: dict) -> list:
    """The human report: eigenvalues with residuals, per-tensor tops, λ_max at α*, counts."""
    from .report import Strong, Table, fmt

    rows = [[f"λ{j + 1}", fmt(p["value"], ".10g"), fmt(p["residual"], ".2e")]
            for j, p in enumerate(doc["top"])]
    if doc.get("smallest") is not None:
        rows.append(["smallest", fmt(doc["smallest"]["value"], ".10g"),
                     fmt(doc["smallest"]["residual"], ".2e")])
    if doc.get("lambda_max_at_alpha_star") is not None:
        p = doc["lambda_max_at_alpha_star"]
        rows.append(["λ1 at α*", fmt(p["value"], ".10g"), fmt(p["residual"], ".2e")])
    blocks: list = [Table(["", "eigenvalue", "residual"], rows, frozenset({1, 2}))]
    if "per_tensor" in doc:
        blocks.append(Table(["tensor", "top eigenvalue of its block", "residual"],
                            [[name, fmt(v, ".10g"), fmt(doc["per_tensor_residual"][name], ".2e")]
                             for name, v in doc["per_tensor"].items()], frozenset({1, 2})))
    if "check" in doc:
        c = doc["check"]
        blocks.append(f"check: diagonal on {len(c['diagonal']['coordinates'])} coordinates, max "
                      f"relative deviation {c['diagonal']['max_relative_deviation']:.2g} "
                      f"({'PASS' if c['diagonal']['passed'] else 'FAIL'}); Hutchinson trace "
                      f"{c['trace']['hutchinson']:.6g} ± {c['trace']['stderr']:.2g} vs exact "
                      f"{c['trace']['exact']:.6g} (z = {c['trace']['z']:.2f}, "
                      f"{'PASS' if c['trace']['passed'] else 'FAIL'})")
    blocks.append(Strong(
        f"{doc['matrix']} of the mean {doc['loss_kind']} loss, {doc['samples']} samples, "
        f"{doc['parameters']} parameters: {doc['hvps']} products in "
        f"{doc['timings']['total_s']:.2f} s"))
    return blocks
