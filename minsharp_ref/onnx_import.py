"""ONNX → typed layer IR (``ir.Network``).

One converter per ONNX op type, registered in ``CONVERTERS``; nodes whose inputs are all
constants are folded (shape arithmetic such as Shape → Gather → Unsqueeze → Concat, the
batch dimension carried as a symbolic marker) with onnx's reference evaluator. The data path
must be a chain from the single graph input to the logits; a trailing Softmax, LogSoftmax,
ArgMax, Cast or ZipMap is post-processing and is stripped. Anything else is refused with
one line that names the node, its op type and the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from . import ir
from .errors import MinsharpError, first_line
from .windows import Geometry

#: Refuse model files larger than this before reading them (bytes).
MAX_MODEL_BYTES = 2 * 1024 ** 3
#: Refuse networks with more parameters than this (before any large allocation).
MAX_PARAMETERS = 500_000_000
MIN_OPSET = 9

#: Stands for the unknown batch size inside folded shape arithmetic.
BATCH = 2 ** 40 + 1

#: Ops that may follow the logits (post-processing); Identity may also appear among them.
POSTPROCESSING = {"Softmax", "LogSoftmax", "ArgMax", "Cast", "ZipMap"}
NOT_HOMOGENEOUS = {
    "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Mish", "Exp", "Log", "Erf", "Sqrt", "Pow", "Clip", "ThresholdedRelu",
    "Softmax", "LogSoftmax", "Hardmax", "Sin", "Cos", "Abs", "Neg", "Sign", "Floor", "Ceil",
    "Round", "LpNormalization", "LRN", "Swish",
}
NORMALISATION = {"BatchNormalization", "InstanceNormalization", "LayerNormalization",
                 "GroupNormalization", "RMSNormalization"}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


@dataclass
class ImportedModel:
    """The ONNX model (external data resolved, in memory), its IR and provenance."""

    path: Path
    sha256: str
    proto: onnx.ModelProto
    network: ir.Network


@dataclass
class _Context:
    opset: int
    consts: dict[str, np.ndarray]
    #: constant name → (initializer or Constant output it came from, transposed?)
    param_source: dict[str, tuple[str, bool]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # live data tensors
    alias: dict[str, str] = field(default_factory=dict)
    layers: list = field(default_factory=list)
    live: str = ""
    logits: Optional[str] = None
    post: list[str] = field(default_factory=list)
    used_params: dict[str, str] = field(default_factory=dict)  # initializer → node

    def canonical(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def is_data(self, name: str) -> bool:
        return bool(name) and self.canonical(name) in self.shapes

    @property
    def has_params(self) -> bool:
        return any(ir.is_parameterised(l) for l in self.layers)


def _fail(node: onnx.NodeProto, reason: str) -> MinsharpError:
    return MinsharpError(f'node "{node.name or node.output[0]}" ({node.op_type}): {reason}')


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


# ------------------------------------------------------------------------ converters

Converter = Callable[[onnx.NodeProto, _Context], None]
CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str):
    def register(fn: Converter) -> Converter:
        for op in op_types:
            CONVERTERS[op] = fn
        return fn
    return register


def _data_input(node, ctx) -> str:
    """The node's single data input, which must be the end of the chain."""
    data = [n for n in node.input if ctx.is_data(n)]
    if len(data) != 1:
        raise _fail(node, "combines two computed tensors (a residual connection or branch); "
                          "only chain networks are supported")
    name = ctx.canonical(data[0])
    if ctx.logits is not None:
        raise _fail(node, "follows post-processing of the logits; only Softmax, LogSoftmax, "
                          "ArgMax, Cast or ZipMap may come after the last layer")
    if name != ctx.live:
        raise _fail(node, f'reads "{data[0]}", which already feeds another node: branches '
                          "are not supported, only chain networks")
    return name


