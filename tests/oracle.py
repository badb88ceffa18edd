"""Independent oracle for the minsharp_ref correctness tests.

Nothing here imports minsharp_ref. Models are built with ``onnx.helper`` (float64, opset 17,
IR version 8, input "x" of shape ["N", ...]); logits are evaluated with onnx's own
``ReferenceEvaluator`` in float64, and the Hessian traces of the softmax cross-entropy are
formed from Jacobians of the logits obtained by central finite differences over every
coordinate of one initializer:

    Tr H_dd = (1/N) Σ_n Tr(J_ndᵀ A_n J_nd),  A_n = diag(p_n) − p_n p_nᵀ,  p_n = softmax(z_n).

For a piecewise-linear, positively homogeneous network the logits are exactly linear in ONE
parameter tensor while the activation pattern (ReLU signs, max-pool arg-maxes) is fixed, so
a central difference is exact up to rounding. A kink inside [θ−h, θ+h] is detected by
comparing the forward and backward one-sided differences (they coincide exactly for a
linear function); a flagged coordinate is retried with a 100× smaller step, and if it is
still flagged ``KinkError`` is raised (never a silent wrong answer).

A second, looser oracle differentiates the mean cross-entropy loss twice per coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

OPSET = 17
IR_VERSION = 8
EPS = np.finfo(np.float64).eps


class KinkError(AssertionError):
    """A finite-difference step crossed a kink of the piecewise-linear network."""


# ------------------------------------------------------------------------------ models


@dataclass
class Built:
    """An ONNX model plus what the tests need to know about its parameters."""

    proto: onnx.ModelProto
    weights: list[str]  # weight initializer of each parameterised layer, network order
    biases: list[Optional[str]]  # its bias initializer or None
    input_shape: tuple[int, ...]  # per sample
    num_classes: int

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of the model (float64 for DOUBLE models, float32 for FLOAT)."""
        elem = self.proto.graph.input[0].type.tensor_type.elem_type
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))

    @property
    def params(self) -> list[str]:
        out = []
        for w, b in zip(self.weights, self.biases):
            out.append(w)
            if b is not None:
                out.append(b)
        return out

    def values(self) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in self.proto.graph.initializer}

    def with_values(self, new: dict[str, np.ndarray]) -> "Built":
        """Copy with some initializers replaced (same names, shapes and dtype)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        for i, t in enumerate(proto.graph.initializer):
            if t.name in new:
                arr = np.asarray(new[t.name], dtype=np.float64)
                assert arr.shape == tuple(t.dims), (t.name, arr.shape, tuple(t.dims))
                stored = arr.astype(self.dtype)
                # FLOAT models: only exactly representable values (e.g. power-of-two rescaling)
                assert np.array_equal(stored.astype(np.float64), arr), f"{t.name} not exact in {self.dtype}"
                arr = stored
                proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
        return Built(proto, list(self.weights), list(self.biases), self.input_shape, self.num_classes)

    def as_double(self) -> onnx.ModelProto:
        """The same function as a DOUBLE model (FLOAT values are exact in float64)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        if self.dtype == np.float64:
            return proto
        for vi in list(proto.graph.input) + list(proto.graph.output):
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
        for i, t in enumerate(proto.graph.initializer):
            if t.data_type == TensorProto.FLOAT:
                arr = numpy_helper.to_array(t).astype(np.float64)
                proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
        return proto


