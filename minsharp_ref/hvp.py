"""Exact Hessian- and Gauss-Newton-vector products of the mean loss by Pearlmutter's
R-operator (docs/method.md section 14).

For a direction v (one array V per parameter tensor, in the stored layout) and one batch,
with R{·} the directional derivative along v:

* forward (``tangent``): every layer maps its input's tangent R{x} (and, for a
  parameterised layer, its own direction) to its output's tangent: R{y} = J_x R{x} + J_θ V;
* backward: R{δ} from the logits, R{δ_z} = A R{z} with A = SᵀS the loss Hessian in the
  logits (``engine.loss_hessian_factor``), moved through each layer by the engine's own
  transposes (``engine.backprop``), plus, at a parameterised layer, the cross term V_xᵀ δ
  (``cross_term``; absent in the Gauss-Newton product);
* products (``product``): (Hv)_θ = ∂y/∂θᵀ R{δ} + (∂/∂θ of the layer along R{x})ᵀ δ, the
  second term again absent in the Gauss-Newton product.

δ = ∂L/∂y at every parameterised layer's output, the layer inputs and the factor S depend on
the parameters only, not on v: ``BatchState`` keeps them per batch (``prepare``), so that a
product costs one tangent forward and one backward pass. Everything is float64; sums over
samples are formed batch by batch in batch order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import singledispatch
from typing import Optional

import numpy as np

from .engine import backprop, first_param_index, loss_hessian_factor
from .ir import (Add, AvgPool2d, BatchNorm, Concat, Conv2d, Dense, InputAffine, LayerBase,
                 LeakyRelu, MaxPool2d, Network, Pad2d, Relu, Reshape, Slice, Transpose)
from .plan import Plan, Step
from .windows import pad_input, windows

MATRICES = ("hessian", "ggn")

#: a direction for one parameterised layer: (V for the weight, c for the bias or None),
#: in the stored layout of the initializers; None where the direction is zero
LayerDirection = Optional[tuple[np.ndarray, Optional[np.ndarray]]]


# ---------------------------------------------------------------------- loss derivatives


def loss_gradient(logits: np.ndarray, y: Optional[np.ndarray], loss: str) -> np.ndarray:
    """∂L/∂z per sample (N, K) of the losses of ``scoring.losses_and_correct``
    (docs/method.md section 1): cross-entropy softmax(z) − e_y; binary σ(z) − y; mse
    (2/K)(z − y)."""
    n, k = logits.shape
    if loss == "cross-entropy":
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(n), y] -= 1.0
        return p
    if loss == "binary":
        z = logits[:, 0]
        sig = np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))),
                       np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
        return (sig - y)[:, None]
    if loss == "mse":
        return (2.0 / k) * (logits - np.asarray(y, dtype=np.float64).reshape(n, k))
    raise ValueError(f"unknown loss {loss!r}")


# ------------------------------------------------------------------- per-layer helpers


def effective_direction(layer, direction: LayerDirection):
    """The layer with its parameters replaced by the direction (weight V, bias c; a missing
    bias direction is zero), so that its own forward/backprop apply V: for BatchNorm the
    affine part γ x̂ + β becomes V x̂ + c."""
    v, c = direction
    if c is None and layer.bias is not None:
        c = np.zeros_like(layer.bias)
    return replace(layer, weight=v, bias=c)


def without_bias(layer):
    return replace(layer, bias=None) if layer.bias is not None else layer


# ------------------------------------------------------------------ forward tangent rules


@singledispatch
def tangent(layer: LayerBase, t, a):
    """R{y} of a fixed layer from its input's tangent ``t`` (not None) and input ``a``."""
    raise NotImplementedError(f"no tangent rule for {type(layer).__name__}")


@tangent.register(Reshape)
@tangent.register(Slice)
@tangent.register(Transpose)
@tangent.register(Pad2d)
@tangent.register(AvgPool2d)
def _(layer, t, a):
    """Linear layers without offset: the forward itself."""
    return layer.forward(t)


