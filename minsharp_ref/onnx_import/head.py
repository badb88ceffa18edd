"""Structural detection of the head: what follows the logits (docs/method.md, section 4,
"The head").

Found from the graph's structure, not from op names, before any node is converted:

* the *data nodes* are those that depend on the graph's data input; the *parameterised
  layers* are the data nodes of type Gemm, MatMul or Conv;
* the *last layer* is the one parameterised layer no other parameterised layer depends on;
* the *logits* are its output, followed along a single path through bias Adds and
  positively homogeneous shape-only, piecewise-linear or pooling ops (``CONTINUATION``:
  SqueezeNet's classifier ends Conv → ReLU → GlobalAveragePool → Flatten) as long as each
  tensor on the path has exactly one reader;
* the *head* is every data node that depends on the logits: it feeds no parameterised
  layer (the last layer is last), is not run and is reported as stripped.

The head also suggests the loss: a Softmax or LogSoftmax on the logits means cross-entropy;
a Sigmoid on a single logit means binary cross-entropy (Keras ``Dense(1, "sigmoid")``,
skl2onnx's two-class MLPClassifier, which builds [1 − p, p] from it with Sub and Concat);
no activation means cross-entropy for K ≥ 2 outputs (logits exported as they are) and
mean squared error for a single output (a regressor). An activation that reads the logits
only through other ops (a temperature: Softmax(z/T)) is refused: its loss is not that of z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx

from ..errors import MinsharpError

PARAMETERISED = {"Gemm", "MatMul", "Conv"}
#: Ops that may continue the logits after the last layer (a bias Add, shape-only,
#: piecewise-linear or pooling ops: positively homogeneous, so part of the network, e.g.
#: SqueezeNet's classifier Conv → ReLU → GlobalAveragePool → Flatten); the driver still
#: checks each of them (e.g. that an Add is a bias, that a reduction is spatial).
CONTINUATION = {"Add", "Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                "Relu", "LeakyRelu", "PRelu", "GlobalAveragePool", "GlobalMaxPool",
                "AveragePool", "MaxPool", "ReduceMean", "ReduceMax", "Pad"}
#: Ops through which the head reads the logits unchanged, when looking for its activation.
TRANSPARENT = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Dropout"}
ACTIVATIONS = {"Softmax": "softmax", "LogSoftmax": "softmax", "Sigmoid": "sigmoid"}
LOSS_KINDS = ("cross-entropy", "binary", "mse")


@dataclass(frozen=True)
class Head:
    """The logits tensor, the stripped head nodes (graph order) and the activation found on
    the logits: "softmax", "sigmoid" or None."""

    logits: str
    nodes: tuple[onnx.NodeProto, ...]
    activation: Optional[str]

    def describe(self) -> tuple[str, ...]:
        return tuple(f"{n.op_type} ({node_id(n)})" for n in self.nodes)

    def loss_kind(self, outputs: int) -> str:
        """The loss the head suggests for ``outputs`` logits per sample."""
        if self.activation == "softmax":
            return "cross-entropy"
        if self.activation == "sigmoid":
            if outputs != 1:
                raise MinsharpError(f"a Sigmoid on {outputs} logits is a multi-label head, which is "
                                    "not supported (only a single sigmoid unit: binary)")
            return "binary"
        return "mse" if outputs == 1 else "cross-entropy"


def node_id(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def find_head(nodes: list[onnx.NodeProto], data_input: str, graph_outputs: list[str]) -> Head:
    """The head of a graph whose ``nodes`` (graph order) compute its outputs from
    ``data_input``."""
    # data nodes: those that (transitively) read the data input
    data_tensors, data_nodes = {data_input}, []
    for n in nodes:
        if any(i in data_tensors for i in n.input if i):
            data_nodes.append(n)
            data_tensors.update(o for o in n.output if o)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in data_nodes:
        for i in dict.fromkeys(n.input):
            if i in data_tensors:
                readers.setdefault(i, []).append(n)

    def downstream(tensors) -> list[onnx.NodeProto]:
        seen, stack = {}, list(tensors)
        while stack:
            for r in readers.get(stack.pop(), []):
                if id(r) not in seen:
                    seen[id(r)] = r
                    stack.extend(o for o in r.output if o)
        return [n for n in data_nodes if id(n) in seen]

    params = [n for n in data_nodes if n.op_type in PARAMETERISED]
    if not params:
        raise MinsharpError("the network has no parameterised layer (Gemm, MatMul, Conv)")
    last = [p for p in params
            if not any(d.op_type in PARAMETERISED for d in downstream(p.output[:1]))]
    if len(last) != 1:
        names = ", ".join(f'"{node_id(p)}"' for p in last)
        raise MinsharpError(f"the network has {len(last)} last layers ({names}); a single output "
                            "layer is needed")
    logits = last[0].output[0]
    while logits not in graph_outputs and len(readers.get(logits, [])) == 1:
        r = readers[logits][0]
        if r.op_type not in CONTINUATION or sum(i in data_tensors for i in r.input) != 1:
            break
        logits = r.output[0]
    head = downstream([logits])
    activations = _activations(logits, readers)
    direct = {id(a) for a in activations}
    behind = {id(n) for n in downstream(o for a in activations for o in a.output if o)}
    for n in head:  # an activation that sees the logits only after other ops (a temperature)
        if n.op_type in ACTIVATIONS and id(n) not in direct | behind:
            raise MinsharpError(f'node "{node_id(n)}" ({n.op_type}) in the head reads the logits '
                                f'"{logits}" through other operations (e.g. a temperature); the '
                                "loss would not be that of the model: export the logits")
    kinds = {ACTIVATIONS[a.op_type] for a in activations}
    if len(kinds) > 1:
        raise MinsharpError(f'the logits "{logits}" feed both a Softmax and a Sigmoid: the head '
                            "does not say which loss applies")
    return Head(logits, tuple(head), kinds.pop() if kinds else None)


def _activations(logits: str, readers) -> list[onnx.NodeProto]:
    """The Softmax, LogSoftmax and Sigmoid nodes that read the logits through TRANSPARENT ops."""
    found, stack, seen = [], [logits], set()
    while stack:
        for r in readers.get(stack.pop(), []):
            if id(r) in seen:
                continue
            seen.add(id(r))
            if r.op_type in ACTIVATIONS:
                found.append(r)
            elif r.op_type in TRANSPARENT:
                stack.extend(o for o in r.output if o)
    return found
