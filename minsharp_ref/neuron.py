"""Neuron-wise minimum sharpness (docs/method.md section 13).

Every hidden unit (a dense layer's output unit, a conv layer's or a kept BatchNorm's output
channel) carries a log-scale s; the network's input and logits have s = 0. A parameterised
layer's weight entry from input unit j to output unit i is multiplied by e^{s_i − s_j}, its
bias i by e^{s_i}; the function does not change, because the fixed layers between
parameterised layers (ReLU, LeakyReLU, pooling, Pad, Reshape, Flatten, Transpose) commute
with a positive per-channel scale, provided the channels summed by an Add share one scale
and the elements of one pooling window too (union-find over units, ``unit_map``). Each
diagonal Hessian entry transforms as H_pp → H_pp e^{−2(s_out(p) − s_in(p))}, so

    neuron-wise MS = inf_s Σ_p H_pp e^{−2(s_out(p) − s_in(p))}
                   = inf_s Σ_t c_t e^{−2(s_out(t) − s_in(t))},

where c_t sums the diagonal over the entries of one tensor that join the same (out unit, in
unit) pair (a conv's kernel positions, a flattened channel's positions: ``neuron_terms``).
The problem is convex; its Hessian is a weighted graph Laplacian on the units, solved by the
one Newton solver of ``sharpness.minimise_exponential_sum`` with sparse steps
(``neuron_sharpness``). With BatchNorm it is taken on the folded view, as MS is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

from .engine import tensor_columns
from .errors import MinsharpError
from .ir import (Add, AvgPool2d, BatchNorm, Concat, Conv2d, Dense, InputAffine, LeakyRelu,
                 MaxPool2d, Network, Pad2d, Relu, Reshape, Slice, Transpose, is_parameterised)
from .sharpness import minimise_exponential_sum
from .windows import pad_input, windows

FIXED = -1  # the unit index of the input's and the logits' elements (s = 0)


# ------------------------------------------------------------------------------ the units


@dataclass(frozen=True)
class Units:
    """The neuron-wise group of a network. Per parameterised layer p: ``layer_in[p]`` the
    unit of each input column (dense: each input element; conv, BatchNorm: each input
    channel) and ``layer_out[p]`` the unit of each output unit (channel), FIXED for the
    input's and the logits' classes; ``names[u]``: ``tensor[channel]`` of a member of unit u
    (the first one created)."""

    names: tuple[str, ...]
    layer_in: tuple[np.ndarray, ...]
    layer_out: tuple[np.ndarray, ...]

    @property
    def size(self) -> int:
        return len(self.names)


class _UnionFind:
    """Raw unit ids 0 (the fixed class), 1, 2, … with names; ``tie`` merges classes."""

    def __init__(self):
        self.parent = [0]
        self.names = ["(fixed)"]

    def new(self, tensor: str, count: int) -> np.ndarray:
        first = len(self.parent)
        self.parent.extend(range(first, first + count))
        self.names.extend(f"{tensor}[{c}]" for c in range(count))
        return np.arange(first, first + count)

    def find(self, v: int) -> int:
        parent = self.parent
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie a[i] with b[i] for every i where both are units (≥ 0)."""
        a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
        ok = (a >= 0) & (b >= 0) & (a != b)
        for x, y in np.unique(np.stack([a[ok], b[ok]], axis=1), axis=0):
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:  # the smaller id (created first, or the fixed class) is the root
                self.parent[max(rx, ry)] = min(rx, ry)


def _per_channel(uf: _UnionFind, ids: np.ndarray) -> np.ndarray:
    """One unit per channel (axis 0) of a tensor read by a conv or BatchNorm: the elements
    of a channel (padding, −2, aside) are tied together."""
    flat = ids.reshape(ids.shape[0], -1)
    out = np.zeros(flat.shape[0], dtype=np.int64)
    for c, row in enumerate(flat):
        valid = row[row >= 0]
        out[c] = valid[0] if valid.size else 0
        uf.tie(np.full(valid.shape, out[c]), valid)
    return out


def _pooled(uf: _UnionFind, layer, ids: np.ndarray) -> np.ndarray:
    """A pool's output ids; the elements of one window are tied (padding ignored)."""
    g = layer.geometry
    out_hw = g.output_hw(ids.shape[1:])
    cols = windows(pad_input(ids[None].astype(np.float64), g, -2.0), g, out_hw)[0]
    c, kh, kw, ho, wo = cols.shape
    cols = cols.reshape(c, kh * kw, ho, wo).astype(np.int64)
    rep = cols.max(axis=1)  # any valid member of each window
    uf.tie(np.broadcast_to(rep[:, None], cols.shape), cols)
    return rep


