"""Typed layer IR: the network as layers in topological order, each with its float64 NumPy
forward. A chain is the common case; ``Add`` and ``Concat`` join branches (a DAG, docs/method.md
section 9), and every layer names the tensors it reads, so fan-out needs nothing special.

Every layer remembers the ONNX tensors it reads and writes (``input_name``/``output_name``;
``inputs`` for all of them)
so that the onnxruntime forward can expose exactly the intermediates the engine needs, and
the ONNX nodes it came from (``nodes``) so that errors can name them. Parameterised layers
(``Dense``, ``Conv2d``) keep their parameters exactly as the ONNX initializers store them,
with the initializer names; everything else is a fixed, positively homogeneous operation
(docs/method.md section 4), except ``InputAffine``, a fixed input transform that may only come before
the first parameterised layer.

Shapes here are per sample (no batch axis); arrays passed to ``forward`` carry the batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Optional, Union

import numpy as np

from .windows import Geometry, pad_input, windows


@dataclass(frozen=True)
class LayerBase:
    input_name: str
    output_name: str
    nodes: tuple[str, ...]

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every tensor the layer reads (one, except for ``Add`` and ``Concat``)."""
        return (self.input_name,)


# --------------------------------------------------------------------------- fixed layers


@dataclass(frozen=True)
class InputAffine(LayerBase):
    """x ↦ x·scale + shift with constant arrays: input preprocessing baked into the graph
    (Sub/Div/Mul/Add by constants on the graph input). Not a parameter, not homogeneous:
    allowed only before the first parameterised layer."""

    scale: np.ndarray = field(default_factory=lambda: np.ones(()))
    shift: np.ndarray = field(default_factory=lambda: np.zeros(()))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale + self.shift


@dataclass(frozen=True)
class Relu(LayerBase):
    """max(u, 0); back-propagation multiplies by 1[u > 0] (docs/method.md section 3)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0)


@dataclass(frozen=True)
class LeakyRelu(LayerBase):
    """u for u ≥ 0, slope·u otherwise (LeakyRelu, or PRelu with a constant slope that
    broadcasts over the per-sample shape)."""

    slope: np.ndarray = field(default_factory=lambda: np.asarray(0.01))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.where(x >= 0, x, x * self.slope)


@dataclass(frozen=True)
class Reshape(LayerBase):
    """Flatten / Reshape / Squeeze / Unsqueeze that keep the batch axis: a new per-sample shape."""

    shape: tuple[int, ...] = ()

    def output_shape(self, in_shape):
        return self.shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.reshape((x.shape[0],) + self.shape)


@dataclass(frozen=True)
class Transpose(LayerBase):
    """Permutation of the per-sample axes (the batch axis stays first), e.g. NHWC → NCHW."""

    perm: tuple[int, ...] = ()

    def output_shape(self, in_shape):
        return tuple(in_shape[p] for p in self.perm)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.transpose((0,) + tuple(p + 1 for p in self.perm))


@dataclass(frozen=True)
class Slice(LayerBase):
    """x[start:stop] along one per-sample axis (step 1): a selection of channels (ONNX Slice
    and each output of Split, as torch.chunk / torch.split export). Positively homogeneous
    and it mixes nothing, so its output shares its input's scale (docs/method.md section 9);
    back-propagation puts the signal back in place, zeros elsewhere."""

    axis: int = 0
    start: int = 0
    stop: int = 0

    def output_shape(self, in_shape):
        if not 0 <= self.start < self.stop <= in_shape[self.axis]:
            raise ValueError(f"slice {self.start}:{self.stop} of an axis of {in_shape[self.axis]}")
        return in_shape[:self.axis] + (self.stop - self.start,) + in_shape[self.axis + 1:]

    def index(self, lead: int = 1) -> tuple:
        """The NumPy index of the slice for arrays with ``lead`` axes before the sample's."""
        return (slice(None),) * (lead + self.axis) + (slice(self.start, self.stop),)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x[self.index()]


@dataclass(frozen=True)
class Pad2d(LayerBase):
    """Zero padding of the two spatial axes of a (C, H, W) tensor: (top, left, bottom, right)."""

    pads: tuple[int, int, int, int] = (0, 0, 0, 0)

    def output_shape(self, in_shape):
        c, h, w = in_shape
        t, l, b, r = self.pads
        return (c, h + t + b, w + l + r)

    def forward(self, x: np.ndarray) -> np.ndarray:
        t, l, b, r = self.pads
        return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))


