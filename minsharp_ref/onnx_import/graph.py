"""The conversion driver: finds the head (head.py), walks the graph in order, folds constant
subgraphs and dispatches every data node before the head to its converter."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .. import ir
from ..errors import MinsharpError, first_line
from .context import (BATCH, CONVERTERS, FLOAT_TYPES, MAX_PARAMETERS, MIN_OPSET,
                      NORMALISATION, NOT_HOMOGENEOUS, Context, attrs, data_input, fail)
from .head import find_head


# ------------------------------------------------------------------------------ driver


def _fold(node: onnx.NodeProto, ctx: Context, opsets) -> None:
    """Evaluate a node whose inputs are all constants with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "Constant":
        a = node.attribute[0]
        value = onnx.helper.get_attribute_value(a)
        if a.name == "value":
            arr = numpy_helper.to_array(value)
        elif a.name in ("value_float", "value_int"):
            arr = np.asarray(value)
        elif a.name in ("value_floats", "value_ints"):
            arr = np.asarray(list(value))
        else:
            raise fail(node, f"constant attribute {a.name!r} is not supported")
        ctx.consts[node.output[0]] = arr
        ctx.param_source[node.output[0]] = (node.output[0], False)
        return
    inputs = [ctx.consts[n] if n else None for n in node.input]
    if node.op_type == "Identity":
        ctx.consts[node.output[0]] = inputs[0]
        if node.input[0] in ctx.param_source:
            ctx.param_source[node.output[0]] = ctx.param_source[node.input[0]]
            ctx.copies.add(node.output[0])
        return
    if node.op_type in ("Expand", "ConstantOfShape", "Tile") and any(
            v is not None and v.dtype.kind == "i" and np.any(v == BATCH) for v in inputs):
        raise fail(node, "builds a constant with one copy per sample (e.g. ViT's class token "
                          "expanded to the batch), which can only join the data as a "
                          "non-homogeneous offset")
    names = [f"in{i}" if n else "" for i, n in enumerate(node.input)]
    outs = [f"out{i}" if n else "" for i, n in enumerate(node.output)]
    folded = onnx.NodeProto()
    folded.CopyFrom(node)
    del folded.input[:]
    folded.input.extend(names)
    del folded.output[:]
    folded.output.extend(outs)
    graph = onnx.helper.make_graph(
        [folded], "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in zip(names, inputs) if n],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outs if o])
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=8)
    try:
        results = ReferenceEvaluator(model).run(None, {n: v for n, v in zip(names, inputs) if n})
    except Exception as exc:  # the evaluator's own message, on one line
        raise fail(node, f"cannot fold constant inputs: {first_line(exc)}") from None
    for name, value in zip([o for o in node.output if o], results):
        ctx.consts[name] = np.asarray(value)
    if node.op_type == "Transpose" and node.input[0] in ctx.param_source and inputs[0].ndim == 2:
        source, transposed = ctx.param_source[node.input[0]]
        ctx.param_source[node.output[0]] = (source, not transposed)


def _needed_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes that contribute to a graph output, in graph order."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    needed, stack = set(), [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(n for n in graph.node[i].input if n)
    return [n for i, n in enumerate(graph.node) if i in needed]


