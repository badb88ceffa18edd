"""The traversal plan of a network: which layers a pass over the signals visits, in which
order, which of their inputs receive a signal, and where fan-outs sum (docs/method.md
sections 3 and 9). Built once from the IR and shared by every pass that moves signals
through it: the NumPy engine (``engine.signals_at_parameters``), the trace-graph builder
(``trace_graph.build_trace_graph``) and any later pass (a Hessian-vector product runs a
forward tangent pass over ``forward_steps`` and a reverse pass over ``backward_steps``).

A tensor *carries a signal* when it depends on some parameter and the logits depend on it:
only such tensors take part in a pass. The backward steps visit the layers that write such
a tensor in reverse topological order, so that a tensor read by several layers has
received the sum of all its readers' signals (a fan-out) before its producer is visited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import MinsharpError
from .ir import InputAffine, LayerBase, Network, is_parameterised

#: Layer types that no signal may pass through, refused by name when one would: the input's
#: preprocessing (``InputAffine``) is supported only before the first parameterised layer.
NO_BACKWARD_RULE = (InputAffine,)


@dataclass(frozen=True)
class Step:
    """One layer of a pass.

    ``index``: its position in ``network.layers``; ``param_index``: its position among the
    parameterised layers (None for the others); ``output``: the tensor whose signal it
    receives (backward) or produces (forward); ``sends``: per input of ``layer.inputs``,
    whether that input carries a signal (backward: the layer passes one back to it;
    forward: a tangent arrives from it); ``first_send``: per input, whether this step is
    the first (in the pass's order) to send a signal to it: later senders add theirs (a
    fan-out's sum)."""

    index: int
    layer: LayerBase
    param_index: Optional[int]
    output: str
    sends: tuple[bool, ...]
    first_send: tuple[bool, ...]

    @property
    def passes_back(self) -> bool:
        """Whether any input receives a signal from this layer."""
        return any(self.sends)


@dataclass(frozen=True)
class Plan:
    """``backward_steps``: the layers that receive a signal, last layer first (reverse
    topological order); ``forward_steps``: the same layers in topological order (for a
    forward tangent pass); ``carriers``: the tensors that carry a signal; ``readers``:
    tensor name → number of steps that send it a signal (more than 1: a fan-out)."""

    backward_steps: tuple[Step, ...]
    forward_steps: tuple[Step, ...]
    carriers: frozenset[str]
    readers: dict

    def layers_reading_input(self, kinds: tuple[type, ...]) -> list[int]:
        """Indices of the visited layers of the types ``kinds`` (those whose rules read the
        layer's input: what a forward must keep for the backward pass)."""
        return sorted(s.index for s in self.backward_steps if isinstance(s.layer, kinds))


def depends_on_parameters(network: Network) -> set[str]:
    """Tensors that depend on some parameter."""
    out: set[str] = set()
    for layer in network.layers:
        if is_parameterised(layer) or any(n in out for n in layer.inputs):
            out.add(layer.output_name)
    return out


def logits_depend_on(network: Network) -> set[str]:
    """Tensors the logits depend on (the logits included)."""
    out = {network.logits_name}
    for layer in reversed(network.layers):
        if layer.output_name in out:
            out.update(layer.inputs)
    return out


def traversal_plan(network: Network) -> Plan:
    """The plan of ``network`` (linear in the number of layers: build it once per run)."""
    carriers = frozenset(depends_on_parameters(network) & logits_depend_on(network))
    params = {id(l): d for d, l in enumerate(network.param_layers)}
    visited = [(i, l) for i, l in enumerate(network.layers) if l.output_name in carriers]

    def steps(order) -> tuple[Step, ...]:
        seen: set[str] = set()
        out = []
        for i, layer in order:
            sends = tuple(n in carriers for n in layer.inputs)
            first = []
            for name, s in zip(layer.inputs, sends):
                first.append(s and name not in seen)
                if s:
                    seen.add(name)
            out.append(Step(i, layer, params.get(id(layer)), layer.output_name, sends,
                            tuple(first)))
        return tuple(out)

    backward = steps(reversed(visited))
    for step in backward:
        if step.passes_back and isinstance(step.layer, NO_BACKWARD_RULE):
            node = step.layer.nodes[0] if step.layer.nodes else "?"
            raise MinsharpError(f"{type(step.layer).__name__} (node {node}) after a "
                                "parameterised layer is not supported: no signal passes it")
    readers: dict[str, int] = {}
    for step in backward:
        for name, s in zip(step.layer.inputs, step.sends):
            if s:
                readers[name] = readers.get(name, 0) + 1
    return Plan(backward, steps(visited), carriers, readers)
