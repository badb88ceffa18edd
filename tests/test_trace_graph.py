"""The onnxruntime engine (the trace graph, minsharp_ref/trace_graph/) on the CPU provider.

References: the float64 NumPy engine (itself checked against the finite-difference
Jacobian oracle in test_oracle_traces.py) for every fixture, and the Jacobian oracle of
tests/oracle.py directly for hand-picked and hypothesis-drawn architectures.

Tolerances: the float32 graph carries float32 rounding through the forward, the signals
and the products (sums over more than one axis are float64): per-tensor traces, naive
trace and MS within 1e-5 relative of the float64 reference on the fixtures, and 2e-4 on
the tiny random oracle nets, whose traces span many decades (plus an absolute slack of
1e-7 × total trace for traces that are (near) zero). The float64 graph (dense nets, where
onnxruntime's CPU provider has every float64 kernel) matches to 1e-10.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from minsharp_ref import score, score_arrays
from minsharp_ref.api import traces_over
from minsharp_ref.cli import app
from minsharp_ref.engine import per_sample_traces, tensor_columns
from minsharp_ref.errors import MinsharpError
from minsharp_ref.group import folded_view
from minsharp_ref.ir import BatchNorm, LayerBase
from minsharp_ref.onnx_import import ImportedModel, convert, import_model
from minsharp_ref.trace_graph import build_trace_graph

from conftest import FIXTURES, MNIST
from oracle import KinkError, Oracle, _Builder, build, data
from test_dag import draw_dag, wirings
from test_oracle_traces import CASES, conv_models, mlp_models

NORM = dict(mean=[0.5], std=[0.5])
#: tv_*: torchvision's 3-channel models, checked on both engines in test_torchvision.py
FIXTURE_MODELS = sorted(p.name for p in FIXTURES.glob("*.onnx") if not p.name.startswith("tv_"))
runner = CliRunner()


def per_tensor(result) -> dict:
    return per_tensor_of(result.layers)


def per_tensor_of(layers) -> dict:
    out = {}
    for layer in layers:
        out[layer.weight] = layer.trace_weight
        if layer.bias is not None:
            out[layer.bias] = layer.trace_bias
    return out


def assert_close(got: dict, want: dict, rtol: float, atol_total: float = 0.0):
    assert list(got) == list(want)
    atol = atol_total * sum(want.values())
    bad = {k: (got[k], want[k]) for k in want if not abs(got[k] - want[k]) <= rtol * abs(want[k]) + atol}
    assert not bad, f"traces differ (trace graph, reference): {bad}"


# ------------------------------------------------------------------------------ fixtures


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fixture_traces_match_float64_numpy_engine(name):
    """Every fixture, 100 MNIST samples (with labels for the cross-entropy models; every
    loss kind's head; ResNets with and without BatchNorm, BN chains, DenseNets): per-tensor traces of
    both parametrisations (BatchNorm: the original and the folded view), naive trace and MS
    of the float32 graph within 1e-5 of the float64 NumPy engine (float64 forward); the
    float64 graph, where the CPU provider runs it, within 1e-10; the JSON fields name what
    ran."""
    network = import_model(FIXTURES / name).network
    labelled = network.loss == "cross-entropy"
    unlabelled = {"x_key": "x_train", "split": "test"}  # x_train without its labels
    common = dict(limit=100, **NORM, **({} if labelled else unlabelled))
    ref = score(FIXTURES / name, MNIST, provider="numpy", **common)
    fast = score(FIXTURES / name, MNIST, provider="cpu", engine="onnxruntime", **common)
    assert (fast.engine, fast.provider, fast.precision) == ("onnxruntime", "cpu", "float32")
    # certified on its first batch, at most 64 samples
    assert fast.engine_check["samples"] == min(64, fast.data["batch_size"])
    assert fast.engine_check["max_relative_deviation"] <= 1e-5
    assert_close(per_tensor(fast), per_tensor(ref), 1e-5)
    assert (fast.folded is None) == (ref.folded is None) == (not network.has_batchnorm)
    if ref.folded is not None:
        assert_close(per_tensor_of(fast.folded["layers"]), per_tensor_of(ref.folded["layers"]), 1e-5)
        assert fast.folded["trace"] == pytest.approx(ref.folded["trace"], rel=1e-5)
    assert fast.trace == pytest.approx(ref.trace, rel=1e-5)
    assert fast.minimum_sharpness == pytest.approx(ref.minimum_sharpness, rel=1e-5)
    assert fast.trace_stderr == pytest.approx(ref.trace_stderr, rel=1e-4)
    if labelled:
        assert fast.loss == pytest.approx(ref.loss, rel=1e-5) and fast.accuracy == ref.accuracy
        assert fast.loss_stderr == pytest.approx(ref.loss_stderr, rel=1e-5)
    if "mlp" in name:  # dense nets: every op has a float64 kernel on the CPU provider
        f64 = score(FIXTURES / name, MNIST, provider="cpu", engine="onnxruntime",
                    precision="float64", **common)
        assert f64.precision == "float64" and not f64.warnings
        assert_close(per_tensor(f64), per_tensor(ref), 1e-10)
        assert f64.minimum_sharpness == pytest.approx(ref.minimum_sharpness, rel=1e-10)


def test_float64_falls_back_to_float32_with_a_warning():
    """Conv nets: the CPU provider has no float64 Conv kernel; the float32 graph runs and
    the result says so."""
    f64 = score(FIXTURES / "cnn_avgpool_strided.onnx", MNIST, provider="cpu", engine="onnxruntime",
                precision="float64", limit=64, **NORM)
    assert f64.precision == "float32" and f64.data["precision"] == "float32"
    assert "cannot run the trace graph in float64" in " ".join(f64.warnings)


def test_diagonal_and_per_sample_match_numpy_engine():
    """--diag and --per-sample outputs of the graph against the NumPy engine's."""
    common = dict(limit=70, diagonal=True, per_sample=True, **NORM)
    for name in ("smallcnn_torchscript.onnx", "mlp_torchscript.onnx", "cnn_bn_dynamo.onnx"):
        ref = score(FIXTURES / name, MNIST, provider="numpy", **common)
        fast = score(FIXTURES / name, MNIST, provider="cpu", engine="onnxruntime", **common)
        assert sorted(fast.diagonal) == sorted(ref.diagonal)
        for key, want in ref.diagonal.items():
            got = fast.diagonal[key]
            assert got.shape == want.shape
            assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), key
        for key, want in ref.per_sample.items():
            np.testing.assert_allclose(fast.per_sample[key], want, rtol=1e-4, atol=1e-9 * want.max())


