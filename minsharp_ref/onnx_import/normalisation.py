"""Converter for BatchNormalization in inference mode (docs/method.md section 10)."""

from __future__ import annotations

import numpy as np

from .. import ir
from .context import attrs, const, converter, data_input, emit, fail, param

#: How to keep BatchNorm nodes in a PyTorch export (both exporters fold eval-mode BN into
#: the preceding conv by default, which is also accepted: a plain conv network).
KEEP_BN_HINT = ("PyTorch keeps BatchNormalization nodes with do_constant_folding=False "
                "(torch.onnx.export, dynamo=False) or optimize=False (dynamo=True)")


@converter("BatchNormalization")
def _batchnorm(node, ctx):
    """y = γ (x − μ)/√(σ² + ε) + β per channel, μ and σ² the stored running statistics."""
    x = data_input(node, ctx)
    a = attrs(node)
    if a.get("training_mode", 0):
        raise fail(node, "training_mode=1 normalises with the batch's own statistics; only "
                          f"inference mode is supported (export the model in eval mode; "
                          f"{KEEP_BN_HINT})")
    if any(out for out in node.output[1:]):
        raise fail(node, "uses the training-only outputs (running mean/variance); only "
                          "inference mode is supported (export the model in eval mode)")
    shape = ctx.shapes[x]
    if len(shape) not in (1, 3):
        raise fail(node, f"input of per-sample shape {shape}: only (C,) or (C, H, W)")
    channels = shape[0]
    gamma, beta = param(node, ctx, 1, "scale"), param(node, ctx, 2, "bias")
    mean, var = const(node, ctx, 3, "mean"), const(node, ctx, 4, "var")
    if any(v is None for v in (gamma, beta, mean, var)):
        raise fail(node, "needs scale, bias, mean and var inputs")
    for what, v in (("scale", gamma[1]), ("bias", beta[1]), ("mean", mean), ("var", var)):
        if v.size != channels:
            raise fail(node, f"{what} of shape {v.shape} does not match {channels} channels")
    var = var.astype(np.float64).reshape(-1)
    epsilon = float(a.get("epsilon", 1e-5))
    if np.any(var + epsilon <= 0):
        raise fail(node, "variance + epsilon is not positive")
    emit(ctx, node, ir.BatchNorm, x, weight_name=gamma[0], weight=gamma[1].reshape(-1),
         bias_name=beta[0], bias=beta[1].reshape(-1), mean=mean.astype(np.float64).reshape(-1),
         mean_name=node.input[3], var=var, epsilon=epsilon)
