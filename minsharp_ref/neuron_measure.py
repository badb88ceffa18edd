"""Neuron-wise minimum sharpness as a measure of ``score --measures`` and as the target of
``rescale --to-neuron-minimum`` (docs/method.md section 13).

The solve (``neuron.neuron_sharpness``) starts from the layer-wise optimum (section 9), so the
value never exceeds MS. Its standard error: by the envelope theorem (∂ value/∂c_t =
e^{−2(s*_out − s*_in)} at the optimum), it is the standard error of the per-sample traces of
the network rescaled to s*; those need the per-sample diagonal at every (out, in) pair,
which is not kept (n × terms floats), so a second pass over the data scores the rescaled
network (its per-sample naive trace, without the diagonal) with the same engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .engine import tensor_columns
from .errors import MinsharpError
from .group import folded_view, group_sharpness, rescaling_group
from .ir import Network
from .neuron import (NeuronSharpness, Units, describe, folded_units_to_original, layer_start,
                     neuron_sharpness, neuron_terms, unit_map, unit_parameters)
from .onnx_import import ImportedModel
from .options import RunOptions
from .rescale import apply_to_proto


@dataclass(frozen=True)
class NeuronOptimum:
    """The solve on the scored parametrisation (the folded view with BatchNorm) and the
    initializers of the original network at s*."""

    result: NeuronSharpness
    scored: Network
    units: Units
    params: dict


def _layer_start(scored: Network, units: Units, diagonal: dict) -> Optional[np.ndarray]:
    """s per unit at the layer-wise optimum (None when MS is not attained)."""
    d = len(scored.param_layers)
    t, u = np.zeros(d), np.zeros(d)
    for p, layer in enumerate(scored.param_layers):
        t[p] = float(np.sum(diagonal[layer.weight_name]))
        if layer.bias is not None:
            u[p] = float(np.sum(diagonal[layer.bias_name]))
    group = rescaling_group(scored)
    ms = group_sharpness(group, t, u)
    if ms.log_scale is None:
        return None
    ell = {m: ms.log_scale[j] for j, members in enumerate(group.members) for m in members}
    return layer_start(scored, units, ell)


def neuron_optimum(network: Network, diagonal: dict) -> NeuronOptimum:
    """Solve the neuron-wise problem from the exact diagonal (initializer name → mean diag H,
    with the folded view's own tensors for a BatchNorm network) and rescale ``network``'s
    initializers to s* (BatchNorm exactly, the conv-BN tensors at s = 0)."""
    folded = folded_view(network)
    scored = folded or network
    units = unit_map(scored)
    missing = [l.weight_name for l in scored.param_layers if l.weight_name not in diagonal]
    if missing:
        raise MinsharpError(f"no Hessian diagonal for {missing[0]!r}: the neuron-wise minimum "
                            "sharpness needs the engine's diagonal of every tensor")
    terms = neuron_terms(scored, units, diagonal)
    result = neuron_sharpness(terms, units.size, _layer_start(scored, units, diagonal))
    if folded is None:
        params = unit_parameters(network, units, result.log_scale)
    else:
        original = unit_map(network)
        s = folded_units_to_original(network, folded, original, units, result.log_scale)
        params = unit_parameters(network, original, s)
    return NeuronOptimum(result, scored, units, params)


def rescaled_model(imported: ImportedModel, params: dict) -> ImportedModel:
    """The model with the given initializers (IR and proto)."""
    return ImportedModel(imported.path, "", apply_to_proto(imported.proto, params),
                         imported.network.with_parameters(params))


def neuron_minimum_sharpness(imported: ImportedModel, diagonal: dict,
                             rerun: Optional[Callable[[ImportedModel], object]] = None) -> dict:
    """``measures.neuron_minimum_sharpness`` of the JSON report (docs/json.md). ``rerun``
    scores a model on the same data and returns its ``TraceSums`` (the second pass for the
    standard error); without it, or when the infimum is not attained, ``stderr`` is null."""
    network = imported.network
    opt = neuron_optimum(network, diagonal)
    ns = opt.result
    stderr = second = None
    seconds = 0.0
    if rerun is not None and ns.attained:
        t0 = time.perf_counter()
        sums = rerun(rescaled_model(imported, opt.params))
        seconds = time.perf_counter() - t0
        offset = 0 if opt.scored is network else len(tensor_columns(network))
        weights = np.zeros(sums.columns)
        weights[offset:offset + len(tensor_columns(opt.scored))] = 1.0
        stderr = sums.stderr(weights)
        second = float(sums.mean @ weights)
    names = [name for _, _, name in tensor_columns(opt.scored)]
    return {
        "value": ns.value, "stderr": stderr, "units": ns.units, "free_units": ns.free_units,
        "attained": ns.attained,
        "solver": dict(describe(ns), second_pass_s=seconds, second_pass_trace=second),
        "traces": [{"tensor": n, "value": v} for n, v in zip(names, ns.traces)],
    }


def diagonal_over(imported: ImportedModel, data, *, prep, options: RunOptions,
                  split: str = "train", x_key: Optional[str] = None,
                  limit: Optional[int] = None) -> tuple[dict, int]:
    """The exact mean Hessian diagonal of every tensor (the folded view's too) over a data
    set, streamed in batches as ``score`` does with the run ``options`` (``rescale
    --to-neuron-minimum``). Returns (diagonal, samples)."""
    from .data import batches, check_finite, open_dataset
    from .scoring import batch_size_for, traces_over

    network = imported.network
    dataset = open_dataset(data, split, x_key, None, limit)
    try:
        check_finite(dataset)
        bs = batch_size_for(network, options.memory_budget, options.batch_size,
                            options.precision, options.engine, options.provider)
        run = traces_over(imported, batches(dataset, network.input_shape, prep, bs), None,
                          options.but(diagonal=True))
    finally:
        dataset.close()
    return run.diagonal, run.sums.n


def to_neuron_minimum(imported: ImportedModel, data, prep, **options) -> tuple[dict, str]:
    """``rescale --to-neuron-minimum``: the initializers at s* on ``data`` (``options``: those
    of ``diagonal_over``) and a description; refused when the infimum is not attained."""
    if data is None:
        raise MinsharpError("--to-neuron-minimum needs --data (the minimiser depends on the data)")
    diagonal, samples = diagonal_over(imported, data, prep=prep, **options)
    ns = neuron_optimum(imported.network, diagonal)
    result = ns.result
    if not result.attained:
        raise MinsharpError(f"the neuron-wise minimum sharpness {result.value:.8g} is an infimum, "
                            f"not attained: {result.dropped_terms} terms vanish only in the limit "
                            f"({result.free_units} free units); nothing written")
    return ns.params, (f"neuron-wise minimum sharpness {result.value:.12g} on {samples} samples "
                       f"of {data} ({result.units} units, {result.free_units} free; "
                       f"{result.iterations} Newton steps, relative gradient "
                       f"{result.gradient_norm:.2g}): the written model's naive trace on these "
                       "samples")
