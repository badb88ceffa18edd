"""Transport rules: signals at a layer's output, (N, R, *out_shape), to its input, as ONNX
nodes; one rule per layer type, the same rules as ``engine.backprop`` (docs/method.md,
"Back-propagating the signals"), applied to all N·R signals at once.

The conv goes back through ConvTranspose; the pooling layers through col2im (ONNX
Col2Im, the adjoint of im2col): average pooling repeats the spread signal over the kernel
offsets, max pooling multiplies it by the one-hot arg-max offsets.
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np

from ..ir import (Add, AvgPool2d, BatchNorm, Concat, Conv2d, Dense, LayerBase, LeakyRelu,
                  MaxPool2d, Pad2d, Relu, Reshape, Slice, Transpose)
from ..windows import Geometry
from .context import Context


@singledispatch
def backward(layer: LayerBase, ctx: Context, g: str) -> str | tuple[str, ...]:
    """The signals at the layer's input; a tuple, one per input, for the layers that join
    branches."""
    raise NotImplementedError(type(layer).__name__)


def _mask(ctx: Context, g: str, factor: str) -> str:
    """g · factor, the per-sample factor (N, *shape) broadcast over the R signals."""
    return ctx.b.node("Mul", [g, ctx.b.node("Unsqueeze", [factor, ctx.b.ints([1])])], "signal")


def _to_signals(ctx: Context, maps: str, in_shape: tuple[int, ...]) -> str:
    """(N·R, *in_shape) maps back to (N, R, *in_shape) signals."""
    return ctx.b.reshape(maps, (-1, ctx.signals) + tuple(in_shape), "signal")


def activation_factor(layer: Relu | LeakyRelu, ctx: Context, x: str) -> str:
    """The activation's derivative as a per-sample factor, from ``x``, any tensor with the
    sign of the pre-activation u: 1 where x > 0, else 0 (ReLU) or the slope (LeakyReLU)."""
    b = ctx.b
    positive = b.node("Greater", [x, b.const(0.0)])
    if isinstance(layer, LeakyRelu):
        return b.node("Where", [positive, b.const(1.0), b.const(layer.slope)])
    return b.node("Cast", [positive], to=b.elem)


@backward.register(Relu)
@backward.register(LeakyRelu)
def _(layer, ctx, g):
    """Multiply by 1[u > 0] (ReLU) or by 1 where u > 0, the slope elsewhere (LeakyReLU);
    nothing when a max pool has already applied the factor (``Context.fused_activations``)."""
    if layer.output_name in ctx.fused_activations:
        return g
    return _mask(ctx, g, activation_factor(layer, ctx, ctx.input_of(layer)))


@backward.register
def _(layer: Reshape, ctx, g):
    """Back to the input's shape."""
    return _to_signals(ctx, g, ctx.in_shape(layer))


@backward.register
def _(layer: Transpose, ctx, g):
    """The inverse permutation of the per-sample axes."""
    inverse = np.argsort(layer.perm)
    return ctx.b.node("Transpose", [g], "signal", perm=[0, 1] + [int(p) + 2 for p in inverse])


def _crop(ctx: Context, g: str, top: int, left: int, h: int, w: int) -> str:
    """g[..., top:top + h, left:left + w] on the last two axes."""
    b = ctx.b
    return b.node("Slice", [g, b.ints([top, left]), b.ints([top + h, left + w]), b.ints([-2, -1])],
                  "signal")


@backward.register
def _(layer: Slice, ctx, g):
    """Zero padding of the sliced axis (axis + 2 of (N, R, *shape)) back to its size."""
    rank = len(ctx.in_shape(layer)) + 2
    pads = [0] * (2 * rank)
    pads[layer.axis + 2] = layer.start
    pads[rank + layer.axis + 2] = ctx.in_shape(layer)[layer.axis] - layer.stop
    return ctx.b.node("Pad", [g, ctx.b.ints(pads)], "signal")


@backward.register
def _(layer: Pad2d, ctx, g):
    """Crop the padding away."""
    _, h, w = ctx.in_shape(layer)
    return _crop(ctx, g, layer.pads[0], layer.pads[1], h, w)