def unit_map(network: Network) -> Units:
    """Propagate element-wise unit ids through the network (docs/method.md section 13):
    fixed layers map elements to elements, Add ties its inputs element-wise, pools tie each
    window, a conv or BatchNorm ties each input channel, a parameterised layer creates one
    unit per output unit (channel); the logits are tied to the fixed class."""
    uf = _UnionFind()
    ids = {network.input_name: np.zeros(network.input_shape, dtype=np.int64)}
    raw_in, raw_out = [], []
    for layer in network.layers:
        x = ids[layer.input_name]
        if is_parameterised(layer):
            if isinstance(layer, Dense):
                col = np.where(x.reshape(-1) >= 0, x.reshape(-1), 0)  # padding: always 0
                out = uf.new(layer.output_name, layer.out_features)
                y = out
            else:
                col = _per_channel(uf, x)
                count = layer.out_channels if isinstance(layer, Conv2d) else x.shape[0]
                out = uf.new(layer.output_name, count)
                shape = layer.output_shape(x.shape)
                y = np.broadcast_to(out.reshape((-1,) + (1,) * (len(shape) - 1)), shape).copy()
            raw_in.append(col)
            raw_out.append(out)
        elif isinstance(layer, Add):
            others = [ids[n] for n in layer.other_inputs]
            for o in others:
                uf.tie(x, o)
            y = x.copy()
            for o in others:
                y = np.where(y >= 0, y, o)
        elif isinstance(layer, Concat):
            y = np.concatenate([ids[n] for n in layer.inputs], axis=0)
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            y = _pooled(uf, layer, x)
        elif isinstance(layer, Pad2d):
            t, l, b, r = layer.pads
            y = np.pad(x, ((0, 0), (t, b), (l, r)), constant_values=-2)
        elif isinstance(layer, Reshape):
            y = x.reshape(layer.shape)
        elif isinstance(layer, Transpose):
            y = x.transpose(layer.perm)
        elif isinstance(layer, Slice):  # a selection of channels keeps their units
            y = x[layer.index(lead=0)]
        elif isinstance(layer, (InputAffine, Relu, LeakyRelu)):  # element-wise
            y = x
        else:
            raise MinsharpError(f"neuron-wise units: no rule for {type(layer).__name__} "
                                f"(node {layer.nodes[0] if layer.nodes else '?'})")
        ids[layer.output_name] = y
    logits = ids[network.logits_name]
    uf.tie(np.zeros_like(logits), logits)
    roots = [uf.find(v) for v in range(len(uf.parent))]
    index: dict[int, int] = {0: FIXED}
    for r in roots:
        if r not in index:
            index[r] = len(index) - 1
    final = np.array([index[r] for r in roots], dtype=np.int64)
    names = [""] * (len(index) - 1)
    for v in range(len(uf.parent) - 1, 0, -1):  # the first created member names the unit
        if final[v] >= 0:
            names[final[v]] = uf.names[v]
    return Units(tuple(names), tuple(final[a] for a in raw_in), tuple(final[a] for a in raw_out))


# ------------------------------------------------------------------------------ the terms


@dataclass(frozen=True)
class Terms:
    """F(s) = Σ_t coef_t e^{−2(s[out_t] − s[in_t])} (s[FIXED] = 0); ``tensor_t``: the index
    into ``tensors`` (the parameter tensors, ``engine.tensor_columns`` order)."""

    out: np.ndarray
    inp: np.ndarray
    coef: np.ndarray
    tensor: np.ndarray
    tensors: tuple[str, ...]