@dataclass(frozen=True)
class MaxPool2d(LayerBase):
    """Maximum over each window (padding never wins); ties go to the first element in
    row-major kernel order, as onnxruntime does."""

    geometry: Geometry = Geometry((1, 1))

    def output_shape(self, in_shape):
        return (in_shape[0],) + self.geometry.output_hw(in_shape[1:])

    def window_argmax(self, x: np.ndarray) -> np.ndarray:
        """Flat kernel index (0 ≤ i·kw + j < kh·kw) of each window's maximum: (N, C, Ho, Wo)."""
        out_hw = self.geometry.output_hw(x.shape[2:])
        cols = windows(pad_input(x, self.geometry, -np.inf), self.geometry, out_hw)
        n, c, kh, kw, ho, wo = cols.shape
        return cols.reshape(n, c, kh * kw, ho, wo).argmax(axis=2)

    def forward(self, x: np.ndarray) -> np.ndarray:
        out_hw = self.geometry.output_hw(x.shape[2:])
        cols = windows(pad_input(x, self.geometry, -np.inf), self.geometry, out_hw)
        return cols.max(axis=(2, 3))


@dataclass(frozen=True)
class AvgPool2d(LayerBase):
    """Mean over each window. With count_include_pad the divisor counts explicit padding
    (not the overhang of ceil_mode); without, only the input elements in the window."""

    geometry: Geometry = Geometry((1, 1))
    count_include_pad: bool = False

    def output_shape(self, in_shape):
        return (in_shape[0],) + self.geometry.output_hw(in_shape[1:])

    def divisor(self, in_hw: tuple[int, int]) -> np.ndarray:
        """Number of elements each output averages over: (Ho, Wo)."""
        g = self.geometry
        h, w = in_hw
        top, left, bottom, right = g.pads
        frame = np.zeros((1, 1) + g.padded_hw(in_hw))
        if self.count_include_pad:
            frame[:, :, :top + h + bottom, :left + w + right] = 1.0
        else:
            frame[:, :, top:top + h, left:left + w] = 1.0
        return windows(frame, g, g.output_hw(in_hw)).sum(axis=(2, 3))[0, 0]

    def forward(self, x: np.ndarray) -> np.ndarray:
        out_hw = self.geometry.output_hw(x.shape[2:])
        cols = windows(pad_input(x, self.geometry, 0.0), self.geometry, out_hw)
        return cols.sum(axis=(2, 3)) / self.divisor(x.shape[2:])


# ------------------------------------------------------------------- parameterised layers


