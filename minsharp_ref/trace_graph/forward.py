"""Forward rules: each layer's output from its input, as ONNX nodes, with the IR's own
semantics (minsharp_ref/ir.py), so the trace graph needs nothing but the IR.

Window ops are written on the padded frame that ``windows.pad_input`` builds (explicit Pad,
then the op without padding), so that ceil_mode, count_include_pad and the max-pool
arg-max positions are exactly the IR's.
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np

from ..ir import (Add, AvgPool2d, BatchNorm, Concat, Conv2d, Dense, InputAffine, LayerBase,
                  LeakyRelu, MaxPool2d, Pad2d, Relu, Reshape, Slice, Transpose)
from ..windows import Geometry
from .context import Context


@singledispatch
def forward(layer: LayerBase, ctx: Context) -> str:
    raise NotImplementedError(type(layer).__name__)


@forward.register
def _(layer: InputAffine, ctx):
    b = ctx.b
    x = b.node("Mul", [ctx.input_of(layer), b.const(layer.scale)])
    return b.node("Add", [x, b.const(layer.shift)], layer.output_name)


@forward.register
def _(layer: Relu, ctx):
    return ctx.b.node("Relu", [ctx.input_of(layer)], layer.output_name)


@forward.register
def _(layer: LeakyRelu, ctx):
    b = ctx.b
    x = ctx.input_of(layer)
    negative = b.node("Mul", [x, b.const(layer.slope)])
    keep = b.node("GreaterOrEqual", [x, b.const(0.0)])
    return b.node("Where", [keep, x, negative], layer.output_name)


@forward.register
def _(layer: Reshape, ctx):
    return ctx.b.reshape(ctx.input_of(layer), (-1,) + layer.shape, layer.output_name)


@forward.register
def _(layer: Transpose, ctx):
    return ctx.b.node("Transpose", [ctx.input_of(layer)], layer.output_name,
                      perm=[0] + [p + 1 for p in layer.perm])


@forward.register
def _(layer: Slice, ctx):
    """x[start:stop] along the layer's per-sample axis."""
    b = ctx.b
    return b.node("Slice", [ctx.input_of(layer), b.ints([layer.start]), b.ints([layer.stop]),
                            b.ints([layer.axis + 1])], layer.output_name)


@forward.register
def _(layer: Pad2d, ctx):
    t, l, bo, r = layer.pads
    return ctx.b.node("Pad", [ctx.input_of(layer), ctx.b.ints([0, 0, t, l, 0, 0, bo, r])],
                      layer.output_name)


def padded_frame(ctx: Context, x: str, geom: Geometry, in_hw: tuple[int, int], value: float) -> str:
    """``windows.pad_input``: x placed at (top, left) in the frame the windows read."""
    hp, wp = geom.padded_hw(in_hw)
    top, left = geom.pads[0], geom.pads[1]
    bottom, right = hp - top - in_hw[0], wp - left - in_hw[1]
    if (top, left, bottom, right) == (0, 0, 0, 0):
        return x
    return ctx.b.node("Pad", [x, ctx.b.ints([0, 0, top, left, 0, 0, bottom, right]),
                              ctx.b.const(value)], "padded")


def window_attrs(geom: Geometry) -> dict:
    return {"kernel_shape": list(geom.kernel), "strides": list(geom.stride),
            "dilations": list(geom.dilation)}


@forward.register
def _(layer: MaxPool2d, ctx):
    """MaxPool on the −∞-padded frame; its Indices (first maximum on ties, flat positions in
    the padded frame) are kept for the routing of the signals."""
    x = padded_frame(ctx, ctx.input_of(layer), layer.geometry, ctx.in_shape(layer)[1:], -np.inf)
    y, indices = ctx.b.node("MaxPool", [x], layer.output_name, outputs=2,
                            **window_attrs(layer.geometry))
    ctx.routes[layer.output_name] = indices
    return y