def rescale(built: Built, alpha: Sequence[float], scale_biases: bool = True) -> Built:
    """The α-scale transformation on the stored initializers: W_d → α_d W_d and
    b_d → c_d b_d with c_d = Π_{j≤d} α_j (``scale_biases=False``: the deliberately wrong
    transform that leaves the biases alone)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    assert alpha.size == len(built.weights)
    vals = built.values()
    new, c = {}, 1.0
    for a, w, b in zip(alpha, built.weights, built.biases):
        c *= a
        new[w] = a * vals[w]
        if b is not None and scale_biases:
            new[b] = c * vals[b]
    return built.with_values(new)


class _Builder:
    """Appends nodes to a chain starting at input "x"; draws the parameters from rng."""

    def __init__(self, input_shape, rng: np.random.Generator, gain: float = 1.6,
                 bias_scale: float = 0.3, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.rng = rng
        self.gain = gain
        self.bias_scale = bias_scale
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.cur = "x"
        self.n = 0
        self.weights: list[str] = []
        self.biases: list[Optional[str]] = []

    def _name(self, stem):
        self.n += 1
        return f"{stem}{self.n}"

    def _init(self, name, arr):
        arr = np.asarray(arr)
        if arr.dtype.kind == "f":
            arr = arr.astype(self.dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def _node(self, op, inputs, **attrs):
        out = self._name(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self._name(op), **attrs))
        self.cur = out
        return out

    def shape(self) -> tuple[int, ...]:
        """Per-sample shape of the current tensor, by running onnx's reference evaluator."""
        graph = helper.make_graph(
            self.nodes, "partial",
            [helper.make_tensor_value_info("x", self.elem, ["N", *self.input_shape])],
            [helper.make_tensor_value_info(self.cur, self.elem, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION)
        x = np.zeros((1,) + self.input_shape, dtype=self.dtype)
        out = evaluator(model).run(None, {"x": x})[0]
        return tuple(out.shape[1:])

    def _weight(self, shape, fan_in):
        return self.rng.normal(0.0, self.gain / np.sqrt(fan_in), size=shape)

    def _bias(self, shape):
        return self.rng.normal(0.0, self.bias_scale, size=shape)

    # -- layers ------------------------------------------------------------------------

    def gemm(self, out, transB=1, alpha=1.0, beta=1.0, bias=True, bias_2d=False):
        (fan_in,) = self.shape()
        w = self._weight((out, fan_in), fan_in) / alpha
        w_name = self._init(self._name("W"), w if transB else w.T)
        inputs = [self.cur, w_name]
        b_name = None
        if bias:
            b = self._bias((1, out) if bias_2d else (out,)) / beta
            b_name = self._init(self._name("b"), b)
            inputs.append(b_name)
        attrs = {"transB": int(transB)}
        if alpha != 1.0:
            attrs["alpha"] = float(alpha)
        if beta != 1.0:
            attrs["beta"] = float(beta)
        self._node("Gemm", inputs, **attrs)
        self.weights.append(w_name)
        self.biases.append(b_name)

    def matmul(self, out, bias: Optional[str] = "right", bias_2d=False):
        """MatMul(x, W) with W stored (in, out), then Add with the bias on the right
        (Add(h, b)) or on the left (Add(b, h)), or no Add."""
        (fan_in,) = self.shape()
        w_name = self._init(self._name("W"), self._weight((fan_in, out), fan_in))
        h = self._node("MatMul", [self.cur, w_name])
        b_name = None
        if bias is not None:
            b_name = self._init(self._name("b"), self._bias((1, out) if bias_2d else (out,)))
            self._node("Add", [h, b_name] if bias == "right" else [b_name, h])
        self.weights.append(w_name)
        self.biases.append(b_name)

    def conv(self, out, kernel=(3, 3), strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
             group=1, bias=True, bias_via_add=False):
        c_in = self.shape()[0]
        assert c_in % group == 0 and out % group == 0
        kh, kw = kernel
        fan_in = c_in // group * kh * kw
        w_name = self._init(self._name("W"), self._weight((out, c_in // group, kh, kw), fan_in))
        inputs = [self.cur, w_name]
        b_name = None
        if bias and not bias_via_add:
            b_name = self._init(self._name("b"), self._bias((out,)))
            inputs.append(b_name)
        attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                     dilations=list(dilations))
        if group != 1:
            attrs["group"] = group
        h = self._node("Conv", inputs, **attrs)
        if bias and bias_via_add:
            b_name = self._init(self._name("b"), self._bias((out, 1, 1)))
            self._node("Add", [h, b_name])
        self.weights.append(w_name)
        self.biases.append(b_name)

    def relu(self):
        self._node("Relu", [self.cur])

    def leaky(self, alpha=0.1):
        self._node("LeakyRelu", [self.cur], alpha=float(alpha))

    def flatten(self):
        self._node("Flatten", [self.cur], axis=1)

    def maxpool(self, kernel=(2, 2), strides=None, pads=(0, 0, 0, 0), ceil_mode=0,
                dilations=None):
        extra = {} if dilations is None else {"dilations": list(dilations)}
        self._node("MaxPool", [self.cur], kernel_shape=list(kernel),
                   strides=list(strides or kernel), pads=list(pads), ceil_mode=int(ceil_mode),
                   **extra)

    def avgpool(self, kernel=(2, 2), strides=None, pads=(0, 0, 0, 0), ceil_mode=0,
                count_include_pad=0):
        self._node("AveragePool", [self.cur], kernel_shape=list(kernel),
                   strides=list(strides or kernel), pads=list(pads), ceil_mode=int(ceil_mode),
                   count_include_pad=int(count_include_pad))

    def gap(self):
        self._node("GlobalAveragePool", [self.cur])

    def pad(self, pads=(1, 1, 1, 1), with_value=False):
        """Zero Pad of H, W (top, left, bottom, right), opset ≥ 11 form: pads as an int64
        initializer, optionally an explicit constant_value initializer 0.0."""
        t, l, b, r = pads
        p_name = self._init(self._name("pads"), np.array([0, 0, t, l, 0, 0, b, r], np.int64))
        inputs = [self.cur, p_name]
        if with_value:
            inputs.append(self._init(self._name("padval"), np.array(0.0)))
        self._node("Pad", inputs, mode="constant")

    # -- branches (DAGs) and BatchNorm -------------------------------------------------

    def batchnorm(self, epsilon=1e-3):
        """Inference-mode BatchNormalization with random γ, β and running statistics."""
        c = self.shape()[0]
        g_name = self._init(self._name("gamma"), self.rng.uniform(0.5, 1.5, c) * self.rng.choice([-1, 1], c))
        b_name = self._init(self._name("beta"), self._bias((c,)))
        m_name = self._init(self._name("mean"), self.rng.normal(0.0, 0.5, c))
        v_name = self._init(self._name("var"), self.rng.uniform(0.3, 2.0, c))
        self._node("BatchNormalization", [self.cur, g_name, b_name, m_name, v_name],
                   epsilon=float(epsilon))
        self.weights.append(g_name)
        self.biases.append(b_name)

    def channel_affine(self, shift=True):
        """Mul by one random constant per channel, then (``shift``) Add one per channel: how
        tf2onnx writes a Keras BatchNormalization after a biased layer, shapes (1, C[, 1, 1])."""
        shape = self.shape()
        c = (1, shape[0]) + (1,) * (len(shape) - 1)
        a_name = self._init(self._name("scale"), self.rng.uniform(0.5, 1.5, c) * self.rng.choice([-1, 1], c))
        self._node("Mul", [self.cur, a_name])
        self.weights.append(a_name)
        self.biases.append(None)
        if shift:
            b_name = self._init(self._name("shift"), self._bias(c))
            self._node("Add", [self.cur, b_name])
            self.biases[-1] = b_name

    def join(self, op, other: str):
        """Add or Concat (channels) of the current tensor and ``other``."""
        if op == "Concat":
            self._node("Concat", [self.cur, other], axis=1)
        else:
            self._node("Add", [self.cur, other])

    def finish(self) -> Built:
        k = self.shape()
        assert len(k) == 1 and k[0] >= 1, k
        logits = self.cur
        graph = helper.make_graph(
            self.nodes, "oracle_net",
            [helper.make_tensor_value_info("x", self.elem, ["N", *self.input_shape])],
            [helper.make_tensor_value_info(logits, self.elem, ["N", k[0]])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="minsharp-oracle")
        onnx.checker.check_model(model, full_check=True)
        return Built(model, self.weights, self.biases, self.input_shape, k[0])


def build(input_shape, layers: Sequence[tuple], seed: int = 0, **kw) -> Built:
    """Build a chain from a list of (method name, kwargs) pairs, e.g.
    ``[("conv", dict(out=3)), ("relu", {}), ("flatten", {}), ("gemm", dict(out=4))]``."""
    b = _Builder(input_shape, np.random.default_rng(seed), **kw)
    for op, args in layers:
        getattr(b, op)(**args)
    return b.finish()


def data(built: Built, n: int, seed: int = 1) -> np.ndarray:
    """float64 inputs (rounded through the model's dtype, so a FLOAT model's onnxruntime
    forward sees exactly the same numbers)."""
    x = np.random.default_rng(seed).normal(size=(n,) + built.input_shape)
    return x.astype(built.dtype).astype(np.float64)


def labels(built: Built, n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, built.num_classes, size=n)


# ------------------------------------------------------------------------------ oracle


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def trace_from_jacobian(jac: np.ndarray, p: np.ndarray) -> float:
    """(1/N) Σ_n Tr(J_nᵀ A_n J_n), A_n = diag(p_n) − p_n p_nᵀ; jac is (N, K, m).

    Evaluated in the equivalent form of spec Proposition 1, Σ_k p_k ‖J_k − Σ_j p_j J_j‖²: a
    sum of non-negative terms. The direct quadratic form with A loses all relative accuracy
    for confident predictions (A's diagonal p_k − p_k² cancels when p_k ≈ 1 and the form
    cancels because A·1 = 0), which made traces of ~1e-26 look wrong by 7x."""
    mean = np.einsum("nk,nki->ni", p, jac)
    dev = jac - mean[:, None, :]
    return float(np.einsum("nk,nki,nki->", p, dev, dev) / jac.shape[0])


def trace_for_loss(jac: np.ndarray, z: np.ndarray, loss: str = "cross-entropy") -> float:
    """(1/N) Σ_n Tr(J_nᵀ A_n J_n) for the loss Hessian A_n in the logits z_n (N, K): softmax
    cross-entropy (``trace_from_jacobian``), binary cross-entropy of σ(z) with K = 1
    (A = σ(z)(1 − σ(z))), or the mean squared error over the K outputs (A = 2I/K)."""
    if loss == "cross-entropy":
        return trace_from_jacobian(jac, softmax(z))
    if loss == "binary":
        s = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return float(np.einsum("n,nki,nki->", s * (1.0 - s), jac, jac) / jac.shape[0])
    if loss == "mse":
        return float(2.0 / z.shape[1] * np.einsum("nki,nki->", jac, jac) / jac.shape[0])
    raise ValueError(loss)


def loss_value(z: np.ndarray, y: np.ndarray, loss: str = "cross-entropy") -> float:
    """Mean loss over samples, written directly from its definition (float64)."""
    if loss == "cross-entropy":
        m = z.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        return float(np.mean(lse - z[np.arange(len(y)), y]))
    if loss == "binary":  # −y log σ(z) − (1 − y) log(1 − σ(z)) = log(1 + e^z) − y z
        return float(np.mean(np.logaddexp(0.0, z[:, 0]) - y * z[:, 0]))
    if loss == "mse":
        return float(np.mean((z - y.reshape(z.shape)) ** 2))
    raise ValueError(loss)


def ort_logits(built: Built, x: np.ndarray) -> np.ndarray:
    """onnxruntime's CPU forward in the model's own dtype (a second, independent forward to
    cross-check the oracle's semantics; for FLOAT models only to ~1e-6)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(built.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x.astype(built.dtype)})[0], dtype=np.float64)


# ------------------------------------------------------------------- pooling semantics
#
# onnx 1.23's ReferenceEvaluator gets some pooling cases wrong, so the oracle evaluates
# MaxPool and AveragePool with the direct implementation below (plugged into the
# ReferenceEvaluator through ``new_ops``; every other op is onnx's own):
#   * MaxPool with all strides 1 and non-zero pads returns a wrongly shaped output
#     (e.g. H = W = 4, kernel 2, pads [0, 0, 1, 1] gives 3×5 instead of 4×4);
#   * AveragePool / MaxPool in ceil_mode whose overhang is ≥ 2 (stride ≥ 3) shift the
#     input by half the overhang (e.g. H = W = 7, kernel 3, stride 3, ceil_mode 1).
# ``test_oracle_pooling_matches_onnxruntime`` checks this implementation against
# onnxruntime on a grid of kernels, strides, pads, ceil_mode and count_include_pad.


def _axis_windows(length, k, s, d, pad_begin, pad_end, ceil_mode):
    """Per output index along one axis: (input indices read, window size counting explicit
    padding but not the ceil_mode overhang)."""
    span = length + pad_begin + pad_end - (d * (k - 1) + 1)
    if span < 0:
        raise ValueError("pooling window larger than the padded input")
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= length + pad_begin:
        out -= 1  # a last window starting in the right padding is dropped
    result = []
    for o in range(out):
        pos = [o * s - pad_begin + a * d for a in range(k)]
        valid = [q for q in pos if 0 <= q < length]
        counted = sum(1 for q in pos if -pad_begin <= q < length + pad_end)
        if not valid:
            raise ValueError("a pooling window lies entirely in the padding")
        result.append((valid, counted))
    return result


def pool2d(x, kind, kernel, strides, pads, dilations=(1, 1), ceil_mode=0, count_include_pad=0):
    """Direct 2-D max / average pooling of an (N, C, H, W) array."""
    n, c, h, w = x.shape
    rows = _axis_windows(h, kernel[0], strides[0], dilations[0], pads[0], pads[2], ceil_mode)
    cols = _axis_windows(w, kernel[1], strides[1], dilations[1], pads[1], pads[3], ceil_mode)
    y = np.empty((n, c, len(rows), len(cols)), dtype=x.dtype)
    for i, (ri, rcount) in enumerate(rows):
        for j, (cj, ccount) in enumerate(cols):
            win = x[:, :, ri][:, :, :, cj]
            if kind == "max":
                y[:, :, i, j] = win.max(axis=(2, 3))
            else:
                div = rcount * ccount if count_include_pad else len(ri) * len(cj)
                y[:, :, i, j] = win.sum(axis=(2, 3)) / div
    return y


class _PoolBase(OpRun):
    op_domain = ""

    def _attrs(self, x, kernel_shape=None, strides=None, pads=None, dilations=None,
               ceil_mode=None, auto_pad=None):
        assert auto_pad in (None, "NOTSET"), "the tests use explicit pads only"
        assert x.ndim == 4
        return dict(kernel=tuple(kernel_shape), strides=tuple(strides or (1, 1)),
                    pads=tuple(pads or (0, 0, 0, 0)), dilations=tuple(dilations or (1, 1)),
                    ceil_mode=int(ceil_mode or 0))


class MaxPool(_PoolBase):
    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
             pads=None, storage_order=None, strides=None):
        a = self._attrs(x, kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
        return (pool2d(x, "max", **a),)


class AveragePool(_PoolBase):
    def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None, dilations=None,
             kernel_shape=None, pads=None, strides=None):
        a = self._attrs(x, kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
        return (pool2d(x, "avg", count_include_pad=int(count_include_pad or 0), **a),)


NEW_OPS = [MaxPool, AveragePool]


def evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx's ReferenceEvaluator with the pooling ops above."""
    return ReferenceEvaluator(model, new_ops=NEW_OPS)


class Oracle:
    """Finite-difference oracle over one built model, evaluated by onnx's ReferenceEvaluator
    in float64. Parameters are fed as graph inputs so one evaluator serves every
    perturbation; perturbing a parameter of layer d re-runs only the chain from layer d on
    (the ONNX nodes from its consumer to the logits, fed with the unchanged input of that
    node taken from a full run): the same operations, just not the unchanged prefix."""

    def __init__(self, built: Built):
        self.built = built
        proto = built.as_double()
        params = set(built.params)
        graph = proto.graph
        keep = [t for t in graph.initializer if t.name not in params]
        moved = [t for t in graph.initializer if t.name in params]
        self.values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in moved}
        param_vi = {t.name: helper.make_tensor_value_info(t.name, TensorProto.DOUBLE, list(t.dims))
                    for t in moved}
        const = {t.name: t for t in keep}
        self.logits_name = graph.output[0].name

        def model(nodes, data_input):
            used = {i for n in nodes for i in n.input}
            inputs = [helper.make_tensor_value_info(data_input, TensorProto.DOUBLE, None)
                      if data_input != "x" else graph.input[0]]
            inputs += [param_vi[p] for p in self.values if p in used]
            g = helper.make_graph(nodes, "oracle", inputs, list(graph.output),
                                  [const[c] for c in const if c in used])
            return evaluator(helper.make_model(
                g, opset_imports=list(proto.opset_import), ir_version=IR_VERSION))

        nodes = list(graph.node)
        self.evaluator = model(nodes, "x")
        # per parameter: (its consumer's data input, evaluator of the chain from there on);
        # a DAG (branches joined by Add/Concat) is always evaluated in full
        self.suffix: dict[str, tuple[str, ReferenceEvaluator]] = {}
        self.dag = any(n.op_type == "Concat" or (n.op_type == "Add" and not set(n.input) & (params | set(const)))
                       for n in nodes)
        for name in ([] if self.dag else self.values):
            i = next(k for k, n in enumerate(nodes) if name in n.input)
            data_in = [t for t in nodes[i].input if t and t not in self.values and t not in const]
            assert len(data_in) == 1, nodes[i]
            self.suffix[name] = (data_in[0], model(nodes[i:], data_in[0]))

    def logits(self, x, overrides: Optional[dict] = None) -> np.ndarray:
        feeds = dict(self.values)
        if overrides:
            feeds.update(overrides)
        feeds["x"] = np.asarray(x, dtype=np.float64)
        return np.asarray(self.evaluator.run(None, feeds)[0], dtype=np.float64)

    def _partial(self, x, name: str):
        """A function θ ↦ logits with only ``name`` varied (evaluated from its layer on)."""
        if self.dag:
            return lambda theta: self.logits(x, {name: theta})
        data_in, ev = self.suffix[name]
        feeds = dict(self.values)
        feeds["x"] = np.asarray(x, dtype=np.float64)
        if data_in != "x":
            feeds[data_in] = self.evaluator.run(None, feeds, intermediate=True)[data_in]
        feeds = {i.name: feeds[i.name] for i in ev.proto_.graph.input}

        def f(theta):
            feeds[name] = theta
            return np.asarray(ev.run(None, feeds)[0], dtype=np.float64)
        return f

    def loss(self, x, y, overrides: Optional[dict] = None, kind: str = "cross-entropy") -> float:
        return loss_value(self.logits(x, overrides), y, kind)

    def _step(self, name, rel_step):
        theta = self.values[name]
        scale = float(np.max(np.abs(theta)))
        if scale == 0.0:
            scale = 1.0
        return 2.0 ** np.round(np.log2(rel_step * scale))  # a power of two

    @staticmethod
    def _perturbed(theta, i, h):
        """θ ± h e_i and the steps actually taken (exact differences of floats)."""
        up, dn = theta.copy(), theta.copy()
        up.flat[i] += h
        dn.flat[i] -= h
        return up, dn, up.flat[i] - theta.flat[i], theta.flat[i] - dn.flat[i]

    def jacobian(self, x, name: str, rel_step: float = 1e-3) -> np.ndarray:
        """∂logits/∂θ for the initializer ``name``: (N, K, θ.size), central differences with
        a kink check (forward vs backward difference)."""
        theta = self.values[name]
        f = self._partial(x, name)
        z0 = f(theta)
        full = self.logits(x)  # the suffix evaluation reproduces the full forward
        assert np.allclose(z0, full, rtol=1e-13, atol=1e-13 * np.max(np.abs(full))), name
        zscale = float(np.max(np.abs(z0))) + 1e-300
        m = theta.size

        def columns(idx, h):
            fwd = np.empty(z0.shape + (len(idx),))
            bwd = np.empty_like(fwd)
            for j, i in enumerate(idx):
                up, dn, hp, hm = self._perturbed(theta, i, h)
                fwd[..., j] = (f(up) - z0) / hp
                bwd[..., j] = (z0 - f(dn)) / hm
            return fwd, bwd

        h = self._step(name, rel_step)
        fwd, bwd = columns(range(m), h)
        jac = 0.5 * (fwd + bwd)
        jmax = float(np.max(np.abs(jac))) + 1e-300

        def flagged(fwd, bwd, h):
            # Rounding noise of a one-sided difference is ~ eps·|z|/h; a kink at distance s
            # < h makes |fwd − bwd| = |Δslope|·(h − s)/h, and the central difference is off
            # by half of that, so this bounds its error by ~1e-10·max|J| + noise.
            tol = 2e-10 * jmax + 256 * EPS * zscale / h
            return np.flatnonzero(np.max(np.abs(fwd - bwd), axis=(0, 1)) > tol)

        bad = flagged(fwd, bwd, h)
        if bad.size:
            h2 = h / 128
            f2, b2 = columns(bad, h2)
            still = flagged(f2, b2, h2)
            if still.size:
                raise KinkError(f"{name}: coordinates {bad[still].tolist()} sit on a kink "
                                f"within ±{h2:g}; draw other data or weights")
            jac[..., bad] = 0.5 * (f2 + b2)
        return jac

    def traces(self, x, rel_step: float = 1e-3) -> dict[str, float]:
        """Oracle Tr H_dd for every parameter initializer."""
        p = softmax(self.logits(x))
        return {name: trace_from_jacobian(self.jacobian(x, name, rel_step), p)
                for name in self.built.params}

    def loss_second_difference_trace(self, x, y, name: str, rel_step: float = 2.0 ** -12,
                                     kind: str = "cross-entropy") -> float:
        """Σ_i ∂²L/∂θ_i² by second central differences of the mean loss (``loss_value``).

        Only for very small networks; its accuracy is ~1e-7..1e-6 relative, not 1e-12: the
        loss is NOT linear in θ (softmax/log-sum-exp are curved), so the second difference
        has a truncation error ~h²·∂⁴L/12 as well as a rounding error ~4·eps·L/h²; no step
        makes both small (the best is ~sqrt(eps) ≈ 1e-8 per entry, and entries are summed).
        """
        theta = self.values[name]
        h = self._step(name, rel_step)
        l0 = self.loss(x, y, kind=kind)
        total = 0.0
        for i in range(theta.size):
            up, dn, hp, hm = self._perturbed(theta, i, h)
            lp, lm = self.loss(x, y, {name: up}, kind), self.loss(x, y, {name: dn}, kind)
            total += 2.0 * ((lp - l0) / hp - (l0 - lm) / hm) / (hp + hm)
        return total
