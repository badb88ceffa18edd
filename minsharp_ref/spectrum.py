"""The Hessian spectrum of the mean loss (docs/method.md section 14): the operator on a
model and a data file (``hessian_operator``), its extreme eigenpairs by Lanczos (SciPy's
``eigsh``) each with its certificate, the residual ‖Hv − λv‖/|λ| recomputed with a fresh
product, the top eigenvalue of every tensor's diagonal block, the spectral density by
stochastic Lanczos quadrature, and the checks of the operator against the exact diagonal
and trace of ``score``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from .data import Preprocessing, batches, check_finite, check_labels, open_dataset
from .errors import MinsharpError
from .hvp_operator import (DEFAULT_BATCH_SIZE, DEFAULT_CACHE_BYTES, HessianOperator,
                           array_source)
from .ir import Network
from .onnx_import import ImportedModel, import_model

DEFAULT_TOL = 1e-8


def load_network(model, loss: Optional[str] = None,
                 input_shape: Optional[Sequence[int]] = None) -> tuple[Network, ImportedModel]:
    """The imported network (an .onnx path or an ``ImportedModel``), with ``loss`` overriding
    the loss its head suggests."""
    from .api import with_loss

    imported = model if isinstance(model, ImportedModel) else import_model(
        model, None if input_shape is None else tuple(input_shape))
    imported = with_loss(imported, loss)
    return imported.network, imported


def file_source(network: Network, data, split: str = "train", x_key: Optional[str] = None,
                y_key: Optional[str] = None, mean=None, std=None, limit: Optional[int] = None,
                batch_size: int = DEFAULT_BATCH_SIZE):
    """A batch source reading the .npz anew at every pass (memory flat in samples): checked
    for NaN/Inf and for labels that fit the loss once, here."""
    prep = Preprocessing(mean, std)
    dataset = open_dataset(data, split, x_key, y_key, limit)
    try:
        check_finite(dataset)
        y_all = dataset.labels()
        check_labels(dataset, network.num_classes, network.loss, y_all)
        info = {"path": str(dataset.path), "x_key": dataset.x_key, "y_key": dataset.y_key,
                "samples": dataset.samples, "preprocessing": prep.describe(dataset.x.dtype),
                "batch_size": min(batch_size, dataset.samples)}
        has_labels = y_all is not None
    finally:
        dataset.close()

    def source():
        ds = open_dataset(data, split, x_key, y_key, limit)
        try:
            start = 0
            for x in batches(ds, network.input_shape, prep, batch_size):
                y = ds.labels(start, start + len(x)) if has_labels else None
                start += len(x)
                yield x, y
        finally:
            ds.close()
    return source, info


def hessian_operator(model, data, *, matrix: str = "hessian", split: str = "train",
                     x_key: Optional[str] = None, y_key: Optional[str] = None,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                     limit: Optional[int] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     loss: Optional[str] = None, input_shape: Optional[Sequence[int]] = None,
                     cache_bytes: int = DEFAULT_CACHE_BYTES,
                     workers: Optional[int] = None) -> HessianOperator:
    """The Hessian (``matrix="hessian"``) or Gauss-Newton matrix (``"ggn"``) of the mean loss
    of ``model`` (an .onnx path, an ``ImportedModel`` or an IR ``Network``) over ``data``
    (an .npz path with the options of ``score``, or an in-memory pair (x, y) of preprocessed
    inputs and labels), as a float64 ``scipy.sparse.linalg.LinearOperator``
    (docs/method.md section 14).

    Parameters are flattened in the report's tensor order (per parameterised layer its weight
    then its bias, the stored initializers, C order; BatchNorm networks on their original
    parametrisation: W, b, γ, β as imported); ``op.slices`` maps an initializer name to its
    coordinates, ``op.block(name)`` is that tensor's diagonal block, ``op.hvps`` counts the
    products. Every product streams the data in batches (summed in batch order, so the same
    call gives the same bits), keeping the parameter-only part of each batch while it fits
    ``cache_bytes``. ``workers``: batches multiplied at once (default: the cores this process
    may use; the bits do not depend on it)."""
    if isinstance(model, Network):
        network = model
    else:
        network, _ = load_network(model, loss, input_shape)
    if isinstance(data, tuple):
        x, y = data
        source = array_source(x, y, batch_size)
    else:
        source, _ = file_source(network, data, split, x_key, y_key, mean, std, limit, batch_size)
    return HessianOperator(network, source, matrix, cache_bytes, workers=workers)


# ------------------------------------------------------------------------- eigenpairs


@dataclass(frozen=True)
class Eigenpair:
    value: float
    residual: float  # ‖Hv − λv‖ / |λ| with a fresh product
    vector: np.ndarray

    def to_dict(self) -> dict:
        return {"value": self.value, "residual": self.residual}


def start_vector(n: int, seed: int) -> np.ndarray:
    """The deterministic Lanczos start vector v0 of ``seed``: standard normal, unit norm."""
    v = np.random.default_rng(seed).standard_normal(n)
    return v / np.linalg.norm(v)


def residual(op: LinearOperator, value: float, vector: np.ndarray) -> float:
    """‖Hv − λv‖ / (|λ| ‖v‖), the eigenpair's certificate, from a fresh product."""
    hv = op.matvec(vector)
    scale = abs(value) * np.linalg.norm(vector)
    return float(np.linalg.norm(hv - value * vector) / scale) if scale > 0 else math.inf