@tangent.register
def _(layer: InputAffine, t, a):
    """x·scale + shift: R{y} = R{x}·scale."""
    return t * layer.scale


@tangent.register
def _(layer: Relu, t, a):
    """R{y} = 1[u > 0] ⊙ R{u} (the mask of ``engine.backprop``; σ'' = 0 almost everywhere)."""
    return t * (a > 0)


@tangent.register
def _(layer: LeakyRelu, t, a):
    """R{y} = (1 where u > 0, else the slope) ⊙ R{u}."""
    return t * np.where(a > 0, 1.0, layer.slope)


@tangent.register
def _(layer: MaxPool2d, t, a):
    """Max-pool routes R{u} like u: each window's tangent at its arg-max."""
    out_hw = layer.geometry.output_hw(a.shape[2:])
    cols = windows(pad_input(t, layer.geometry, 0.0), layer.geometry, out_hw)
    n, c, kh, kw, ho, wo = cols.shape
    arg = layer.window_argmax(a)
    return np.take_along_axis(cols.reshape(n, c, kh * kw, ho, wo), arg[:, :, None], 2)[:, :, 0]


def param_tangent(layer, t: Optional[np.ndarray], a: np.ndarray,
                  direction: LayerDirection) -> Optional[np.ndarray]:
    """R{y} = J_x R{x} + J_θ V of a parameterised layer: Dense W R{x} + V a + c, Conv the
    same with convolutions, BatchNorm γ s R{x} + V x̂ + c (docs/method.md section 14)."""
    out = None
    if t is not None:
        if isinstance(layer, BatchNorm):
            out = t * layer.multiplier.reshape(layer.channel_shape(t.ndim))
        elif isinstance(layer, Conv2d):
            out = conv_apply(layer, layer.weight, t)
        else:
            out = without_bias(layer).forward(t)
    if direction is not None:
        if isinstance(layer, Conv2d):
            part = conv_apply(layer, direction[0], a)
            if direction[1] is not None:
                part += layer.bias_coef * direction[1].reshape(-1, 1, 1)
        else:
            part = effective_direction(layer, direction).forward(a)
        out = part if out is None else out + part
    return out


# ------------------------------------------------------------------- the backward terms


def cross_term(layer, delta: np.ndarray, a: np.ndarray, direction: LayerDirection) -> np.ndarray:
    """V_xᵀ δ: the derivative along V of the layer's input transpose applied to δ (the
    engine's transpose rule on the layer with its weight replaced by V)."""
    return backprop(without_bias(effective_direction(layer, direction)), delta[:, None], a)[:, 0]