def _const(node, ctx, index: int, what: str) -> Optional[np.ndarray]:
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    if name not in ctx.consts:
        raise _fail(node, f'{what} "{name}" is computed, not a constant')
    return ctx.consts[name]


def _param(node, ctx, index: int, what: str) -> Optional[tuple[str, np.ndarray, bool]]:
    """(initializer name, stored values as float64, transposed?) of a parameter input."""
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    if name not in ctx.param_source:
        raise _fail(node, f'{what} "{name}" is computed by other nodes; parameters must be '
                          "initializers or Constant nodes")
    source, transposed = ctx.param_source[name]
    if source in ctx.used_params:
        raise _fail(node, f'initializer "{source}" is also used by node '
                          f'"{ctx.used_params[source]}"; shared parameters are not supported')
    ctx.used_params[source] = node.name or node.output[0]
    values = ctx.consts[source]
    return source, values.astype(np.float64), transposed


def _emit(ctx, node, layer_cls, in_name: str, **fields):
    layer = layer_cls(input_name=in_name, output_name=node.output[0],
                      nodes=(node.name or node.output[0],), **fields)
    try:
        out_shape = layer.output_shape(ctx.shapes[in_name])
    except ValueError as exc:
        raise _fail(node, str(exc)) from None
    if any(s <= 0 for s in out_shape):
        raise _fail(node, f"output shape {out_shape} is empty")
    ctx.layers.append(layer)
    ctx.shapes[node.output[0]] = tuple(int(s) for s in out_shape)
    ctx.live = node.output[0]


@converter("Gemm")
def _gemm(node, ctx):
    x = _data_input(node, ctx)
    a = _attrs(node)
    if a.get("transA", 0):
        raise _fail(node, "transA=1 transposes the batch of activations; not supported")
    if len(ctx.shapes[x]) != 1:
        raise _fail(node, f"input of per-sample shape {ctx.shapes[x]} is not a vector")
    weight_name, weight, stored_t = _param(node, ctx, 1, "weight")
    transposed = (not a.get("transB", 0)) != stored_t
    w_eff = weight.T if transposed else weight
    if w_eff.ndim != 2 or w_eff.shape[1] != ctx.shapes[x][0]:
        raise _fail(node, f"weight {weight.shape} does not fit an input of {ctx.shapes[x][0]}")
    bias = _param(node, ctx, 2, "bias")
    if bias is not None and bias[1].size != w_eff.shape[0]:
        raise _fail(node, f"bias of shape {bias[1].shape} does not match {w_eff.shape[0]} outputs")
    _emit(ctx, node, ir.Dense, x, weight_name=weight_name, weight=weight,
          weight_transposed=transposed, weight_coef=float(a.get("alpha", 1.0)),
          bias_name=bias and bias[0], bias=bias and bias[1], bias_coef=float(a.get("beta", 1.0)))


@converter("MatMul")
def _matmul(node, ctx):
    x = _data_input(node, ctx)
    if node.input[0] != x and ctx.canonical(node.input[0]) != x:
        raise _fail(node, "the constant is on the left (W·x); only x·W is supported")
    if len(ctx.shapes[x]) != 1:
        raise _fail(node, f"input of per-sample shape {ctx.shapes[x]} is not a vector")
    weight_name, weight, stored_t = _param(node, ctx, 1, "weight")
    transposed = not stored_t  # MatMul stores (in, out)
    w_eff = weight.T if transposed else weight
    if w_eff.ndim != 2 or w_eff.shape[1] != ctx.shapes[x][0]:
        raise _fail(node, f"weight {weight.shape} does not fit an input of {ctx.shapes[x][0]}")
    _emit(ctx, node, ir.Dense, x, weight_name=weight_name, weight=weight, weight_transposed=transposed)


