"""Converters for dense layers: Gemm and MatMul (+ Add as bias, see elementwise.py)."""

from __future__ import annotations

from .. import ir
from .context import attrs, converter, data_input, emit, fail, param


@converter("Gemm")
def _gemm(node, ctx):
    x = data_input(node, ctx)
    a = attrs(node)
    if a.get("transA", 0):
        raise fail(node, "transA=1 transposes the batch of activations; not supported")
    if len(ctx.shapes[x]) != 1:
        raise fail(node, f"input of per-sample shape {ctx.shapes[x]} is not a vector")
    weight_name, weight, stored_t = param(node, ctx, 1, "weight")
    transposed = (not a.get("transB", 0)) != stored_t
    w_eff = weight.T if transposed else weight
    if w_eff.ndim != 2 or w_eff.shape[1] != ctx.shapes[x][0]:
        raise fail(node, f"weight {weight.shape} does not fit an input of {ctx.shapes[x][0]}")
    bias = param(node, ctx, 2, "bias")
    if bias is not None and bias[1].size != w_eff.shape[0]:
        raise fail(node, f"bias of shape {bias[1].shape} does not match {w_eff.shape[0]} outputs")
    emit(ctx, node, ir.Dense, x, weight_name=weight_name, weight=weight,
          weight_transposed=transposed, weight_coef=float(a.get("alpha", 1.0)),
          bias_name=bias and bias[0], bias=bias and bias[1], bias_coef=float(a.get("beta", 1.0)))


@converter("MatMul")
def _matmul(node, ctx):
    x = data_input(node, ctx)
    if node.input[0] != x and ctx.canonical(node.input[0]) != x:
        raise fail(node, "the constant is on the left (W·x); only x·W is supported")
    if len(ctx.shapes[x]) != 1:
        raise fail(node, f"input of per-sample shape {ctx.shapes[x]} is not a vector")
    weight_name, weight, stored_t = param(node, ctx, 1, "weight")
    transposed = not stored_t  # MatMul stores (in, out)
    w_eff = weight.T if transposed else weight
    if w_eff.ndim != 2 or w_eff.shape[1] != ctx.shapes[x][0]:
        raise fail(node, f"weight {weight.shape} does not fit an input of {ctx.shapes[x][0]}")
    emit(ctx, node, ir.Dense, x, weight_name=weight_name, weight=weight, weight_transposed=transposed)