def col2im(ctx: Context, cols: str, geom: Geometry, in_shape: tuple[int, ...],
           frame: bool = False) -> str:
    """The adjoint of im2col: columns (M, C·kh·kw, Ho·Wo), rows ordered (c, i, j), added back
    to the input positions they were read from, what falls on padding dropped: (M, C, H, W).
    With ``frame`` (or in ceil_mode, whose last windows may overhang the padding) the
    columns are laid on the padded frame of ``windows.pad_input``, then cropped."""
    b = ctx.b
    _, h, w = in_shape
    attrs = {"strides": list(geom.stride), "dilations": list(geom.dilation)}
    if not (frame or geom.ceil_mode):
        return b.node("Col2Im", [cols, b.ints([h, w]), b.ints(geom.kernel)], pads=list(geom.pads),
                      **attrs)
    hp, wp = geom.padded_hw((h, w))
    padded = b.node("Col2Im", [cols, b.ints([hp, wp]), b.ints(geom.kernel)], **attrs)
    return _crop(ctx, padded, geom.pads[0], geom.pads[1], h, w)


def disjoint_windows(geom: Geometry) -> bool:
    """Whether no two windows share an input position: stride ≥ d(k − 1) + 1 per axis."""
    return all(s >= d * (k - 1) + 1 for s, d, k in zip(geom.stride, geom.dilation, geom.kernel))


@backward.register
def _(layer: MaxPool2d, ctx, g):
    """Route each signal to its window's arg-max (first maximum on ties: MaxPool's Indices,
    flat positions in the padded frame), adding up where overlapping windows share one.

    Disjoint windows (``disjoint_windows``, e.g. stride = kernel): MaxUnpool writes each
    signal at its arg-max, which no other window's signal shares, on the padded frame
    (then cropped); the indices of the N·R signal maps are the pool's in-sample indices
    plus the map's offset. Overlapping windows: the per-sample routing mask (one-hot
    arg-max offsets in the window) is formed once and broadcast over the R signals; the
    masked signals are columns, added back by col2im. The arg-max's offset in its window is
    its flat position in the padded plane less the window's corner, i·d_h·W_p + j·d_w: one
    value per (i, j), since (kw − 1)·d_w < W_p. When the pool's input is a ReLU output or a
    LeakyReLU output with a slope ≥ 0 (``Context.fused_activations``), the activation's
    factor at the arg-max, which has the sign of the pool's output, multiplies the signals
    (disjoint windows) or is folded into the mask, and the activation's own rule does
    nothing (docs/method.md, section 11)."""
    b = ctx.b
    geom = layer.geometry
    c, h, w = ctx.in_shape(layer)
    _, ho, wo = ctx.out_shape(layer)
    hp, wp = geom.padded_hw((h, w))
    kh, kw = geom.kernel
    r = ctx.signals
    route = ctx.routes[layer.output_name]
    activation = ctx.fused_activations.get(layer.input_name)
    factor = None if activation is None else \
        activation_factor(activation, ctx, ctx.values[layer.output_name])  # (N, C, Ho, Wo)
    frame = (hp, wp) != (h, w)
    if disjoint_windows(geom):
        if factor is not None:
            g = _mask(ctx, g, factor)
        n = b.node("Shape", [g], start=0, end=1)
        maps = b.node("Mul", [n, b.ints([r])])  # N·R, as a 1-element shape
        map_index = b.node("Range", [b.const(0, np.int64), b.node("Squeeze", [maps]),
                                     b.const(1, np.int64)])  # n·R + k
        offset = b.reshape(b.node("Mul", [map_index, b.const(c * hp * wp, np.int64)]),
                           (-1, r, 1, 1, 1))
        in_sample = b.node("Mod", [route, b.ints([c * hp * wp])])  # (N, C, Ho, Wo)
        index = b.node("Add", [b.node("Unsqueeze", [in_sample, b.ints([1])]), offset])
        shape = (-1, c, ho, wo)
        out = b.node("MaxUnpool", [b.reshape(g, shape), b.reshape(index, shape),
                                   b.node("Concat", [maps, b.ints([c, hp, wp])], axis=0)],
                     "signal_maps", kernel_shape=list(geom.kernel), strides=list(geom.stride))
        if frame:
            out = _crop(ctx, out, geom.pads[0], geom.pads[1], h, w)
        return _to_signals(ctx, out, (c, h, w))
    position = b.node("Mod", [route, b.ints([hp * wp])])  # in the plane
    corner = (np.arange(ho) * geom.stride[0] * wp)[:, None] + np.arange(wo) * geom.stride[1]
    step = b.node("Sub", [position, b.const(corner, np.int64)])  # (N, C, Ho, Wo): i·d·wp + j·d
    dh, dw = geom.dilation
    steps = (np.arange(kh) * dh * wp)[:, None] + np.arange(kw) * dw  # distinct: (kw − 1)·dw < wp
    window = (c, 1, ho * wo)  # per sample, broadcast over the R signals and kh·kw offsets
    one_hot = b.node("Equal", [b.reshape(step, (-1, 1) + window),
                               b.const(steps.reshape(kh * kw, 1), np.int64)])
    mask = b.node("Cast", [one_hot], "argmax_mask", to=b.elem)  # (N, 1, C, kh·kw, P)
    if factor is not None:
        mask = b.node("Mul", [mask, b.reshape(factor, (-1, 1) + window)], "argmax_mask")
    routed = b.node("Mul", [b.reshape(g, (-1, r) + window), mask])
    cols = b.reshape(routed, (-1, c * kh * kw, ho * wo))
    return _to_signals(ctx, col2im(ctx, cols, geom, (c, h, w), frame=frame), (c, h, w))


