"""Minimum sharpness from the per-tensor traces (docs/method.md sections 3, 4 and 9).

The convex solver is stated once here (``minimise_exponential_sum``); chains use it through
``minimum_sharpness`` and DAGs through ``group.group_sharpness``.

With t_d = Tr H_{W_d} and u_d = Tr H_{b_d} (u_d = 0 without a bias), the α-scale
transformation W_d → α_d W_d, b_d → c_d b_d (c_d = Π_{j≤d} α_j, Π_d α_d = 1) sends the naive
trace to Σ_d t_d/α_d² + Σ_d u_d/c_d² (Proposition 2), and

    MS = inf_α Σ_d t_d/α_d² + Σ_d u_d/c_d².                         (Definition 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import sparse

MAX_ITERATIONS = 500


@dataclass(frozen=True)
class MinimumSharpness:
    value: float
    alpha: Optional[tuple[float, ...]]  # None when the infimum is not attained
    method: str  # "closed-form", "newton", "dead-layer"
    gradient_norm: float  # relative norm of the projected gradient at the end (0: closed form)
    iterations: int
    dead_layers: tuple[int, ...] = ()
    converged: bool = True


def minimum_sharpness(t, u=None) -> MinimumSharpness:
    """Exact infimum of the trace over the α-scale transformations of a chain.

    * no biases, all t_d > 0: Theorem 1, MS = D·(Π t_d)^{1/D} computed in the log domain as
      exp(log D + mean log t_d), attained at α_d² = t_d / (Π_j t_j)^{1/D}.
    * biases: with ℓ_d = log c_d (ℓ_0 = ℓ_D = 0, so Π α_d = 1 holds by construction),
      F(ℓ) = Σ_d t_d e^{−2(ℓ_d − ℓ_{d−1})} + Σ_d u_d e^{−2ℓ_d}: the chain case of the
      group problem of docs/method.md section 9, minimised by ``minimise_exponential_sum``
      from the no-bias optimum; α_d = e^{ℓ_d − ℓ_{d−1}}.
    * a dead layer (t_d = 0): the infimum is not attained. Without biases it is 0. With
      biases it can be positive (c_D = 1 always, so u_D stays; more generally the dead
      layer only decouples the problem): the same Newton iteration, with least-squares
      steps, drives the vanishing terms to 0 geometrically and converges to the infimum.
    """
    t = np.asarray(t, dtype=np.float64)
    u = np.zeros_like(t) if u is None else np.nan_to_num(np.asarray(u, dtype=np.float64))
    d = t.size
    if np.any(~np.isfinite(t)) or np.any(t < 0) or np.any(u < 0) or np.any(~np.isfinite(u)):
        raise ValueError("traces must be finite and non-negative")
    dead = tuple(int(i) for i in np.flatnonzero(t == 0))
    has_bias = bool(np.any(u > 0))
    if dead and not has_bias:
        return MinimumSharpness(0.0, None, "dead-layer", 0.0, 0, dead)
    if not dead:
        log_t = np.log(t)
        beta0 = 0.5 * (log_t - log_t.mean())  # the no-bias optimum
        if not has_bias:
            value = math.exp(math.log(d) + float(log_t.mean()))
            return MinimumSharpness(value, tuple(np.exp(beta0).tolist()), "closed-form", 0.0, 0)
    else:
        beta0 = np.zeros(d)
    chain_in, chain_out = (-1,) + tuple(range(d - 1)), tuple(range(d - 1)) + (-1,)
    rows, coefs = exponent_terms(chain_in, chain_out, t, u, d - 1)
    ell, grad_norm, iters, converged = minimise_exponential_sum(rows, coefs, np.cumsum(beta0)[:-1])
    value = float(np.sum(coefs * np.exp(rows @ ell)))
    if dead:
        return MinimumSharpness(value, None, "dead-layer", grad_norm, iters, dead, converged)
    alpha = np.exp(np.diff(np.concatenate([[0.0], ell, [0.0]])))
    return MinimumSharpness(value, tuple(alpha.tolist()), "newton", grad_norm, iters,
                            (), converged)


# ------------------------------------------------- the one solver, for chains and DAGs


def exponent_terms(layer_in, layer_out, t, u, size: int):
    """Rows a_j and coefficients c_j of F(ℓ) = Σ_j c_j e^{a_j·ℓ} over ``size`` free
    log-scales (docs/method.md section 9): a layer p from class ``layer_in[p]`` to class
    ``layer_out[p]`` (−1: a fixed class, ℓ = 0) contributes t_p e^{−2(ℓ_out − ℓ_in)} and
    u_p e^{−2ℓ_out}. Terms with a zero coefficient are left out."""
    rows, coefs = [], []
    for p, (i, o) in enumerate(zip(layer_in, layer_out)):
        for value, is_bias in ((t[p], False), (u[p], True)):
            if value <= 0:
                continue
            a = np.zeros(size + 1)  # last entry: the fixed classes, dropped
            a[o] -= 2.0
            if not is_bias:
                a[i] += 2.0
            rows.append(a[:size])
            coefs.append(value)
    return np.array(rows, dtype=np.float64).reshape(len(rows), size), np.array(coefs)


#: Up to this many variables the Hessian of sparse rows is solved as a dense matrix
#: (Cholesky): a neuron-wise Hessian couples whole layers, so it fills in under sparse
#: elimination (a ResNet-like graph of 2,880 units: ~13 s per SuperLU solve, ~0.3 s dense).
DENSE_VARIABLES = 4096


@dataclass(frozen=True)
class PositiveDefinite:
    """A dense Hessian known to be positive definite (solved by Cholesky)."""

    matrix: np.ndarray


class SparseHessian:
    """H(w) = Σ_t w_t a_t a_tᵀ for sparse rows a_t: the pairs of entries that share a row
    are found once; each call sums w_t a_ti a_tj into a dense matrix (``PositiveDefinite``;
    up to DENSE_VARIABLES) or a sparse one."""

    def __init__(self, rows):
        csr = sparse.csr_matrix(rows)
        csr.sum_duplicates()
        counts = np.diff(csr.indptr)
        row_of = np.repeat(np.arange(csr.shape[0]), counts)
        first = np.repeat(np.arange(csr.nnz), counts[row_of])
        within = np.arange(first.size) - np.repeat(np.cumsum(counts[row_of]) - counts[row_of],
                                                    counts[row_of])
        second = csr.indptr[row_of[first]] + within
        self.n = csr.shape[1]
        self.row = row_of[first]
        self.i, self.j = csr.indices[first], csr.indices[second]
        self.product = csr.data[first] * csr.data[second]

    def __call__(self, w):
        values = w[self.row] * self.product
        if self.n <= DENSE_VARIABLES:
            return PositiveDefinite(np.bincount(self.i * self.n + self.j, values,
                                                self.n * self.n).reshape(self.n, self.n))
        return sparse.csc_matrix((values, (self.i, self.j)), shape=(self.n, self.n))


def _objective(rows, coefs, ell, hessian=None):
    """F(ℓ) = Σ_j c_j e^{a_j·ℓ}, its gradient and Hessian (``hessian(w)`` for sparse rows)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a too-long trial step gives inf: rejected
        w = coefs * np.exp(rows @ ell)
    if hessian is not None:
        return w.sum(), rows.T @ w, hessian(w)
    return w.sum(), rows.T @ w, (rows.T * w) @ rows