def _spatial_geometry(node, ctx, in_hw, kernel, ceil_mode=False) -> Geometry:
    """Kernel, strides, dilations and pads (auto_pad resolved) of Conv and the pools."""
    a = _attrs(node)
    strides = tuple(a.get("strides", (1, 1)))
    dilations = tuple(a.get("dilations", (1, 1)))
    pads = tuple(a.get("pads", (0, 0, 0, 0)))
    auto_pad = a.get("auto_pad", "NOTSET")
    if len(kernel) != 2 or len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise _fail(node, "only 2-D (NCHW) operations are supported")
    if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0 or min(kernel) < 1:
        raise _fail(node, f"invalid strides {strides}, dilations {dilations}, pads {pads} "
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
        raise _fail(node, f"unknown auto_pad {auto_pad!r}")
    return Geometry(tuple(kernel), strides, dilations, pads, bool(ceil_mode))


@converter("Conv")
def _conv(node, ctx):
    x = _data_input(node, ctx)
    shape = ctx.shapes[x]
    if len(shape) != 3:
        raise _fail(node, f"input of per-sample shape {shape}: only 2-D convolutions (NCHW)")
    weight_name, weight, stored_t = _param(node, ctx, 1, "weight")
    if stored_t or weight.ndim != 4:
        raise _fail(node, f"weight of shape {weight.shape}: only 2-D convolutions")
    groups = int(_attrs(node).get("group", 1))
    if groups < 1 or shape[0] % groups or weight.shape[0] % groups or weight.shape[1] * groups != shape[0]:
        raise _fail(node, f"weight {weight.shape} with group={groups} does not fit {shape[0]} input channels")
    kernel = tuple(_attrs(node).get("kernel_shape", weight.shape[2:]))
    if kernel != weight.shape[2:]:
        raise _fail(node, f"kernel_shape {kernel} disagrees with the weight {weight.shape}")
    geom = _spatial_geometry(node, ctx, shape[1:], kernel)
    bias = _param(node, ctx, 2, "bias")
    if bias is not None and bias[1].size != weight.shape[0]:
        raise _fail(node, f"bias of shape {bias[1].shape} does not match {weight.shape[0]} channels")
    _emit(ctx, node, ir.Conv2d, x, weight_name=weight_name, weight=weight, geometry=geom,
          groups=groups, bias_name=bias and bias[0], bias=bias and bias[1])


def _pool_input(node, ctx) -> tuple[str, tuple[int, ...]]:
    x = _data_input(node, ctx)
    if len(ctx.shapes[x]) != 3:
        raise _fail(node, f"input of per-sample shape {ctx.shapes[x]}: only 2-D pooling (NCHW)")
    return x, ctx.shapes[x]


@converter("MaxPool")
def _maxpool(node, ctx):
    x, shape = _pool_input(node, ctx)
    a = _attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise _fail(node, "the Indices output is used; only the pooled values are supported")
    geom = _spatial_geometry(node, ctx, shape[1:], tuple(a["kernel_shape"]), a.get("ceil_mode", 0))
    _emit(ctx, node, ir.MaxPool2d, x, geometry=geom)


@converter("AveragePool")
def _avgpool(node, ctx):
    x, shape = _pool_input(node, ctx)
    a = _attrs(node)
    geom = _spatial_geometry(node, ctx, shape[1:], tuple(a["kernel_shape"]), a.get("ceil_mode", 0))
    _emit(ctx, node, ir.AvgPool2d, x, geometry=geom,
          count_include_pad=bool(a.get("count_include_pad", 0)))


@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, ctx):
    x, shape = _pool_input(node, ctx)
    geom = Geometry(tuple(shape[1:]))
    if node.op_type == "GlobalMaxPool":
        _emit(ctx, node, ir.MaxPool2d, x, geometry=geom)
    else:
        _emit(ctx, node, ir.AvgPool2d, x, geometry=geom)


