"""The folded view's traces from the original network's signals (docs/method.md section 10).

The folded network computes the same function as the original, so the signal (the
back-propagated loss-Hessian factor) at every tensor the two share is the same. Its
parameterised layers are of three kinds, each measured from signals the original backward
pass already has:

* a layer no BatchNorm touches: the same tensors, the same traces (copied);
* a dense/conv layer with a BN folded into it, W' = diag(γ s) W: its output is the BN's
  output, so its signal is the one at the BN's output, and its input is the original
  layer's; measured when the original layer is visited (the BN comes just before it in
  reverse order, and nothing else reads the tensor between them);
* a BN that stays a per-channel diagonal layer (weight γ s, bias β − γ s μ): the signal at
  its output and its input, those of the original BN.

One backward pass instead of two (the folded network's own, ``per_sample_traces`` on
``folded_view``, is what the engine check and the tests compare with).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .engine import measure_into, signals_at_parameters, tensor_columns
from .ir import BatchNorm, Network


def traces_with_folded(network: Network, folded: Network, inputs: list[Optional[np.ndarray]],
                       logits: np.ndarray, dtype=np.float64, diagonal: bool = False):
    """Per-sample traces (N, columns of ``network``) and (N, columns of ``folded``), float64,
    in the order of ``tensor_columns``, and with ``diagonal`` the diagonal batch sums (as
    ``per_sample_traces``) of the original tensors and of the folded view's own tensors (named
    ``<weight> (folded)``, ``<β> (folded)``: the neuron-wise minimum sharpness needs them,
    docs/method.md section 13). ``network`` and ``folded`` in the signal dtype."""
    by_output = {layer.output_name: p for p, layer in enumerate(folded.param_layers)}
    folded_into: dict[str, int] = {}  # original dense/conv output → the folded layer it became
    for layer in network.param_layers:
        p = by_output.get(layer.output_name)
        if isinstance(layer, BatchNorm) and not isinstance(folded.param_layers[p], BatchNorm):
            folded_into[layer.input_name] = p
    original: list[np.ndarray] = []
    parts: list[Optional[tuple]] = [None] * len(folded.param_layers)
    waiting: dict[int, np.ndarray] = {}  # folded layer → the signal at its output
    diagonals: dict[str, np.ndarray] = {}
    store = diagonals if diagonal else None
    for _, layer, g, a in signals_at_parameters(network, inputs, logits, dtype):
        t_w, t_b = measure_into(layer, g, a, diagonals if diagonal else None)
        original.extend([t_b, t_w] if t_b is not None else [t_w])  # reversed below
        if layer.output_name in folded_into:  # W of a folded pair: the BN's output signal
            p = folded_into[layer.output_name]
            parts[p] = measure_into(folded.param_layers[p], waiting.pop(p), a, store)
        elif isinstance(layer, BatchNorm):
            p = by_output[layer.output_name]
            if isinstance(folded.param_layers[p], BatchNorm):  # stays: a diagonal layer
                parts[p] = measure_into(folded.param_layers[p], g, a, store)
            else:
                waiting[p] = g
        else:
            parts[by_output[layer.output_name]] = (t_w, t_b)
    traces = np.stack(original[::-1], axis=1).astype(np.float64)
    columns = [parts[p][0 if which == "weight" else 1] for p, which, _ in tensor_columns(folded)]
    return traces, np.stack(columns, axis=1).astype(np.float64), (diagonals if diagonal else None)
