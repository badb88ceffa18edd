"""Converters for shape-only ops: Flatten, Reshape, Squeeze/Unsqueeze, Transpose, Slice,
Split, SplitToSequence/SequenceAt and Gather (selections along one per-sample axis:
torch.chunk / torch.split of channels, ``x[:, i]``), Identity/Dropout, Shape."""

from __future__ import annotations

import numpy as np

from .. import ir
from .context import BATCH, attrs, const, converter, data_input, emit, fail, renamed


def reshape_to(node, ctx, x: str, per_sample: tuple[int, ...]):
    size = int(np.prod(ctx.shapes[x]))
    if int(np.prod(per_sample)) != size:
        raise fail(node, f"cannot reshape per-sample shape {ctx.shapes[x]} to {per_sample}")
    emit(ctx, node, ir.Reshape, x, shape=tuple(int(s) for s in per_sample))


@converter("Flatten")
def _flatten(node, ctx):
    x = data_input(node, ctx)
    axis = int(attrs(node).get("axis", 1))
    if axis % (len(ctx.shapes[x]) + 1) != 1:
        raise fail(node, f"axis={axis} mixes the batch axis into the features; only axis=1")
    reshape_to(node, ctx, x, (int(np.prod(ctx.shapes[x])),))


@converter("Reshape")
def _reshape(node, ctx):
    x = data_input(node, ctx)
    target = [int(v) for v in const(node, ctx, 1, "shape").reshape(-1)]
    allowzero = int(attrs(node).get("allowzero", 0))
    full_in = (BATCH,) + ctx.shapes[x]
    dims = [full_in[i] if (v == 0 and not allowzero and i < len(full_in)) else v
            for i, v in enumerate(target)]
    if not dims:
        raise fail(node, "reshape to a scalar loses the batch axis")
    rest = dims[1:]
    size = int(np.prod(ctx.shapes[x]))
    if dims[0] not in (BATCH, -1) and dims[0] <= 0:
        raise fail(node, f"shape {target} does not keep the batch axis")
    if BATCH in rest or rest.count(-1) > 1 or (dims[0] == -1 and -1 in rest):
        raise fail(node, f"shape {target} does not keep the batch axis first")
    if -1 in rest:
        known = int(np.prod([d for d in rest if d != -1]))
        if known <= 0 or size % known:
            raise fail(node, f"cannot reshape per-sample shape {ctx.shapes[x]} to {target}")
        rest = [size // known if d == -1 else d for d in rest]
    reshape_to(node, ctx, x, tuple(rest))


@converter("Squeeze", "Unsqueeze")
def _squeeze(node, ctx):
    x = data_input(node, ctx)
    a = attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = const(node, ctx, 1, "axes").reshape(-1).tolist()
    shape = list(ctx.shapes[x])
    if node.op_type == "Squeeze":
        rank = len(shape) + 1
        axes = [i for i in range(1, rank) if shape[i - 1] == 1] if axes is None else [int(v) % rank for v in axes]
        if 0 in axes:
            raise fail(node, "squeezes the batch axis")
        new = [s for i, s in enumerate(shape, start=1) if i not in axes]
    else:
        rank = len(shape) + 1 + len(axes or [])
        axes = sorted(int(v) % rank for v in axes or [])
        if 0 in axes:
            raise fail(node, "inserts an axis before the batch axis")
        full = [BATCH] + shape
        for ax in axes:
            full.insert(ax, 1)
        new = full[1:]
    reshape_to(node, ctx, x, tuple(new))


@converter("Transpose")
def _transpose(node, ctx):
    x = data_input(node, ctx)
    rank = len(ctx.shapes[x]) + 1
    perm = list(attrs(node).get("perm", range(rank - 1, -1, -1)))
    if perm[0] != 0:
        raise fail(node, f"perm {perm} moves the batch axis")
    emit(ctx, node, ir.Transpose, x, perm=tuple(p - 1 for p in perm[1:]))


@converter("Identity", "Dropout")
def _identity(node, ctx):
    x = data_input(node, ctx)
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = const(node, ctx, 2, "training_mode")
        if bool(np.asarray(mode).reshape(-1)[0]):
            raise fail(node, "training_mode=true makes the network random")
    ctx.alias[node.output[0]] = x



@converter("Shape")
def _shape(node, ctx):
    name = ctx.canonical(node.input[0])
    a = attrs(node)
    full = np.array((BATCH,) + ctx.shapes[name], dtype=np.int64)
    ctx.consts[node.output[0]] = full[a.get("start", 0):a.get("end", None)]


@converter("CastLike")
def _cast_like(node, ctx):
    """CastLike(constant, activation): a constant in the activations' float type (the dynamo
    exporter builds zero conv biases so); casting activations themselves is an alias."""
    if node.input[0] in ctx.consts:
        ctx.consts[node.output[0]] = np.asarray(ctx.consts[node.input[0]], dtype=np.float64)
        return
    ctx.alias[node.output[0]] = data_input(node, ctx)


def _slice_layer(node, ctx, x: str, output: str, axis: int, start: int, stop: int) -> None:
    """One ``ir.Slice`` of x along the full-tensor ``axis`` (the batch axis is refused)."""
    shape = ctx.shapes[x]
    if axis == 0:
        raise fail(node, "slices the batch axis")
    if not 0 <= start < stop <= shape[axis - 1]:
        raise fail(node, f"selects {start}:{stop} of an axis of {shape[axis - 1]}: empty")
    target = node if output == node.output[0] else renamed(node, output)
    emit(ctx, target, ir.Slice, x, axis=axis - 1, start=start, stop=stop)


@converter("Slice")
def _slice(node, ctx):
    """x[starts:ends] with constant bounds and step 1 on one per-sample axis (the others,
    the batch axis included, taken whole), ONNX's clamping of the bounds."""
    x = data_input(node, ctx)
    full = (BATCH,) + ctx.shapes[x]
    a = attrs(node)
    if ctx.opset < 10:
        starts, ends = a.get("starts", []), a.get("ends", [])
        axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts = const(node, ctx, 1, "starts").reshape(-1).tolist()
        ends = const(node, ctx, 2, "ends").reshape(-1).tolist()
        axes = const(node, ctx, 3, "axes")
        axes = list(range(len(starts))) if axes is None else axes.reshape(-1).tolist()
        steps = const(node, ctx, 4, "steps")
        steps = [1] * len(starts) if steps is None else steps.reshape(-1).tolist()
    selected = []
    for axis, start, end, step in zip(axes, starts, ends, steps):
        axis = int(axis) % len(full)
        if int(step) != 1:
            raise fail(node, f"step {step} on axis {axis}: only contiguous slices (step 1)")
        bounds = range(full[axis])[int(start):int(end)]
        if (bounds.start, bounds.stop) != (0, full[axis]):
            selected.append((axis, bounds.start, bounds.stop))
    if not selected:
        ctx.alias[node.output[0]] = x
        return
    if len(selected) > 1:
        raise fail(node, f"slices {len(selected)} axes; only one axis at a time is supported")
    _slice_layer(node, ctx, x, node.output[0], *selected[0])


def _parts(node, sizes: list[int], size: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive parts of an axis of ``size``, checked."""
    if len(sizes) != parts or sum(sizes) != size or min(sizes) < 0:
        raise fail(node, f"split sizes {sizes} do not divide an axis of {size} into {parts}")
    edges = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    return list(zip(edges[:-1], edges[1:]))


@converter("Split")
def _split(node, ctx):
    """Consecutive slices along one axis, one per output (``split`` sizes, or equal parts
    as ``num_outputs`` / the number of outputs asks)."""
    x = data_input(node, ctx)
    full = (BATCH,) + ctx.shapes[x]
    a = attrs(node)
    axis = int(a.get("axis", 0)) % len(full)
    size = full[axis]
    sizes = a.get("split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        sizes = const(node, ctx, 1, "split").reshape(-1).tolist()
    parts = len(node.output)
    if sizes is None:
        part = -(-size // parts)
        sizes = [min(part, size - i * part) for i in range(parts)]
    for output, (start, stop) in zip(node.output, _parts(node, [int(s) for s in sizes], size, parts)):
        if output and ctx.consumers.get(output):
            _slice_layer(node, ctx, x, output, axis, start, stop)


@converter("SplitToSequence")
def _split_to_sequence(node, ctx):
    """A sequence of consecutive parts along one axis (``split``: a chunk size, the last
    part smaller, or the sizes), each taken by SequenceAt: nothing is emitted here."""
    x = data_input(node, ctx)
    full = (BATCH,) + ctx.shapes[x]
    axis = int(attrs(node).get("axis", 0)) % len(full)
    size = full[axis]
    split = const(node, ctx, 1, "split")
    if split is None:
        raise fail(node, "splits into single elements (no split sizes): not supported")
    if split.ndim == 0:
        chunk = int(split)
        if chunk < 1:
            raise fail(node, f"chunk size {chunk}")
        sizes = [min(chunk, size - i) for i in range(0, size, chunk)]
    else:
        sizes = [int(s) for s in split.reshape(-1)]
    ctx.sequences[node.output[0]] = (x, axis, tuple(_parts(node, sizes, size, len(sizes))))
    ctx.shapes[node.output[0]] = ctx.shapes[x]  # a computed value: SequenceAt reads it


@converter("SequenceAt")
def _sequence_at(node, ctx):
    """Part ``position`` of a SplitToSequence: a slice of its input."""
    seq = data_input(node, ctx)
    if seq not in ctx.sequences:
        raise fail(node, f'reads "{seq}", which is not the output of a SplitToSequence')
    x, axis, bounds = ctx.sequences[seq]
    position = int(np.asarray(const(node, ctx, 1, "position")).reshape(-1)[0])
    if not -len(bounds) <= position < len(bounds):
        raise fail(node, f"position {position} of a sequence of {len(bounds)}")
    _slice_layer(node, ctx, x, node.output[0], axis, *bounds[position])


@converter("Gather")
def _gather(node, ctx):
    """x.take(i, axis) of a computed tensor with constant indices on one per-sample axis: a
    slice when the indices are consecutive (a scalar index also drops the axis: a Reshape
    follows). torchvision's ``transform_input`` (GoogLeNet, Inception v3 with pretrained
    weights) reads each input channel so: ``x[:, 0]``, then Unsqueeze, Mul, Add, Concat."""
    x = data_input(node, ctx)
    if ctx.canonical(node.input[0]) != x:
        raise fail(node, "gathers from a constant with computed indices")
    full = (BATCH,) + ctx.shapes[x]
    axis = int(attrs(node).get("axis", 0)) % len(full)
    indices = np.asarray(const(node, ctx, 1, "indices"))
    flat = [int(i) % full[axis] if axis else int(i) for i in indices.reshape(-1)]
    if axis == 0 or indices.ndim > 1 or not flat or flat != list(range(flat[0], flat[0] + len(flat))):
        raise fail(node, f"indices {indices.tolist()} on axis {axis}: only consecutive indices on "
                          "one per-sample axis (a slice) are supported")
    if indices.ndim == 1:
        _slice_layer(node, ctx, x, node.output[0], axis, flat[0], flat[0] + len(flat))
        return
    sliced = f"{node.output[0]}::slice"
    _slice_layer(node, ctx, x, sliced, axis, flat[0], flat[0] + 1)
    shape = ctx.shapes[x]
    emit(ctx, node, ir.Reshape, sliced, shape=shape[:axis - 1] + shape[axis:])
