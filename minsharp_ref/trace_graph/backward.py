"""Transport rules: signals at a layer's output, (N, R, *out_shape), to its input, as ONNX
nodes; one rule per layer type, the same rules as ``engine.backprop`` (docs/method.md,
"Back-propagating the signals"), applied to all N·R signals at once.
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np

from ..ir import (AvgPool2d, Conv2d, Dense, LayerBase, LeakyRelu, MaxPool2d, Pad2d, Relu,
                  Reshape, Transpose)
from ..windows import Geometry
from .context import Context
from .forward import window_attrs, window_ones


@singledispatch
def backward(layer: LayerBase, ctx: Context, g: str) -> str:
    raise NotImplementedError(type(layer).__name__)


def _mask(ctx: Context, g: str, factor: str) -> str:
    """g · factor, the per-sample factor (N, *shape) broadcast over the R signals."""
    return ctx.b.node("Mul", [g, ctx.b.node("Unsqueeze", [factor, ctx.b.ints([1])])], "signal")


@backward.register
def _(layer: Relu, ctx, g):
    """Multiply by 1[u > 0]."""
    b = ctx.b
    positive = b.node("Greater", [ctx.input_of(layer), b.const(0.0)])
    return _mask(ctx, g, b.node("Cast", [positive], to=b.elem))


@backward.register
def _(layer: LeakyRelu, ctx, g):
    """Multiply by 1 where u > 0, by the slope elsewhere."""
    b = ctx.b
    positive = b.node("Greater", [ctx.input_of(layer), b.const(0.0)])
    return _mask(ctx, g, b.node("Where", [positive, b.const(1.0), b.const(layer.slope)]))


@backward.register
def _(layer: Reshape, ctx, g):
    return ctx.b.reshape(g, (-1, ctx.signals) + ctx.in_shape(layer), "signal")


@backward.register
def _(layer: Transpose, ctx, g):
    inverse = np.argsort(layer.perm)
    return ctx.b.node("Transpose", [g], "signal", perm=[0, 1] + [int(p) + 2 for p in inverse])


def _crop(ctx: Context, g: str, top: int, left: int, h: int, w: int) -> str:
    """g[..., top:top + h, left:left + w] on the last two axes."""
    b = ctx.b
    return b.node("Slice", [g, b.ints([top, left]), b.ints([top + h, left + w]), b.ints([-2, -1])],
                  "signal")


@backward.register
def _(layer: Pad2d, ctx, g):
    """Crop the padding away."""
    _, h, w = ctx.in_shape(layer)
    return _crop(ctx, g, layer.pads[0], layer.pads[1], h, w)


@backward.register
def _(layer: MaxPool2d, ctx, g):
    """Route each signal to its window's arg-max (MaxPool's Indices: first maximum on ties),
    adding up where overlapping windows share one: ScatterElements(reduction="add") over the
    flat positions of the padded frame, then crop the padding away."""
    b = ctx.b
    c, h, w = ctx.in_shape(layer)
    _, ho, wo = ctx.out_shape(layer)
    hp, wp = layer.geometry.padded_hw((h, w))
    r = ctx.signals
    plane = b.node("Mod", [ctx.routes[layer.output_name], b.ints([c * hp * wp])])  # per sample
    index = b.reshape(plane, (-1, 1, c * ho * wo))
    flat = b.reshape(g, (-1, r, c * ho * wo))
    index = b.node("Expand", [index, b.node("Shape", [flat])])
    frame_shape = b.node("Concat", [b.node("Shape", [flat], start=0, end=1),
                                    b.ints([r, c * hp * wp])], axis=0)
    zeros = b.node("Expand", [b.const(0.0), frame_shape])
    routed = b.node("ScatterElements", [zeros, index, flat], axis=2, reduction="add")
    routed = b.reshape(routed, (-1, r, c, hp, wp))
    return _crop(ctx, routed, layer.geometry.pads[0], layer.geometry.pads[1], h, w)


def transposed_window_op(ctx: Context, g: str, kernel: str, geom: Geometry, groups: int,
                         in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """The adjoint of a window op (conv or depthwise window sum) with ``kernel``: one
    ConvTranspose over the N·R signal maps into the padded frame, then the crop to the input
    (docs/method.md, "Back-propagating the signals")."""
    b = ctx.b
    c, h, w = in_shape
    r = ctx.signals
    maps = b.reshape(g, (-1,) + out_shape)
    frame = b.node("ConvTranspose", [maps, kernel], "signal_frame", group=groups,
                   **window_attrs(geom))
    ho, wo = out_shape[1:]
    extent = [(ho - 1) * geom.stride[0] + geom.dilation[0] * (geom.kernel[0] - 1) + 1,
              (wo - 1) * geom.stride[1] + geom.dilation[1] * (geom.kernel[1] - 1) + 1]
    top, left = geom.pads[0], geom.pads[1]
    short = [max(0, top + h - extent[0]), max(0, left + w - extent[1])]
    if any(short):  # the frame ends before the input does (rows no window reads)
        frame = b.node("Pad", [frame, b.ints([0, 0, 0, 0, 0, 0, short[0], short[1]])])
    frame = _crop(ctx, frame, top, left, h, w)
    return b.reshape(frame, (-1, r, c, h, w), "signal")


@backward.register
def _(layer: AvgPool2d, ctx, g):
    """Spread each signal evenly over its window: divide by the window's divisor, then the
    transposed all-ones depthwise window sum."""
    in_shape, out_shape = ctx.in_shape(layer), ctx.out_shape(layer)
    spread = ctx.b.node("Div", [g, ctx.b.const(layer.divisor(in_shape[1:]))])
    return transposed_window_op(ctx, spread, window_ones(ctx, in_shape[0], layer.geometry),
                                layer.geometry, in_shape[0], in_shape, out_shape)


@backward.register
def _(layer: Dense, ctx, g):
    """g W: (N, R, out) @ (out, in)."""
    return ctx.b.node("MatMul", [g, ctx.dense_matrix(layer)], "signal")


@backward.register
def _(layer: Conv2d, ctx, g):
    """The transposed convolution with the same kernel, stride, dilation and groups."""
    return transposed_window_op(ctx, g, ctx.conv_kernel(layer), layer.geometry, layer.groups,
                                ctx.in_shape(layer), ctx.out_shape(layer))
