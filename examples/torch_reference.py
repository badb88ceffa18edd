#!/usr/bin/env python
"""Independent PyTorch reference for the per-tensor Hessian traces and diagonals.

Rebuilds an ONNX ReLU network (a chain, or a residual/DenseNet-style DAG with inference-mode
BatchNorm) in torch (float64) straight from the ONNX initializers and
computes, for every parameter tensor θ_d, the exact diagonal Hessian block of the mean
softmax cross-entropy through per-sample Jacobians (torch.func):

    H_dd = (1/N) Σ_n J_ndᵀ A_n J_nd,   J_nd = ∂z(x_n)/∂θ_d,   A_n = diag(p_n) − p_n p_nᵀ

(the second-order term vanishes for piecewise-linear, positively homogeneous networks; see
the spec, section 2). Its trace and diagonal are written in the formats accepted by
``minsharp-ref verify``. A second, independent method — double back-propagation of the loss
with unit vectors (exact Hessian-vector products) — spot-checks diagonal entries.

torch is developer tooling here, never a runtime dependency of minsharp-ref.

    python examples/torch_reference.py fixtures/mlp_torchscript.onnx fixtures/mnist_subset.npz \\
        --limit 1000 --out expected.json --diag-out expected_diag.npz --check-double-backprop 5
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch.func import jacrev, vmap

POSTPROCESSING = ("Softmax", "LogSoftmax")
PREPROCESSING = ["uint8 scaled by 1/255", "normalised (x - 0.5) / 0.5"]


# ----------------------------------------------------------------- ONNX ops in torch

def _pads(a):
    """ONNX pads (top, left, bottom, right) → torch's symmetric padding, or the F.pad tuple."""
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise NotImplementedError("auto_pad other than NOTSET")
    t, l, b, r = a.get("pads", (0, 0, 0, 0))
    return ((t, l), None) if (t, l) == (b, r) else ((0, 0), (l, r, t, b))


def _conv(x, w, b=None, **a):
    padding, explicit = _pads(a)
    if explicit:
        x = F.pad(x, explicit)
    return F.conv2d(x, w, b, stride=tuple(a.get("strides", (1, 1))), padding=padding,
                    dilation=tuple(a.get("dilations", (1, 1))), groups=a.get("group", 1))


def _maxpool(x, **a):
    padding, explicit = _pads(a)
    if explicit:
        x = F.pad(x, explicit, value=-torch.inf)
    k = tuple(a["kernel_shape"])
    return F.max_pool2d(x, k, stride=tuple(a.get("strides", (1, 1))), padding=padding,
                        dilation=tuple(a.get("dilations", (1, 1))),
                        ceil_mode=bool(a.get("ceil_mode", 0)))


def _avgpool(x, **a):
    # torch and ONNX agree on the divisor of every full or padded window; with ceil_mode=1 the
    # extra partial windows may be divided differently (none of the fixtures uses ceil_mode).
    padding, explicit = _pads(a)
    if explicit or tuple(a.get("dilations", (1, 1))) != (1, 1):
        raise NotImplementedError("AveragePool with asymmetric pads or dilations")
    k = tuple(a["kernel_shape"])
    return F.avg_pool2d(x, k, stride=tuple(a.get("strides", (1, 1))), padding=padding,
                        ceil_mode=bool(a.get("ceil_mode", 0)),
                        count_include_pad=bool(a.get("count_include_pad", 0)))


def _gemm(x, w, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((x.T if transA else x) @ (w.T if transB else w))
    return y if c is None else y + beta * c


def _reshape(x, shape, allowzero=0):
    dims = [int(s) for s in shape.tolist()]
    if not allowzero:  # 0 copies the input dimension
        dims = [x.shape[i] if s == 0 else s for i, s in enumerate(dims)]
    return x.reshape(dims)


def _flatten(x, axis=1):
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _attr(a):
    value = helper.get_attribute_value(a)
    return value.decode() if isinstance(value, bytes) else value


def _batchnorm(x, gamma, beta, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0):
    """Inference-mode BatchNormalization with the stored running statistics."""
    if training_mode:
        raise NotImplementedError("BatchNormalization in training mode")
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=epsilon)


