"""Converters for the piecewise-linear activations: Relu, LeakyRelu, PRelu."""

from __future__ import annotations

import numpy as np

from .. import ir
from .context import attrs, const, converter, data_input, emit, per_sample_constant


@converter("Relu")
def _relu(node, ctx):
    emit(ctx, node, ir.Relu, data_input(node, ctx))


@converter("LeakyRelu", "PRelu")
def _leaky(node, ctx):
    x = data_input(node, ctx)
    if node.op_type == "LeakyRelu":
        slope = np.asarray(float(attrs(node).get("alpha", 0.01)))
    else:
        slope = per_sample_constant(node, const(node, ctx, 1, "slope"), ctx.shapes[x], "slope")
    emit(ctx, node, ir.LeakyRelu, x, slope=slope)