@converter("Pad")
def _pad(node, ctx):
    x = _data_input(node, ctx)
    a = _attrs(node)
    if a.get("mode", "constant") != "constant":
        raise _fail(node, f"mode {a['mode']!r} is not zero padding")
    if ctx.opset < 11:
        pads, value = list(a.get("pads", ())), float(a.get("value", 0.0))
    else:
        pads = _const(node, ctx, 1, "pads")
        value_arr = _const(node, ctx, 2, "constant_value")
        value = 0.0 if value_arr is None or value_arr.size == 0 else float(value_arr.reshape(-1)[0])
        axes = _const(node, ctx, 3, "axes")
        rank = len(ctx.shapes[x]) + 1
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        if axes is not None:
            full = [0] * (2 * rank)
            for i, ax in enumerate(int(v) % rank for v in axes.reshape(-1)):
                full[ax], full[ax + rank] = pads[i], pads[i + len(axes.reshape(-1))]
            pads = full
    if value != 0.0:
        raise _fail(node, f"pads with {value}, not zero: not positively homogeneous")
    if len(ctx.shapes[x]) != 3 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)):
        raise _fail(node, f"pads {list(pads)}: only zero padding of H and W in NCHW is supported")
    if min(pads) < 0:
        raise _fail(node, f"negative pads {list(pads)} (cropping) are not supported")
    _emit(ctx, node, ir.Pad2d, x, pads=(pads[2], pads[3], pads[6], pads[7]))


@converter("Relu")
def _relu(node, ctx):
    _emit(ctx, node, ir.Relu, _data_input(node, ctx))


@converter("LeakyRelu", "PRelu")
def _leaky(node, ctx):
    x = _data_input(node, ctx)
    if node.op_type == "LeakyRelu":
        slope = np.asarray(float(_attrs(node).get("alpha", 0.01)))
    else:
        slope = _per_sample_constant(node, _const(node, ctx, 1, "slope"), ctx.shapes[x], "slope")
    _emit(ctx, node, ir.LeakyRelu, x, slope=slope)