def test_maxpool_ties_route_to_the_first_index():
    """Constant and two-valued images make every max-pool window a tie: the graph routes
    to the first maximum, as the NumPy engine (window_argmax) does."""
    imported = import_model(FIXTURES / "lenet_torchscript.onnx")
    x = np.zeros((6, 1, 28, 28))
    x[1] = 1.0
    x[2, :, ::2] = 0.5
    x[3, :, :, 1::2] = -1.0
    x[4:] = np.round(np.random.default_rng(0).random((2, 1, 28, 28)))
    layers, trace, ms = score_arrays(imported, x, provider="cpu", engine="onnxruntime")
    ref_layers, ref_trace, ref_ms = score_arrays(imported, x, provider="numpy")
    for a, b in zip(layers, ref_layers):
        assert a.trace_weight == pytest.approx(b.trace_weight, rel=1e-5)
        assert a.trace_bias == pytest.approx(b.trace_bias, rel=1e-5)
    assert ms == pytest.approx(ref_ms, rel=1e-5)


# --------------------------------------------------------------------- against the oracle


def graph_traces(built, x, precision):
    layers, trace, ms = score_arrays(built.proto, x, provider="cpu", engine="onnxruntime",
                                     precision=precision)
    got = {}
    for layer in layers:
        got[layer.weight] = layer.trace_weight
        if layer.bias is not None:
            got[layer.bias] = layer.trace_bias
    return got, trace


