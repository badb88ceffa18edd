"""The rescaling group of a DAG and minimum sharpness over it (docs/method.md sections 9, 10).

Every tensor v carries a log-scale ℓ_v; ℓ = 0 on the network input and on the logits. The
fixed positively homogeneous layers (ReLU, pooling, Pad, Reshape, Transpose, Slice: a channel
selection or permutation ties the classes it maps) and the layers that join branches (Add,
Concat) need one common ℓ on all their inputs and their output, so
the tensors fall into classes (union-find); each class other than the input's and the
logits' is a free variable. A parameterised layer from tensor ``in`` to ``out`` transforms as
W → e^{ℓ_out − ℓ_in} W, b → e^{ℓ_out} b, its traces as t → t e^{−2(ℓ_out − ℓ_in)},
u → u e^{−2 ℓ_out}, and

    MS = inf_ℓ Σ_layers [ t e^{−2(ℓ_out − ℓ_in)} + u e^{−2 ℓ_out} ],

a sum of exponentials of linear functions of ℓ: convex, minimised by damped Newton steps.
A chain is the special case ℓ_d = log c_d (docs/method.md section 3), solved by
``sharpness.minimum_sharpness`` (closed form without biases).

BatchNorm (section 10): minimum sharpness is defined on the folded network (``folded_view``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .ir import BatchNorm, Conv2d, Dense, InputAffine, Network, is_parameterised
from .sharpness import exponent_terms, minimise_exponential_sum, minimum_sharpness


# ----------------------------------------------------------------------------- the group


@dataclass(frozen=True)
class Group:
    """Classes of tensors tied by the fixed layers. ``layer_in[p]``/``layer_out[p]``: the
    free-class index (−1 for a fixed class, ℓ = 0) of parameterised layer p's input and
    output tensors; ``names[j]``: a tensor of free class j (the first one written)."""

    layer_in: tuple[int, ...]
    layer_out: tuple[int, ...]
    names: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def is_chain(self) -> bool:
        """Layer d reads free class d − 1 and writes free class d (the last: the logits)."""
        d = len(self.layer_in)
        return (self.size == d - 1
                and self.layer_in == (-1,) + tuple(range(d - 1))
                and self.layer_out == tuple(range(d - 1)) + (-1,))


def rescaling_group(network: Network) -> Group:
    """Union-find over the tensors (docs/method.md section 9)."""
    parent: dict[str, str] = {}

    def find(v: str) -> str:
        parent.setdefault(v, v)
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    find(network.input_name)
    for layer in network.layers:
        find(layer.output_name)
        if is_parameterised(layer):
            continue
        for name in layer.inputs:  # fixed layer: input(s) and output share ℓ
            union(name, layer.output_name)
        if isinstance(layer, InputAffine):  # not homogeneous: pinned to the input's ℓ = 0
            union(layer.output_name, network.input_name)
    fixed = {find(network.input_name), find(network.logits_name)}
    order = [network.input_name] + [l.output_name for l in network.layers]
    index: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for name in order:
        root = find(name)
        if root in fixed:
            continue
        if root not in index:
            index[root] = len(index)
            members[root] = []
        members[root].append(name)

    def cls(name: str) -> int:
        return index.get(find(name), -1)

    params = network.param_layers
    roots = sorted(index, key=index.get)
    return Group(tuple(cls(l.input_name) for l in params), tuple(cls(l.output_name) for l in params),
                 tuple(members[r][0] for r in roots), tuple(tuple(members[r]) for r in roots))


# ---------------------------------------------------------------------------- the solver


@dataclass(frozen=True)
class GroupSharpness:
    value: float
    log_scale: Optional[tuple[float, ...]]  # ℓ* per free class; None when not attained
    method: str  # "closed-form", "newton", "dead-layer"
    gradient_norm: float
    iterations: int
    dead_layers: tuple[int, ...] = ()
    converged: bool = True

    def layer_scales(self, group: Group) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(α_p = e^{ℓ_out − ℓ_in}, c_p = e^{ℓ_out}) per parameterised layer at ℓ*."""
        if self.log_scale is None:
            return None
        ell = np.append(np.asarray(self.log_scale), 0.0)  # index −1: a fixed class
        lin, lout = ell[list(group.layer_in)], ell[list(group.layer_out)]
        return np.exp(lout - lin), np.exp(lout)


