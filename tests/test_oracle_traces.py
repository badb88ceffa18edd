"""Per-tensor Hessian traces from ``score_arrays`` against an independent oracle.

The oracle (tests/oracle.py) never imports minsharp_ref: it evaluates the ONNX model with
onnx's ReferenceEvaluator in float64 (pooling by a direct implementation checked against
onnxruntime below) and differentiates the logits by central finite differences, coordinate
by coordinate, then forms (1/N) Σ_n Tr(J_nᵀ A_n J_n).

Tolerances: the oracle's central differences are exact up to rounding for networks that
are linear in one tensor at a fixed activation pattern (about 1e-12 relative in practice),
so every per-tensor trace must match to rtol 1e-9, with an absolute slack of only
1e-12 × (total trace) for traces that are (near) zero.

About dtypes: onnxruntime's CPU provider has no float64 kernels for Conv, AveragePool and
GlobalAveragePool, so it cannot cross-check DOUBLE conv models (the numpy path scores them,
skipping its fidelity check with a warning: ``test_double_conv_model_scores_with_numpy_provider``).
Conv nets are therefore mostly stored as FLOAT, so that onnxruntime can check the oracle: the package computes in float64 from the float32 values, and the oracle
evaluates a DOUBLE copy of the same model (float32 values are exact in float64), so both
sides compute the same mathematical function in float64 and the 1e-9 tolerance still holds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from minsharp_ref import score_arrays

from oracle import (KinkError, Oracle, build, data, evaluator, labels, ort_logits)

F32 = np.float32
RTOL = 1e-9  # per-tensor trace vs the finite-difference Jacobian oracle
ATOL_REL_TOTAL = 1e-12  # absolute slack, relative to the total trace


def package_traces(built, x, provider="numpy", batch_size=1000):
    """{initializer name: trace} in the package's column order, naive trace, MS, layers."""
    layers, trace, ms = score_arrays(built.proto, x, provider=provider, batch_size=batch_size)
    got = {}
    for layer in layers:
        got[layer.weight] = layer.trace_weight
        if layer.bias is not None:
            got[layer.bias] = layer.trace_bias
        else:
            assert layer.trace_bias is None
    return got, trace, ms, layers


def check_oracle_forward(built, oracle, x):
    """The oracle's forward (ReferenceEvaluator, float64) agrees with onnxruntime's."""
    z = oracle.logits(x)
    zo = ort_logits(built, x)
    tol = (1e-12 if built.dtype == np.float64 else 2e-5) * (1 + np.max(np.abs(z)))
    assert np.max(np.abs(z - zo)) <= tol, "oracle forward disagrees with onnxruntime"


def assert_traces_match(got: dict, want: dict, rtol=RTOL):
    assert list(got) == list(want), "reported tensors (names/order) differ from the model's"
    total = sum(want.values())
    atol = ATOL_REL_TOTAL * total
    bad = {k: (got[k], want[k]) for k in want
           if not abs(got[k] - want[k]) <= rtol * abs(want[k]) + atol}
    assert not bad, f"traces differ (package, oracle): {bad}"


def check_against_oracle(built, n, seed=1, ort_check=True):
    x = data(built, n, seed)
    oracle = Oracle(built)
    if ort_check:
        check_oracle_forward(built, oracle, x)
    want = oracle.traces(x)
    got, trace, ms, layers = package_traces(built, x)
    assert [l.weight for l in layers] == built.weights
    assert [l.bias for l in layers] == built.biases
    assert_traces_match(got, want)
    assert trace == pytest.approx(sum(want.values()), rel=RTOL)
    assert np.isfinite(ms) and 0 <= ms <= trace * (1 + 1e-12)
    # a dead layer (zero weight trace) without bias traces gives MS = 0; no dead layer, MS > 0
    dead = any(want[w] == 0 for w in built.weights)
    if dead and not any(want[b] > 0 for b in built.biases if b is not None):
        assert ms == 0
    elif not dead:
        assert ms > 0


# ------------------------------------------------------------------ hand-picked problems

