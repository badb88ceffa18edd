"""Exact per-tensor Hessian traces by back-propagating a factor of the loss Hessian in the
logits (docs/method.md, section 3).

For cross-entropy, with p = softmax(z), the loss Hessian in the logits is A = diag(p) − ppᵀ
= SᵀS; the K rows √p_k (e_k − p) are a factor and ``loss_hessian_sqrt`` builds an exact one
with K − 1 rows. ``loss_hessian_factor`` gives S for every loss kind (binary: A = p(1 − p),
mse: A = 2I/K).
Back-propagating its rows from the logits gives, at each layer output z_d, signals
g_k = S_k ∂z/∂z_d, and

    Tr H_dd = (1/N) Σ_n Σ_k ‖g_nk ∂z_d/∂θ_d‖²                      (docs/method.md section 3)

because the logits are linear in any one parameter tensor once the activation pattern is
fixed. Two kinds of rule keep apart how signals travel and what is measured (as BackPACK):

* ``backprop(layer, g, a)`` moves signals g (N, R, *out_shape) from a layer's output to its
  input (a is the layer's input, needed for masks and arg-max routing); the layers that join
  branches (``Add``, ``Concat``) return one signal per input, and a tensor read by several
  layers receives the sum of their signals (docs/method.md section 9);
* ``measure(layer, g, a)`` (and ``measure_diagonal``) turn the signals at a parameterised
  layer's output into the per-sample traces (the diagonal) of its weight and bias.

Everything is vectorised over samples, signals and positions; signals are float64 (the
reference) or float32 (``--precision float32``), and every reduction is float64.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Optional

import numpy as np

from .ir import (Add, AvgPool2d, BatchNorm, Concat, Conv2d, Dense, LayerBase, LeakyRelu,
                 MaxPool2d, Network, Pad2d, Relu, Reshape, Slice, Transpose,
                 is_parameterised)
from .plan import Plan, depends_on_parameters, traversal_plan
from .windows import scatter_windows


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stabilised by subtracting the row maximum."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loss_hessian_sqrt(p: np.ndarray) -> np.ndarray:
    """A factor S with SᵀS = A = diag(p) − ppᵀ per sample, as (N, K − 1, K) signals.

    docs/method.md section 3 ("The S factorisation") uses the K rows S_k = √p_k (e_k − p), which satisfy Σ_k √p_k S_k = 0. So
    the row of the largest probability, m, is S_m = −Σ_{k≠m} v_k S_k with v_k = √(p_k/p_m),
    and with R the other K − 1 rows, A = Rᵀ(I + vvᵀ)R. Since (I + c vvᵀ)² = I + vvᵀ for
    c = 1/(1 + √(1 + ‖v‖²)), the K − 1 rows (I + c vvᵀ)R are an exact factor: one signal
    fewer to back-propagate, with no decomposition (v_k ≤ 1, nothing is divided by a small
    number).
    """
    n, k = p.shape
    top = np.argmax(p, axis=1)
    rows = np.arange(k - 1)[None, :] + (np.arange(k - 1)[None, :] >= top[:, None])  # k ≠ m
    p_rows = np.take_along_axis(p, rows, axis=1)
    r = np.sqrt(p_rows)[:, :, None] * (np.eye(k)[rows] - p[:, None, :])  # (N, K−1, K)
    v = np.sqrt(p_rows / p[np.arange(n), top][:, None])
    c = 1.0 / (1.0 + np.sqrt(1.0 + np.einsum("nk,nk->n", v, v)))
    return r + (c[:, None] * v)[:, :, None] * np.einsum("nk,nkj->nj", v, r)[:, None, :]


def loss_hessian_factor(z: np.ndarray, loss: str = "cross-entropy") -> np.ndarray:
    """An exact factor S with SᵀS = A, the Hessian of the per-sample loss in the logits z
    (N, K), as (N, R, K) signals (docs/method.md, section 1 and "The S factorisation"):

    * "cross-entropy": A = diag(p) − ppᵀ, p = softmax(z): R = K − 1 (``loss_hessian_sqrt``);
    * "binary" (K = 1, ℓ = BCE of σ(z)): A = σ(z)σ(−z) = p(1 − p), S = e^{−|z|/2}/(1 + e^{−|z|}),
      exact and without cancellation for any z;
    * "mse" (ℓ = (1/K) Σ_k (z_k − y_k)²): A = 2I/K, S = √(2/K) I: R = K.
    """
    z = z.astype(np.float64)
    n, k = z.shape
    if loss == "cross-entropy":
        return loss_hessian_sqrt(softmax(z))
    if loss == "binary":
        e = np.exp(-0.5 * np.abs(z))
        return (e / (1.0 + e * e))[:, :, None]  # (N, 1, 1)
    if loss == "mse":
        return np.broadcast_to(np.sqrt(2.0 / k) * np.eye(k), (n, k, k)).copy()
    raise ValueError(f"unknown loss {loss!r}")


def signal_rows(network: Network) -> int:
    """R, the number of signals per sample of ``loss_hessian_factor``."""
    k = network.num_classes
    return {"cross-entropy": k - 1, "binary": 1, "mse": k}[network.loss]


# ------------------------------------------------------------------ signal back-propagation


@singledispatch
def backprop(layer: LayerBase, g: np.ndarray, a: np.ndarray) -> np.ndarray:
    raise NotImplementedError(f"no back-propagation rule for {type(layer).__name__}")


@backprop.register
def _(layer: Relu, g, a):
    """ReLU: multiply by 1[u > 0] (in place: every rule returns a fresh or owned array)."""
    return np.multiply(g, (a > 0)[:, None], out=g) if g.flags.writeable else g * (a > 0)[:, None]


@backprop.register
def _(layer: LeakyRelu, g, a):
    """LeakyReLU: multiply by 1 where u > 0, by the slope elsewhere."""
    return g * np.where(a > 0, 1.0, layer.slope)[:, None]


@backprop.register
def _(layer: Reshape, g, a):
    """Reshape: back to the input's shape."""
    return g.reshape(g.shape[:2] + a.shape[1:])