def extreme_eigenpairs(op: LinearOperator, k: int = 1, which: str = "LA",
                       tol: float = DEFAULT_TOL, max_iter: Optional[int] = None,
                       seed: int = 0) -> list[Eigenpair]:
    """The ``k`` largest (``which="LA"``) or smallest (``"SA"``) eigenpairs by implicitly
    restarted Lanczos (ARPACK via ``eigsh``), largest first for "LA", smallest first for
    "SA", each with its residual. A matrix too small for ARPACK is formed densely."""
    n = op.shape[0]
    if k < 1:
        raise MinsharpError(f"--top must be at least 1, not {k}")
    if k >= n - 1:  # ARPACK needs k < n − 1: form the (tiny) matrix by n products
        dense = op.matmat(np.eye(n))
        values, vectors = np.linalg.eigh(0.5 * (dense + dense.T))
        order = np.argsort(values)[::-1] if which == "LA" else np.argsort(values)
        values, vectors = values[order][:k], vectors[:, order][:, :k]
    else:
        found = lanczos_extreme(op, k, which, tol, seed, min(n - 1, LANCZOS_STEPS + 10 * k))
        if found is not None:
            values, vectors = found
            return [Eigenpair(float(values[j]), residual(op, float(values[j]), vectors[:, j]),
                              vectors[:, j]) for j in range(len(values))]
        try:
            values, vectors = eigsh(op, k=k, which=which, tol=tol, maxiter=max_iter,
                                    v0=start_vector(n, seed))
        except ArpackNoConvergence as exc:
            raise MinsharpError(f"Lanczos did not converge to tolerance {tol:g} within "
                                f"--max-iter {max_iter} ({len(exc.eigenvalues)} of {k} "
                                "eigenvalues); raise --max-iter or --tol") from None
        order = np.argsort(values)[::-1] if which == "LA" else np.argsort(values)
        values, vectors = values[order], vectors[:, order]
    return [Eigenpair(float(values[j]), residual(op, float(values[j]), vectors[:, j]),
                      vectors[:, j]) for j in range(len(values))]


#: Lanczos steps (plus 10 per eigenvalue) before ``extreme_eigenpairs`` hands over to ARPACK
LANCZOS_STEPS = 40


def lanczos_iterations(op: LinearOperator, v0: np.ndarray, steps: int):
    """Lanczos with full reorthogonalisation (twice is enough: Kahan, Parlett) from v0,
    at most ``steps`` steps: after step j yields (α_0..α_j, β_0..β_{j−1}, β_j = ‖w_j‖, the
    basis rows 0..j); stops after a step whose β_j is 0 (an invariant subspace)."""
    basis = np.empty((steps, op.shape[0]))
    alpha, beta = np.zeros(steps), np.zeros(steps)
    v = v0 / np.linalg.norm(v0)
    for j in range(steps):
        basis[j] = v
        w = op.matvec(v)
        alpha[j] = w @ v
        q = basis[:j + 1]
        w -= q.T @ (q @ w)
        w -= q.T @ (q @ w)
        b = float(np.linalg.norm(w))
        yield alpha[:j + 1], beta[:j], b, q
        if b == 0.0:
            return
        beta[j] = b
        v = w / b