@dataclass(frozen=True)
class Dense(LayerBase):
    """z = W a + b with W = weight_coef · (weight or weightᵀ) and b = bias_coef · bias.

    ``weight`` is the ONNX initializer as stored: (out, in), or (in, out) when
    ``weight_transposed`` (MatMul, Gemm with transB = 0). ``weight_coef``/``bias_coef`` are
    Gemm's alpha/beta. Traces are reported with respect to the initializers themselves.
    """

    weight_name: str = ""
    weight: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    bias_name: Optional[str] = None
    bias: Optional[np.ndarray] = None
    weight_transposed: bool = False
    weight_coef: float = 1.0
    bias_coef: float = 1.0

    @property
    def kind(self) -> str:
        return "dense"

    @property
    def matrix(self) -> np.ndarray:
        """The effective (out, in) matrix W."""
        w = self.weight.T if self.weight_transposed else self.weight
        return w if self.weight_coef == 1.0 else self.weight_coef * w

    @property
    def out_features(self) -> int:
        return self.matrix.shape[0]

    @property
    def effective_bias(self) -> Optional[np.ndarray]:
        if self.bias is None:
            return None
        return self.bias_coef * self.bias.reshape(self.out_features)

    def output_shape(self, in_shape):
        return (self.out_features,)

    def forward(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.matrix.T
        b = self.effective_bias
        return z if b is None else z + b


@dataclass(frozen=True)
class Conv2d(LayerBase):
    """z = W ⋆ a + b: 2-D cross-correlation, weight (C_out, C_in/groups, kh, kw), any stride,
    padding, dilation and groups; bias (C_out,) or absent."""

    weight_name: str = ""
    weight: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 1, 1)))
    bias_name: Optional[str] = None
    bias: Optional[np.ndarray] = None
    geometry: Geometry = Geometry((1, 1))
    groups: int = 1
    bias_coef: float = 1.0
    weight_coef: float = 1.0

    @property
    def kind(self) -> str:
        return "conv2d"

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def effective_bias(self) -> Optional[np.ndarray]:
        if self.bias is None:
            return None
        return self.bias_coef * self.bias.reshape(self.out_channels, 1, 1)

    def output_shape(self, in_shape):
        return (self.out_channels,) + self.geometry.output_hw(in_shape[1:])

    def kernel_matrix(self) -> np.ndarray:
        """Weight as (groups, C_out/groups, C_in/groups·kh·kw)."""
        g = self.groups
        return self.weight_coef * self.weight.reshape(g, self.out_channels // g, -1)

    def im2col(self, x: np.ndarray) -> np.ndarray:
        """U = im2col(x): (N, groups, C_in/groups·kh·kw, Ho·Wo), rows ordered (c, i, j)."""
        out_hw = self.geometry.output_hw(x.shape[2:])
        cols = windows(pad_input(x, self.geometry, 0.0), self.geometry, out_hw)
        n = x.shape[0]
        return cols.reshape(n, self.groups, -1, out_hw[0] * out_hw[1])

    def forward(self, x: np.ndarray) -> np.ndarray:
        out_hw = self.geometry.output_hw(x.shape[2:])
        z = np.matmul(self.kernel_matrix()[None], self.im2col(x))  # (N, G, C_out/G, P)
        z = z.reshape((x.shape[0], self.out_channels) + out_hw)
        b = self.effective_bias
        return z if b is None else z + b


@dataclass(frozen=True)
class BatchNorm(LayerBase):
    """Inference-mode BatchNormalization (docs/method.md section 10): per channel c (axis 0 of
    the per-sample shape), y = γ_c x̂ + β_c with x̂ = s_c (x − μ_c), s_c = 1/√(σ²_c + ε).

    μ, σ² and ε are constants of the exported model; γ (``weight``) and β (``bias``) are the
    parameters whose traces are reported. With μ = 0, σ² = 1, ε = 0 it is a per-channel
    diagonal layer y = γ x + β (how the folded view keeps a BN it cannot fold)."""

    weight_name: str = ""
    weight: np.ndarray = field(default_factory=lambda: np.ones(0))
    bias_name: Optional[str] = None
    bias: Optional[np.ndarray] = None
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mean_name: str = ""  # the running mean's initializer (rescaled by docs/method.md section 10)
    var: np.ndarray = field(default_factory=lambda: np.ones(0))
    epsilon: float = 1e-5

    @property
    def kind(self) -> str:
        return "batchnorm"

    def channel_shape(self, ndim: int) -> tuple[int, ...]:
        """Broadcast shape of a per-channel vector against a batch of rank ``ndim``."""
        return (1, -1) + (1,) * (ndim - 2)

    @property
    def scale(self) -> np.ndarray:
        """s = 1/√(σ² + ε) per channel."""
        return 1.0 / np.sqrt(self.var + self.epsilon)

    @property
    def multiplier(self) -> np.ndarray:
        """γ s: ∂y/∂x per channel."""
        return self.weight * self.scale

    def normalised(self, x: np.ndarray) -> np.ndarray:
        """x̂ = s (x − μ), for a batch (N, C, ...)."""
        shape = self.channel_shape(x.ndim)
        return (x - self.mean.reshape(shape)) * self.scale.reshape(shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        shape = self.channel_shape(x.ndim)
        y = self.normalised(x) * self.weight.reshape(shape)
        return y if self.bias is None else y + self.bias.reshape(shape)


# ----------------------------------------------------------------- joining branches (DAG)


@dataclass(frozen=True)
class Add(LayerBase):
    """Sum of two or more branches of the same shape (docs/method.md section 9); back-
    propagation passes the signal unchanged to every input."""

    other_inputs: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input_name,) + self.other_inputs

    def forward(self, *xs: np.ndarray) -> np.ndarray:
        out = xs[0] + xs[1]
        for x in xs[2:]:
            out = out + x
        return out


@dataclass(frozen=True)
class Concat(LayerBase):
    """Concatenation of branches along the channel axis (axis 0 per sample); ``sizes`` are
    the inputs' channel counts. Back-propagation splits the signal along that axis."""

    other_inputs: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input_name,) + self.other_inputs

    def output_shape(self, in_shape):
        return (sum(self.sizes),) + tuple(in_shape[1:])

    def forward(self, *xs: np.ndarray) -> np.ndarray:
        return np.concatenate(xs, axis=1)