def check_graph_against_oracle(built, n, seed):
    """DOUBLE (dense) models: the float64 graph at 1e-9; FLOAT (conv) models: float32 graph."""
    x = data(built, n, seed)
    want = Oracle(built).traces(x)
    double = built.dtype == np.float64
    got, trace = graph_traces(built, x, "float64" if double else "float32")
    rtol, atol = (1e-9, 1e-12) if double else (2e-4, 1e-7)
    assert_close(got, want, rtol, atol)


@pytest.mark.parametrize("name", list(CASES))
def test_hand_picked_oracle_problems(name):
    shape, layers, n, kw = CASES[name]
    check_graph_against_oracle(build(shape, layers, seed=3, **kw), n, seed=4)


@pytest.mark.parametrize("alpha", [0.1, -0.5])
@pytest.mark.parametrize("pool", [dict(kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
                                  dict(kernel=(2, 2), strides=(1, 1))])
def test_activation_folded_into_maxpool_routing(alpha, pool):
    """A (Leaky)ReLU before a max pool: the pool's routing applies the activation's factor
    (sign of the pool's output) for slopes ≥ 0; a negative slope (not increasing, so the
    sign test on the output would be wrong) keeps its own rule. Against the oracle."""
    layers = [("conv", dict(out=3, pads=(1, 1, 1, 1))), ("leaky", dict(alpha=alpha)),
              ("maxpool", pool), ("conv", dict(out=2, kernel=(2, 2))), ("relu", {}),
              ("maxpool", {}), ("flatten", {}), ("gemm", dict(out=4))]
    check_graph_against_oracle(build((2, 8, 8), layers, seed=6, dtype=np.float32), 6, seed=7)


@pytest.mark.parametrize("pool", [
    dict(kernel=(3, 2), strides=(2, 1), dilations=(2, 3), pads=(1, 0, 2, 1), ceil_mode=1),
    dict(kernel=(2, 3), strides=(1, 2), dilations=(3, 1), pads=(0, 2, 1, 0)),
    dict(kernel=(2, 2), strides=(3, 2), dilations=(2, 1), pads=(1, 1, 0, 1), ceil_mode=1),
    dict(kernel=(3, 2), strides=(3, 3), pads=(1, 0, 1, 1))])
def test_dilated_maxpool_routing(pool):
    """Max pools with overlapping windows (the arg-max's offset in its window read from its
    flat position in the padded plane less the window's corner, then col2im) and disjoint
    ones (MaxUnpool on the padded frame), dilated, padded, strided, in ceil_mode, with a
    ReLU (folded into the routing) or a LeakyReLU before them; against the oracle."""
    for act in ("relu", "leaky"):
        layers = [("conv", dict(out=3, pads=(1, 1, 1, 1))), (act, {}), ("maxpool", pool),
                  ("conv", dict(out=2, kernel=(2, 2))), ("relu", {}), ("flatten", {}),
                  ("gemm", dict(out=4))]
        check_graph_against_oracle(build((2, 11, 10), layers, seed=8, dtype=np.float32), 6, seed=9)


def _drawn(arch, **kw):
    shape, layers, n, seed = arch
    try:
        check_graph_against_oracle(build(shape, layers, seed=seed, **kw), n, seed + 1)
    except KinkError:
        reject()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_models())
def test_drawn_mlps_match_oracle(arch):
    _drawn(arch)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_models())
def test_drawn_conv_nets_match_oracle(arch):
    _drawn(arch, dtype=np.float32)


def check_dag_against_oracle_and_numpy_engine(built, x):
    """The float32 graph's W, b, γ, β traces against the finite-difference oracle, and every
    column (the folded view's too) against the float64 NumPy engine, at the tiny nets'
    float32 tolerance."""
    imported = ImportedModel(None, "", built.proto, convert(built.proto))
    fast = traces_over(imported, [x], None, "cpu", check=False, engine="onnxruntime",
                       precision="float32")
    ref = traces_over(imported, [x], None, "numpy", check=False)
    names = [n for _, _, n in tensor_columns(imported.network)]
    assert fast.sums.columns == ref.sums.columns >= len(names)  # BatchNorm: the folded columns
    got = fast.sums.mean
    want = ref.sums.mean
    assert np.all(np.abs(got - want) <= 2e-4 * np.abs(want) + 1e-7 * np.abs(want).sum())
    assert_close(dict(zip(names, got[:len(names)])), Oracle(built).traces(x), 2e-4, 1e-7)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings, bn_stem=st.booleans())
