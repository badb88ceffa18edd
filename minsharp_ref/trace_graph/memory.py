"""How much memory one sample of a trace-graph batch needs (for --memory-budget)."""

from __future__ import annotations

import numpy as np

from ..engine import conv_measure_elements, first_param_index, signal_rows
from ..ir import AvgPool2d, Conv2d, MaxPool2d, Network


def graph_bytes_per_sample(network: Network, itemsize: int = 4) -> int:
    """Rough peak bytes per sample of the trace graph at ``itemsize`` bytes per element:
    every forward activation (the graph keeps them for the backward rules), plus at the
    largest layer the signals on both sides and the temporaries of its rules (the conv's
    columns Wᵀg and im2col, its trace product or Gram matrices, the pooling columns),
    with a margin of 1.5 for onnxruntime's buffers that are not reused in place."""
    k = signal_rows(network)
    shapes, in_shapes = network.layer_shapes(), network.input_shapes()
    stored = itemsize * sum(int(np.prod(s)) for s in shapes)
    peak = 0
    for i in range(first_param_index(network), len(network.layers)):
        layer, a, z = network.layers[i], int(np.prod(in_shapes[i])), int(np.prod(shapes[i + 1]))
        need = 2 * k * (a + z)
        if not network.is_chain:  # signals waiting at branch points: about one more layer's
            need += k * z
        if isinstance(layer, Conv2d):  # the columns Wᵀg (K of them), im2col, the product
            columns, product = conv_measure_elements(layer, in_shapes[i], k)
            need += (k + 1) * columns + product
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            kh, kw = layer.geometry.kernel
            need += (k + 1) * kh * kw * z  # columns and the arg-max mask
        peak = max(peak, need * itemsize)
    return 3 * (stored + peak) // 2
