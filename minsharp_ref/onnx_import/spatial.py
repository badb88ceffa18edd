"""Converters for 2-D spatial ops: Conv, MaxPool, AveragePool, the global pools, Pad."""

from __future__ import annotations

import numpy as np

from .. import ir
from ..windows import Geometry
from .context import (attrs, computed_zeros, const, converter, data_input, emit, fail, param,
                      renamed)


def spatial_geometry(node, ctx, in_hw, kernel, ceil_mode=False) -> Geometry:
    """Kernel, strides, dilations and pads (auto_pad resolved) of Conv and the pools."""
    a = attrs(node)
    strides = tuple(a.get("strides", (1, 1)))
    dilations = tuple(a.get("dilations", (1, 1)))
    pads = tuple(a.get("pads", (0, 0, 0, 0)))
    auto_pad = a.get("auto_pad", "NOTSET")
    if len(kernel) != 2 or len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise fail(node, "only 2-D (NCHW) operations are supported")
    if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0 or min(kernel) < 1:
        raise fail(node, f"invalid strides {strides}, dilations {dilations}, pads {pads} "
                          f"or kernel {kernel}")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for ax in range(2):
            out = -(-in_hw[ax] // strides[ax])
            total = max(0, (out - 1) * strides[ax] + dilations[ax] * (kernel[ax] - 1) + 1 - in_hw[ax])
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        pads = (begin[0], begin[1], end[0], end[1])
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    elif auto_pad != "NOTSET":
        raise fail(node, f"unknown auto_pad {auto_pad!r}")
    return Geometry(tuple(kernel), strides, dilations, pads, bool(ceil_mode))


@converter("Conv")
def _conv(node, ctx):
    x = data_input(node, ctx)
    shape = ctx.shapes[x]
    if len(shape) != 3:
        raise fail(node, f"input of per-sample shape {shape}: only 2-D convolutions (NCHW)")
    weight_name, weight, stored_t = param(node, ctx, 1, "weight")
    if stored_t or weight.ndim != 4:
        raise fail(node, f"weight of shape {weight.shape}: only 2-D convolutions")
    groups = int(attrs(node).get("group", 1))
    if groups < 1 or shape[0] % groups or weight.shape[0] % groups or weight.shape[1] * groups != shape[0]:
        raise fail(node, f"weight {weight.shape} with group={groups} does not fit {shape[0]} input channels")
    kernel = tuple(attrs(node).get("kernel_shape", weight.shape[2:]))
    if kernel != weight.shape[2:]:
        raise fail(node, f"kernel_shape {kernel} disagrees with the weight {weight.shape}")
    geom = spatial_geometry(node, ctx, shape[1:], kernel)
    bias = None if computed_zeros(node, ctx, 2) else param(node, ctx, 2, "bias")
    if bias is not None and bias[1].size != weight.shape[0]:
        raise fail(node, f"bias of shape {bias[1].shape} does not match {weight.shape[0]} channels")
    emit(ctx, node, ir.Conv2d, x, weight_name=weight_name, weight=weight, geometry=geom,
          groups=groups, bias_name=bias and bias[0], bias=bias and bias[1])


def _pool_input(node, ctx) -> tuple[str, tuple[int, ...]]:
    x = data_input(node, ctx)
    if len(ctx.shapes[x]) != 3:
        raise fail(node, f"input of per-sample shape {ctx.shapes[x]}: only 2-D pooling (NCHW)")
    return x, ctx.shapes[x]


@converter("MaxPool")
def _maxpool(node, ctx):
    x, shape = _pool_input(node, ctx)
    a = attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise fail(node, "the Indices output is used; only the pooled values are supported")
    geom = spatial_geometry(node, ctx, shape[1:], tuple(a["kernel_shape"]), a.get("ceil_mode", 0))
    emit(ctx, node, ir.MaxPool2d, x, geometry=geom)


@converter("AveragePool")
def _avgpool(node, ctx):
    x, shape = _pool_input(node, ctx)
    a = attrs(node)
    geom = spatial_geometry(node, ctx, shape[1:], tuple(a["kernel_shape"]), a.get("ceil_mode", 0))
    emit(ctx, node, ir.AvgPool2d, x, geometry=geom,
          count_include_pad=bool(a.get("count_include_pad", 0)))


@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, ctx):
    x, shape = _pool_input(node, ctx)
    geom = Geometry(tuple(shape[1:]))
    if node.op_type == "GlobalMaxPool":
        emit(ctx, node, ir.MaxPool2d, x, geometry=geom)
    else:
        emit(ctx, node, ir.AvgPool2d, x, geometry=geom)


