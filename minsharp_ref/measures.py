"""Measures beyond minimum sharpness that use the exact Hessian diagonal (docs/method.md section 12).

Normalised sharpness (after Tsuzuku, Sato & Sugiyama 2020, "Normalized flat minima"): their
PAC-Bayesian bound with a Gaussian posterior whose standard deviations σ_ij = a_i b_j are
rank one per weight matrix gives, per parameterised layer d with weight W and exact Hessian
diagonal h (same shape),

    NS_d = min_{a > 0, b > 0} Σ_ij ( h_ij a_i² b_j² + w_ij² / (a_i² b_j²) ),

rows i = output units (channels), columns j = input units (channels; for a convolution the
kernel positions of one (i, j) pair share a_i b_j, so h and w² are summed over them). Any
neuron-wise rescaling (docs/method.md section 12) multiplies w_ij by γ_i/γ'_j and h_ij by its inverse
square, which a and b absorb: NS_d is invariant, and so is NS = Σ_d NS_d. Biases are not
part of it. In x = log a, y = log b the objective is a sum of exponentials of affine
functions, hence convex; it is minimised by exact alternating minimisation (each a_i has the
closed form a_i⁴ = Σ_j w²_ij b_j⁻² / Σ_j h_ij b_j²) followed by scipy's L-BFGS with the
analytic gradient. Each term is at least 2|w_ij|√h_ij (AM-GM), a lower bound reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ir import BatchNorm, Dense, Network


@dataclass(frozen=True)
class NormalisedSharpness:
    value: float
    lower_bound: float  # Σ 2|w|√h
    gradient_norm: float


def _as_matrix(layer, stored: np.ndarray) -> np.ndarray:
    """A stored weight-shaped array as (outputs, inputs), summed over kernel positions."""
    if isinstance(layer, Dense):
        return stored.T if layer.weight_transposed else stored
    cout, cg = stored.shape[:2]
    per_pair = stored.reshape(cout, cg, -1).sum(axis=2)  # (C_out, C_in/groups)
    full = np.zeros((cout, cg * layer.groups))
    o_per_g = cout // layer.groups
    for g in range(layer.groups):
        full[g * o_per_g:(g + 1) * o_per_g, g * cg:(g + 1) * cg] = per_pair[g * o_per_g:(g + 1) * o_per_g]
    return full


def normalised_sharpness_layer(h: np.ndarray, w2: np.ndarray) -> NormalisedSharpness:
    """min over a, b > 0 of Σ h_ij a_i² b_j² + w2_ij /(a_i² b_j²) for (out, in) matrices."""
    from scipy.optimize import minimize

    bound = float(2 * np.sum(np.sqrt(h * w2)))
    # rows/columns with no curvature (or no weight) contribute 0 in the infimum: drop them
    rows = np.ones(h.shape[0], bool)
    cols = np.ones(h.shape[1], bool)
    while True:
        hh, ww = h[np.ix_(rows, cols)], w2[np.ix_(rows, cols)]
        new_rows = rows.copy()
        new_cols = cols.copy()
        new_rows[rows] = (hh.sum(axis=1) > 0) & (ww.sum(axis=1) > 0)
        new_cols[cols] = (hh.sum(axis=0) > 0) & (ww.sum(axis=0) > 0)
        if (new_rows == rows).all() and (new_cols == cols).all():
            break
        rows, cols = new_rows, new_cols
    hh, ww = h[np.ix_(rows, cols)], w2[np.ix_(rows, cols)]
    if hh.size == 0:
        return NormalisedSharpness(0.0, bound, 0.0)
    scale = hh.sum() + ww.sum()
    hh, ww = hh / scale, ww / scale
    x, y = np.zeros(hh.shape[0]), np.zeros(hh.shape[1])
    for _ in range(100):  # exact block-coordinate steps
        x = 0.25 * (np.log(ww @ np.exp(-2 * y)) - np.log(hh @ np.exp(2 * y)))
        y = 0.25 * (np.log(ww.T @ np.exp(-2 * x)) - np.log(hh.T @ np.exp(2 * x)))
    m = hh.shape[0]

    def objective(z):
        p, q = np.exp(2 * z[:m]), np.exp(2 * z[m:])
        e_plus, e_minus = hh * np.outer(p, q), ww / np.outer(p, q)
        f = e_plus.sum() + e_minus.sum()
        diff = e_plus - e_minus
        return f, np.concatenate([2 * diff.sum(axis=1), 2 * diff.sum(axis=0)])

    res = minimize(objective, np.concatenate([x, y]), jac=True, method="L-BFGS-B",
                   options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 10_000})
    f, grad = objective(res.x)
    return NormalisedSharpness(float(f * scale), bound, float(np.linalg.norm(grad) / f))


def normalised_sharpness(network: Network, diagonal: dict[str, np.ndarray]) -> list[NormalisedSharpness]:
    """NS_d for every parameterised layer, from the exact diagonal keyed by initializer name.
    A BatchNorm's γ is a diagonal weight matrix: each entry has its own product a_i b_i, so
    its NS_d is the AM-GM bound Σ_i 2|γ_i|√h_i, attained (docs/method.md section 12)."""
    out = []
    for layer in network.param_layers:
        if isinstance(layer, BatchNorm):
            bound = float(2 * np.sum(np.abs(layer.weight) * np.sqrt(diagonal[layer.weight_name])))
            out.append(NormalisedSharpness(bound, bound, 0.0))
            continue
        h = _as_matrix(layer, diagonal[layer.weight_name])  # both w.r.t. the stored weight
        w2 = _as_matrix(layer, layer.weight.astype(np.float64) ** 2)
        out.append(normalised_sharpness_layer(h, w2))
    return out