def group_sharpness(group: Group, t, u, chain_formula: bool = True) -> GroupSharpness:
    """inf_ℓ Σ_p t_p e^{−2(ℓ_out − ℓ_in)} + u_p e^{−2 ℓ_out} (docs/method.md section 9).

    A chain is handed to ``sharpness.minimum_sharpness`` (the same numbers as before, the
    closed form without biases), with ℓ_d = log c_d. Otherwise damped Newton from ℓ = 0. A
    layer with t_p = 0 (dead) makes the infimum unattained in general: reported as
    "dead-layer" with the infimum the iteration converges to and no ℓ*. ``chain_formula=False``
    solves a chain by the general iteration too (for tests)."""
    t = np.asarray(t, dtype=np.float64)
    u = np.nan_to_num(np.asarray(u, dtype=np.float64))
    if np.any(~np.isfinite(t)) or np.any(t < 0) or np.any(u < 0) or np.any(~np.isfinite(u)):
        raise ValueError("traces must be finite and non-negative")
    if group.is_chain and chain_formula:
        ms = minimum_sharpness(t, u)
        ell = None if ms.alpha is None else tuple(np.cumsum(np.log(ms.alpha))[:-1].tolist())
        return GroupSharpness(ms.value, ell, ms.method, ms.gradient_norm, ms.iterations,
                              ms.dead_layers, ms.converged)
    dead = tuple(int(i) for i in np.flatnonzero(t == 0))
    rows, coefs = exponent_terms(group.layer_in, group.layer_out, t, u, group.size)
    if group.size == 0 or coefs.size == 0:
        return GroupSharpness(float(coefs.sum()), () if not dead else None,
                              "dead-layer" if dead else "newton", 0.0, 0, dead)
    ell, rel, iters, converged = minimise_exponential_sum(rows, coefs, np.zeros(group.size))
    value = float(np.sum(coefs * np.exp(rows @ ell)))
    if dead:
        return GroupSharpness(value, None, "dead-layer", rel, iters, dead, converged)
    return GroupSharpness(value, tuple(ell.tolist()), "newton", rel, iters, (), converged)


# ------------------------------------------------------------------ BatchNorm, folded


def _fold_into(layer, bn: BatchNorm):
    """W' = diag(γ s) W, b' = γ s (b − μ) + β (docs/method.md section 10), in the layer's
    stored layout (Gemm's alpha/beta absorbed)."""
    m = bn.multiplier
    if isinstance(layer, Conv2d):
        weight = layer.weight_coef * layer.weight * m.reshape(-1, 1, 1, 1)
    else:
        weight = layer.matrix * m[:, None]  # (out, in)
    b = np.zeros(m.size) if layer.effective_bias is None else layer.effective_bias.reshape(-1)
    bias = m * (b - bn.mean) + bn.bias
    changes = dict(weight=weight, bias=bias, weight_name=f"{layer.weight_name} (folded)",
                   bias_name=f"{bn.bias_name} (folded)", weight_coef=1.0, bias_coef=1.0,
                   output_name=bn.output_name, nodes=layer.nodes + bn.nodes)
    if isinstance(layer, Dense):
        changes["weight_transposed"] = False
    return dataclasses.replace(layer, **changes)


def folded_view(network: Network) -> Optional[Network]:
    """The network with every BatchNorm folded into the dense/conv layer that writes its
    input (when nothing else reads that tensor); a BN that follows no such layer becomes the
    diagonal layer y = (γ s) x + (β − γ s μ). None when the network has no BatchNorm."""
    if not network.has_batchnorm:
        return None
    readers: dict[str, int] = {}
    for layer in network.layers:
        for name in layer.inputs:
            readers[name] = readers.get(name, 0) + 1
    layers = list(network.layers)
    out = []
    for layer in layers:
        if not isinstance(layer, BatchNorm):
            out.append(layer)
            continue
        prev = next((k for k in range(len(out) - 1, -1, -1)
                     if out[k].output_name == layer.input_name), None)
        if (prev is not None and isinstance(out[prev], (Dense, Conv2d))
                and readers.get(layer.input_name, 0) == 1):
            out[prev] = _fold_into(out[prev], layer)
            continue
        m = layer.multiplier
        out.append(dataclasses.replace(
            layer, weight=m, bias=layer.bias - m * layer.mean, mean=np.zeros_like(m),
            var=np.ones_like(m), epsilon=0.0, weight_name=f"{layer.weight_name} (folded)",
            bias_name=f"{layer.bias_name} (folded)"))
    return dataclasses.replace(network, layers=tuple(out))


def folded_inputs(network: Network, folded: Network, inputs: list) -> list:
    """The engine inputs of ``folded`` from those of ``network`` (matched by tensor name)."""
    values = {l.input_name: a for l, a in zip(network.layers, inputs) if a is not None}
    return [values.get(l.input_name) for l in folded.layers]


def log_scale_names(group: Group, ms: GroupSharpness) -> list[dict]:
    """α* = e^{ℓ*} per free class, each named by a tensor in it."""
    return [{"tensor": name, "tensors": len(members),
             "alpha": None if ms.log_scale is None else math.exp(ms.log_scale[j])}
            for j, (name, members) in enumerate(zip(group.names, group.members))]