ParamLayer = Union[Dense, Conv2d, BatchNorm]
Layer = Union[InputAffine, Relu, LeakyRelu, Reshape, Transpose, Slice, Pad2d, MaxPool2d,
              AvgPool2d, Dense, Conv2d, BatchNorm, Add, Concat]


def is_parameterised(layer: LayerBase) -> bool:
    return isinstance(layer, (Dense, Conv2d, BatchNorm))


@dataclass(frozen=True)
class Network:
    """Layers in topological order from the graph input to the logits (before any
    post-processing). Without ``Add``/``Concat`` it is a chain: each layer reads the
    previous one's output (the fast path of ``forward`` and of the engine)."""

    layers: tuple[LayerBase, ...]
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    logits_name: str
    output_name: str
    opset: int
    postprocessing: tuple[str, ...] = ()
    #: the loss whose Hessian is traced: "cross-entropy", "binary" or "mse" (docs/method.md §1)
    loss: str = "cross-entropy"

    @property
    def param_layers(self) -> list[ParamLayer]:
        return [l for l in self.layers if is_parameterised(l)]  # type: ignore[misc]

    @property
    def num_classes(self) -> int:
        """Number of logits per sample (outputs of a regressor, 1 for a binary head)."""
        return self.layer_shapes()[-1][0]

    @cached_property
    def is_chain(self) -> bool:
        """No layer joins branches: every layer reads the previous layer's output."""
        return not any(isinstance(l, (Add, Concat)) for l in self.layers)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(l, BatchNorm) for l in self.layers)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every tensor, by name (DAG networks)."""
        shapes = {self.input_name: self.input_shape}
        for layer in self.layers:
            shapes[layer.output_name] = layer.output_shape(shapes[layer.input_name])
        return shapes

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape after each layer (input shape first)."""
        if not self.is_chain:
            shapes = self.tensor_shapes()
            return [self.input_shape] + [shapes[l.output_name] for l in self.layers]
        shapes = [self.input_shape]
        for layer in self.layers:
            shapes.append(layer.output_shape(shapes[-1]))
        return shapes

    def input_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each layer's (first) input."""
        if self.is_chain:
            return self.layer_shapes()[:-1]
        shapes = self.tensor_shapes()
        return [shapes[l.input_name] for l in self.layers]

    def forward(self, x: np.ndarray, keep_inputs: bool = False, dtype=np.float64):
        """Float64 reference forward (``dtype`` float32 on a network cast with ``astype``: the
        same in float32). Returns logits, or (logits, (first) input of every layer)."""
        a = np.asarray(x, dtype=dtype)
        inputs = []
        if not self.is_chain:
            values = {self.input_name: a}
            for layer in self.layers:
                args = [values[n] for n in layer.inputs]
                if keep_inputs:
                    inputs.append(args[0])
                values[layer.output_name] = layer.forward(*args)
            a = values[self.logits_name]
            return (a, inputs) if keep_inputs else a
        for layer in self.layers:
            if keep_inputs:
                inputs.append(a)
            a = layer.forward(a)
        return (a, inputs) if keep_inputs else a

    def astype(self, dtype) -> "Network":
        """Copy with every parameter and slope cast to dtype (for the float32 signal path)."""

        def cast(layer):
            changes = {}
            for name in ("weight", "bias", "slope", "mean", "var"):
                value = getattr(layer, name, None)
                if isinstance(value, np.ndarray):
                    changes[name] = value.astype(dtype)
            return replace(layer, **changes) if changes else layer

        return replace(self, layers=tuple(cast(l) for l in self.layers))

    def with_parameters(self, params: dict[str, np.ndarray]) -> "Network":
        """Copy with some initializers replaced (keys: ONNX initializer names; for BatchNorm
        also the running mean)."""
        layers = []
        for layer in self.layers:
            if is_parameterised(layer):
                changes = {}
                if layer.weight_name in params:
                    changes["weight"] = params[layer.weight_name]
                if layer.bias_name is not None and layer.bias_name in params:
                    changes["bias"] = params[layer.bias_name]
                if isinstance(layer, BatchNorm) and layer.mean_name in params:
                    changes["mean"] = params[layer.mean_name].reshape(-1)
                layer = replace(layer, **changes)
            layers.append(layer)
        return replace(self, layers=tuple(layers))
