"""Converter for BatchNormalization in inference mode, and the per-channel scale an exporter
writes for a decomposed one (docs/method.md section 10)."""

from __future__ import annotations

from typing import Optional

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


def channel_vector(c: np.ndarray, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """``c`` as one value per channel (axis 0 of the per-sample ``shape``), or None when it
    is not shaped (1,) C (1, 1) or C (1, 1) (a leading batch axis of 1 allowed)."""
    if c.ndim == len(shape) + 1 and c.shape[0] == 1:
        c = c.reshape(c.shape[1:])
    if c.shape == (shape[0],) + (1,) * (len(shape) - 1):
        return c.reshape(-1)
    return None


def scale_channels(node, ctx, x: str, index: int) -> bool:
    """Mul by a per-channel constant after a parameterised layer: the scale half of a batch
    normalisation decomposed by the exporter (tf2onnx writes a Keras BatchNormalization
    after a Dense or a biased Conv2D as Mul(x, γ s) then Add(β − γ s μ)). It becomes the
    per-channel diagonal layer y = a x + b (b: the Add that must follow, converted as its
    bias in elementwise.py): a BatchNorm with μ = 0, σ² = 1, ε = 0 (docs/method.md section
    10) whose γ and β are the file's two constants. Returns False when the constant is not
    per channel."""
    c = const(node, ctx, index, "operand")
    if len(ctx.shapes[x]) not in (1, 3) or channel_vector(c, ctx.shapes[x]) is None:
        return False
    readers = ctx.consumers.get(node.output[0], [])
    shift = readers[0] if len(readers) == 1 and readers[0].op_type == "Add" else None
    if shift is None or sum(n in ctx.consts for n in shift.input) != 1:
        raise fail(node, "a per-channel scale after a layer is supported only as a decomposed "
                          "batch normalisation, followed by the Add of a per-channel shift")
    name, values, _ = param(node, ctx, index, "scale")
    channels = ctx.shapes[x][0]
    emit(ctx, node, ir.BatchNorm, x, weight_name=name, weight=values.reshape(-1),
         bias_name=None, bias=None, mean=np.zeros(channels), mean_name="",
         var=np.ones(channels), epsilon=0.0)
    return True
