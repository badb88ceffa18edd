"""What the emitters share while one trace graph is built: the builder, the graph value of
every IR tensor (keyed by IR tensor name), per-sample shapes, and the number of signals."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir import Conv2d, Dense, LayerBase
from .builder import GraphBuilder


@dataclass
class Context:
    b: GraphBuilder
    values: dict[str, str] = field(default_factory=dict)  # IR tensor → graph value (forward)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # IR tensor → per-sample shape
    routes: dict[str, str] = field(default_factory=dict)  # max-pool output → its Indices
    signals: int = 0  # R: signals per sample (rows of the loss-Hessian factor)
    derived: dict[str, str] = field(default_factory=dict)  # effective parameter tensors, made once
    # activation output → its (Leaky)ReLU layer, when the max pool reading it applies the
    # activation's factor in its routing mask (``backward``) and the activation's rule is skipped
    fused_activations: dict[str, LayerBase] = field(default_factory=dict)

    def input_of(self, layer: LayerBase) -> str:
        return self.values[layer.input_name]

    def in_shape(self, layer: LayerBase) -> tuple[int, ...]:
        return self.shapes[layer.input_name]

    def out_shape(self, layer: LayerBase) -> tuple[int, ...]:
        return self.shapes[layer.output_name]

    def to_double(self, x: str) -> str:
        """x as float64 (a Cast only when the graph is float32): every reduction over more
        than one axis, and every product of reduced terms, is float64 (docs/method.md)."""
        if self.b.dtype == np.float64:
            return x
        return self.b.node("Cast", [x], f"{x}:f64", to=11)

    def scaled(self, x: str, coef: float, dtype=None) -> str:
        """x · coef (x of the graph's dtype, or ``dtype``); no node when coef is 1."""
        return x if coef == 1.0 else self.b.node("Mul", [x, self.b.const(coef, dtype)])

    # -- parameters: the initializers as stored, and the effective tensors derived from them

    def parameter(self, name: str, array: np.ndarray) -> str:
        """The initializer under its ONNX name (once), in the graph's precision."""
        if name not in self.b.used:
            self.b.initializer(array, name)
        return name

    def dense_matrix(self, layer: Dense) -> str:
        """W = weight_coef · (weight or weightᵀ), (out, in)."""
        if layer.weight_name not in self.derived:
            w = self.parameter(layer.weight_name, layer.weight)
            if layer.weight_transposed:
                w = self.b.node("Transpose", [w], f"{layer.weight_name}:T", perm=[1, 0])
            self.derived[layer.weight_name] = self.scaled(w, layer.weight_coef)
        return self.derived[layer.weight_name]

    def conv_kernel(self, layer: Conv2d) -> str:
        """weight_coef · weight, (C_out, C_in/groups, kh, kw)."""
        if layer.weight_name not in self.derived:
            w = self.parameter(layer.weight_name, layer.weight)
            self.derived[layer.weight_name] = self.scaled(w, layer.weight_coef)
        return self.derived[layer.weight_name]

    def bias(self, layer, shape: tuple[int, ...]) -> str:
        """bias_coef · bias reshaped to ``shape``."""
        b = self.parameter(layer.bias_name, layer.bias)
        return self.scaled(self.b.reshape(b, shape, f"{layer.bias_name}:shaped"), layer.bias_coef)