G, MM, R, LR, FL = "gemm", "matmul", "relu", "leaky", "flatten"
CASES = {
    # MLPs (DOUBLE)
    "gemm_transB1_transB0_alpha_beta": ((4,), [
        (G, dict(out=6)), (R, {}),
        (G, dict(out=5, transB=0, alpha=0.7, beta=1.3)), (LR, dict(alpha=0.1)),
        (G, dict(out=3, bias=False))], 6, {}),
    "gemm_alpha_no_bias_2d_bias": ((5,), [
        (G, dict(out=4, transB=0, alpha=2.5, bias=False)), (R, {}),
        (G, dict(out=4, bias_2d=True, beta=0.5)), (LR, dict(alpha=0.3)),
        (G, dict(out=2, transB=0, alpha=0.25, beta=4.0, bias_2d=True))], 5, {}),
    "matmul_add_bias_right_and_left": ((3,), [
        (MM, dict(out=5, bias="right")), (R, {}),
        (MM, dict(out=4, bias="left", bias_2d=True)), (R, {}),
        (MM, dict(out=4, bias=None))], 7, {}),
    "flatten_input_mixed_dense": ((2, 3, 2), [
        (FL, {}), (MM, dict(out=5, bias="left")), (LR, dict(alpha=0.01)),
        (G, dict(out=6, transB=0)), (R, {}), (MM, dict(out=2, bias="right"))], 4, {}),
    # conv nets (FLOAT storage, see the module docstring)
    "conv_pad1_maxpool": ((1, 7, 7), [
        ("conv", dict(out=3, pads=(1, 1, 1, 1))), (R, {}), ("maxpool", {}), (FL, {}),
        (G, dict(out=4))], 5, dict(dtype=F32)),
    "conv_strided_dilated_grouped_avgpool_ceil_incl_pad": ((2, 9, 9), [
        ("conv", dict(out=4, kernel=(3, 2), strides=(2, 1), dilations=(1, 2),
                      pads=(1, 0, 2, 1), group=2)), (LR, dict(alpha=0.2)),
        ("avgpool", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1),
                         count_include_pad=1, ceil_mode=1)),
        (FL, {}), (G, dict(out=6)), (R, {}), (G, dict(out=3))], 5, dict(dtype=F32)),
    "depthwise_conv_no_bias_pointwise_gap": ((3, 6, 6), [
        ("conv", dict(out=6, group=3, pads=(1, 1, 1, 1), bias=False)), (R, {}),
        ("conv", dict(out=4, kernel=(1, 1))), (R, {}), ("gap", {}), (FL, {}),
        (G, dict(out=5))], 4, dict(dtype=F32)),
    "pad_op_conv_stride2_maxpool_ceil_pads": ((1, 8, 8), [
        ("pad", dict(pads=(1, 2, 0, 1), with_value=True)),
        ("conv", dict(out=2, strides=(2, 2))), (R, {}),
        ("maxpool", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1), ceil_mode=1)),
        (FL, {}), (G, dict(out=3))], 5, dict(dtype=F32)),
    "conv_bias_via_add_avgpool_excl_pad_two_convs": ((2, 7, 7), [
        ("conv", dict(out=3, kernel=(2, 2), bias_via_add=True)), (R, {}),
        ("avgpool", dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))),
        ("conv", dict(out=2, kernel=(2, 2))), (LR, dict(alpha=0.05)), (FL, {}),
        (G, dict(out=2))], 6, dict(dtype=F32)),
    "avgpool_ceil_overhang_incl_pad_stride3": ((1, 7, 6), [
        ("conv", dict(out=2, kernel=(2, 2), pads=(0, 1, 0, 1))), (R, {}),
        ("avgpool", dict(kernel=(3, 3), strides=(3, 3), pads=(1, 0, 1, 0), ceil_mode=1,
                         count_include_pad=1)),
        ("pad", dict(pads=(0, 1, 1, 0))), ("conv", dict(out=3, kernel=(2, 2), bias=False)),
        (R, {}), ("maxpool", dict(kernel=(2, 2), strides=(1, 1), pads=(0, 0, 1, 1))),
        (FL, {}), (MM, dict(out=4, bias="right"))], 4, dict(dtype=F32)),
    "dilated_conv_leaky_maxpool_stride3_ceil_gemm_head": ((3, 9, 8), [
        ("conv", dict(out=2, kernel=(2, 3), dilations=(2, 2), pads=(2, 1, 0, 2))),
        (LR, dict(alpha=0.5)),
        ("maxpool", dict(kernel=(2, 3), strides=(3, 2), pads=(1, 0, 0, 2), ceil_mode=1)),
        (FL, {}), (G, dict(out=5, transB=0, alpha=1.5, beta=0.5)), (R, {}),
        (G, dict(out=6, bias=False))], 3, dict(dtype=F32)),
    # per-channel Mul (+ Add) after a layer: a diagonal layer (tf2onnx's Keras BatchNorm)
    "dense_channel_scale_shift": ((5,), [
        (MM, dict(out=6, bias="right")), ("channel_affine", {}), (R, {}),
        (G, dict(out=4, bias=False)), ("channel_affine", {}), (LR, dict(alpha=0.1)),
        (G, dict(out=3))], 6, {}),
    "biased_conv_channel_scale_shift": ((1, 6, 6), [
        ("conv", dict(out=3)), ("channel_affine", {}), (R, {}), ("maxpool", {}), (FL, {}),
        (G, dict(out=4))], 5, dict(dtype=F32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_picked_traces_match_jacobian_oracle(name):
    shape, layers, n, kw = CASES[name]
    built = build(shape, layers, seed=sum(map(ord, name)), **kw)
    check_against_oracle(built, n)


# ----------------------------------------------------------- hypothesis: architectures


@st.composite
def mlp_models(draw):
    layers = []
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        layers.append((FL, {}))
    else:
        shape = (draw(st.integers(1, 6)),)
    depth = draw(st.integers(1, 4))
    k = draw(st.integers(2, 6))
    for d in range(depth):
        out = k if d == depth - 1 else draw(st.integers(1, 6))
        if draw(st.booleans()):
            layers.append((G, dict(
                out=out, transB=draw(st.integers(0, 1)), bias=draw(st.booleans()),
                alpha=draw(st.sampled_from([1.0, 1.0, 0.5, 3.0])),
                beta=draw(st.sampled_from([1.0, 1.0, 0.25, 2.0])),
                bias_2d=draw(st.booleans()))))
        else:
            layers.append((MM, dict(out=out, bias=draw(st.sampled_from([None, "right", "left"])),
                                    bias_2d=draw(st.booleans()))))
        if d < depth - 1:
            if draw(st.booleans()):
                layers.append((R, {}))
            else:
                layers.append((LR, dict(alpha=draw(st.sampled_from([0.01, 0.2, 0.7])))))
    return shape, layers, draw(st.integers(3, 8)), draw(st.integers(0, 2 ** 16))


def _out_len(length, k, s, d, pb, pe, ceil):
    span = length + pb + pe - (d * (k - 1) + 1)
    if span < 0:
        return 0
    out = (-(-span // s) if ceil else span // s) + 1
    return out


@st.composite
def conv_models(draw):
    c = draw(st.integers(1, 3))
    h, w = draw(st.integers(5, 9)), draw(st.integers(5, 9))
    shape = (c, h, w)
    layers = []
    if draw(st.integers(0, 3)) == 0:  # a Pad op now and then
        p = tuple(draw(st.integers(0, 2)) for _ in range(4))
        layers.append(("pad", dict(pads=p, with_value=draw(st.booleans()))))
        h, w = h + p[0] + p[2], w + p[1] + p[3]
    for block in range(draw(st.integers(1, 2))):
        group = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
        out = group * draw(st.integers(1, 2)) if group > 1 else draw(st.integers(1, 4))
        kernel, strides, dil, pads, hw = [], [], [], [0, 0, 0, 0], []
        for ax, length in enumerate((h, w)):
            k = draw(st.integers(1, 3))
            s = draw(st.integers(1, 2))
            d = draw(st.integers(1, 2))
            pb, pe = draw(st.integers(0, 2)), draw(st.integers(0, 2))
            if _out_len(length, k, s, d, pb, pe, 0) < 1:
                k, d = 1, 1
            kernel.append(k)
            strides.append(s)
            dil.append(d)
            pads[ax], pads[ax + 2] = pb, pe
            hw.append(_out_len(length, k, s, d, pb, pe, 0))
        layers.append(("conv", dict(out=out, kernel=tuple(kernel), strides=tuple(strides),
                                    dilations=tuple(dil), pads=tuple(pads), group=group,
                                    bias=draw(st.booleans()))))
        h, w = hw
        c = out
        if draw(st.booleans()):
            layers.append((R, {}))
        else:
            layers.append((LR, dict(alpha=draw(st.sampled_from([0.01, 0.2, 0.6])))))
        pool = draw(st.sampled_from(["none", "max", "avg"]))
        if pool != "none":
            ceil = draw(st.integers(0, 1))
            kernel, strides, pads, hw = [], [], [0, 0, 0, 0], []
            for ax, length in enumerate((h, w)):
                k = draw(st.integers(1, min(3, length)))
                s = draw(st.integers(1, 3))
                pb, pe = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
                kernel.append(k)
                strides.append(s)
                pads[ax], pads[ax + 2] = pb, pe
            for ax, length in enumerate((h, w)):
                k, s, pb, pe = kernel[ax], strides[ax], pads[ax], pads[ax + 2]
                o = _out_len(length, k, s, 1, pb, pe, ceil)
                if ceil and (o - 1) * s >= length + pb:
                    ceil = 0  # keep the last window starting inside input or left padding
            for ax, length in enumerate((h, w)):
                hw.append(_out_len(length, kernel[ax], strides[ax], 1, pads[ax], pads[ax + 2], ceil))
            args = dict(kernel=tuple(kernel), strides=tuple(strides), pads=tuple(pads),
                        ceil_mode=ceil)
            if pool == "avg":
                args["count_include_pad"] = draw(st.integers(0, 1))
            layers.append(("maxpool" if pool == "max" else "avgpool", args))
            h, w = hw
    if c * h * w > 48 or draw(st.integers(0, 4)) == 0:
        layers.append(("gap", {}))
    layers.append((FL, {}))
    k = draw(st.integers(2, 6))
    if draw(st.booleans()):
        layers.append((G, dict(out=draw(st.integers(2, 5)), transB=draw(st.integers(0, 1)))))
        layers.append((R, {}))
    layers.append((G, dict(out=k, bias=draw(st.booleans()), transB=draw(st.integers(0, 1)))))
    return shape, layers, draw(st.integers(3, 5)), draw(st.integers(0, 2 ** 16))


def _run_drawn(arch, **kw):
    shape, layers, n, seed = arch
    built = build(shape, layers, seed=seed, **kw)
    try:
        check_against_oracle(built, n, seed=seed + 1)
    except KinkError:
        reject()  # a finite-difference step crossed a kink: an oracle limit, not a finding


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_models())
def test_drawn_mlps_match_jacobian_oracle(arch):
    _run_drawn(arch)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_models())
def test_drawn_conv_nets_match_jacobian_oracle(arch):
    _run_drawn(arch, dtype=F32)


# ------------------------------------------------ Jacobian oracle vs loss second differences

TINY = {
    "mlp": ((3,), [(G, dict(out=4)), (R, {}), (MM, dict(out=3, bias="left")), (LR, dict(alpha=0.2)),
                   (G, dict(out=3, transB=0, alpha=1.5))], 4, {}),
    "conv": ((1, 5, 5), [("conv", dict(out=2, kernel=(2, 2), pads=(1, 1, 0, 0))), (R, {}),
                         ("maxpool", dict(kernel=(2, 2), strides=(2, 2), ceil_mode=1)),
                         (FL, {}), (G, dict(out=3))], 4, dict(dtype=F32)),
}


@pytest.mark.parametrize("name", list(TINY))
def test_jacobian_oracle_vs_loss_second_differences(name):
    """Two independent oracles agree, and the package agrees with the loss-based one.
    rtol 1e-6: second differences of the (curved) cross-entropy carry truncation error
    O(h²) and rounding error O(eps/h²) (see Oracle.loss_second_difference_trace)."""
    shape, layers, n, kw = TINY[name]
    built = build(shape, layers, seed=7, **kw)
    x, y = data(built, n), labels(built, n)
    oracle = Oracle(built)
    jac = oracle.traces(x)
    loss = {p: oracle.loss_second_difference_trace(x, y, p) for p in built.params}
    got, _, _, _ = package_traces(built, x)
    total = sum(jac.values())
    for p in built.params:
        assert loss[p] == pytest.approx(jac[p], rel=1e-6, abs=1e-9 * total), p
        assert got[p] == pytest.approx(loss[p], rel=1e-6, abs=1e-9 * total), p


# ------------------------------------------------------------- batching and providers


@pytest.mark.parametrize("name", ["gemm_transB1_transB0_alpha_beta",
                                  "conv_strided_dilated_grouped_avgpool_ceil_incl_pad",
                                  "pad_op_conv_stride2_maxpool_ceil_pads"])
def test_batch_size_does_not_change_results(name):
    shape, layers, _, kw = CASES[name]
    built = build(shape, layers, seed=3, **kw)
    x = data(built, 9)
    ref, ref_trace, ref_ms, _ = package_traces(built, x, batch_size=1000)
    for bs in (1, 2, 7):
        got, trace, ms, _ = package_traces(built, x, batch_size=bs)
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-15 * ref_trace), (bs, k)
        assert trace == pytest.approx(ref_trace, rel=1e-12)
        assert ms == pytest.approx(ref_ms, rel=1e-12)


@pytest.mark.parametrize("name", ["gemm_transB1_transB0_alpha_beta", "flatten_input_mixed_dense",
                                  "matmul_add_bias_right_and_left"])
def test_onnxruntime_cpu_provider_matches_numpy(name):
    """provider="cpu" runs onnxruntime's forward (float64 for these DOUBLE models, which
    onnxruntime supports for Gemm/MatMul/Add/Relu/LeakyRelu/Flatten)."""
    shape, layers, _, kw = CASES[name]
    built = build(shape, layers, seed=5, **kw)
    x = data(built, 6)
    ref, ref_trace, ref_ms, _ = package_traces(built, x, provider="numpy")
    got, trace, ms, _ = package_traces(built, x, provider="cpu")
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12 * ref_trace), k
    assert trace == pytest.approx(ref_trace, rel=1e-9)
    assert ms == pytest.approx(ref_ms, rel=1e-9)


