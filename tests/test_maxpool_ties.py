"""Max-pool ties (docs/method.md, "Back-propagating the signals", max pooling): both engines
route a window's signal to its *first* maximum in row-major window order (kernel row i,
then column j), padding never winning, in every padding, stride, dilation and ceil mode:
PyTorch's and onnxruntime's MaxPool indices.

Oracle: a brute-force float64 evaluation of the convention, window by window, and the
exact per-tensor traces of a tiny network built on it (explicit Jacobians, contracted with
diag(p) − ppᵀ): Conv 1×1 → (ReLU) → MaxPool → Flatten → Gemm. The conv reads two input
channels; the second has weight 0, so it never breaks a tie in the pooled tensor but its
weight's trace, Σ_k (Σ_q g_kq x₁(q))², sees which position q each window routes to: a
convention that picked another tied position would move it. Inputs: all-zero images (every
window ties), constant images, two-valued images, stripes (repeated values in every
window), on the second channel distinct values.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from minsharp_ref import score_arrays

K = 3  # classes
W1 = np.array([[0.75, 0.0], [-0.5, 0.0]])  # (out, in): the second input channel never ties
B1 = np.array([0.25, 0.125])  # channel 1: u = 0.125 − 0.5 x0, zero after the ReLU where x0 = 1

POOLS = {  # kernel, strides, pads (top, left, bottom, right), ceil_mode, dilations
    "3x3 s1 p1 ceil (GoogLeNet's branch pools)": ((3, 3), (1, 1), (1, 1, 1, 1), 1, (1, 1)),
    "3x3 s2 ceil (GoogLeNet's stem pools)": ((3, 3), (2, 2), (0, 0, 0, 0), 1, (1, 1)),
    "3x3 s2 p1 (ResNet's stem pool)": ((3, 3), (2, 2), (1, 1, 1, 1), 0, (1, 1)),
    "2x2 s1": ((2, 2), (1, 1), (0, 0, 0, 0), 0, (1, 1)),
    "2x2 s2 ceil (overhang)": ((2, 2), (2, 2), (0, 0, 0, 0), 1, (1, 1)),
    "2x3 s(1,2) asymmetric pads ceil": ((2, 3), (1, 2), (1, 0, 0, 1), 1, (1, 1)),
    "2x2 s1 dilated 2 p1": ((2, 2), (1, 1), (1, 1, 1, 1), 0, (2, 2)),
}


def pool_output_size(n: int, k: int, s: int, begin: int, end: int, d: int, ceil: int) -> int:
    """PyTorch's rule: ⌊ or ⌈(n + pads − d(k − 1) − 1)/s⌉ + 1, in ceil mode without a last
    window that starts in the end padding."""
    span = n + begin + end - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + begin:
        out -= 1
    return out


def first_maximum(a: np.ndarray, pool, last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Brute force, window by window: the pooled values (C, Ho, Wo) and the (row, column)
    of each window's first maximum in row-major window order among its input positions
    (with ``last``, the last one: a convention the engines must not follow)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), ceil, (dh, dw) = pool
    c, h, w = a.shape
    ho = pool_output_size(h, kh, sh, pt, pb, dh, ceil)
    wo = pool_output_size(w, kw, sw, pl, pr, dw, ceil)
    pooled = np.empty((c, ho, wo))
    where = np.empty((c, ho, wo, 2), dtype=int)
    for ch in range(c):
        for r in range(ho):
            for q in range(wo):
                best, at = -np.inf, None
                for i in range(kh):
                    for j in range(kw):
                        y, x = r * sh - pt + i * dh, q * sw - pl + j * dw
                        if 0 <= y < h and 0 <= x < w and (at is None or a[ch, y, x] > best
                                                          or (last and a[ch, y, x] == best)):
                            best, at = a[ch, y, x], (y, x)
                pooled[ch, r, q], where[ch, r, q] = best, at
    return pooled, where


def oracle_traces(x: np.ndarray, w2: np.ndarray, b2: np.ndarray, pool, relu: bool,
                  last: bool = False) -> dict:
    """Exact per-tensor Tr H of the mean cross-entropy from explicit per-sample Jacobians."""
    traces = dict.fromkeys(["W1", "B1", "W2", "B2"], 0.0)
    for xn in x:
        u = np.einsum("oi,ihw->ohw", W1, xn) + B1[:, None, None]
        a = np.maximum(u, 0.0) if relu else u
        pooled, where = first_maximum(a, pool, last)
        p = pooled.reshape(-1)
        z = w2 @ p + b2
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        hess = np.diag(prob) - np.outer(prob, prob)
        dz_da = np.zeros((K,) + a.shape)
        for flat, (ch, r, q) in enumerate(np.ndindex(pooled.shape)):
            y, xx = where[ch, r, q]
            dz_da[:, ch, y, xx] += w2[:, flat]
        dz_du = dz_da * (u > 0) if relu else dz_da
        jac = {"W1": np.einsum("kohw,ihw->koi", dz_du, xn).reshape(K, -1),
               "B1": dz_du.sum(axis=(2, 3)),
               "W2": np.einsum("kl,j->klj", np.eye(K), p).reshape(K, -1),
               "B2": np.eye(K)}
        for name, j in jac.items():
            traces[name] += float(np.sum(hess * (j @ j.T))) / len(x)
    return traces


def model(pool, hw: tuple[int, int], w2, b2, relu: bool):
    (kh, kw), strides, pads, ceil, dilations = pool
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["u"], name="conv", kernel_shape=[1, 1])]
    pooled_input = "u"
    if relu:
        nodes.append(helper.make_node("Relu", ["u"], ["a"], name="relu"))
        pooled_input = "a"
    nodes += [helper.make_node("MaxPool", [pooled_input], ["m"], name="pool",
                               kernel_shape=[kh, kw], strides=list(strides), pads=list(pads),
                               ceil_mode=ceil, dilations=list(dilations)),
              helper.make_node("Flatten", ["m"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "W2", "B2"], ["z"], name="fc", transB=1)]
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
             (("W1", W1.reshape(2, 2, 1, 1)), ("B1", B1), ("W2", w2), ("B2", b2))]
    graph = helper.make_graph(nodes, "ties", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 2, *hw])], [helper.make_tensor_value_info(
            "z", TensorProto.FLOAT, ["N", K])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tie_images(hw: tuple[int, int], rng) -> np.ndarray:
    """Channel 0: all zeros, all ones, two-valued random, row stripes, column stripes, a
    checkerboard; channel 1: distinct values (exact in float32)."""
    h, w = hw
    rows, cols = np.indices(hw)
    first = np.stack([np.zeros(hw), np.ones(hw), rng.integers(0, 2, hw).astype(float),
                      (rows % 2).astype(float), (cols % 3 == 0).astype(float),
                      ((rows + cols) % 2).astype(float)])
    second = rng.permutation(first.shape[0] * h * w).reshape(first.shape) / 64.0 - 1.0
    return np.stack([first, second], axis=1)


def per_tensor(layers) -> dict:
    out = {}
    for layer in layers:
        out[layer.weight] = layer.trace_weight
        if layer.bias is not None:
            out[layer.bias] = layer.trace_bias
    return out


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("name", list(POOLS))
def test_both_engines_route_ties_to_the_first_maximum(name, relu):
    pool = POOLS[name]
    hw = (7, 6)
    rng = np.random.default_rng(len(name))
    ho = pool_output_size(hw[0], pool[0][0], pool[1][0], pool[2][0], pool[2][2], pool[4][0], pool[3])
    wo = pool_output_size(hw[1], pool[0][1], pool[1][1], pool[2][1], pool[2][3], pool[4][1], pool[3])
    w2 = rng.integers(-8, 9, (K, 2 * ho * wo)) / 8.0
    b2 = rng.integers(-4, 5, K) / 8.0
    x = tie_images(hw, rng)
    want = oracle_traces(x, w2, b2, pool, relu)
    assert want["W1"] > 0  # the zero-weight channel's trace is observed
    proto = model(pool, hw, w2, b2, relu)
    total = sum(want.values())
    for engine, rtol in (("numpy", 1e-12), ("onnxruntime", 1e-5)):
        got = per_tensor(score_arrays(proto, x, provider="numpy" if engine == "numpy" else "cpu",
                                      engine=engine)[0])
        for key, value in want.items():
            assert abs(got[key] - value) <= rtol * (abs(value) + 1e-9 * total), (engine, key)


def test_another_tie_convention_would_be_seen():
    """The test above can fail: routing ties to the *last* maximum moves the traces."""
    pool = POOLS["3x3 s1 p1 ceil (GoogLeNet's branch pools)"]
    rng = np.random.default_rng(0)
    x = tie_images((7, 6), rng)
    w2 = rng.integers(-8, 9, (K, 2 * 7 * 6)) / 8.0
    b2 = np.zeros(K)
    first = oracle_traces(x, w2, b2, pool, relu=True)
    last = oracle_traces(x, w2, b2, pool, relu=True, last=True)
    got = per_tensor(score_arrays(model(pool, (7, 6), w2, b2, True), x)[0])
    assert abs(got["W1"] - first["W1"]) <= 1e-12 * first["W1"]
    assert abs(last["W1"] - first["W1"]) > 1e-2 * first["W1"]
