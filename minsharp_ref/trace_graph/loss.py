"""Loss heads: from the logits (N, K), the R signals per sample at the logits, (N, R, K),
rows of a factor S with SᵀS = A, the loss Hessian in the logits. Registry keyed by the
network's loss kind; every head computes in float64 (it is N·K·K work) and returns
signals in the graph's dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .context import Context


def cross_entropy(ctx: Context, logits: str, k: int) -> tuple[str, int]:
    """Softmax cross-entropy: A = diag(p) − ppᵀ and the exact K − 1-row factor of
    ``engine.loss_hessian_sqrt`` (docs/method.md, "One signal fewer"): with m the arg-max of
    p (first on ties), R the rows √p_k (e_k − p) for k ≠ m, v_k = √(p_k/p_m) and
    c = 1/(1 + √(1 + ‖v‖²)), the signals are (I + c vvᵀ) R. Softmax is onnxruntime's
    (max-subtracted, stable); nothing is divided by a small number (v_k ≤ 1)."""
    b = ctx.b
    z = b.node("Cast", [logits], "logits:f64", to=11) if b.dtype != np.float64 else logits
    p = b.node("Softmax", [z], "p", axis=1)  # (N, K)
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
    s = b.node("Add", [r, b.node("Mul", [cv, vr])], "loss_factor")
    if b.dtype != np.float64:
        s = b.node("Cast", [s], "signal", to=b.elem)
    return s, k - 1


#: loss kind (``Network.loss``) → head: (context, logits value, K) → (signals, R)
LOSS_HEADS: dict[str, Callable[[Context, str, int], tuple[str, int]]] = {
    "cross-entropy": cross_entropy,
}
