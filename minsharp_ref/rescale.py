"""Function-preserving rescalings of a network's parameters (docs/method.md sections 5 and 12).

* α-scale transformation (docs/method.md section 5): W_d → α_d W_d, b_d → c_d b_d with
  c_d = Π_{j≤d} α_j and Π_d α_d = 1.
* Neuron-wise rescaling (docs/method.md section 12): unit (or channel) i of layer d gets its incoming
  weights and bias scaled by γ_{d,i} > 0 and its outgoing weights by 1/γ_{d,i}.

Both positive homogeneity arguments need only that the operations between parameterised
layers are positively homogeneous, per unit for the neuron-wise one. The transforms return
new initializer values keyed by ONNX initializer name, applied to the IR with
``Network.with_parameters`` and to the ONNX model with ``apply_to_proto``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import MinsharpError
from .group import Group, rescaling_group
from .ir import BatchNorm, Dense, Network, is_parameterised


def check_alpha(network: Network, alpha: Sequence[float], normalize: bool = False) -> np.ndarray:
    """Validate α: one positive finite value per parameterised layer with Π α_d = 1
    (to 1e-9 in log), or divide by the geometric mean when ``normalize``."""
    a = np.asarray(alpha, dtype=np.float64)
    d = len(network.param_layers)
    if a.shape != (d,):
        raise MinsharpError(f"--alpha needs {d} values (one per parameterised layer), got {a.size}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise MinsharpError(f"--alpha values must be positive and finite, got {a.tolist()}")
    log_a = np.log(a)
    if normalize:
        return np.exp(log_a - log_a.mean())
    if abs(log_a.sum()) > 1e-9:
        raise MinsharpError(f"the product of --alpha is {math.exp(log_a.sum()):.12g}, not 1 "
                            "(use --normalize to divide by the geometric mean)")
    return a


def random_alpha(d: int, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Log-uniform α over ``spread`` decades around 1, normalised to Π α = 1 in log space."""
    log10 = rng.uniform(-spread / 2, spread / 2, size=d)
    log10 -= log10.mean()
    return 10.0 ** log10


def alpha_parameters(network: Network, alpha: np.ndarray) -> dict[str, np.ndarray]:
    """The α-scale transformation (docs/method.md section 5) on the stored initializers:
    weight × α_d, bias × c_d."""
    params = {}
    c = np.cumprod(alpha)
    for d, layer in enumerate(network.param_layers):
        params[layer.weight_name] = layer.weight * alpha[d]
        if layer.bias is not None:
            params[layer.bias_name] = layer.bias * c[d]
    return params


def uses_group(network: Network) -> bool:
    """DAG or BatchNorm networks rescale with the group of docs/method.md section 9 (one ℓ
    per class of tied tensors) instead of one α per layer."""
    return not network.is_chain or network.has_batchnorm


def random_log_scales(group: Group, rng: np.random.Generator, spread: float) -> np.ndarray:
    """ℓ per free class, e^ℓ log-uniform over ``spread`` decades around 1."""
    return np.log(10.0) * rng.uniform(-spread / 2, spread / 2, size=group.size)