@backprop.register
def _(layer: Transpose, g, a):
    """Transpose: apply the inverse permutation to the per-sample axes."""
    inverse = np.argsort(layer.perm)
    return g.transpose((0, 1) + tuple(int(p) + 2 for p in inverse))


@backprop.register
def _(layer: Slice, g, a):
    """Slice: the signal back in its place along the sliced axis, zeros elsewhere."""
    out = np.zeros(g.shape[:2] + a.shape[1:], dtype=g.dtype)
    out[layer.index(lead=2)] = g
    return out


@backprop.register
def _(layer: Pad2d, g, a):
    """Zero padding: crop the padding away."""
    t, l = layer.pads[0], layer.pads[1]
    h, w = a.shape[2:]
    return g[..., t:t + h, l:l + w]


@backprop.register
def _(layer: MaxPool2d, g, a):
    """MaxPool: route each signal to its window's arg-max (first index on ties), adding up
    where overlapping windows share an arg-max: one bincount over flat input positions."""
    geom = layer.geometry
    kh, kw = geom.kernel
    n, k, c, ho, wo = g.shape
    h, w = a.shape[2:]
    arg = layer.window_argmax(a)  # (N, C, Ho, Wo), flat kernel offset i·kw + j
    rows = np.arange(ho)[:, None] * geom.stride[0] - geom.pads[0] + (arg // kw) * geom.dilation[0]
    cols = np.arange(wo)[None, :] * geom.stride[1] - geom.pads[1] + (arg % kw) * geom.dilation[1]
    position = rows * w + cols  # (N, C, Ho, Wo), never in the padding
    plane = (np.arange(n)[:, None, None] * k + np.arange(k)[None, :, None]) * c \
        + np.arange(c)[None, None, :]  # (N, K, C): index of each (sample, signal, channel) map
    flat = plane[..., None] * (h * w) + position.reshape(n, 1, c, ho * wo)
    out = np.bincount(flat.reshape(-1), weights=g.reshape(-1), minlength=n * k * c * h * w)
    return out.reshape(n, k, c, h, w).astype(g.dtype, copy=False)


@backprop.register
def _(layer: AvgPool2d, g, a):
    """AveragePool: spread each signal evenly over its window (divided by the window count)."""
    spread = g / layer.divisor(a.shape[2:]).astype(g.dtype)
    return scatter_windows(lambda i, j: spread, layer.geometry, a.shape[2:], g.shape[:3],
                           dtype=g.dtype)


@backprop.register
def _(layer: Dense, g, a):
    """Dense: gᵀ W, i.e. (N·K, out) @ (out, in) as one GEMM."""
    n, k, out = g.shape
    return (g.reshape(n * k, out) @ layer.matrix).reshape(n, k, -1)


@backprop.register
def _(layer: BatchNorm, g, a):
    """BatchNorm (inference): multiply channel c by γ_c s_c (docs/method.md section 10)."""
    return g * layer.multiplier.reshape((1, 1, -1) + (1,) * (g.ndim - 3)).astype(g.dtype, copy=False)


@backprop.register
def _(layer: Add, g, a):
    """Add: every input receives the signal (copies, so that in-place rules downstream of
    one branch cannot touch another's)."""
    return (g,) + tuple(g.copy() for _ in layer.other_inputs)


@backprop.register
def _(layer: Concat, g, a):
    """Concat: split the signal along the channel axis."""
    edges = np.cumsum(layer.sizes)[:-1]
    return tuple(np.split(g, edges, axis=2))


#: Bytes of im2col columns materialised at once in the conv back-propagation.
CONV_CHUNK_BYTES = 8 * 1024 ** 2


@backprop.register
def _(layer: Conv2d, g, a):
    """Conv: the transposed convolution. Per chunk of m signals, one GEMM forms the columns
    Wᵀ g (G, Q, m·P), which are added back to the input positions they came from (col2im);
    chunks keep the columns in cache instead of materialising them for the whole batch."""
    n, k = g.shape[:2]
    kh, kw = layer.geometry.kernel
    ho, wo = g.shape[3:]
    c = a.shape[1]
    groups = layer.groups
    wt = np.ascontiguousarray(layer.kernel_matrix().transpose(0, 2, 1)).astype(g.dtype, copy=False)
    signals = g.reshape(n * k, groups, -1, ho * wo)  # (NK, G, O, P)
    chunk = max(1, CONV_CHUNK_BYTES // (g.itemsize * c * kh * kw * ho * wo))
    out = np.empty((n * k, c) + a.shape[2:], dtype=g.dtype)
    for s in range(0, n * k, chunk):
        part = signals[s:s + chunk]
        m = part.shape[0]
        stacked = part.transpose(1, 2, 0, 3).reshape(groups, -1, m * ho * wo)  # (G, O, m·P)
        cols = np.matmul(wt, stacked).reshape(c, kh, kw, m, ho, wo)
        frame = scatter_windows(lambda i, j: cols[:, i, j], layer.geometry, a.shape[2:],
                                (c, m), dtype=g.dtype)
        out[s:s + m] = frame.transpose(1, 0, 2, 3)
    return out.reshape((n, k) + out.shape[1:])


# --------------------------------------------------------------- what is measured at θ_d


@singledispatch
def measure(layer: LayerBase, g: np.ndarray, a: np.ndarray):
    raise NotImplementedError(type(layer).__name__)


@measure.register
def _(layer: Dense, g, a):
    """Tr_n(W) = c_W² ‖a‖² Σ_k ‖g_k‖² and Tr_n(b) = c_b² Σ_k ‖g_k‖² (no outer products);
    c_W, c_b are Gemm's alpha and beta (traces are with respect to the initializers)."""
    signal = np.einsum("nko,nko->n", g, g, dtype=np.float64)
    t_w = layer.weight_coef ** 2 * np.einsum("ni,ni->n", a, a, dtype=np.float64) * signal
    t_b = None if layer.bias is None else layer.bias_coef ** 2 * signal
    return t_w, t_b


def conv_trace_flops(layer: Conv2d, in_shape: tuple[int, ...], k: int) -> dict[str, int]:
    """Multiply-adds per sample of the two exact forms of Tr_n(W) for a conv layer:
    'im2col' forms g_k Uᵀ (G·K·O·Q·P); 'gram' forms Uᵀ U and Σ_k g_kᵀ g_k (G·P²·(Q + K·O))."""
    g = layer.groups
    q = layer.weight[0].size
    o = layer.out_channels // g
    ho, wo = layer.geometry.output_hw(in_shape[1:])
    p = ho * wo
    return {"im2col": g * k * o * q * p, "gram": g * p * p * (q + k * o)}


@measure.register
def _(layer: Conv2d, g, a):
    """Tr_n(W) = Σ_k ‖g_k Uᵀ‖²_F = Σ_k ⟨g_kᵀ g_k, Uᵀ U⟩ with U = im2col(a), whichever form
    needs fewer FLOPs; Tr_n(b) = Σ_k ‖Σ_positions g_k‖²."""
    n, k = g.shape[:2]
    u = layer.im2col(a)  # (N, G, Q, P)
    g_mat = g.reshape(n, k, layer.groups, -1, u.shape[-1])  # (N, K, G, O, P)
    flops = conv_trace_flops(layer, a.shape[1:], k)
    if flops["im2col"] <= flops["gram"]:
        stacked = g_mat.transpose(0, 2, 1, 3, 4).reshape(n, layer.groups, -1, u.shape[-1])
        m = np.matmul(stacked, u.transpose(0, 1, 3, 2))  # (N, G, K·O, Q): one GEMM per sample
        t_w = np.einsum("ngoq,ngoq->n", m, m, dtype=np.float64)
    else:
        gram_u = np.matmul(u.transpose(0, 1, 3, 2), u)  # (N, G, P, P)
        stacked = g_mat.transpose(0, 2, 1, 3, 4).reshape(n, layer.groups, -1, u.shape[-1])
        gram_g = np.matmul(stacked.transpose(0, 1, 3, 2), stacked)  # Σ_k g_kᵀ g_k
        t_w = np.einsum("ngpq,ngpq->n", gram_u, gram_g, dtype=np.float64)
    t_w = layer.weight_coef ** 2 * t_w
    if layer.bias is None:
        return t_w, None
    summed = g.sum(axis=(3, 4), dtype=np.float64)
    return t_w, layer.bias_coef ** 2 * np.einsum("nkc,nkc->n", summed, summed, dtype=np.float64)


def _channel_sums(layer: BatchNorm, g, a):
    """Per channel and signal, Σ_positions g x̂ and Σ_positions g: (N, K, C) each, float64."""
    n, k, c = g.shape[:3]
    xhat = layer.normalised(a.astype(np.float64)).reshape(n, 1, c, -1)
    g = g.reshape(n, k, c, -1)
    return (np.einsum("nkcp,nkcp->nkc", g, xhat, dtype=np.float64),
            g.sum(axis=3, dtype=np.float64))


@measure.register
def _(layer: BatchNorm, g, a):
    """Tr_n(γ) = Σ_k Σ_c (Σ_positions g_k x̂)², Tr_n(β) = Σ_k Σ_c (Σ_positions g_k)²
    (docs/method.md section 10: ∂/∂γ_c = Σ_positions g x̂, ∂/∂β_c = Σ_positions g)."""
    dg, db = _channel_sums(layer, g, a)
    t_b = None if layer.bias is None else np.einsum("nkc,nkc->n", db, db)
    return np.einsum("nkc,nkc->n", dg, dg), t_b


@singledispatch
def measure_diagonal(layer: LayerBase, g: np.ndarray, a: np.ndarray):
    """Like ``measure``, and from the same intermediates the batch sums of the exact Hessian
    diagonal, shaped like the stored initializers: (t_w, t_b, d_w, d_b)."""
    raise NotImplementedError(type(layer).__name__)


@measure_diagonal.register
def _(layer: Dense, g, a):
    """W: Σ_n Σ_k (g_k ⊙ g_k)(a ⊙ a)ᵀ, b: Σ_n Σ_k g_k ⊙ g_k (docs/method.md section 12;
    times Gemm's alpha², beta²); the per-sample traces are their totals."""
    signal = np.einsum("nko,nko->no", g, g, dtype=np.float64)  # (N, out)
    a2 = a.astype(np.float64) ** 2  # (N, in)
    t_w = layer.weight_coef ** 2 * a2.sum(axis=1) * signal.sum(axis=1)
    d_w = layer.weight_coef ** 2 * (signal.T @ a2)  # (out, in)
    d_w = d_w.T if layer.weight_transposed else d_w
    if layer.bias is None:
        return t_w, None, d_w, None
    t_b = layer.bias_coef ** 2 * signal.sum(axis=1)
    d_b = (layer.bias_coef ** 2 * signal.sum(axis=0)).reshape(layer.bias.shape)
    return t_w, t_b, d_w, d_b


@measure_diagonal.register
def _(layer: Conv2d, g, a):
    """W: Σ_n Σ_k (g_k Uᵀ)⊙(g_k Uᵀ) (the im2col form); b: Σ_n Σ_k (Σ_positions g_k)²."""
    n, k = g.shape[:2]
    u = layer.im2col(a)
    g_mat = g.reshape(n, k, layer.groups, -1, u.shape[-1])
    m = np.matmul(g_mat, u.transpose(0, 1, 3, 2)[:, None])  # (N, K, G, O, Q)
    squares = layer.weight_coef ** 2 * np.einsum("nkgoq,nkgoq->ngoq", m, m, dtype=np.float64)
    t_w = squares.sum(axis=(1, 2, 3))
    d_w = squares.sum(axis=0).reshape(layer.weight.shape)
    if layer.bias is None:
        return t_w, None, d_w, None
    summed = g.sum(axis=(3, 4), dtype=np.float64)  # (N, K, C_out)
    per_channel = layer.bias_coef ** 2 * np.einsum("nkc,nkc->nc", summed, summed)
    return t_w, per_channel.sum(axis=1), d_w, per_channel.sum(axis=0).reshape(layer.bias.shape)


@measure_diagonal.register
def _(layer: BatchNorm, g, a):
    """γ_c: Σ_n Σ_k (Σ_positions g_k x̂)², β_c: Σ_n Σ_k (Σ_positions g_k)²."""
    dg, db = _channel_sums(layer, g, a)
    per_gamma, per_beta = np.einsum("nkc,nkc->nc", dg, dg), np.einsum("nkc,nkc->nc", db, db)
    if layer.bias is None:
        return per_gamma.sum(axis=1), None, per_gamma.sum(axis=0).reshape(layer.weight.shape), None
    return (per_gamma.sum(axis=1), per_beta.sum(axis=1),
            per_gamma.sum(axis=0).reshape(layer.weight.shape),
            per_beta.sum(axis=0).reshape(layer.bias.shape))


# ------------------------------------------------------------------------------ driver

LAYERS_NEEDING_INPUT = (Relu, LeakyRelu, MaxPool2d, Dense, Conv2d, BatchNorm)


def first_param_index(network: Network) -> int:
    return next(i for i, l in enumerate(network.layers) if is_parameterised(l))


def needed_inputs(network: Network, plan: Optional[Plan] = None) -> list[int]:
    """Indices of the layers whose input the engine reads (those the plan visits whose
    rules read it)."""
    return (plan or traversal_plan(network)).layers_reading_input(LAYERS_NEEDING_INPUT)


def tensor_columns(network: Network) -> list[tuple[int, str, str]]:
    """(parameterised layer position, 'weight'|'bias', initializer name) in network order."""
    cols = []
    for d, layer in enumerate(network.param_layers):
        cols.append((d, "weight", layer.weight_name))
        if layer.bias is not None:
            cols.append((d, "bias", layer.bias_name))
    return cols


def signals_at_parameters(network: Network, inputs: list[Optional[np.ndarray]],
                          logits: np.ndarray, dtype=np.float64, plan: Optional[Plan] = None):
    """Back-propagate the signals of ``loss_hessian_factor`` from the logits along the
    traversal plan (``plan.traversal_plan``: reverse topological order, a tensor read by
    several layers receives the sum of their signals before its producer is visited,
    docs/method.md section 9); yield, for each parameterised layer from the last to the
    first, (its index among the parameterised layers, the layer, the signals at its output
    (N, R, *out_shape), its input).

    ``inputs[i]`` is layer i's input where the engine needs it (``needed_inputs``); other
    entries may be None. ``dtype`` is the precision of the signals: float64 (the reference)
    or float32 (pass a network already cast with ``Network.astype``). ``plan`` may be the
    plan of any network of the same structure (the uncast one): the layers, and so the
    parameters and their precision, are read from ``network``."""
    plan = plan or traversal_plan(network)
    shapes = network.tensor_shapes()
    n = logits.shape[0]
    pending = {network.logits_name: loss_hessian_factor(logits, network.loss)
               .astype(dtype, copy=False)}
    for step in plan.backward_steps:
        layer = network.layers[step.index]  # the plan is structure; parameters come from network
        g = pending.pop(step.output)
        a = inputs[step.index]
        if a is None:  # shape-only layers: a stand-in with the right shape and no data
            a = np.broadcast_to(np.zeros((), dtype=dtype), (n,) + shapes[layer.input_name])
        a = a.astype(dtype, copy=False)
        if step.param_index is not None:
            yield step.param_index, layer, g, a
        if not step.passes_back:
            continue
        out = backprop(layer, g, a)
        for name, part, sends, first in zip(layer.inputs, out if isinstance(out, tuple) else (out,),
                                            step.sends, step.first_send):
            if sends:
                pending[name] = part if first else pending[name] + part


def signal_tensors(network: Network) -> set[str]:
    """Tensors that depend on some parameter: where signals must arrive."""
    return depends_on_parameters(network)


def per_sample_traces(network: Network, inputs: list[Optional[np.ndarray]],
                      logits: np.ndarray, dtype=np.float64, diagonal: bool = False,
                      plan: Optional[Plan] = None):
    """Per-sample trace contributions, (N, number of parameter tensors), float64, columns
    in the order of ``tensor_columns``; their mean over samples is Tr H_dd.

    With ``diagonal``, also returns the batch sums of the exact Hessian diagonal of every
    parameter tensor, keyed by initializer name and shaped like it (divide by N for diag
    H_dd), from the same back-propagated signals."""
    results: list[np.ndarray] = []
    diagonals: dict[str, np.ndarray] = {}
    for _, layer, g, a in signals_at_parameters(network, inputs, logits, dtype, plan):
        t_w, t_b = measure_into(layer, g, a, diagonals if diagonal else None)
        results.extend([t_b, t_w] if t_b is not None else [t_w])  # reversed below
    traces = np.stack(results[::-1], axis=1).astype(np.float64)
    return (traces, diagonals) if diagonal else traces


def measure_into(layer: LayerBase, g: np.ndarray, a: np.ndarray,
                 diagonals: Optional[dict] = None):
    """``measure``; with a ``diagonals`` dict, ``measure_diagonal``, storing the layer's
    diagonal batch sums in it by initializer name. Returns (t_w, t_b)."""
    if diagonals is None:
        return measure(layer, g, a)
    t_w, t_b, d_w, d_b = measure_diagonal(layer, g, a)
    diagonals[layer.weight_name] = d_w
    if d_b is not None:
        diagonals[layer.bias_name] = d_b
    return t_w, t_b


def conv_measure_elements(layer: Conv2d, in_shape: tuple[int, ...], k: int) -> tuple[int, int]:
    """Elements per sample of a conv measure's temporaries: the im2col columns U (G·Q·P) and
    the contraction product, g_k Uᵀ (K·C_out·Q) or the two Gram matrices (2·G·P²), in the
    form that ``conv_trace_flops`` picks (for the memory estimates of both engines)."""
    q = layer.weight[0].size
    p = int(np.prod(layer.geometry.output_hw(in_shape[1:])))
    flops = conv_trace_flops(layer, in_shape, k)
    product = k * layer.out_channels * q if flops["im2col"] <= flops["gram"] \
        else 2 * layer.groups * p * p
    return layer.groups * q * p, product


def bytes_per_sample(network: Network, itemsize: int = 8) -> int:
    """Rough peak bytes per sample of one engine batch: the stored float64 layer inputs plus,
    at the largest layer, the signals on both sides and the temporaries of its rules (im2col
    columns and the trace products of a conv, the flat indices of max-pool routing), at
    ``itemsize`` bytes per signal element. The conv back-propagation's own columns are
    chunked to CONV_CHUNK_BYTES and do not grow with the batch."""
    k = signal_rows(network)
    shapes = network.layer_shapes()
    in_shapes = network.input_shapes()
    stored = 8 * sum(int(np.prod(s)) for s in shapes)
    peak = 0
    for i in range(first_param_index(network), len(network.layers)):
        layer, a, z = network.layers[i], int(np.prod(in_shapes[i])), int(np.prod(shapes[i + 1]))
        need = 2 * k * (a + z) * itemsize
        if not network.is_chain:  # signals waiting at branch points: about one more layer's
            need += k * z * itemsize
        if isinstance(layer, Conv2d):
            columns, product = conv_measure_elements(layer, in_shapes[i], k)
            need += (columns + product) * itemsize
        elif isinstance(layer, MaxPool2d):
            need += 8 * k * z  # int64 flat positions
        peak = max(peak, need)
    return stored + peak