def test_onnxruntime_cpu_provider_float32_conv_close_to_numpy():
    """A FLOAT conv net: onnxruntime's forward is float32, so only ~1e-5 agreement."""
    shape, layers, _, kw = CASES["conv_pad1_maxpool"]
    built = build(shape, layers, seed=5, **kw)
    x = data(built, 6)
    ref, _, ref_ms, _ = package_traces(built, x, provider="numpy")
    got, _, ms, _ = package_traces(built, x, provider="cpu")
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-4), k
    assert ms == pytest.approx(ref_ms, rel=1e-4)


def test_double_conv_model_scores_with_numpy_provider():
    """onnxruntime has no float64 Conv kernels: the numpy path must still score (the fidelity
    check is skipped with a warning), against the oracle."""
    shape, layers, n, _ = CASES["conv_pad1_maxpool"]
    built = build(shape, layers, seed=1)  # DOUBLE: onnxruntime cannot cross-check the oracle
    check_against_oracle(built, n, ort_check=False)


# ---------------------------------------------------- the oracle's pooling vs onnxruntime


def _pool_model(op, hw, kernel, strides, pads, ceil, cip, dil, elem):
    attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads), ceil_mode=ceil)
    if op == "AveragePool":
        attrs["count_include_pad"] = cip
    else:
        attrs["dilations"] = list(dil)
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", elem, ["N", 2, *hw])],
                              [helper.make_tensor_value_info("y", elem, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


POOL_GRID = [
    (op, hw, k, s, p, ceil, cip, d)
    for op in ("MaxPool", "AveragePool")
    for hw, k, s, p, ceil, cip, d in itertools.product(
        [(5, 6), (7, 4)], [(2, 2), (3, 2)], [(1, 1), (2, 3), (3, 3)],
        [(0, 0, 0, 0), (1, 0, 0, 1), (1, 1, 1, 1)], [0, 1], [0, 1], [(1, 1), (2, 1)])
    if not (op == "MaxPool" and cip) and not (op == "AveragePool" and d != (1, 1))
]


def test_oracle_pooling_matches_onnxruntime():
    """The oracle's MaxPool / AveragePool (used instead of the ReferenceEvaluator's, which
    is wrong for some padded or ceil_mode cases) reproduces onnxruntime's float32 output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    for op, hw, k, s, p, ceil, cip, d in POOL_GRID:
        x = rng.normal(size=(2, 2) + hw).astype(np.float32)
        m32 = _pool_model(op, hw, k, s, p, ceil, cip, d, TensorProto.FLOAT)
        m64 = _pool_model(op, hw, k, s, p, ceil, cip, d, TensorProto.DOUBLE)
        want = ort.InferenceSession(m32.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        got = evaluator(m64).run(None, {"x": x.astype(np.float64)})[0]
        assert got.shape == want.shape, (op, hw, k, s, p, ceil, cip, d)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                   err_msg=str((op, hw, k, s, p, ceil, cip, d)))