def _per_sample_constant(node, c: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A constant that broadcasts over one sample (a leading batch axis of 1 is dropped)."""
    c = c.astype(np.float64)
    if c.ndim == len(shape) + 1 and c.shape[0] == 1:
        c = c[0]
    try:
        if np.broadcast_shapes(shape, c.shape) != shape:
            raise ValueError
    except ValueError:
        raise _fail(node, f"{what} of shape {c.shape} does not broadcast to {shape}") from None
    return c


def _reshape_to(node, ctx, x: str, per_sample: tuple[int, ...]):
    size = int(np.prod(ctx.shapes[x]))
    if int(np.prod(per_sample)) != size:
        raise _fail(node, f"cannot reshape per-sample shape {ctx.shapes[x]} to {per_sample}")
    _emit(ctx, node, ir.Reshape, x, shape=tuple(int(s) for s in per_sample))


@converter("Flatten")
def _flatten(node, ctx):
    x = _data_input(node, ctx)
    axis = int(_attrs(node).get("axis", 1))
    if axis % (len(ctx.shapes[x]) + 1) != 1:
        raise _fail(node, f"axis={axis} mixes the batch axis into the features; only axis=1")
    _reshape_to(node, ctx, x, (int(np.prod(ctx.shapes[x])),))


@converter("Reshape")
def _reshape(node, ctx):
    x = _data_input(node, ctx)
    target = [int(v) for v in _const(node, ctx, 1, "shape").reshape(-1)]
    allowzero = int(_attrs(node).get("allowzero", 0))
    full_in = (BATCH,) + ctx.shapes[x]
    dims = [full_in[i] if (v == 0 and not allowzero and i < len(full_in)) else v
            for i, v in enumerate(target)]
    if not dims:
        raise _fail(node, "reshape to a scalar loses the batch axis")
    rest = dims[1:]
    size = int(np.prod(ctx.shapes[x]))
    if dims[0] not in (BATCH, -1) and dims[0] <= 0:
        raise _fail(node, f"shape {target} does not keep the batch axis")
    if BATCH in rest or rest.count(-1) > 1 or (dims[0] == -1 and -1 in rest):
        raise _fail(node, f"shape {target} does not keep the batch axis first")
    if -1 in rest:
        known = int(np.prod([d for d in rest if d != -1]))
        if known <= 0 or size % known:
            raise _fail(node, f"cannot reshape per-sample shape {ctx.shapes[x]} to {target}")
        rest = [size // known if d == -1 else d for d in rest]
    _reshape_to(node, ctx, x, tuple(rest))


@converter("Squeeze", "Unsqueeze")
def _squeeze(node, ctx):
    x = _data_input(node, ctx)
    a = _attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _const(node, ctx, 1, "axes").reshape(-1).tolist()
    shape = list(ctx.shapes[x])
    if node.op_type == "Squeeze":
        rank = len(shape) + 1
        axes = [i for i in range(1, rank) if shape[i - 1] == 1] if axes is None else [int(v) % rank for v in axes]
        if 0 in axes:
            raise _fail(node, "squeezes the batch axis")
        new = [s for i, s in enumerate(shape, start=1) if i not in axes]
    else:
        rank = len(shape) + 1 + len(axes or [])
        axes = sorted(int(v) % rank for v in axes or [])
        if 0 in axes:
            raise _fail(node, "inserts an axis before the batch axis")
        full = [BATCH] + shape
        for ax in axes:
            full.insert(ax, 1)
        new = full[1:]
    _reshape_to(node, ctx, x, tuple(new))


@converter("Transpose")
def _transpose(node, ctx):
    x = _data_input(node, ctx)
    rank = len(ctx.shapes[x]) + 1
    perm = list(_attrs(node).get("perm", range(rank - 1, -1, -1)))
    if perm[0] != 0:
        raise _fail(node, f"perm {perm} moves the batch axis")
    _emit(ctx, node, ir.Transpose, x, perm=tuple(p - 1 for p in perm[1:]))


@converter("Identity", "Dropout")
def _identity(node, ctx):
    x = _data_input(node, ctx)
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = _const(node, ctx, 2, "training_mode")
        if bool(np.asarray(mode).reshape(-1)[0]):
            raise _fail(node, "training_mode=true makes the network random")
    ctx.alias[node.output[0]] = x


@converter("Add", "Sub", "Mul", "Div")
def _elementwise(node, ctx):
    x = _data_input(node, ctx)
    data_first = ctx.canonical(node.input[0]) == x
    c = _const(node, ctx, 1 if data_first else 0, "operand").astype(np.float64)
    shape = ctx.shapes[x]
    last = ctx.layers[-1] if ctx.layers else None
    if (node.op_type == "Add" and ir.is_parameterised(last) and last.output_name == x
            and last.bias is None):
        # MatMul (or Conv) + Add: the constant is the layer's bias
        out = last.out_features if isinstance(last, ir.Dense) else last.out_channels
        expected = (out,) if isinstance(last, ir.Dense) else (out, 1, 1)
        squeezed = c.reshape(c.shape[1:]) if c.ndim == len(shape) + 1 and c.shape[0] == 1 else c
        if squeezed.shape != expected:
            raise _fail(node, f"adds a constant of shape {c.shape} after a layer with {out} "
                              "outputs: not a bias, and not positively homogeneous")
        source = _param(node, ctx, 1 if data_first else 0, "bias")
        ctx.layers[-1] = dataclasses.replace(
            last, bias_name=source[0], bias=source[1], output_name=node.output[0],
            nodes=last.nodes + (node.name or node.output[0],))
        ctx.shapes[node.output[0]] = shape
        ctx.live = node.output[0]
        return
    if ctx.has_params:
        raise _fail(node, "an elementwise operation with a constant after a parameterised "
                          "layer is not positively homogeneous (only a bias right after "
                          "MatMul or Conv is)")
    c = _per_sample_constant(node, c, shape, "constant")
    one, zero = np.ones(()), np.zeros(())
    if node.op_type == "Add":
        scale, shift = one, c
    elif node.op_type == "Sub":
        scale, shift = (one, -c) if data_first else (-one, c)
    elif node.op_type == "Mul":
        scale, shift = c, zero
    else:
        if not data_first:
            raise _fail(node, "divides a constant by the input: not an affine transform")
        if np.any(c == 0):
            raise _fail(node, "divides by zero")
        scale, shift = 1.0 / c, zero
    _emit(ctx, node, ir.InputAffine, x, scale=np.asarray(scale), shift=np.asarray(shift))


@converter("Shape")
def _shape(node, ctx):
    name = ctx.canonical(node.input[0])
    a = _attrs(node)
    full = np.array((BATCH,) + ctx.shapes[name], dtype=np.int64)
    ctx.consts[node.output[0]] = full[a.get("start", 0):a.get("end", None)]


def _postprocess(node, ctx):
    x = ctx.canonical(next(n for n in node.input if ctx.is_data(n)))
    if ctx.logits is None:
        if x != ctx.live:
            raise _fail(node, f'reads "{x}", which is not the end of the chain')
        ctx.logits = x
    ctx.post.append(f"{node.op_type} ({node.name or node.output[0]})")
    for out in node.output:
        if out:
            ctx.shapes[out] = ()  # post-processed: no longer part of the network


# ------------------------------------------------------------------------------ driver


def _fold(node: onnx.NodeProto, ctx: _Context, opsets) -> None:
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
            raise _fail(node, f"constant attribute {a.name!r} is not supported")
        ctx.consts[node.output[0]] = arr
        ctx.param_source[node.output[0]] = (node.output[0], False)
        return
    inputs = [ctx.consts[n] if n else None for n in node.input]
    if node.op_type == "Identity":
        ctx.consts[node.output[0]] = inputs[0]
        if node.input[0] in ctx.param_source:
            ctx.param_source[node.output[0]] = ctx.param_source[node.input[0]]
        return
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
        raise _fail(node, f"cannot fold constant inputs: {first_line(exc)}") from None
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


def _read_model(path: Path) -> tuple[onnx.ModelProto, bytes]:
    if not path.is_file():
        raise MinsharpError(f"{path}: no such model file")
    size = path.stat().st_size
    if size == 0:
        raise MinsharpError(f"{path}: empty file, not an ONNX model")
    if size > MAX_MODEL_BYTES:
        raise MinsharpError(f"{path}: {size} bytes exceeds the limit of {MAX_MODEL_BYTES} bytes")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        raise MinsharpError(f"{path}: not an ONNX model (protobuf parse failed)") from None
    if not model.HasField("graph") or not model.graph.node:
        raise MinsharpError(f"{path}: not an ONNX model (no graph)")
    return model, data


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read initializers stored outside the model file, only from inside its directory."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    base = path.parent.resolve()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f'{path}: initializer "{tensor.name}" has external data at "{location}"'
        parts = Path(location).parts
        if not location or Path(location).is_absolute() or ".." in parts or location.startswith(("/", "\\")):
            raise MinsharpError(f"{where}: refused, external data must be a relative path "
                                "inside the model's directory")
        target = (base / location).resolve()
        if base not in target.parents:
            raise MinsharpError(f"{where}: refused, it resolves outside the model's directory")
        if not target.is_file():
            raise MinsharpError(f"{where}: no such file")
        try:
            load_external_data_for_tensor(tensor, str(base))
        except Exception as exc:
            raise MinsharpError(f"{where}: cannot read it ({exc})") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def import_model(path, input_shape: Optional[tuple[int, ...]] = None) -> ImportedModel:
    """Read, check and convert an ONNX model file; raise MinsharpError on anything refused.
    ``input_shape`` (per sample) fixes dynamic input dimensions and must agree with the
    static ones."""
    path = Path(path)
    model, data = _read_model(path)
    _load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise MinsharpError(f"{path}: fails the ONNX checker: {first_line(exc)}") from None
    try:
        network = convert(model, input_shape)
    except MinsharpError as exc:
        raise MinsharpError(f"{path}: {exc}") from None
    return ImportedModel(path, hashlib.sha256(data).hexdigest(), model, network)


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
    ctx = _Context(opset, consts, {n: (n, False) for n in consts})
    ctx.shapes[inp.name] = tuple(per_sample)
    ctx.live = inp.name
    node_names = set()
    consumers = _consumers(graph)
    allowed_domains = {"", "ai.onnx", "ai.onnx.ml"}
    for node in _needed_nodes(graph):
        if node.name and node.name in node_names:
            raise MinsharpError(f'node name "{node.name}" is used twice')
        node_names.add(node.name)
        if node.domain not in allowed_domains:
            raise _fail(node, f"custom domain {node.domain!r} is not supported")
        data_in = [n for n in node.input if ctx.is_data(n)]
        if not data_in:
            if node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
                raise _fail(node, "random values make the network non-deterministic")
            _fold(node, ctx, model.opset_import)
            continue
        if ctx.logits is not None or (node.op_type in POSTPROCESSING and _is_tail(node, consumers)):
            if node.op_type not in POSTPROCESSING | {"Identity"}:
                raise _fail(node, "follows post-processing of the logits; only Softmax, "
                                  "LogSoftmax, ArgMax, Cast or ZipMap may come after the last layer")
            _postprocess(node, ctx)
            continue
        if node.op_type == "Cast":
            to = _attrs(node).get("to")
            if to not in FLOAT_TYPES:
                raise _fail(node, "casts the network's activations to a non-float type")
            ctx.alias[node.output[0]] = _data_input(node, ctx)
            continue
        fn = CONVERTERS.get(node.op_type)
        if fn is None:
            if node.op_type in NOT_HOMOGENEOUS:
                raise _fail(node, "not positively homogeneous, minimum sharpness is not defined "
                                  "for this network")
            if node.op_type in NORMALISATION:
                raise _fail(node, "folding a normalisation layer into the preceding layer changes "
                                  "the parameterisation, so minsharp-ref will not do it silently; "
                                  "fold it before export if that is what you want")
            if node.op_type in ("Concat", "Sum", "Max", "Min", "Mean", "Where", "Split"):
                raise _fail(node, "combines or splits computed tensors (branches); only chain "
                                  "networks are supported")
            raise _fail(node, "op type not supported between parameterised layers")
        fn(node, ctx)
    logits = ctx.logits or ctx.live
    if not ctx.has_params:
        raise MinsharpError("the network has no parameterised layer (Gemm, MatMul, Conv)")
    if ctx.logits is None and logits not in {ctx.canonical(o.name) for o in graph.output}:
        raise MinsharpError(f'the end of the chain "{logits}" is not a graph output')
    shape = ctx.shapes[logits]
    if len(shape) != 1 or shape[0] < 2:
        raise MinsharpError(f'the logits "{logits}" have per-sample shape {shape}; need '
                            "(classes,) with at least 2 classes")
    # layers after the last parameterised one must be shape-only or piecewise linear
    elem = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
    return ir.Network(tuple(ctx.layers), inp.name, tuple(per_sample), np.dtype(elem), logits,
                      graph.output[0].name, opset, tuple(ctx.post))


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name → the nodes that read it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def _is_tail(node, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    """True when a Softmax/LogSoftmax/ArgMax/Cast/ZipMap starts post-processing: nothing but
    more post-processing depends on its output."""
    stack, seen = list(node.output), set()
    while stack:
        name = stack.pop()
        for c in consumers.get(name, []):
            if id(c) in seen:
                continue
            seen.add(id(c))
            if c.op_type not in POSTPROCESSING | {"Identity"}:
                return False
            stack.extend(c.output)
    return True