@converter("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce_spatial(node, ctx):
    """Mean (or max) over the two spatial axes: global average (max) pooling. Of (C, H, W),
    axes (2, 3): the dynamo exporter writes ``x.mean((2, 3))`` and AdaptiveAvgPool2d(1)
    (ReduceMax: AdaptiveMaxPool2d(1), ``x.amax((2, 3))``) so. Of (H, W, C),
    axes (1, 2): jax2onnx writes Flax's ``jnp.mean(x, axis=(1, 2))`` on NHWC so; a Transpose
    to (C, H, W) comes first. keepdims=0 (or NHWC) adds a Reshape to the output shape.
    ReduceSum followed by a Div by the number of summed positions is the same mean (jax2onnx
    writes ``h.mean(axis=(1, 2))`` so); the Div is converted with it."""
    x = data_input(node, ctx)
    shape = ctx.shapes[x]
    a = attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = const(node, ctx, 1, "axes").reshape(-1).tolist()
    axes = None if axes is None or len(shape) != 3 else sorted(int(v) % 4 for v in axes)
    if axes not in ([2, 3], [1, 2]):
        raise fail(node, f"axes {a.get('axes', axes)} of per-sample shape {shape}: only the "
                          "reduction over the two spatial axes of (C, H, W) or (H, W, C) is "
                          "supported")
    out, keep = node.output[0], a.get("keepdims", 1)
    if node.op_type == "ReduceSum":
        node, out = _sum_then_divide(node, ctx, shape[1] * shape[2] if axes == [2, 3]
                                     else shape[0] * shape[1])
    if axes == [1, 2]:  # channels last
        emit(ctx, renamed(node, f"{out}::nchw"), ir.Transpose, x, perm=(2, 0, 1))
        x, shape = f"{out}::nchw", (shape[2], shape[0], shape[1])
        final = (1, 1, shape[0]) if keep else (shape[0],)
    else:
        final = None if keep else (shape[0],)
    pooled = out if final is None else f"{out}::pooled"
    pool = ir.MaxPool2d if node.op_type == "ReduceMax" else ir.AvgPool2d
    emit(ctx, renamed(node, pooled), pool, x, geometry=Geometry(tuple(shape[1:])))
    if final is not None:
        emit(ctx, node, ir.Reshape, pooled, shape=final)


def _sum_then_divide(node, ctx, count: int):
    """The Div that makes a spatial ReduceSum a mean: (that Div, its output); refused when
    the sum has another reader or the divisor is not the count."""
    readers = ctx.consumers.get(node.output[0], [])
    div = readers[0] if len(readers) == 1 else None
    divisor = ctx.consts.get(div.input[1]) if div is not None and div.op_type == "Div" else None
    if (divisor is None or div.input[0] != node.output[0] or divisor.size != 1
            or float(divisor.reshape(-1)[0]) != count):
        raise fail(node, f"a sum over the {count} spatial positions is supported only as a "
                          f"mean (followed by a Div by {count})")
    ctx.fused.add(id(div))
    return div, div.output[0]


@converter("Pad")
def _pad(node, ctx):
    x = data_input(node, ctx)
    a = attrs(node)
    if a.get("mode", "constant") != "constant":
        raise fail(node, f"mode {a['mode']!r} is not zero padding")
    if ctx.opset < 11:
        pads, value = list(a.get("pads", ())), float(a.get("value", 0.0))
    else:
        pads = const(node, ctx, 1, "pads")
        value_arr = const(node, ctx, 2, "constant_value")
        value = 0.0 if value_arr is None or value_arr.size == 0 else float(value_arr.reshape(-1)[0])
        axes = const(node, ctx, 3, "axes")
        rank = len(ctx.shapes[x]) + 1
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        if axes is not None:
            full = [0] * (2 * rank)
            for i, ax in enumerate(int(v) % rank for v in axes.reshape(-1)):
                full[ax], full[ax + rank] = pads[i], pads[i + len(axes.reshape(-1))]
            pads = full
    if value != 0.0:
        raise fail(node, f"pads with {value}, not zero: not positively homogeneous")
    if len(ctx.shapes[x]) != 3 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)):
        raise fail(node, f"pads {list(pads)}: only zero padding of H and W in NCHW is supported")
    if min(pads) < 0:
        raise fail(node, f"negative pads {list(pads)} (cropping) are not supported")
    emit(ctx, node, ir.Pad2d, x, pads=(pads[2], pads[3], pads[6], pads[7]))
