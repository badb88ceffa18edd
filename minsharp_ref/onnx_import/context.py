"""Shared state and helpers of the ONNX importer: the conversion context, the converter
registry (one converter per op type, ``CONVERTERS``), and the checks every converter uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx

from .. import ir
from ..errors import MinsharpError

#: Refuse model files larger than this before reading them (bytes).
MAX_MODEL_BYTES = 2 * 1024 ** 3
#: Refuse networks with more parameters than this (before any large allocation).
MAX_PARAMETERS = 500_000_000
MIN_OPSET = 9

#: Stands for the unknown batch size inside folded shape arithmetic.
BATCH = 2 ** 40 + 1

NOT_HOMOGENEOUS = {
    "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Mish", "Exp", "Log", "Erf", "Sqrt", "Pow", "Clip", "ThresholdedRelu",
    "Softmax", "LogSoftmax", "Hardmax", "Sin", "Cos", "Abs", "Neg", "Sign", "Floor", "Ceil",
    "Round", "LpNormalization", "LRN", "Swish",
}
NORMALISATION = {"InstanceNormalization", "LayerNormalization",
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
class Context:
    opset: int
    consts: dict[str, np.ndarray]
    #: constant name → (initializer or Constant output it came from, transposed?)
    param_source: dict[str, tuple[str, bool]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # live data tensors
    alias: dict[str, str] = field(default_factory=dict)
    layers: list = field(default_factory=list)
    live: str = ""
    used_params: dict[str, str] = field(default_factory=dict)  # initializer → node
    #: Identity outputs of constants: the legacy exporter stores bit-identical initializers
    #: once and feeds the other uses through an Identity (see ``param``)
    copies: set[str] = field(default_factory=set)
    #: tensor name → the nodes that read it (whole graph)
    consumers: dict[str, list] = field(default_factory=dict)
    #: nodes already converted together with an earlier one (e.g. ReduceSum's Div)
    fused: set[int] = field(default_factory=set)
    #: SplitToSequence output → (its data input, axis, (start, stop) of each part): read by
    #: SequenceAt, each part a slice (the dynamo exporter writes ``torch.chunk`` so)
    sequences: dict[str, tuple] = field(default_factory=dict)

    def canonical(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def is_data(self, name: str) -> bool:
        return bool(name) and self.canonical(name) in self.shapes

    @property
    def has_params(self) -> bool:
        return any(ir.is_parameterised(l) for l in self.layers)


def fail(node: onnx.NodeProto, reason: str) -> MinsharpError:
    return MinsharpError(f'node "{node.name or node.output[0]}" ({node.op_type}): {reason}')


def attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


# ------------------------------------------------------------------------ converters

Converter = Callable[[onnx.NodeProto, Context], None]
CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str):
    def register(fn: Converter) -> Converter:
        for op in op_types:
            CONVERTERS[op] = fn
        return fn
    return register


def data_input(node, ctx) -> str:
    """The node's single data input (canonical name). Any computed tensor may be read, by
    any number of nodes (fan-out); only Add, Sum and Concat may read two (merge.py)."""
    data = [n for n in node.input if ctx.is_data(n)]
    if len(data) != 1:
        raise fail(node, "combines two computed tensors; only Add, Sum and Concat may join "
                          "branches")
    return ctx.canonical(data[0])


def producer(ctx, name: str):
    """The layer that writes tensor ``name``, or None (the graph input)."""
    return next((l for l in reversed(ctx.layers) if l.output_name == name), None)


def const(node, ctx, index: int, what: str) -> Optional[np.ndarray]:
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    if name not in ctx.consts:
        raise fail(node, f'{what} "{name}" is computed, not a constant')
    return ctx.consts[name]


def computed_zeros(node, ctx, index: int) -> bool:
    """True when input ``index`` is a constant computed by folded nodes (not an initializer)
    and all zeros: the dynamo exporter builds the bias of a bias-free conv this way at run
    time (Shape, Expand, CastLike on the input)."""
    if index >= len(node.input) or not node.input[index]:
        return False
    name = node.input[index]
    return name in ctx.consts and name not in ctx.param_source and not np.any(ctx.consts[name])


def param(node, ctx, index: int, what: str) -> Optional[tuple[str, np.ndarray, bool]]:
    """(initializer name, stored values as float64, transposed?) of a parameter input."""
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    if name not in ctx.param_source:
        raise fail(node, f'{what} "{name}" is computed by other nodes; parameters must be '
                          "initializers or Constant nodes")
    source, transposed = ctx.param_source[name]
    if source in ctx.used_params and name in ctx.copies and name not in ctx.used_params:
        # a second use through an Identity (bit-identical initializers merged by the legacy
        # exporter): a parameter of its own in the user's model, named by the Identity output
        source = name
    if source in ctx.used_params:
        raise fail(node, f'initializer "{source}" is also used by node '
                          f'"{ctx.used_params[source]}"; shared parameters are not supported')
    ctx.used_params[source] = node.name or node.output[0]
    values = ctx.consts[source]
    return source, values.astype(np.float64), transposed


def emit(ctx, node, layer_cls, in_name: str, **fields):
    layer = layer_cls(input_name=in_name, output_name=node.output[0],
                      nodes=(node.name or node.output[0],), **fields)
    try:
        out_shape = layer.output_shape(ctx.shapes[in_name])
    except ValueError as exc:
        raise fail(node, str(exc)) from None
    if any(s <= 0 for s in out_shape):
        raise fail(node, f"output shape {out_shape} is empty")
    ctx.layers.append(layer)
    ctx.shapes[node.output[0]] = tuple(int(s) for s in out_shape)
    ctx.live = node.output[0]


def renamed(node: onnx.NodeProto, output: str) -> onnx.NodeProto:
    """A copy of ``node`` writing ``output``: for one ONNX node that becomes several layers."""
    inner = onnx.NodeProto()
    inner.CopyFrom(node)
    del inner.output[:]
    inner.output.append(output)
    return inner


def per_sample_constant(node, c: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A constant that broadcasts over one sample (a leading batch axis of 1 is dropped)."""
    c = c.astype(np.float64)
    if c.ndim == len(shape) + 1 and c.shape[0] == 1:
        c = c[0]
    try:
        if np.broadcast_shapes(shape, c.shape) != shape:
            raise ValueError
    except ValueError:
        raise fail(node, f"{what} of shape {c.shape} does not broadcast to {shape}") from None
    return c
