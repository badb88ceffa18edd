"""Minimum sharpness from the per-tensor traces (spec sections 3 and 4).

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
    """Exact infimum of the trace over the α-scale transformations.

    * no biases, all t_d > 0: Theorem 1, MS = D·(Π t_d)^{1/D} computed in the log domain as
      exp(log D + mean log t_d), attained at α_d² = t_d / (Π_j t_j)^{1/D}.
    * biases: F(β) = Σ t_d e^{−2β_d} + Σ u_d e^{−2Σ_{j≤d}β_j} with β = log α on Σβ = 0 is
      convex (strictly, when all t_d > 0); minimised by damped Newton steps until the
      predicted decrease is below 1e-28·F.
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
    beta, grad_norm, iters, converged = _newton(t, u, beta0)
    value = float(np.sum(t * np.exp(-2 * beta)) + np.sum(u * np.exp(-2 * np.cumsum(beta))))
    if dead:
        return MinimumSharpness(value, None, "dead-layer", grad_norm, iters, dead, converged)
    return MinimumSharpness(value, tuple(np.exp(beta).tolist()), "newton", grad_norm, iters,
                            (), converged)


def _objective(t, u, beta):
    """F(β), its gradient and Hessian (in β ∈ R^D; the constraint is applied by projection)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a too-long trial step gives inf: rejected
        wt = t * np.exp(-2 * beta)
        wu = u * np.exp(-2 * np.cumsum(beta))
    tail = np.cumsum(wu[::-1])[::-1]  # tail[d] = Σ_{e≥d} wu_e
    f = wt.sum() + wu.sum()
    grad = -2 * wt - 2 * tail
    idx = np.arange(t.size)
    hess = np.diag(4 * wt) + 4 * tail[np.maximum.outer(idx, idx)]
    return f, grad, hess


def _newton(t, u, beta):
    """Damped Newton on the plane Σβ = 0, in an orthonormal basis of the plane.
    Returns (β, relative projected gradient norm, iterations, converged)."""
    d = t.size
    basis = np.linalg.qr(np.vstack([np.ones(d), np.eye(d)[:-1]]).T)[0][:, 1:]  # D × (D−1)
    f, grad, hess = _objective(t, u, beta)
    for it in range(MAX_ITERATIONS):
        g = basis.T @ grad
        h = basis.T @ hess @ basis
        rel = float(np.linalg.norm(g) / f)
        step = basis @ np.linalg.lstsq(h, -g, rcond=None)[0]
        decrement = float(-g @ (basis.T @ step))  # Newton decrement²: twice the predicted gain
        if decrement <= 1e-20 * f:  # the gain is below F's rounding: polish β with one full
            f_new, grad_new, _ = _objective(t, u, beta + step)  # step (quadratic convergence)
            rel_new = float(np.linalg.norm(basis.T @ grad_new) / f_new) if np.isfinite(f_new) else rel
            return (beta + step, rel_new, it + 1, True) if rel_new < rel else (beta, rel, it, True)
        s = 1.0
        while True:
            candidate = beta + s * step
            f_new, grad_new, hess_new = _objective(t, u, candidate)
            if np.isfinite(f_new) and f_new <= f - 0.25 * s * decrement:
                break
            s *= 0.5
            if s < 1e-12:  # no decrease representable: at the minimum to rounding
                return beta, rel, it, True
        if f_new >= f:  # the decrease is below the rounding of F: at the minimum
            return beta, rel, it, True
        beta, f, grad, hess = candidate, f_new, grad_new, hess_new
    return beta, float(np.linalg.norm(basis.T @ grad) / f), MAX_ITERATIONS, False