def class_log_scales(group: Group, text: str, reported: Sequence[str] = ()) -> np.ndarray:
    """ℓ per free class of ``group`` from ``rescale --alpha`` on a network with branches or
    BatchNorm (docs/method.md section 9): either ``tensor=α,...`` pairs, each naming any
    tensor of a free class (classes not named keep α = 1), or exactly one α per class of
    the score report's class table, in its order (``reported``: the names of those classes,
    by default ``group.names``; with BatchNorm the report's classes are the folded network's,
    each of which is a class of the original network minus the conv-BN tensors, which keep
    α = 1). Here α = e^ℓ is a class's scale (the scale c of a bias added in it), as the
    report gives α* per class; there is no product constraint (the input's and the logits'
    classes are fixed)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    ell = np.zeros(group.size)
    reported = tuple(reported) or group.names
    if not items:
        raise MinsharpError("--alpha is empty")
    if all("=" not in t for t in items):
        if len(items) != len(reported):
            raise MinsharpError(f"--alpha needs {len(reported)} values (one per free class of "
                                f"tied tensors, in the order of the score report) or "
                                f"tensor=value pairs, got {len(items)}")
        pairs = list(zip(reported, items))
    elif all("=" in t for t in items):
        pairs = [tuple(t.rsplit("=", 1)) for t in items]
    else:
        raise MinsharpError("--alpha: give either plain values or tensor=value pairs, not both")
    where = {name: j for j, members in enumerate(group.members) for name in members}
    seen: dict[int, str] = {}
    for name, value in pairs:
        name = name.strip()
        try:
            a = float(value)
        except ValueError:
            raise MinsharpError(f"--alpha: {value.strip()!r} for {name!r} is not a number") from None
        if not math.isfinite(a) or a <= 0:
            raise MinsharpError(f"--alpha values must be positive and finite, got {a:g} for {name!r}")
        if name not in where:
            raise MinsharpError(f"--alpha: tensor {name!r} is in no free class (the free classes "
                                f"are named {', '.join(group.names)}; the input's and the "
                                "logits' classes are fixed)")
        j = where[name]
        if j in seen:
            raise MinsharpError(f"--alpha: {seen[j]!r} and {name!r} are in the same class")
        seen[j] = name
        ell[j] = math.log(a)
    return ell


def group_parameters(network: Network, ell: np.ndarray,
                     group: Optional[Group] = None) -> dict[str, np.ndarray]:
    """docs/method.md section 9 on the stored initializers: for a layer from tensor ``in`` to
    ``out``, W → e^{ℓ_out − ℓ_in} W and b → e^{ℓ_out} b. A BatchNorm is rescaled exactly,
    keeping its node (section 10): γ → e^{ℓ_out − ℓ_in} γ, β → e^{ℓ_out} β, μ → e^{ℓ_in} μ
    with σ² and ε unchanged, since γ s (e^{ℓ_in} x − e^{ℓ_in} μ) e^{ℓ_out − ℓ_in} + e^{ℓ_out} β
    = e^{ℓ_out} (γ s (x − μ) + β); its folded network then transforms by the same group."""
    group = group or rescaling_group(network)
    e = np.append(np.asarray(ell, dtype=np.float64), 0.0)  # index −1: a fixed class
    params: dict[str, np.ndarray] = {}

    def put(name, value):
        if name in params and not np.array_equal(params[name], value):
            raise MinsharpError(f'initializer "{name}" is used by two layers that rescale '
                                "differently")
        params[name] = value

    for p, layer in enumerate(network.param_layers):
        lin, lout = e[group.layer_in[p]], e[group.layer_out[p]]
        put(layer.weight_name, layer.weight * math.exp(lout - lin))
        if layer.bias is not None:
            put(layer.bias_name, layer.bias * math.exp(lout))
        if isinstance(layer, BatchNorm) and layer.mean_name:  # none: a diagonal layer
            put(layer.mean_name, layer.mean * math.exp(lin))
    return params


def _out_axis(layer) -> int:
    """Axis of the stored weight that indexes output units."""
    return 1 if isinstance(layer, Dense) and layer.weight_transposed else 0


def _in_axis(layer) -> int:
    return 0 if isinstance(layer, Dense) and layer.weight_transposed else 1


def _channel_routing(network: Network, start: int, stop: int) -> np.ndarray:
    """For the fixed layers between parameterised layers at positions start and stop: the
    output channel of layer ``start`` that feeds each input element of layer ``stop``
    (−1 where none does, e.g. padding). Found by pushing one indicator per channel through
    the fixed layers."""
    shapes = network.layer_shapes()
    out_shape, in_shape = shapes[start + 1], shapes[stop]
    channels = out_shape[0]
    x = np.zeros((channels,) + out_shape)
    x[np.arange(channels), np.arange(channels)] = 1.0
    for layer in network.layers[start + 1:stop]:
        x = layer.forward(x)
    reached = x.reshape(channels, -1) > 0
    if np.any(reached.sum(axis=0) > 1):
        raise MinsharpError("the operations between two layers mix channels; neuron-wise "
                            "rescaling is not function-preserving here")
    owner = np.where(reached.any(axis=0), reached.argmax(axis=0), -1)
    return owner.reshape(in_shape)


def neuron_parameters(network: Network, rng: np.random.Generator,
                      spread: float) -> dict[str, np.ndarray]:
    """Neuron-wise rescaling (docs/method.md section 12) with random γ_{d,i}, log-uniform over ``spread`` decades, for every
    hidden unit (channel) of every parameterised layer but the last."""
    positions = [i for i, l in enumerate(network.layers) if is_parameterised(l)]
    params = {}
    incoming = {}  # layer position → scale per input element of that layer
    for k, pos in enumerate(positions):
        layer = network.layers[pos]
        weight = layer.weight.copy()
        if pos in incoming:
            scale = incoming[pos]
            if isinstance(layer, Dense):
                shape = [1, 1]
                shape[_in_axis(layer)] = -1
                weight = weight * scale.reshape(shape)
            else:  # conv: input channel c of group g is column c − g·C_in/groups
                per_channel = scale.reshape(scale.shape[0], -1)
                if not np.all(per_channel == per_channel[:, :1]):
                    raise MinsharpError("a conv input channel is fed by several units")
                col = per_channel[:, 0]
                cg = weight.shape[1]
                group_of_out = np.arange(weight.shape[0]) // (weight.shape[0] // layer.groups)
                idx = group_of_out[:, None] * cg + np.arange(cg)[None, :]
                weight = weight * col[idx][:, :, None, None]
        if k < len(positions) - 1:
            units = layer.out_features if isinstance(layer, Dense) else layer.out_channels
            gamma = 10.0 ** rng.uniform(-spread / 2, spread / 2, size=units)
            shape = [1] * weight.ndim
            shape[_out_axis(layer)] = -1
            weight = weight * gamma.reshape(shape)
            if layer.bias is not None:
                params[layer.bias_name] = (layer.bias.reshape(-1) * gamma).reshape(layer.bias.shape)
            nxt = positions[k + 1]
            owner = _channel_routing(network, pos, nxt)
            inv = np.where(owner >= 0, 1.0 / gamma[np.maximum(owner, 0)], 1.0)
            incoming[nxt] = inv
        params[layer.weight_name] = weight
    return params


def apply_to_proto(proto: onnx.ModelProto, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Copy of the model with the named initializers (or Constant-node values) replaced,
    each keeping its name, dtype and position; nothing else changes, except that a
    parameter read through an Identity of another initializer (the legacy exporter's merged
    bit-identical initializers, scored as a tensor of its own) becomes an initializer of its
    own under the Identity's output name, and the Identity goes."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    done = set()
    for i, init in enumerate(model.graph.initializer):
        if init.name in params:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            new = numpy_helper.from_array(params[init.name].reshape(tuple(init.dims)).astype(dtype), init.name)
            model.graph.initializer[i].CopyFrom(new)
            done.add(init.name)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in params:
            for attr in node.attribute:
                if attr.name == "value":
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(attr.t.data_type)
                    attr.t.CopyFrom(numpy_helper.from_array(
                        params[node.output[0]].reshape(tuple(attr.t.dims)).astype(dtype), attr.t.name))
                    done.add(node.output[0])
    copies = {n.output[0]: n for n in model.graph.node
              if n.op_type == "Identity" and n.output[0] in params and n.output[0] not in done}
    for name, node in copies.items():  # a merged initializer's second use: its own tensor now
        source = next(t for t in model.graph.initializer if t.name == node.input[0])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(source.data_type)
        model.graph.initializer.append(numpy_helper.from_array(
            params[name].reshape(tuple(source.dims)).astype(dtype), name))
        model.graph.node.remove(node)
        done.add(name)
    missing = set(params) - done
    if missing:
        raise MinsharpError(f"cannot rescale parameters {sorted(missing)}: not initializers or Constant values")
    return model


def logits_agree(a: np.ndarray, b: np.ndarray, rtol: float) -> tuple[bool, float]:
    """|a − b| ≤ rtol · (1 + max |a|) elementwise; returns (agree, scaled max difference)."""
    diff = float(np.max(np.abs(a - b))) / (1.0 + float(np.max(np.abs(a))))
    return diff <= rtol, diff
