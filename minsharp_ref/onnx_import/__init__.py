"""ONNX → typed layer IR (``ir.Network``).

One converter per ONNX op type, registered in ``CONVERTERS``; nodes whose inputs are all
constants are folded (shape arithmetic such as Shape → Gather → Unsqueeze → Concat, the
batch dimension carried as a symbolic marker) with onnx's reference evaluator. The data path
runs from the single graph input to the logits: a chain, or a DAG whose branches join in Add,
Sum or Concat; whatever depends on the logits is the head (found structurally, ``head.py``),
stripped and reported, and it suggests the loss. Anything else is refused with one line that
names the node, its op type and the reason.

Layout: ``context.py`` (conversion state, the converter registry and shared checks), one
module per op family (``dense``, ``spatial``, ``activation``, ``shape``, ``elementwise``,
``merge``, ``normalisation``), ``head.py`` (the head), ``graph.py`` (the driver) and
``reader.py`` (safe file reading).
"""

from . import activation, dense, elementwise, merge, normalisation, shape, spatial  # noqa: F401
from .context import CONVERTERS, ImportedModel
from .graph import convert
from .reader import import_model

__all__ = ["CONVERTERS", "ImportedModel", "convert", "import_model"]
