"""``export-trace-graph``: the trace graph as a checked, self-contained ONNX file."""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import MinsharpError, first_line
from ..ir import Network
from . import build_trace_graph

DTYPES = {"float32": np.float32, "float64": np.float64}


def trace_graph_bytes(network: Network, precision: str = "float32", diagonal: bool = False) -> bytes:
    """The serialized trace graph, after onnx.checker's full check (shapes and types
    inferred through every node)."""
    if precision not in DTYPES:
        raise MinsharpError(f"--precision must be float64 or float32, not {precision!r}")
    model = build_trace_graph(network, DTYPES[precision], diagonal)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # a bug here, not the user's input: still one line
        raise MinsharpError(f"the trace graph fails onnx.checker: {first_line(exc)}") from None
    return model.SerializeToString()