@singledispatch
def weight_gradient(layer, g: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Σ_n ∂y/∂W ᵀ g_n for output signals g (N, *out) and inputs a, in the stored layout."""
    raise NotImplementedError(type(layer).__name__)


@weight_gradient.register
def _(layer: Dense, g, a):
    """Σ_n g aᵀ, times Gemm's alpha, transposed for a stored (in, out) weight."""
    gw = layer.weight_coef * (g.T @ a)
    return gw.T if layer.weight_transposed else gw


@weight_gradient.register
def _(layer: Conv2d, g, a):
    """Σ_n g U(a)ᵀ per group with U = im2col(a): one GEMM over all samples and positions."""
    groups = layer.groups
    gm = g.transpose(1, 0, 2, 3).reshape(groups, layer.out_channels // groups, -1)
    gw = np.matmul(gm, conv_columns(layer, a).transpose(0, 2, 1))
    return layer.weight_coef * gw.reshape(layer.weight.shape)


def conv_columns(layer: Conv2d, x: np.ndarray) -> np.ndarray:
    """im2col of a batch as (G, Q, N·P), rows ordered (c, i, j), columns (sample, position):
    the layout in which a convolution over the whole batch is one GEMM per group."""
    out_hw = layer.geometry.output_hw(x.shape[2:])
    cols = windows(pad_input(x, layer.geometry, 0.0), layer.geometry, out_hw)
    n, c, kh, kw, ho, wo = cols.shape
    return cols.transpose(1, 2, 3, 0, 4, 5).reshape(layer.groups, -1, n * ho * wo)


def conv_apply(layer: Conv2d, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The convolution of ``x`` with ``weight`` (stored layout, times Gemm-style weight_coef),
    no bias, as one GEMM per group: (N, C_out, Ho, Wo)."""
    groups = layer.groups
    k = layer.weight_coef * weight.reshape(groups, weight.shape[0] // groups, -1)
    out_hw = layer.geometry.output_hw(x.shape[2:])
    z = np.matmul(k, conv_columns(layer, x))  # (G, O, N·P)
    return z.reshape((weight.shape[0], x.shape[0]) + out_hw).transpose(1, 0, 2, 3)


@weight_gradient.register
def _(layer: BatchNorm, g, a):
    """Σ_n Σ_positions g x̂ per channel."""
    return _channel_sum(g * layer.normalised(a)).reshape(layer.weight.shape)


def _channel_sum(values: np.ndarray) -> np.ndarray:
    """Σ over samples and positions per channel (axis 1)."""
    return values.reshape(values.shape[0], values.shape[1], -1).sum(axis=(0, 2))


def bias_gradient(layer, g: np.ndarray) -> np.ndarray:
    """Σ_n Σ_positions g per output channel, times the bias coefficient."""
    coef = getattr(layer, "bias_coef", 1.0)
    return (coef * _channel_sum(g)).reshape(layer.bias.shape)


def tangent_weight_gradient(layer, delta: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The second product term: Σ_n (∂/∂W of y along R{x})ᵀ δ, i.e. the weight gradient
    with the input replaced by its tangent (for BatchNorm x̂ by R{x̂} = s R{x})."""
    if isinstance(layer, BatchNorm):
        shaped = layer.scale.reshape(layer.channel_shape(t.ndim))
        return _channel_sum(delta * t * shaped).reshape(layer.weight.shape)
    return weight_gradient(layer, delta, t)


# ------------------------------------------------------------------------ the traversal


@dataclass
class BatchState:
    """What one batch's products share, for parameters θ (not for v): the first input of
    every layer from the first parameterised one on, the loss Hessian factor S (N, R, K) and,
    for the full Hessian, δ = ∂L_n/∂y at every parameterised layer's output."""

    n: int
    inputs: list
    factor: np.ndarray
    deltas: Optional[dict]

    @property
    def nbytes(self) -> int:
        arrays = [a for a in self.inputs if a is not None] + [self.factor]
        arrays += list((self.deltas or {}).values())
        return sum(a.nbytes for a in arrays)


def prepare(network: Network, plan: Plan, x: np.ndarray, y: Optional[np.ndarray],
            with_deltas: bool) -> BatchState:
    """Forward one batch in float64 and, with ``with_deltas``, back-propagate δ = ∂L/∂z
    over the traversal ``plan`` (``plan.traversal_plan``)."""
    logits, inputs = network.forward(x, keep_inputs=True)
    start = first_param_index(network)
    inputs = [a if i >= start else None for i, a in enumerate(inputs)]
    deltas = None
    if with_deltas:
        deltas = {}
        pending = {network.logits_name: loss_gradient(logits, y, network.loss)}
        for step in plan.backward_steps:
            g = pending.pop(step.output)
            if step.param_index is not None:
                deltas[step.param_index] = g
            if step.passes_back:
                _send(pending, step, backprop(network.layers[step.index], g[:, None].copy(), inputs[step.index]))
    return BatchState(len(x), inputs, loss_hessian_factor(logits, network.loss), deltas)


def _send(pending: dict, step: Step, out) -> None:
    """A layer's backward signals (N, 1, ...) to the inputs it sends to: the first sender
    stores, later ones add (a fan-out's sum, in the plan's order)."""
    for name, part, sends, first in zip(step.layer.inputs, out if isinstance(out, tuple) else (out,),
                                        step.sends, step.first_send):
        if sends:
            pending[name] = part[:, 0] if first or name not in pending else pending[name] + part[:, 0]


def _forward_tangents(network: Network, plan: Plan, state: BatchState,
                      directions: list) -> dict:
    """R{·} of every signal-carrying tensor downstream of a non-zero direction, over the
    plan's forward steps (others are absent: zero)."""
    shapes = network.tensor_shapes()
    tangents: dict = {}
    for step in plan.forward_steps:
        layer, a = network.layers[step.index], state.inputs[step.index]
        ts = [tangents.get(k) if sends else None for k, sends in zip(layer.inputs, step.sends)]
        if step.param_index is not None:
            out = param_tangent(layer, ts[0], a, directions[step.param_index])
        elif all(t is None for t in ts):
            continue
        elif isinstance(layer, Add):
            out = sum(t for t in ts if t is not None)
        elif isinstance(layer, Concat):
            out = np.concatenate([np.zeros((state.n,) + shapes[k]) if t is None else t
                                  for k, t in zip(layer.inputs, ts)], axis=1)
        else:
            out = tangent(layer, ts[0], a)
        if out is not None:
            tangents[step.output] = out
    return tangents


def batch_product(network: Network, plan: Plan, state: BatchState, directions: list,
                  wanted: set, ggn: bool) -> dict:
    """Σ over the batch's samples of (Hv) (or (Gv) with ``ggn``) for the parameterised
    layers in ``wanted``: {d: (weight part, bias part or None)} in the stored layouts
    (docs/method.md section 14). The tangent pass runs over the plan's forward steps, the
    reverse pass over its backward steps (until the lowest wanted layer)."""
    tangents = _forward_tangents(network, plan, state, directions)
    rz = tangents.get(network.logits_name)
    pending = {}
    if rz is not None:
        s = state.factor
        pending[network.logits_name] = np.einsum("nrk,nr->nk", s, np.einsum("nrk,nk->nr", s, rz))
    lowest = min(wanted)
    shapes = network.tensor_shapes()
    out: dict = {}
    for step in plan.backward_steps:
        layer, a, d = network.layers[step.index], state.inputs[step.index], step.param_index
        g = pending.pop(step.output, None)
        if d is not None and d in wanted:
            t_in = tangents.get(layer.input_name) if step.sends[0] else None
            out[d] = _layer_product(layer, g, a, t_in, None if ggn else state.deltas[d], state.n)
        if d == lowest:
            break
        cross = d is not None and not ggn and directions[d] is not None
        if not step.passes_back or (g is None and not cross):
            continue
        if a is None:  # shape-only layers: a stand-in with the right shape and no data
            a = np.broadcast_to(np.zeros(()), (state.n,) + shapes[layer.input_name])
        if g is None:
            g = np.zeros((state.n,) + shapes[step.output])
        back = backprop(layer, g[:, None].copy(), a)
        if cross:
            back = back + cross_term(layer, state.deltas[d], a, directions[d])[:, None]
        _send(pending, step, back)
    return out


def _layer_product(layer, g, a, t_in, delta, n):
    """(Hv)_θ = ∂y/∂θᵀ R{δ} (+ R{∂y/∂θ}ᵀ δ, the tangent term, when ``delta`` is given)."""
    gw = np.zeros(layer.weight.shape) if g is None else weight_gradient(layer, g, a)
    if delta is not None and t_in is not None:
        gw = gw + tangent_weight_gradient(layer, delta, t_in)
    gb = None
    if layer.bias is not None:
        gb = np.zeros(layer.bias.shape) if g is None else bias_gradient(layer, g)
    return gw, gb