@example(seed=3, wiring=[("Concat", True, True), ("Add", False, False)], bn_stem=True)
def test_drawn_dags_match_oracle_and_numpy_engine(seed, wiring, bn_stem):
    """Drawn residual/DenseNet-style nets (random Add/Concat wiring, projections, BatchNorm
    with random running statistics; tests/test_dag.py)."""
    built = draw_dag(seed, wiring, bn_stem)
    try:
        check_dag_against_oracle_and_numpy_engine(built, data(built, 5, seed + 1))
    except KinkError:
        reject()  # a finite-difference step crossed a kink: an oracle limit, not a finding


def test_batchnorm_that_cannot_be_folded():
    """A BN after an Add and a BN on flattened features (1-D per sample): the folded view
    keeps them as per-channel diagonal layers, measured by the same BatchNorm rule."""
    b = _Builder((2, 5, 5), np.random.default_rng(7), gain=1.2)
    b.conv(3, pads=(1, 1, 1, 1))
    b.relu()
    skip = b.cur
    b.conv(3, pads=(1, 1, 1, 1))
    b.relu()
    b.join("Add", skip)
    b.batchnorm()
    b.relu()
    b.gap()
    b.flatten()
    b.batchnorm()
    b.gemm(3)
    built = b.finish()
    folded = folded_view(convert(built.proto))
    assert sum(isinstance(layer, BatchNorm) for layer in folded.layers) == 2
    check_dag_against_oracle_and_numpy_engine(built, data(built, 5, 8))


# ----------------------------------------------------------------- export, refusal, CLI