def _reduce_mean(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    """ReduceMean with axes as attribute (opset < 18) or input (opset 18+)."""
    dims = tuple(int(a) for a in (axes.tolist() if torch.is_tensor(axes) else axes))
    return x.mean(dim=dims, keepdim=bool(keepdims))


def _reduce_max(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    """ReduceMax with axes as attribute (opset < 18) or input (opset 18+)."""
    dims = tuple(int(a) for a in (axes.tolist() if torch.is_tensor(axes) else axes))
    return x.amax(dim=dims, keepdim=bool(keepdims))


def _squeeze(x, axes=None):
    dims = [int(a) for a in (axes.reshape(-1).tolist() if torch.is_tensor(axes) else axes or [])]
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = x.squeeze(d)
    return x if dims else x.squeeze()


def _constant(value=None, value_int=None, value_ints=None, value_float=None, value_floats=None):
    if value is not None:
        return torch.from_numpy(numpy_helper.to_array(value).copy())
    if value_int is not None or value_ints is not None:
        return torch.tensor(value_int if value_ints is None else list(value_ints), dtype=torch.int64)
    return torch.tensor(value_float if value_floats is None else list(value_floats),
                        dtype=torch.float64)


OPS = {
    "Gemm": _gemm, "MatMul": lambda a, b: a @ b, "Add": lambda a, b: a + b,
    "Conv": _conv, "MaxPool": _maxpool, "AveragePool": _avgpool,
    "Relu": lambda x: torch.relu(x),
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "Flatten": _flatten, "Reshape": _reshape,
    # residual networks and BatchNorm (issue 11)
    "BatchNormalization": _batchnorm, "ReduceMean": _reduce_mean, "ReduceMax": _reduce_max,
    "GlobalAveragePool": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis), "Identity": lambda x: x,
    # the run-time zero conv biases of the unoptimised dynamo export
    "Shape": lambda x, start=0, end=None: torch.tensor(x.shape[start:end], dtype=torch.int64),
    "Squeeze": _squeeze, "Constant": lambda **a: _constant(**a),
    "Expand": lambda x, shape: x * torch.ones(tuple(int(s) for s in shape.tolist()), dtype=x.dtype),
    "CastLike": lambda x, like: x.to(like.dtype),
}


class TorchGraph:
    """The ONNX graph as a torch function of (input, parameters). Every floating-point
    initializer is a separate float64 ``torch.nn.Parameter`` in ``params``, keyed by its ONNX
    initializer name and stored exactly as ONNX stores it (a MatMul weight stays (in, out),
    a Gemm weight with transB=1 stays (out, in)), so gradients and Hessian diagonals come out
    shaped like the initializers with no transposition to undo."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.params, self.consts = {}, {}
        for init in g.initializer:
            arr = numpy_helper.to_array(init)
            if np.issubdtype(arr.dtype, np.floating):
                self.params[init.name] = torch.nn.Parameter(torch.from_numpy(arr.astype(np.float64)))
            else:
                self.consts[init.name] = torch.from_numpy(arr.copy())
        self.input_name = next(i.name for i in g.input if i.name not in self.params and i.name not in self.consts)
        self.nodes = []
        for node in g.node:
            if node.op_type == "Identity" and node.input[0] in self.params:
                # the legacy exporter's merged bit-identical initializers: each use is its
                # own parameter of the user's model (as minsharp-ref scores it)
                copy = self.params[node.input[0]].detach().clone()
                self.params[node.output[0]] = torch.nn.Parameter(copy)
                continue
            self.nodes.append(node)
            if node.op_type == "BatchNormalization":  # running statistics: constants
                for name in node.input[3:5]:
                    if name in self.params:
                        self.consts[name] = self.params.pop(name).detach()
        self.output_name = g.output[0].name
        while self.nodes and self.nodes[-1].op_type in POSTPROCESSING \
                and self.nodes[-1].output[0] == self.output_name:  # strip a trailing Softmax
            self.output_name = self.nodes.pop().input[0]
        for node in self.nodes:
            if node.op_type not in OPS:
                raise NotImplementedError(f"op {node.op_type} (node {node.name!r})")
        self.attrs = [{a.name: _attr(a) for a in n.attribute} for n in self.nodes]

    def forward(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        env = {**self.consts, **(self.params if params is None else params), self.input_name: x}
        for node, attrs in zip(self.nodes, self.attrs):
            args = [env[name] for name in node.input if name]
            env[node.output[0]] = OPS[node.op_type](*args, **attrs)
        return env[self.output_name]


def load_graph(path) -> TorchGraph:
    return TorchGraph(onnx.load(str(path)))


def load_inputs(npz, split="train", limit=1000):
    """First ``limit`` samples, uint8/255 then (x − 0.5)/0.5, float64 of shape (N, 1, 28, 28)."""
    with np.load(npz, allow_pickle=False) as data:
        x, y = data[f"x_{split}"][:limit], data[f"y_{split}"][:limit]
    x = (x.astype(np.float64) / 255.0 - 0.5) / 0.5
    return x.reshape(len(x), 1, 28, 28), y.astype(np.int64)


# --------------------------------------------------------------- Hessian computations

def jacobian_hessian(graph: TorchGraph, x, chunk_bytes=256 * 1024 ** 2):
    """Exact Tr H_dd and diag H_dd of the mean cross-entropy for every parameter tensor, from
    per-sample Jacobians J_n = ∂z(x_n)/∂θ_d (torch.func.jacrev under vmap):
    diag H_dd = (1/N) Σ_n diag(J_nᵀ A_n J_n), Tr H_dd = its sum. Returns (traces, diagonals)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    params = {k: v.detach() for k, v in graph.params.items()}

    def logits_one(p, xi):  # one sample → its K logits
        return graph.forward(xi.unsqueeze(0), p).squeeze(0)

    per_sample_jac = vmap(jacrev(logits_one), in_dims=(None, 0))
    k = graph.forward(x[:1], params).shape[1]
    chunk = max(1, chunk_bytes // (3 * 8 * k * sum(v.numel() for v in params.values())))
    diag = {name: torch.zeros_like(v) for name, v in params.items()}
    with torch.no_grad():
        for s in range(0, len(x), chunk):
            xb = x[s:s + chunk]
            jac = per_sample_jac(params, xb)  # name → (n, K, *shape)
            p = torch.softmax(graph.forward(xb, params), dim=1)
            a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, K, K)
            for name, j in jac.items():
                jf = j.reshape(len(xb), k, -1)
                diag[name] += (jf * (a @ jf)).sum(dim=(0, 1)).reshape(diag[name].shape)
    diag = {name: (d / len(x)).numpy() for name, d in diag.items()}
    return {name: float(d.sum()) for name, d in diag.items()}, diag


def double_backprop_diag(graph: TorchGraph, x, y, name, flat_indices):
    """Diagonal entries H_ii of the mean cross-entropy w.r.t. initializer ``name`` at the given
    flat indices, by double back-propagation: H e_i = ∂(∂L/∂θ_i)/∂θ, one backward per entry."""
    x = torch.as_tensor(x, dtype=torch.float64)
    params = {k: v.detach().requires_grad_(k == name) for k, v in graph.params.items()}
    loss = F.cross_entropy(graph.forward(x, params), torch.as_tensor(y))
    (grad,) = torch.autograd.grad(loss, params[name], create_graph=True)
    grad = grad.reshape(-1)
    out = []
    for i in flat_indices:
        (row,) = torch.autograd.grad(grad[int(i)], params[name], retain_graph=True)
        out.append(float(row.reshape(-1)[int(i)]))
    return np.array(out)


def expected_document(traces: dict, samples: int, split: str) -> dict:
    return {"schema": "minsharp-ref/expected/v1",
            "producer": f"torch {torch.__version__} (torch.func per-sample Jacobians, float64)",
            "data": {"samples": samples, "split": split, "preprocessing": PREPROCESSING},
            "traces": traces, "trace": float(sum(traces.values()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="ONNX model (.onnx)")
    ap.add_argument("data", help="npz with x_train/y_train/x_test/y_test (uint8 MNIST)")
    ap.add_argument("--split", choices=("train", "test"), default="train")
    ap.add_argument("--limit", type=int, default=1000, help="first N samples (default 1000)")
    ap.add_argument("--out", default="expected.json")
    ap.add_argument("--diag-out", default=None, help="npz of diag H_dd per initializer")
    ap.add_argument("--check-double-backprop", type=int, default=0, metavar="K",
                    help="also check K random diagonal entries per tensor by double backprop")
    args = ap.parse_args(argv)

    graph = load_graph(args.model)
    x, y = load_inputs(args.data, args.split, args.limit)
    traces, diag = jacobian_hessian(graph, x)
    with open(args.out, "w") as f:
        json.dump(expected_document(traces, len(x), args.split), f, indent=2)
        f.write("\n")
    if args.diag_out:
        np.savez(args.diag_out, **diag)
    for name, t in traces.items():
        print(f"{name:>24s}  {str(tuple(diag[name].shape)):>18s}  Tr H_dd = {t:.12g}")
    print(f"{'total':>24s}  {'':>18s}  Tr H    = {sum(traces.values()):.12g}   ({len(x)} samples)")
    if args.check_double_backprop:
        rng = np.random.default_rng(0)
        worst = 0.0
        for name, d in diag.items():
            idx = rng.choice(d.size, size=min(args.check_double_backprop, d.size), replace=False)
            ref = double_backprop_diag(graph, x, y, name, idx)
            rel = np.abs(ref - d.reshape(-1)[idx]) / np.maximum(np.abs(ref), 1e-12 * np.abs(d).max())
            worst = max(worst, float(rel.max()))
        print(f"double back-propagation spot-check: max relative difference {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