@backward.register
def _(layer: AvgPool2d, ctx, g):
    """Spread each signal evenly over its window: divide by the window's divisor, repeat
    over the kh·kw offsets, col2im."""
    b = ctx.b
    c, h, w = ctx.in_shape(layer)
    _, ho, wo = ctx.out_shape(layer)
    kh, kw = layer.geometry.kernel
    spread = b.node("Div", [g, b.const(layer.divisor((h, w)))])
    cols = b.node("Expand", [b.reshape(spread, (-1, c, 1, ho * wo)), b.ints([1, 1, kh * kw, 1])])
    cols = b.reshape(cols, (-1, c * kh * kw, ho * wo))
    return _to_signals(ctx, col2im(ctx, cols, layer.geometry, (c, h, w)), (c, h, w))


@backward.register
def _(layer: Dense, ctx, g):
    """g W: (N·R, out) @ (out, in), one GEMM."""
    b = ctx.b
    flat = b.reshape(g, (-1, layer.out_features))
    return _to_signals(ctx, b.node("MatMul", [flat, ctx.dense_matrix(layer)]), ctx.in_shape(layer))


@backward.register
def _(layer: Conv2d, ctx, g):
    """The transposed convolution (ConvTranspose with the same kernel, stride, dilation,
    groups and padding) over all N·R signal maps; output_padding restores the last
    (H + p_top + p_bottom − d(k − 1) − 1) mod s rows that no window reads. In ceil_mode the
    signals are laid on the padded frame and cropped."""
    b = ctx.b
    geom = layer.geometry
    in_shape = ctx.in_shape(layer)
    c, h, w = in_shape
    maps = b.reshape(g, (-1,) + ctx.out_shape(layer))
    attrs = {"group": layer.groups, "kernel_shape": list(geom.kernel),
             "strides": list(geom.stride), "dilations": list(geom.dilation)}
    if geom.ceil_mode:
        hp, wp = geom.padded_hw((h, w))
        extent = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in
                  zip(ctx.out_shape(layer)[1:], geom.stride, geom.dilation, geom.kernel)]
        frame = b.node("ConvTranspose", [maps, ctx.conv_kernel(layer)], "signal_frame", **attrs)
        frame = b.node("Pad", [frame, b.ints([0, 0, 0, 0, 0, 0, hp - extent[0], wp - extent[1]])])
        out = _crop(ctx, frame, geom.pads[0], geom.pads[1], h, w)
    else:
        rest = [((h, w)[ax] + geom.pads[ax] + geom.pads[ax + 2]
                 - geom.dilation[ax] * (geom.kernel[ax] - 1) - 1) % geom.stride[ax] for ax in range(2)]
        out = b.node("ConvTranspose", [maps, ctx.conv_kernel(layer)], "signal_maps",
                     pads=list(geom.pads), output_padding=rest, **attrs)
    return _to_signals(ctx, out, in_shape)


@backward.register
def _(layer: BatchNorm, ctx, g):
    """Multiply channel c by γ_c s_c (docs/method.md section 10)."""
    shape = (1, 1, -1) + (1,) * (len(ctx.in_shape(layer)) - 1)
    return ctx.b.node("Mul", [g, ctx.b.const(layer.multiplier.reshape(shape))], "signal")


@backward.register
def _(layer: Add, ctx, g):
    """Every input receives the signal (docs/method.md section 9)."""
    return (g,) * len(layer.inputs)


@backward.register
def _(layer: Concat, ctx, g):
    """Split the signal along the channel axis (axis 2 of (N, R, C, ...))."""
    parts = ctx.b.node("Split", [g, ctx.b.ints(layer.sizes)], "signal", outputs=len(layer.sizes),
                       axis=2)
    return tuple(parts) if len(layer.sizes) > 1 else (parts,)