def convert(model: onnx.ModelProto, input_shape: Optional[tuple[int, ...]] = None) -> ir.Network:
    """The IR of a checked ModelProto (errors name nodes, not the file: see import_model)."""
    graph = model.graph
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx")
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise MinsharpError(f"default-domain opset {opset} is not supported (need {MIN_OPSET} "
                            f"to {newest})")
    consts: dict[str, np.ndarray] = {}
    total = 0
    for init in graph.initializer:
        if init.name in consts:
            raise MinsharpError(f'initializer "{init.name}" is defined twice')
        total += int(np.prod(init.dims)) if init.dims else 1
        if total > MAX_PARAMETERS:
            raise MinsharpError(f"more than {MAX_PARAMETERS} parameters: refused")
        try:
            arr = numpy_helper.to_array(init)
        except Exception:
            raise MinsharpError(f'initializer "{init.name}": its stored data does not match its '
                                f"dims {list(init.dims)} and type") from None
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise MinsharpError(f'initializer "{init.name}" contains {bad} NaN/Inf values')
        consts[init.name] = arr
    data_inputs = [i for i in graph.input if i.name not in consts]
    if len(data_inputs) != 1:
        names = ", ".join(f'"{i.name}"' for i in data_inputs) or "none"
        raise MinsharpError(f"the graph must have exactly one data input, it has {names}")
    inp = data_inputs[0]
    ttype = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or ttype.elem_type not in FLOAT_TYPES:
        raise MinsharpError(f'input "{inp.name}" is not a float tensor')
    dims = list(ttype.shape.dim)
    if len(dims) < 2:
        raise MinsharpError(f'input "{inp.name}" has rank {len(dims)}; need (batch, features...)')
    if input_shape is not None and len(input_shape) != len(dims) - 1:
        raise MinsharpError(f'--input-shape {",".join(map(str, input_shape))} has {len(input_shape)} '
                            f'dimensions; input "{inp.name}" has {len(dims) - 1} per sample')
    per_sample = []
    for axis, d in enumerate(dims[1:], start=1):
        static = d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        given = None if input_shape is None else int(input_shape[axis - 1])
        if given is not None and (given < 1 or (static is not None and given != static)):
            raise MinsharpError(f'--input-shape gives {given} at axis {axis}; input "{inp.name}" '
                                f"has {static if static is not None else 'a dynamic dimension'} there")
        if static is None and given is None:
            raise MinsharpError(f'input "{inp.name}" has a dynamic dimension '
                                f'{d.dim_param or "?"!r} at axis {axis}; a fixed per-sample shape '
                                "is needed (--input-shape)")
        per_sample.append(static if static is not None else given)
    ctx = Context(opset, consts, {n: (n, False) for n in consts})
    ctx.shapes[inp.name] = tuple(per_sample)
    ctx.live = inp.name
    node_names = set()
    allowed_domains = {"", "ai.onnx", "ai.onnx.ml"}
    needed = _needed_nodes(graph)
    head = find_head(needed, inp.name, [o.name for o in graph.output])
    stripped = {id(n) for n in head.nodes}
    for node in needed:
        for name in node.input:
            ctx.consumers.setdefault(name, []).append(node)
    for node in needed:
        if node.name and node.name in node_names:
            raise MinsharpError(f'node name "{node.name}" is used twice')
        node_names.add(node.name)
        if id(node) in stripped or id(node) in ctx.fused:
            continue  # the head: not run (head.py); or converted with an earlier node
        if node.domain not in allowed_domains:
            raise fail(node, f"custom domain {node.domain!r} is not supported")
        data_in = [n for n in node.input if ctx.is_data(n)]
        if not data_in:
            if node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
                raise fail(node, "random values make the network non-deterministic")
            _fold(node, ctx, model.opset_import)
            continue
        if node.op_type == "Cast":
            to = attrs(node).get("to")
            if to not in FLOAT_TYPES:
                raise fail(node, "casts the network's activations to a non-float type")
            ctx.alias[node.output[0]] = data_input(node, ctx)
            continue
        fn = CONVERTERS.get(node.op_type)
        if fn is None:
            if node.op_type in NOT_HOMOGENEOUS:
                why = _why_not_homogeneous(node, ctx)
                raise fail(node, "not positively homogeneous, minimum sharpness is not defined "
                                  "for this network" + (f" ({why})" if why else ""))
            if node.op_type in NORMALISATION:
                raise fail(node, "normalises with the sample's own statistics: not positively "
                                  "homogeneous (only inference-mode BatchNormalization is supported)")
            if node.op_type in ("Max", "Min", "Mean", "Where"):
                raise fail(node, "combines computed tensors; only Add, Sum and Concat may join "
                                  "branches")
            raise fail(node, "op type not supported between parameterised layers")
        fn(node, ctx)
    logits = ctx.canonical(head.logits)
    if logits != ctx.live:
        raise MinsharpError(f'the logits "{head.logits}" are not the end of the chain "{ctx.live}"')
    _check_reaches_logits(ctx, logits)
    shape = ctx.shapes[logits]
    if len(shape) != 1:
        raise MinsharpError(f'the logits "{logits}" have per-sample shape {shape}; need '
                            "(outputs,)")
    loss = head.loss_kind(shape[0])
    if loss == "cross-entropy" and shape[0] < 2:
        raise MinsharpError(f'the logits "{logits}" have a single output; cross-entropy needs '
                            "at least 2 classes")
    # layers after the last parameterised one must be shape-only or piecewise linear
    elem = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
    return ir.Network(tuple(ctx.layers), inp.name, tuple(per_sample), np.dtype(elem), logits,
                      graph.output[0].name, opset, head.describe(), loss)


#: What the common non-homogeneous activations are, for the refusal (docs/exporting.md).
WHY_NOT_HOMOGENEOUS = {
    "Clip": "a clipped ReLU such as ReLU6 saturates: f(c·u) ≠ c·f(u) once c·u passes the clip",
    "HardSwish": "hardswish u·ReLU6(u + 3)/6",
    "HardSigmoid": "hard sigmoid, as in hardswish and MobileNetV3's gates",
    "Erf": "the error function, as in the exact GELU",
    "Gelu": "GELU",
    "Mish": "mish u·tanh(softplus(u))",
}


def _why_not_homogeneous(node: onnx.NodeProto, ctx: Context) -> str:
    """What the refused activation is part of: a Sigmoid whose output multiplies its own
    input is SiLU / swish, one that multiplies another computed tensor is a gate
    (squeeze-and-excitation); other ops from ``WHY_NOT_HOMOGENEOUS``."""
    if node.op_type == "Sigmoid":
        for reader in ctx.consumers.get(node.output[0], []):
            if reader.op_type == "Mul":
                other = [n for n in reader.input if n != node.output[0]]
                if other and other[0] == node.input[0]:
                    return "SiLU / swish u·σ(u)"
                if other and ctx.is_data(other[0]):
                    return "a gate σ(·) multiplying another computed tensor, as in " \
                           "squeeze-and-excitation"
    return WHY_NOT_HOMOGENEOUS.get(node.op_type, "")


def _check_reaches_logits(ctx: Context, logits: str) -> None:
    """Every layer must lie on a path to the logits (a branch that ends elsewhere, e.g. in
    a second graph output, is not part of the scored network)."""
    wanted = {logits}
    for layer in reversed(ctx.layers):
        if layer.output_name in wanted:
            wanted.update(layer.inputs)
        else:
            raise MinsharpError(f'node "{layer.nodes[0]}" does not contribute to the logits '
                                f'"{logits}"')