def weight_matrix(layer, stored: np.ndarray) -> np.ndarray:
    """A weight-shaped array (the diagonal) as (outputs, input columns): a conv's kernel
    positions summed, its groups expanded to all input channels (zeros elsewhere)."""
    if isinstance(layer, Dense):
        return stored.T if layer.weight_transposed else stored
    cout, cg = stored.shape[:2]
    per_pair = stored.reshape(cout, cg, -1).sum(axis=2)
    if layer.groups == 1:
        return per_pair
    full = np.zeros((cout, cg * layer.groups))
    per_group = cout // layer.groups
    for g in range(layer.groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        full[rows, g * cg:(g + 1) * cg] = per_pair[rows]
    return full


def _pair_sums(h: np.ndarray, out_units: np.ndarray, in_units: np.ndarray):
    """Σ h[i, j] over the entries of each (out unit, in unit) pair: (out, in, sum), sum > 0."""
    uo, io = np.unique(out_units, return_inverse=True)
    ui, ii = np.unique(in_units, return_inverse=True)
    s_in = sparse.csr_matrix((np.ones(ii.size), (np.arange(ii.size), ii)), shape=(ii.size, ui.size))
    s_out = sparse.csr_matrix((np.ones(io.size), (io, np.arange(io.size))), shape=(uo.size, io.size))
    agg = np.asarray(s_out @ np.asarray(s_in.T @ np.asarray(h, np.float64).T).T)
    r, c = np.nonzero(agg > 0)
    return uo[r], ui[c], agg[r, c]


def neuron_terms(network: Network, units: Units, diagonal: dict) -> Terms:
    """The terms of F from the exact diagonal (initializer name → diag H), per tensor."""
    outs, ins, coefs, tensors = [], [], [], []
    names = tuple(name for _, _, name in tensor_columns(network))
    column = {name: k for k, name in enumerate(names)}
    for p, layer in enumerate(network.param_layers):
        lo, li = units.layer_out[p], units.layer_in[p]
        d = np.asarray(diagonal[layer.weight_name], np.float64)
        if isinstance(layer, BatchNorm):
            o, i, c = _pair_sums(np.diag(d.reshape(-1)), lo, li)
        else:
            o, i, c = _pair_sums(weight_matrix(layer, d), lo, li)
        parts = [(o, i, c, column[layer.weight_name])]
        if layer.bias is not None:
            db = np.asarray(diagonal[layer.bias_name], np.float64).reshape(-1)
            o, i, c = _pair_sums(db[:, None], lo, np.array([FIXED]))
            parts.append((o, i, c, column[layer.bias_name]))
        for o, i, c, k in parts:
            outs.append(o), ins.append(i), coefs.append(c), tensors.append(np.full(c.size, k))
    cat = np.concatenate
    return Terms(cat(outs).astype(np.int64), cat(ins).astype(np.int64), cat(coefs),
                 cat(tensors).astype(np.int64), names)


# ----------------------------------------------------------------------------- the solver


@dataclass(frozen=True)
class NeuronSharpness:
    value: float
    log_scale: np.ndarray  # s* per unit (0 where the optimum leaves a unit free)
    attained: bool  # False: some terms only vanish in the limit (dropped)
    units: int
    free_units: int  # units outside the class of the input and logits' strong component
    dropped_terms: int
    traces: tuple[float, ...]  # per tensor at s*, summing to value
    iterations: int
    gradient_norm: float
    converged: bool
    seconds: float
    variables: int


def neuron_sharpness(terms: Terms, size: int, start: Optional[np.ndarray] = None) -> NeuronSharpness:
    """inf_s Σ_t c_t e^{−2(s[out_t] − s[in_t])} over ``size`` unit log-scales
    (docs/method.md section 13).

    A term is an edge in → out of a directed graph on the units and one fixed node; moving s
    along a potential that increases along every edge between strongly connected components
    drives those terms to 0 and leaves the others, so they are dropped (the infimum is then
    not attained) and each component is solved on its own: the fixed node's with s = 0,
    every other one with its first unit pinned to 0 (F is constant along a common shift).
    What remains has a positive definite Hessian (a grounded weighted Laplacian), so the
    Newton steps of ``minimise_exponential_sum`` are sparse solves. ``start``: s per unit
    (e.g. the layer-wise optimum), else 0."""
    t0 = time.perf_counter()
    node = lambda u: np.where(u < 0, size, u)  # noqa: E731  the fixed node is ``size``
    out, inp = node(terms.out), node(terms.inp)
    graph = sparse.csr_matrix((np.ones(out.size), (inp, out)), shape=(size + 1, size + 1))
    _, comp = connected_components(graph, directed=True, connection="strong")
    keep = comp[out] == comp[inp]
    _, first = np.unique(comp, return_index=True)  # the first node of each component
    first[comp[size]] = size  # the fixed node's component: s = 0 there
    pinned = np.zeros(size + 1, bool)
    pinned[first] = True
    anchor_of = first[comp]  # each node's pinned node
    live = keep & (out != inp)
    in_play = np.zeros(size + 1, bool)
    in_play[out[live]] = in_play[inp[live]] = True
    var_of = np.full(size + 1, -1)
    variables = np.flatnonzero(in_play & ~pinned)
    var_of[variables] = np.arange(variables.size)
    s0 = np.zeros(size + 1) if start is None else np.append(np.asarray(start, np.float64), 0.0)
    x0 = (s0 - s0[anchor_of])[variables]
    vo, vi = var_of[out[live]], var_of[inp[live]]
    k = np.arange(vo.size)
    rows = sparse.csr_matrix(
        (np.concatenate([np.full(np.sum(vo >= 0), -2.0), np.full(np.sum(vi >= 0), 2.0)]),
         (np.concatenate([k[vo >= 0], k[vi >= 0]]), np.concatenate([vo[vo >= 0], vi[vi >= 0]]))),
        shape=(vo.size, variables.size))
    coefs = terms.coef[live]
    with threadpool_limits(1, user_api="blas"):  # small factorisations: threads only contend
        x, rel, iters, converged = minimise_exponential_sum(rows, coefs, x0)
    s = np.zeros(size + 1)
    s[variables] = x
    s[size] = 0.0
    at = np.where(keep, terms.coef * np.exp(-2.0 * (s[out] - s[inp])), 0.0)
    traces = np.bincount(terms.tensor, weights=at, minlength=len(terms.tensors))
    return NeuronSharpness(float(at.sum()), s[:size], not np.any(~keep), size,
                           int(np.sum(comp[:size] != comp[size])), int(np.sum(~keep)),
                           tuple(float(v) for v in traces), iters, rel, converged,
                           time.perf_counter() - t0, int(variables.size))


def layer_start(network: Network, units: Units, ell_by_tensor: dict) -> np.ndarray:
    """s per unit from a layer-wise optimum: each unit takes ℓ* of its layer's output tensor
    (``ell_by_tensor``: output tensor name → ℓ*, absent for fixed classes)."""
    s = np.zeros(units.size)
    for layer, out in zip(network.param_layers, units.layer_out):
        value = ell_by_tensor.get(layer.output_name, 0.0)
        s[out[out >= 0]] = value
    return s


def unit_parameters(network: Network, units: Units, s: np.ndarray) -> dict[str, np.ndarray]:
    """The stored initializers rescaled by s (docs/method.md section 13): weight (i, j) ×
    e^{s_i − s_j}, bias i × e^{s_i}; a BatchNorm exactly (section 10): γ × e^{s_out − s_in},
    β × e^{s_out}, μ × e^{s_in} per channel."""
    e = np.append(np.asarray(s, np.float64), 0.0)  # index −1: fixed
    params: dict[str, np.ndarray] = {}
    for p, layer in enumerate(network.param_layers):
        so, si = e[units.layer_out[p]], e[units.layer_in[p]]
        if isinstance(layer, BatchNorm):
            params[layer.weight_name] = layer.weight * np.exp(so - si)
            if layer.mean_name:
                params[layer.mean_name] = layer.mean * np.exp(si)
        elif isinstance(layer, Dense):
            factor = np.exp(so[:, None] - si[None, :])
            params[layer.weight_name] = layer.weight * (factor.T if layer.weight_transposed else factor)
        else:
            cout, cg = layer.weight.shape[:2]
            col = (np.arange(cout) // (cout // layer.groups))[:, None] * cg + np.arange(cg)[None, :]
            params[layer.weight_name] = layer.weight * np.exp(so[:, None] - si[col])[:, :, None, None]
        if layer.bias is not None:
            params[layer.bias_name] = (layer.bias.reshape(-1) * np.exp(so)).reshape(layer.bias.shape)
    return params


def folded_units_to_original(network: Network, folded: Network, units: Units,
                             folded_units: Units, s_folded: np.ndarray) -> np.ndarray:
    """s per unit of ``network`` from s per unit of its folded view: a unit created at a
    tensor the folded view also writes takes its value there; the tensors between a conv
    and the BatchNorm folded into it keep s = 0 (docs/method.md section 13)."""
    by_tensor = {l.output_name: folded_units.layer_out[p] for p, l in enumerate(folded.param_layers)}
    e = np.append(np.asarray(s_folded, np.float64), 0.0)
    s = np.zeros(units.size)
    for p, layer in enumerate(network.param_layers):
        there = by_tensor.get(layer.output_name)
        out = units.layer_out[p]
        if there is not None:
            s[out[out >= 0]] = e[there][out >= 0]
    return s


def describe(ns: NeuronSharpness) -> dict:
    """The solver's record for the JSON report."""
    return {"method": "newton-sparse" if ns.attained else "not-attained",
            "iterations": ns.iterations, "gradient_norm": ns.gradient_norm,
            "converged": ns.converged, "variables": ns.variables,
            "dropped_terms": ns.dropped_terms, "seconds": ns.seconds}
