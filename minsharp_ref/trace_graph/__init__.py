"""The trace graph: the whole exact trace computation of ``engine.py`` (forward, loss
factor, signal back-propagation, per-layer contractions) as one ONNX graph that
onnxruntime (or any ONNX runtime) runs; docs/trace-graph.md documents its inputs and
outputs, docs/method.md the formulas.

Built from the typed IR, keyed by tensor names: each layer reads ``layer.input_name`` and
writes ``layer.output_name`` (``forward``), signals are held per tensor name and moved from
a layer's output to its input by one transport rule per layer type (``backward``), and one
contraction rule per parameterised layer type (``measure``) turns them into traces.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..engine import first_param_index, tensor_columns
from ..errors import MinsharpError
from ..ir import LeakyRelu, MaxPool2d, Network, Relu, is_parameterised
from .backward import backward
from .builder import GraphBuilder
from .context import Context
from .forward import forward
from .loss import LOSS_HEADS
from .measure import measure

#: names of the graph's inputs and outputs (docs/trace-graph.md)
INPUT, TRACES, LOGITS, DIAGONAL_PREFIX = "input", "traces", "logits", "diagonal:"


def check_supported(network: Network) -> None:
    """Refuse, in one line, networks with a layer type or loss without a rule here."""
    start = first_param_index(network)
    for i, layer in enumerate(network.layers):
        kind = type(layer)
        missing = kind not in forward.registry or (i > start and kind not in backward.registry)
        if is_parameterised(layer):
            missing = missing or kind not in measure.registry
        if missing:
            raise MinsharpError(f"the onnxruntime engine does not support {kind.__name__} "
                                f"(node {layer.nodes[0] if layer.nodes else '?'}) yet; use --engine numpy")
    if network.loss not in LOSS_HEADS:
        raise MinsharpError(f"the onnxruntime engine does not support the loss "
                            f"{network.loss!r} yet; use --engine numpy")


def build_trace_graph(network: Network, dtype=np.float32, diagonal: bool = False) -> onnx.ModelProto:
    """The trace graph of ``network`` in ``dtype`` (float32 or float64).

    Input ``input`` (N, *input_shape); outputs ``traces`` (N, T) float64, the per-sample
    trace contributions in ``engine.tensor_columns`` order, and ``logits`` (N, K); with
    ``diagonal`` also ``diagonal:<initializer>``, the batch sums of the exact Hessian
    diagonal of each parameter tensor, float64, shaped like the initializer.
    """
    check_supported(network)
    b = GraphBuilder(dtype)
    ctx = Context(b)
    b.reserve([INPUT, TRACES, LOGITS] + [DIAGONAL_PREFIX + name for _, _, name in tensor_columns(network)])
    b.fresh(INPUT, exact=True)
    ctx.values[network.input_name] = INPUT
    shapes = network.layer_shapes()
    for layer, in_shape, out_shape in zip(network.layers, shapes, shapes[1:]):
        ctx.shapes[layer.input_name], ctx.shapes[layer.output_name] = in_shape, out_shape
        ctx.values[layer.output_name] = forward(layer, ctx)
    logits = ctx.values[network.layers[-1].output_name]
    k = network.num_classes
    signals, ctx.signals = LOSS_HEADS[network.loss](ctx, logits, k)

    at: dict[str, str] = {network.layers[-1].output_name: signals}  # tensor name → signals
    measured = {}
    start = first_param_index(network)
    for i in range(len(network.layers) - 1, start - 1, -1):
        layer = network.layers[i]
        before = network.layers[i - 1] if i > start else None
        # in a chain, an activation read only by a max pool: the pool applies its factor
        if (network.is_chain and isinstance(layer, MaxPool2d)
                and (isinstance(before, Relu)
                     or isinstance(before, LeakyRelu) and np.all(before.slope >= 0))):
            ctx.fused_activations[before.output_name] = before
        g = at.pop(layer.output_name)
        if is_parameterised(layer):
            measured[id(layer)] = measure(layer, ctx, g, diagonal)
        if i > start:
            at[layer.input_name] = backward(layer, ctx, g)

    columns, diagonals = [], []
    params = network.param_layers
    for d, which, name in tensor_columns(network):
        m = measured[id(params[d])]
        value, diag = (m.weight, m.weight_diagonal) if which == "weight" else (m.bias, m.bias_diagonal)
        columns.append(b.node("Unsqueeze", [value, b.ints([1])]))
        if diagonal:
            shape = list(np.shape(getattr(params[d], which)))
            diagonals.append((b.node("Identity", [diag], DIAGONAL_PREFIX + name, exact=True), shape))
    traces = b.node("Concat", columns, TRACES, exact=True, axis=1)
    logits_out = b.node("Identity", [logits], LOGITS, exact=True)

    n = "N"
    inputs = [helper.make_tensor_value_info(INPUT, b.elem, [n, *network.input_shape])]
    outputs = [helper.make_tensor_value_info(traces, TensorProto.DOUBLE, [n, len(columns)]),
               helper.make_tensor_value_info(logits_out, b.elem, [n, k])]
    outputs += [helper.make_tensor_value_info(value, TensorProto.DOUBLE, shape)
                for value, shape in diagonals]
    doc = ("minsharp-ref trace graph: per-sample exact Hessian-trace contributions of every "
           "parameter tensor (outputs 'traces', columns: "
           + ", ".join(name for _, _, name in tensor_columns(network)) + "); see docs/trace-graph.md")
    return b.model(inputs, outputs, "minsharp_trace_graph", doc)