def test_exported_graph_checks_and_runs_in_a_fresh_session(tmp_path):
    """export-trace-graph writes a model that passes onnx.checker's full check (IR version
    ≤ 13, as onnxruntime reads) and gives the NumPy engine's per-sample traces."""
    import onnxruntime as ort

    out = tmp_path / "traces.onnx"
    model = FIXTURES / "cnn_avgpool_strided.onnx"
    r = runner.invoke(app, ["export-trace-graph", str(model), "-o", str(out), "--diag"])
    assert r.exit_code == 0, r.output
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 13
    assert [i.name for i in proto.graph.input] == ["input"]
    network = import_model(model).network
    names = [o.name for o in proto.graph.output]
    assert names[:2] == ["traces", "logits"]
    assert names[2:] == ["diagonal:" + n for _, _, n in tensor_columns(network)]
    x = np.random.default_rng(0).standard_normal((5,) + network.input_shape)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    traces, logits = session.run(["traces", "logits"], {"input": x.astype(np.float32)})[:2]
    z, inputs = network.forward(x, keep_inputs=True)
    np.testing.assert_allclose(logits, z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(traces, per_sample_traces(network, inputs, z), rtol=1e-4)


def test_unsupported_layer_and_loss_are_refused():
    network = import_model(FIXTURES / "mlp_torchscript.onnx").network

    class Softsign(LayerBase):
        pass

    from dataclasses import replace

    odd = replace(network, layers=network.layers[:-1] + (Softsign("a", "b", ("softsign",)),)
                  + network.layers[-1:])
    with pytest.raises(MinsharpError, match="does not support Softsign .*use --engine numpy"):
        build_trace_graph(odd)
    object.__setattr__(network, "loss", "hinge")
    with pytest.raises(MinsharpError, match="does not support the loss 'hinge'"):
        build_trace_graph(network)


def test_failed_engine_check_exits_2(monkeypatch):
    """A fast engine that drifts by 1e-3 from the reference is an error, not a result."""
    from minsharp_ref.trace_graph import runner as runner_module

    original = runner_module.TraceGraphRunner.__call__

    def drifting(self, x):
        traces, logits, diagonal = original(self, x)
        return traces * (1 + 1e-3), logits, diagonal

    monkeypatch.setattr(runner_module.TraceGraphRunner, "__call__", drifting)
    r = runner.invoke(app, ["score", str(FIXTURES / "mlp_torchscript.onnx"), "--data", str(MNIST),
                            "--mean", "0.5", "--std", "0.5", "--limit", "80", "--engine", "onnxruntime"])
    assert r.exit_code == 2
    assert "engine check failed" in r.output and "by 0.001 " in r.output


def test_engine_check_scores_the_first_batch(monkeypatch):
    """The certificate covers the first batch, at most 64 samples (a first batch of 10: 10
    samples; of 100: 64), and the reference is the float64 NumPy engine's: a drift of the
    first batch alone fails the run. The import-fidelity check shares the first batch's
    float64 forward: reported, and an unfaithful import (the IR's first bias off by 1) fails."""
    from minsharp_ref.trace_graph import runner as runner_module

    imported = import_model(FIXTURES / "smallcnn_torchscript.onnx")
    with np.load(MNIST) as d:
        x = (d["x_train"][:120].astype(np.float64) / 255 - 0.5) / 0.5
    x = x.reshape(-1, 1, 28, 28)
    for first, want in ((10, 10), (100, 64)):
        run = traces_over(imported, [x[:first], x[first:]], None, "cpu", engine="onnxruntime")
        assert run.engine_check["samples"] == want and run.sums.n == 120
        assert run.engine_check["max_relative_deviation"] <= 1e-5
        assert 0 < run.fidelity <= 1e-5
    assert traces_over(imported, [x], None, "cpu", engine="onnxruntime", check=False).fidelity is None
    layer = imported.network.param_layers[0]
    wrong = imported.network.with_parameters({layer.bias_name: layer.bias + 1.0})
    unfaithful = ImportedModel(imported.path, imported.sha256, imported.proto, wrong)
    with pytest.raises(MinsharpError, match="the import is not faithful"):
        traces_over(unfaithful, [x[:10], x[10:]], None, "cpu", engine="onnxruntime")
    original = runner_module.TraceGraphRunner.__call__
    calls = []

    def drifting_once(self, x):  # the batch submitted first drifts by 1e-3
        traces, logits, diagonal = original(self, x)
        calls.append(len(x))
        return (traces * (1 + 1e-3) if len(calls) == 1 else traces), logits, diagonal

    monkeypatch.setattr(runner_module.TraceGraphRunner, "__call__", drifting_once)
    with pytest.raises(MinsharpError, match="engine check failed.* on the first 10 samples"):
        traces_over(imported, [x[:10], x[10:]], None, "cpu", engine="onnxruntime", threads=1)


def _numbers(table: str) -> list[float]:
    rows = [l for l in table.splitlines() if re.match(r"^\d+\s", l)]
    rows += [l for l in table.splitlines() if l.startswith(("naive trace", "minimum sharpness"))]
    return [float(v) for l in rows for v in re.findall(r"(?<![\w.])-?\d+\.\d+(?:e[-+]\d+)?", l)]


def test_cli_table_matches_numpy_engine(tmp_path):
    """`score --engine onnxruntime` prints the NumPy engine's table to ~6 significant
    digits (each printed number within 1e-5 relative), plus its engine check; the JSON
    report validates against the schema and names engine, provider and precision."""
    jsonschema = pytest.importorskip("jsonschema")
    args = ["score", str(FIXTURES / "smallcnn_torchscript.onnx"), "--data", str(MNIST),
            "--mean", "0.5", "--std", "0.5", "--limit", "100", "--provider", "cpu"]
    ref = runner.invoke(app, args)
    out = tmp_path / "report.json"
    fast = runner.invoke(app, args + ["--engine", "onnxruntime", "--json", str(out)])
    assert ref.exit_code == 0 and fast.exit_code == 0, fast.output
    assert "engine: onnxruntime (cpu, float32); engine check" in fast.stdout
    a, b = _numbers(fast.stdout), _numbers(ref.stdout)
    assert len(a) == len(b) > 10
    assert all(x == pytest.approx(y, rel=1e-5) for x, y in zip(a, b))
    doc = json.loads(out.read_text())
    schema = json.loads((FIXTURES.parent / "docs" / "score.schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert (doc["engine"], doc["provider"], doc["precision"]) == ("onnxruntime", "cpu", "float32")
    assert doc["engine_check"]["tolerance"] == 1e-4
