"""Converters for the ops that join branches (docs/method.md section 9): Add and Sum of
computed tensors (residual connections), Concat along channels (DenseNet-style)."""

from __future__ import annotations

from .. import ir
from .context import converter, emit, fail


def _branches(node, ctx) -> list[str]:
    """Canonical names of the node's inputs, all of which must be computed tensors."""
    names = [ctx.canonical(n) for n in node.input if n]
    if not names or not all(ctx.is_data(n) for n in names):
        raise fail(node, "joins a computed tensor with a constant that is not a bias: not "
                          "positively homogeneous")
    return names


def _single(node, ctx, names) -> bool:
    """A Sum or Concat of one computed tensor is that tensor (the legacy PyTorch exporter
    writes ``torch.cat([x], 1)``, torchvision DenseNet's first dense layer, as a one-input
    Concat; the dynamo exporter writes an Identity): alias it, as for Identity."""
    if len(names) == 1:
        ctx.alias[node.output[0]] = names[0]
    return len(names) == 1


@converter("Sum")
def add_branches(node, ctx):
    """Add/Sum of two or more branches of one shape (no broadcasting between branches)."""
    names = _branches(node, ctx)
    if _single(node, ctx, names):
        return
    shapes = {ctx.shapes[n] for n in names}
    if len(shapes) != 1:
        raise fail(node, f"adds branches of different per-sample shapes {sorted(shapes)}; "
                          "only same-shape sums are supported")
    emit(ctx, node, ir.Add, names[0], other_inputs=tuple(names[1:]))


@converter("Concat")
def _concat(node, ctx):
    """Concat of branches along the channel axis (axis 1 with the batch axis)."""
    names = _branches(node, ctx)
    if _single(node, ctx, names):
        return
    shapes = [ctx.shapes[n] for n in names]
    rank = len(shapes[0]) + 1
    axis = int(next((a.i for a in node.attribute if a.name == "axis"), 1))
    if axis % rank != 1:
        raise fail(node, f"axis={axis}: only concatenation along channels (axis 1) is supported")
    if any(len(s) != rank - 1 or s[1:] != shapes[0][1:] for s in shapes):
        raise fail(node, f"branches of per-sample shapes {shapes} do not concatenate along channels")
    emit(ctx, node, ir.Concat, names[0], other_inputs=tuple(names[1:]),
         sizes=tuple(s[0] for s in shapes))
