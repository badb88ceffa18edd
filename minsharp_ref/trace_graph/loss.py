"""Loss heads: from the logits (N, K), the R signals per sample at the logits, (N, R, K),
rows of a factor S with SᵀS = A, the loss Hessian in the logits: the same factors as
``engine.loss_hessian_factor`` (docs/method.md, "The S factorisation"). Registry keyed by
the network's loss kind; every head computes in float64 (it is N·K·K work) and returns
signals in the graph's dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .context import Context


def cross_entropy(ctx: Context, logits: str, k: int) -> tuple[str, int]:
    """Softmax cross-entropy: A = diag(p) − ppᵀ and the exact K − 1-row factor of
    ``engine.loss_hessian_sqrt`` (docs/method.md, "The S factorisation"): with m the arg-max of
    p (first on ties), R the rows √p_k (e_k − p) for k ≠ m, v_k = √(p_k/p_m) and
    c = 1/(1 + √(1 + ‖v‖²)), the signals are (I + c vvᵀ) R. Softmax is onnxruntime's
    (max-subtracted, stable); nothing is divided by a small number (v_k ≤ 1)."""
    b = ctx.b
    p = b.node("Softmax", [_double(ctx, logits)], "p", axis=1)  # (N, K)
    top = b.node("ArgMax", [p], "top", axis=1, keepdims=1)  # (N, 1)
    ranks = b.const(np.arange(k - 1)[None, :], np.int64)
    skip = b.node("Cast", [b.node("GreaterOrEqual", [ranks, top])], to=7)
    rows = b.node("Add", [ranks, skip], "rows")  # (N, K − 1): the k ≠ m
    p_rows = b.node("GatherElements", [p, rows], "p_rows", axis=1)
    one_hot = b.node("Cast", [b.node("Equal", [b.node("Unsqueeze", [rows, b.ints([2])]),
                                               b.const(np.arange(k)[None, None, :], np.int64)])],
                     to=11)  # (N, K − 1, K): e_k
    centred = b.node("Sub", [one_hot, b.node("Unsqueeze", [p, b.ints([1])])])
    r = b.node("Mul", [b.node("Unsqueeze", [b.node("Sqrt", [p_rows]), b.ints([2])]), centred])
    p_top = b.node("ReduceMax", [p, b.ints([1])], keepdims=1)
    v = b.node("Sqrt", [b.node("Div", [p_rows, p_top])], "v")  # (N, K − 1)
    one = b.const(1.0, np.float64)
    norm = b.node("Sqrt", [b.node("Add", [one, b.sum_squares(v, [1], keepdims=1)])])
    c = b.node("Div", [one, b.node("Add", [one, norm])])  # (N, 1)
    vr = b.node("MatMul", [b.node("Unsqueeze", [v, b.ints([1])]), r])  # (N, 1, K): Σ_k v_k r_k
    cv = b.node("Unsqueeze", [b.node("Mul", [c, v]), b.ints([2])])  # (N, K − 1, 1)
    return _signals(ctx, b.node("Add", [r, b.node("Mul", [cv, vr])], "loss_factor")), k - 1


def binary(ctx: Context, logits: str, k: int) -> tuple[str, int]:
    """Binary cross-entropy of σ(z), K = 1: A = p(1 − p), S = e^{−|z|/2}/(1 + e^{−|z|}),
    exact and without cancellation for any z (``engine.loss_hessian_factor``)."""
    b = ctx.b
    z = _double(ctx, logits)
    e = b.node("Exp", [b.node("Mul", [b.node("Abs", [z]), b.const(-0.5, np.float64)])])
    s = b.node("Div", [e, b.node("Add", [b.const(1.0, np.float64), b.node("Mul", [e, e])])])
    return _signals(ctx, b.node("Unsqueeze", [s, b.ints([2])], "loss_factor")), 1


def mse(ctx: Context, logits: str, k: int) -> tuple[str, int]:
    """Mean squared error (1/K) Σ_k (z_k − y_k)²: A = 2I/K, S = √(2/K) I, R = K."""
    b = ctx.b
    n = b.node("Shape", [logits], start=0, end=1)
    shape = b.node("Concat", [n, b.ints([k, k])], axis=0)
    eye = b.const(np.sqrt(2.0 / k) * np.eye(k)[None])
    return b.node("Expand", [eye, shape], "signal"), k


def _double(ctx: Context, logits: str) -> str:
    b = ctx.b
    return b.node("Cast", [logits], "logits:f64", to=11) if b.dtype != np.float64 else logits


def _signals(ctx: Context, s: str) -> str:
    """Float64 head output in the graph's dtype."""
    b = ctx.b
    return b.node("Cast", [s], "signal", to=b.elem) if b.dtype != np.float64 else s


#: loss kind (``Network.loss``) → head: (context, logits value, K) → (signals, R)
LOSS_HEADS: dict[str, Callable[[Context, str, int], tuple[str, int]]] = {
    "cross-entropy": cross_entropy,
    "binary": binary,
    "mse": mse,
}
