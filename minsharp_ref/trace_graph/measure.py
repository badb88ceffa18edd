"""Contraction rules: the signals at a parameterised layer's output (N, R, *out_shape) and
its input give the per-sample traces of its weight and bias (float64 (N,) values), and
with ``diagonal`` the batch sums of the exact Hessian diagonal, shaped like the stored
initializers. The same formulas as ``engine.measure`` / ``engine.measure_diagonal``
(docs/method.md section 3, "Dense layers" and "Convolutions"; the diagonal: section 12).

Precision: products are formed in the graph's dtype; in a float32 graph the innermost sum
(over one row of a product, or over the positions of one signal map) is float32 and every
other sum float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch
from typing import Optional

import numpy as np

from ..engine import conv_trace_flops
from ..ir import BatchNorm, Conv2d, Dense, LayerBase
from .context import Context
from .forward import normalised, window_attrs

F64 = np.float64


@dataclass
class Measured:
    """Graph values: per-sample traces (N,) float64; diagonal batch sums or None."""

    weight: str
    bias: Optional[str]
    weight_diagonal: Optional[str] = None
    bias_diagonal: Optional[str] = None


@singledispatch
def measure(layer: LayerBase, ctx: Context, g: str, diagonal: bool) -> Measured:
    raise NotImplementedError(type(layer).__name__)


@measure.register
def _(layer: Dense, ctx, g, diagonal):
    """Tr_n(W) = c_W² ‖a‖² Σ_k ‖g_k‖², Tr_n(b) = c_b² Σ_k ‖g_k‖²; diagonal: c_W² Σ_n Σ_k
    (g_k ⊙ g_k)(a ⊙ a)ᵀ and c_b² Σ_n Σ_k g_k ⊙ g_k."""
    b = ctx.b
    a = ctx.input_of(layer)
    if diagonal:
        per_unit = b.sum_squares(ctx.to_double(g), [1], stem="signal_energy")  # (N, out)
        energy = b.sum(per_unit, [1])  # (N,)
    else:  # Σ_k ‖g_k‖²: the sum over units within a signal in the graph's dtype
        energy = b.sum(ctx.to_double(b.sum_squares(g, [2])), [1], stem="signal_energy")
    a2 = ctx.to_double(b.sum_squares(a, [1]))  # ‖a‖²: one row, in the graph's dtype
    t_w = ctx.scaled(b.node("Mul", [a2, energy]), layer.weight_coef ** 2, F64)
    t_b = None if layer.bias is None else ctx.scaled(energy, layer.bias_coef ** 2, F64)
    if not diagonal:
        return Measured(t_w, t_b)
    a64 = ctx.to_double(a)
    squares = b.node("Mul", [a64, a64])  # (N, in)
    d_w = b.node("MatMul", [b.node("Transpose", [per_unit], perm=[1, 0]), squares])  # (out, in)
    if layer.weight_transposed:
        d_w = b.node("Transpose", [d_w], perm=[1, 0])
    d_w = ctx.scaled(d_w, layer.weight_coef ** 2, F64)
    d_b = None
    if layer.bias is not None:
        d_b = b.reshape(ctx.scaled(b.sum(per_unit, [0]), layer.bias_coef ** 2, F64),
                        layer.bias.shape)
    return Measured(t_w, t_b, d_w, d_b)


def im2col(ctx: Context, layer: Conv2d) -> str:
    """U = im2col(a), (N, G, Q, P) with rows ordered (c, i, j) as ``Conv2d.im2col``: a
    depthwise Conv with fixed one-hot kernels, C·kh·kw output channels."""
    b = ctx.b
    c, _, _ = ctx.in_shape(layer)
    kh, kw = layer.geometry.kernel
    one_hot = np.eye(kh * kw).reshape(kh * kw, 1, kh, kw)
    kernel = b.const(np.tile(one_hot, (c, 1, 1, 1)))  # output channel c·kh·kw + i·kw + j
    cols = b.node("Conv", [ctx.input_of(layer), kernel], "im2col", group=c,
                  pads=list(layer.geometry.pads), **window_attrs(layer.geometry))
    _, ho, wo = ctx.out_shape(layer)
    return b.reshape(cols, (-1, layer.groups, c // layer.groups * kh * kw, ho * wo))


def stacked_signals(ctx: Context, layer: Conv2d, g: str) -> str:
    """The signals as (N, G, R·O, P): rows (k, o) of each group."""
    b = ctx.b
    r, groups = ctx.signals, layer.groups
    o = layer.out_channels // groups
    _, ho, wo = ctx.out_shape(layer)
    if groups == 1:
        return b.reshape(g, (-1, 1, r * o, ho * wo))
    five = b.reshape(g, (-1, r, groups, o, ho * wo))
    return b.reshape(b.node("Transpose", [five], perm=[0, 2, 1, 3, 4]), (-1, groups, r * o, ho * wo))


@measure.register
def _(layer: Conv2d, ctx, g, diagonal):
    """Tr_n(W) = c_W² Σ_k ‖g_k Uᵀ‖²_F (im2col form) = c_W² ⟨Σ_k g_kᵀ g_k, UᵀU⟩ (Gram form),
    whichever needs fewer FLOPs (``engine.conv_trace_flops``); Tr_n(b) = c_b² Σ_k ‖Σ_positions
    g_k‖². Diagonal (always the im2col form): c_W² Σ_n Σ_k (g_k Uᵀ) ⊙ (g_k Uᵀ)."""
    b = ctx.b
    u = im2col(ctx, layer)
    s = stacked_signals(ctx, layer, g)
    flops = conv_trace_flops(layer, ctx.in_shape(layer), ctx.signals)
    d_w = None
    if diagonal or flops["im2col"] <= flops["gram"]:
        m = b.node("MatMul", [s, b.node("Transpose", [u], perm=[0, 1, 3, 2])])  # (N, G, R·O, Q)
        rows = ctx.to_double(b.sum_squares(m, [3]))  # (N, G, R·O)
        t_w = b.sum(rows, [1, 2])
        if diagonal:
            o = layer.out_channels // layer.groups
            m5 = b.reshape(ctx.to_double(m), (-1, layer.groups, ctx.signals, o, layer.weight[0].size))
            d_w = b.reshape(b.sum_squares(m5, [0, 2]), layer.weight.shape)
            d_w = ctx.scaled(d_w, layer.weight_coef ** 2, F64)
    else:
        gram_u = b.node("MatMul", [b.node("Transpose", [u], perm=[0, 1, 3, 2]), u])  # (N, G, P, P)
        gram_g = b.node("MatMul", [b.node("Transpose", [s], perm=[0, 1, 3, 2]), s])
        rows = ctx.to_double(b.sum(b.node("Mul", [gram_u, gram_g]), [3]))
        t_w = b.sum(rows, [1, 2])
    t_w = ctx.scaled(t_w, layer.weight_coef ** 2, F64)
    if layer.bias is None:
        return Measured(t_w, None, d_w, None)
    _, ho, wo = ctx.out_shape(layer)  # Σ over positions, in the graph's dtype: (N, R, C_out)
    summed = ctx.to_double(b.sum(b.reshape(g, (-1, ctx.signals, layer.out_channels, ho * wo)), [3]))
    per_channel = ctx.scaled(b.sum_squares(summed, [1]), layer.bias_coef ** 2, F64)  # (N, C_out)
    t_b = b.sum(per_channel, [1])
    d_b = b.reshape(b.sum(per_channel, [0]), layer.bias.shape) if diagonal else None
    return Measured(t_w, t_b, d_w, d_b)


@measure.register
def _(layer: BatchNorm, ctx, g, diagonal):
    """∂/∂γ_c = Σ_positions g x̂, ∂/∂β_c = Σ_positions g (docs/method.md section 10):
    Tr_n(γ) = Σ_k Σ_c (Σ_positions g_k x̂)², Tr_n(β) = Σ_k Σ_c (Σ_positions g_k)²; diagonal:
    their sums over n and k per channel. The sum over the last axis is in the graph's dtype,
    the rest float64."""
    b = ctx.b
    spatial = len(ctx.in_shape(layer)) - 1  # position axes after (N, R, C)

    def channel_sums(v: str) -> str:  # (N, R, C, ...) → (N, R, C), float64
        if not spatial:
            return ctx.to_double(v)
        rows = ctx.to_double(b.sum(v, [-1]))
        return b.sum(rows, list(range(3, 2 + spatial))) if spatial > 1 else rows

    xhat = b.node("Unsqueeze", [normalised(layer, ctx), b.ints([1])])
    per_gamma = b.sum_squares(channel_sums(b.node("Mul", [g, xhat])), [1])  # (N, C)
    t_w = b.sum(per_gamma, [1])
    d_w = b.reshape(b.sum(per_gamma, [0]), layer.weight.shape) if diagonal else None
    if layer.bias is None:
        return Measured(t_w, None, d_w, None)
    per_beta = b.sum_squares(channel_sums(g), [1])
    d_b = b.reshape(b.sum(per_beta, [0]), layer.bias.shape) if diagonal else None
    return Measured(t_w, b.sum(per_beta, [1]), d_w, d_b)
