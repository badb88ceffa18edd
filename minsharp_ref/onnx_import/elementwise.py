"""Converters for Add/Sub/Mul/Div with a constant: a bias after MatMul/Conv, a per-channel
scale after a layer (a decomposed batch normalisation, normalisation.py), or input
preprocessing (InputAffine) before the first layer."""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import ir
from .context import (const, converter, data_input, emit, fail, param, per_sample_constant,
                      producer)
from .merge import add_branches
from .normalisation import channel_vector, scale_channels


@converter("Add", "Sub", "Mul", "Div")
def _elementwise(node, ctx):
    if node.op_type == "Add" and sum(ctx.is_data(n) for n in node.input) > 1:
        return add_branches(node, ctx)
    x = data_input(node, ctx)
    data_first = ctx.canonical(node.input[0]) == x
    c = const(node, ctx, 1 if data_first else 0, "operand").astype(np.float64)
    shape = ctx.shapes[x]
    last = producer(ctx, x)
    if (node.op_type == "Add" and isinstance(last, (ir.Dense, ir.Conv2d, ir.BatchNorm))
            and last.bias is None and not any(x in l.inputs for l in ctx.layers)):
        # MatMul (or Conv, or a per-channel Mul) + Add: the constant is the layer's bias
        if channel_vector(c, shape) is None:
            raise fail(node, f"adds a constant of shape {c.shape} after a layer with "
                              f"{shape[0]} outputs: not a bias, and not positively homogeneous")
        name, bias, _ = param(node, ctx, 1 if data_first else 0, "bias")
        ctx.layers[ctx.layers.index(last)] = dataclasses.replace(
            last, bias_name=name, bias=bias.reshape(-1) if isinstance(last, ir.BatchNorm) else bias,
            output_name=node.output[0], nodes=last.nodes + (node.name or node.output[0],))
        ctx.shapes[node.output[0]] = shape
        ctx.live = node.output[0]
        return
    if node.op_type == "Mul" and ctx.has_params and scale_channels(
            node, ctx, x, 1 if data_first else 0):
        return
    if ctx.has_params:
        raise fail(node, "an elementwise operation with a constant after a parameterised "
                          "layer is not positively homogeneous (only a bias right after "
                          "MatMul or Conv is)")
    c = per_sample_constant(node, c, shape, "constant")
    one, zero = np.ones(()), np.zeros(())
    if node.op_type == "Add":
        scale, shift = one, c
    elif node.op_type == "Sub":
        scale, shift = (one, -c) if data_first else (-one, c)
    elif node.op_type == "Mul":
        scale, shift = c, zero
    else:
        if not data_first:
            raise fail(node, "divides a constant by the input: not an affine transform")
        if np.any(c == 0):
            raise fail(node, "divides by zero")
        scale, shift = 1.0 / c, zero
    emit(ctx, node, ir.InputAffine, x, scale=np.asarray(scale), shift=np.asarray(shift))