def _newton_step(hess, grad) -> np.ndarray:
    """The Newton step: least squares on a dense Hessian (it may be singular); Cholesky or
    a sparse solve on a positive definite one (the neuron-wise problem, docs/method.md
    section 13: a grounded weighted Laplacian)."""
    if isinstance(hess, PositiveDefinite):
        from scipy.linalg import LinAlgError, cho_factor, cho_solve

        try:
            return cho_solve(cho_factor(hess.matrix), -grad)
        except LinAlgError:  # numerically singular: least squares
            hess = hess.matrix
    elif sparse.issparse(hess):
        from scipy.sparse.linalg import spsolve

        return np.asarray(spsolve(hess, -grad, permc_spec="MMD_AT_PLUS_A"))
    return np.linalg.lstsq(hess, -grad, rcond=None)[0]


def minimise_exponential_sum(rows, coefs, ell):
    """Damped Newton on the convex F(ℓ) = Σ_j c_j e^{a_j·ℓ}, with least-squares steps (a
    singular Hessian: directions on which F is constant, or along which it decays to an
    unattained infimum). ``rows`` is a dense array (layer-wise, docs/method.md section 9) or
    a scipy.sparse matrix with a positive definite Hessian (neuron-wise, section 13: each
    row couples two units; ``SparseHessian`` assembles it, and the steps are Cholesky or
    sparse solves). It stops once the predicted decrease is below F's rounding, or the
    line search finds no representable decrease; then one full step polishes ℓ (quadratic
    convergence), kept when it lowers the gradient, so that traces that differ in the last
    bits give ℓ* that differ in the last bits. Returns (ℓ, relative gradient norm,
    iterations, converged)."""
    ell = np.asarray(ell, dtype=np.float64)
    hessian = SparseHessian(rows) if sparse.issparse(rows) else None
    f, grad, hess = _objective(rows, coefs, ell, hessian)
    if ell.size == 0:
        return ell, 0.0, 0, True

    def polished(ell, grad, hess, f, it):
        rel = float(np.linalg.norm(grad) / f)
        step = _newton_step(hess, grad)
        f_new, grad_new, _ = _objective(rows, coefs, ell + step, hessian)
        rel_new = float(np.linalg.norm(grad_new) / f_new) if np.isfinite(f_new) else rel
        return (ell + step, rel_new, it + 1, True) if rel_new < rel else (ell, rel, it, True)

    for it in range(MAX_ITERATIONS):
        step = _newton_step(hess, grad)
        decrement = float(-grad @ step)  # Newton decrement²: twice the predicted gain
        if decrement <= 1e-20 * f:
            return polished(ell, grad, hess, f, it)
        s = 1.0
        while True:
            candidate = ell + s * step
            f_new, grad_new, hess_new = _objective(rows, coefs, candidate, hessian)
            if np.isfinite(f_new) and f_new <= f - 0.25 * s * decrement:
                break
            s *= 0.5
            if s < 1e-12:  # no decrease representable: at the minimum to rounding
                return polished(ell, grad, hess, f, it)
        if f_new >= f:  # the decrease is below the rounding of F: at the minimum
            return polished(ell, grad, hess, f, it)
        ell, f, grad, hess = candidate, f_new, grad_new, hess_new
    return ell, float(np.linalg.norm(grad) / f), MAX_ITERATIONS, False
