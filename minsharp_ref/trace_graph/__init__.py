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

from ..errors import MinsharpError
from ..group import folded_view
from ..ir import LeakyRelu, MaxPool2d, Network, Relu, is_parameterised
from .backward import backward
from .builder import GraphBuilder
from .context import Context
from .forward import forward
from .loss import LOSS_HEADS
from .measure import measure
from ..plan import traversal_plan

#: names of the graph's inputs and outputs (docs/trace-graph.md)
INPUT, TRACES, LOGITS, DIAGONAL_PREFIX = "input", "traces", "logits", "diagonal:"


def check_supported(network: Network) -> None:
    """Refuse, in one line, networks with a layer type or loss without a rule here."""
    needs = traversal_plan(network).carriers
    for layer in network.layers:
        kind = type(layer)
        missing = kind not in forward.registry or (
            layer.output_name in needs and any(n in needs for n in layer.inputs)
            and kind not in backward.registry)
        if is_parameterised(layer):
            missing = missing or kind not in measure.registry
        if missing:
            raise MinsharpError(f"the onnxruntime engine does not support {kind.__name__} "
                                f"(node {layer.nodes[0] if layer.nodes else '?'}) yet; use --engine numpy")
    if network.loss not in LOSS_HEADS:
        raise MinsharpError(f"the onnxruntime engine does not support the loss "
                            f"{network.loss!r} yet; use --engine numpy")


def traced_layers(network: Network) -> list:
    """The parameterised layers whose traces the graph reports, in column order: the
    network's, then, for a network with BatchNorm, those of its folded view
    (``group.folded_view``, docs/method.md section 10)."""
    folded = folded_view(network)
    return network.param_layers + ([] if folded is None else folded.param_layers)


def columns_of(layers: list) -> list[tuple[object, str, str]]:
    """(layer, 'weight'|'bias', initializer name) per column of the ``traces`` output."""
    return [(layer, which, name) for layer in layers for which, name in
            [("weight", layer.weight_name)] + ([("bias", layer.bias_name)] if layer.bias is not None else [])]


def foldable_activations(network: Network) -> dict:
    """Output name → layer of each ReLU, and LeakyReLU with slope ≥ 0, whose output only
    a max pool reads: the pool's routing applies the activation's factor (``backward``)."""
    readers: dict[str, list] = {}
    for layer in network.layers:
        for name in layer.inputs:
            readers.setdefault(name, []).append(layer)
    return {layer.output_name: layer for layer in network.layers
            if (isinstance(layer, Relu) or isinstance(layer, LeakyRelu) and np.all(layer.slope >= 0))
            and [type(r) for r in readers.get(layer.output_name, [])] == [MaxPool2d]}


def build_trace_graph(network: Network, dtype=np.float32, diagonal: bool = False) -> onnx.ModelProto:
    """The trace graph of ``network`` in ``dtype`` (float32 or float64).

    Input ``input`` (N, *input_shape); outputs ``traces`` (N, T) float64, the per-sample
    trace contributions in ``engine.tensor_columns`` order (for a network with BatchNorm,
    followed by those of its folded view's tensors), and ``logits`` (N, K); with
    ``diagonal`` also ``diagonal:<initializer>``, the batch sums of the exact Hessian
    diagonal of each parameter tensor of the network and of its folded view's own tensors
    (``<weight> (folded)``), float64, shaped like the initializer.

    The signals go back through the DAG in reverse topological order, held per tensor name;
    a tensor read by several layers receives the sum of their signals, complete before its
    producer is visited (docs/method.md section 9). The folded view needs no second pass:
    its layers write tensors of the network (a folded conv writes its BatchNorm's output)
    and the signals there are the same, so only its new layers' contractions are added.
    """
    check_supported(network)
    b = GraphBuilder(dtype)
    ctx = Context(b)
    layers = traced_layers(network)
    b.reserve([INPUT, TRACES, LOGITS] + [DIAGONAL_PREFIX + name for _, _, name in columns_of(layers)])
    b.fresh(INPUT, exact=True)
    ctx.values[network.input_name] = INPUT
    ctx.shapes.update(network.tensor_shapes())
    for layer in network.layers:
        ctx.values[layer.output_name] = forward(layer, ctx)
    logits = ctx.values[network.logits_name]
    k = network.num_classes
    signals, ctx.signals = LOSS_HEADS[network.loss](ctx, logits, k)

    keep = {layer.output_name for layer in layers[len(network.param_layers):]}  # folded view's
    at: dict[str, str] = {network.logits_name: signals}  # tensor name → pending signals
    kept: dict[str, str] = {}
    measured = {}
    ctx.fused_activations.update(foldable_activations(network))
    for step in traversal_plan(network).backward_steps:
        layer = step.layer
        g = at.pop(step.output)
        if layer.output_name in keep:
            kept[layer.output_name] = g
        if step.param_index is not None:
            measured[id(layer)] = measure(layer, ctx, g, diagonal)
        if not step.passes_back:
            continue
        out = backward(layer, ctx, g)
        for name, part, sends, first in zip(layer.inputs, out if isinstance(out, tuple) else (out,),
                                            step.sends, step.first_send):
            if sends:  # fan-out: the sum over the tensor's readers
                at[name] = part if first else b.node("Add", [at[name], part], "signal")
    for layer in layers:  # the folded view's own layers (the others are measured above)
        if id(layer) not in measured:
            measured[id(layer)] = measure(layer, ctx, kept[layer.output_name], diagonal)

    columns, diagonals, emitted = [], [], set()
    names = columns_of(layers)
    for layer, which, name in names:
        m = measured[id(layer)]
        value, diag = (m.weight, m.weight_diagonal) if which == "weight" else (m.bias, m.bias_diagonal)
        columns.append(b.node("Unsqueeze", [value, b.ints([1])]))
        if diagonal and name not in emitted:  # the folded view's own tensors too
            emitted.add(name)
            shape = list(np.shape(getattr(layer, which)))
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
           + ", ".join(name for _, _, name in names) + "); see docs/trace-graph.md")
    return b.model(inputs, outputs, "minsharp_trace_graph", doc)