def lanczos_extreme(op: LinearOperator, k: int, which: str, tol: float, seed: int,
                    steps: int):
    """Plain Lanczos (``lanczos_iterations`` from ``start_vector(seed)``), stopped as soon as
    the k wanted Ritz pairs (θ, y) have ‖Hy − θy‖ = β_j |s_jk| ≤ tol·|θ| (ARPACK's
    criterion, without its minimum of 20 vectors and restarts). Returns (values, vectors),
    largest first for "LA", smallest first for "SA", or None when ``steps`` did not suffice
    (the caller then runs ARPACK)."""
    for alpha, beta, b, q in lanczos_iterations(op, start_vector(op.shape[0], seed), steps):
        j = len(alpha) - 1
        theta, s = np.linalg.eigh(np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1))
        if j + 1 >= k:
            idx = np.arange(j, j - k, -1) if which == "LA" else np.arange(k)
            bound = b * np.abs(s[-1, idx])
            if np.all(bound <= tol * np.abs(theta[idx])) or b <= 1e-14 * np.abs(theta).max():
                return theta[idx], q.T @ s[:, idx]
    return None


# ------------------------------------------------------------------------ the density


def lanczos_tridiagonal(op: LinearOperator, v0: np.ndarray, steps: int):
    """(α, β) of ``steps`` Lanczos steps from v0 (``lanczos_iterations``), fewer when the
    Krylov space is exhausted (β below 1e-12 of the scale)."""
    steps = min(steps, op.shape[0])
    for alpha, beta, b, _ in lanczos_iterations(op, v0, steps):
        if len(alpha) == steps or b < 1e-12 * max(1.0, abs(alpha[-1])):
            return alpha.copy(), beta.copy()
    raise AssertionError("unreachable: the last step returns")  # pragma: no cover


def slq_density(op: LinearOperator, runs: int = 4, steps: int = 40,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019; docs/method.md section 14):
    per run a Rademacher start vector, ``steps`` Lanczos steps, and the Gauss quadrature of
    the tridiagonal matrix: nodes (its eigenvalues) and weights (squared first components),
    averaged over runs. Returns (nodes, weights) with the weights summing to 1."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    for _ in range(runs):
        v = rng.choice([-1.0, 1.0], size=op.shape[0])
        a, b = lanczos_tridiagonal(op, v, steps)
        t = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
        theta, q = np.linalg.eigh(t)
        nodes.append(theta)
        weights.append(q[0] ** 2 / runs)
    return np.concatenate(nodes), np.concatenate(weights)


def density_curve(nodes: np.ndarray, weights: np.ndarray, points: int = 1000,
                  width: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """The density smoothed by Gaussians of ``width`` (default 1% of the spectral range)."""
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12)
    sigma = width or 0.01 * span
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, points)
    dens = (weights[None, :] * np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2)
            ).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))
    return grid, dens


def density_plot_bytes(nodes: np.ndarray, weights: np.ndarray, fmt: str, title: str) -> bytes:
    """A figure of the SLQ density (log scale), as PNG or SVG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, dens = density_curve(nodes, weights)
    fig, ax = plt.subplots(figsize=(8.0, 4.5))
    ax.semilogy(grid, np.maximum(dens, 1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (smoothed)")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------- the checks


def check_against_score(op: HessianOperator, diagonal: dict, trace: float, coordinates: int = 8,
                        probes: int = 16, seed: int = 0) -> dict:
    """``spectrum --check``: the operator's diagonal on ``coordinates`` random coordinates
    (products with e_i) against score's exact diagonal, and a Hutchinson estimate of the
    trace (``probes`` Rademacher vectors, mean of zᵀHz with its standard error) against
    score's exact trace (docs/method.md section 14: Tr H = Tr G)."""
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    exact = np.concatenate([np.asarray(diagonal[name], dtype=np.float64).reshape(-1)
                            for name in op.slices])
    worst = 0.0
    picks = rng.choice(n, size=min(coordinates, n), replace=False)
    scale = float(np.max(np.abs(exact))) or 1.0
    rows = []
    for i in sorted(int(p) for p in picks):
        e = np.zeros(n)
        e[i] = 1.0
        ours = float(op.matvec(e)[i])
        worst = max(worst, abs(ours - exact[i]) / scale)
        rows.append({"index": i, "operator": ours, "score": float(exact[i])})
    samples = np.array([z @ op.matvec(z) for z in rng.choice([-1.0, 1.0], size=(probes, n))])
    estimate = float(samples.mean())
    stderr = float(samples.std(ddof=1) / math.sqrt(probes)) if probes > 1 else math.inf
    z = abs(estimate - trace) / stderr if stderr > 0 else (0.0 if estimate == trace else math.inf)
    return {"diagonal": {"coordinates": rows, "max_relative_deviation": worst,
                         "passed": bool(worst <= 1e-9)},
            "trace": {"hutchinson": estimate, "stderr": stderr, "probes": probes, "exact": trace,
                      "z": z, "passed": bool(z <= 3.0)}}