def window_ones(ctx: Context, channels: int, geom: Geometry) -> str:
    """The depthwise all-ones kernel (C, 1, kh, kw): window sums as a grouped Conv."""
    return ctx.b.const(np.ones((channels, 1) + tuple(geom.kernel)))


@forward.register
def _(layer: AvgPool2d, ctx):
    """Window sums (a depthwise Conv with ones on the zero-padded frame) over the IR's
    divisor, which decides count_include_pad and the ceil_mode overhang."""
    c, h, w = ctx.in_shape(layer)
    geom = layer.geometry
    x = padded_frame(ctx, ctx.input_of(layer), geom, (h, w), 0.0)
    sums = ctx.b.node("Conv", [x, window_ones(ctx, c, geom)], "window_sums", group=c,
                      **window_attrs(geom))
    return ctx.b.node("Div", [sums, ctx.b.const(layer.divisor((h, w)))], layer.output_name)


@forward.register
def _(layer: Dense, ctx):
    b = ctx.b
    z = b.node("MatMul", [ctx.input_of(layer),
                          b.node("Transpose", [ctx.dense_matrix(layer)], perm=[1, 0])])
    if layer.bias is None:
        return b.node("Identity", [z], layer.output_name)
    return b.node("Add", [z, ctx.bias(layer, (layer.out_features,))], layer.output_name)


@forward.register
def _(layer: Conv2d, ctx):
    geom = layer.geometry
    inputs = [ctx.input_of(layer), ctx.conv_kernel(layer)]
    if layer.bias is not None:
        inputs.append(ctx.bias(layer, (layer.out_channels,)))
    return ctx.b.node("Conv", inputs, layer.output_name, group=layer.groups,
                      pads=list(geom.pads), **window_attrs(geom))


def channel_const(ctx: Context, layer: LayerBase, values: np.ndarray) -> str:
    """A per-channel vector as a constant broadcast against (N, C, ...) values."""
    ndim = len(ctx.in_shape(layer))
    return ctx.b.const(np.asarray(values).reshape((-1,) + (1,) * (ndim - 1)))


def normalised(layer: BatchNorm, ctx: Context) -> str:
    """x̂ = s (x − μ) per channel (docs/method.md section 10), made once per BatchNorm."""
    key = f"{layer.weight_name}:xhat"  # the folded view's BN (μ = 0, s = 1) has its own
    if key not in ctx.derived:
        centred = ctx.b.node("Sub", [ctx.input_of(layer), channel_const(ctx, layer, layer.mean)])
        ctx.derived[key] = ctx.b.node("Mul", [centred, channel_const(ctx, layer, layer.scale)],
                                      "xhat")
    return ctx.derived[key]


@forward.register
def _(layer: BatchNorm, ctx):
    """y = γ x̂ + β per channel, γ and β the stored initializers (docs/method.md section 10)."""
    b = ctx.b
    shape = (-1,) + (1,) * (len(ctx.in_shape(layer)) - 1)
    gamma = b.reshape(ctx.parameter(layer.weight_name, layer.weight), shape)
    y = b.node("Mul", [normalised(layer, ctx), gamma])
    if layer.bias is None:
        return b.node("Identity", [y], layer.output_name)
    beta = b.reshape(ctx.parameter(layer.bias_name, layer.bias), shape)
    return b.node("Add", [y, beta], layer.output_name)


@forward.register
def _(layer: Add, ctx):
    """The sum of the branches (docs/method.md section 9)."""
    xs = [ctx.values[name] for name in layer.inputs]
    out = xs[0]
    for i, x in enumerate(xs[1:], 2):
        out = ctx.b.node("Add", [out, x], layer.output_name if i == len(xs) else None)
    return out


@forward.register
def _(layer: Concat, ctx):
    """The branches concatenated along the channel axis."""
    return ctx.b.node("Concat", [ctx.values[name] for name in layer.inputs], layer.output_name,
                      axis=1)
