"""Neuron-wise minimum sharpness (docs/method.md section 13).

Oracles: the closed form Σ_i 2√(A_i B_i) of one hidden layer without biases; scipy's
minimiser on F(s) written out entry by entry from the diagonal (not from the code's terms);
the layer-wise minimum sharpness (a subgroup: neuron-wise MS ≤ MS); function-preserving
neuron-wise rescalings checked in onnx's float64 ReferenceEvaluator (tests/oracle.py), under
which the value must not move while MS and the naive trace do; the rescaled network's own
naive trace.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse
from scipy.optimize import minimize

import oracle
from conftest import FIXTURES, MNIST
from minsharp_ref.api import summarise, traces_over
from minsharp_ref.group import folded_view
from minsharp_ref.neuron import unit_map, unit_parameters
from minsharp_ref.neuron_measure import neuron_optimum
from minsharp_ref.onnx_import import ImportedModel, convert
from minsharp_ref.rescale import apply_to_proto
from minsharp_ref.sharpness import minimise_exponential_sum
from test_dag import draw_dag, wirings

RTOL = 1e-9


def measured(built: oracle.Built, x: np.ndarray):
    """(imported, summary, run) on the float64 NumPy engine, with the diagonal."""
    imported = ImportedModel(None, "", built.proto, convert(built.proto))
    run = traces_over(imported, [x], None, "numpy", diagonal=True, check=False)
    return imported, summarise(imported, run.sums, False), run


def mlp(seed: int, sizes=(4, 5, 3), biases=True) -> oracle.Built:
    layers = []
    for k, out in enumerate(sizes[1:]):
        layers.append(("gemm", dict(out=out, bias=biases)))
        if k < len(sizes) - 2:
            layers.append(("relu", {}))
    return oracle.build((sizes[0],), layers, seed=seed)


def small_cnn(seed: int) -> oracle.Built:
    return oracle.build((2, 6, 6), [("conv", dict(out=3)), ("relu", {}), ("maxpool", {}),
                                    ("flatten", {}), ("gemm", dict(out=4)), ("relu", {}),
                                    ("gemm", dict(out=3))], seed=seed)


@given(seed=st.integers(0, 2 ** 16))
@settings(max_examples=5, deadline=None)
def test_one_hidden_layer_without_biases_is_the_closed_form(seed):
    """Σ_i 2√(A_i B_i), A_i = Σ_j H_(1,i,j), B_i = Σ_k H_(2,k,i)."""
    built = mlp(seed, (4, 6, 3), biases=False)
    imported, summary, run = measured(built, oracle.data(built, 7, seed=seed + 1))
    h1, h2 = run.diagonal[built.weights[0]], run.diagonal[built.weights[1]]  # (out, in) each
    want = float(np.sum(2 * np.sqrt(h1.sum(axis=1) * h2.sum(axis=0))))
    got = neuron_optimum(imported.network, run.diagonal).result
    assert got.value == pytest.approx(want, rel=1e-12)
    assert got.value <= summary.minimum_sharpness * (1 + 1e-12)


def entrywise_objective(network, diagonal):
    """F(s) of a dense chain written out entry by entry: s holds the hidden units in order."""
    layers = network.param_layers
    sizes = [l.out_features for l in layers[:-1]]
    offsets = np.concatenate([[0], np.cumsum(sizes)])

    def f(s):
        total = 0.0
        for d, layer in enumerate(layers):
            h = diagonal[layer.weight_name]
            s_out = s[offsets[d]:offsets[d + 1]] if d < len(sizes) else np.zeros(layer.out_features)
            s_in = s[offsets[d - 1]:offsets[d]] if d > 0 else np.zeros(h.shape[1])
            for i in range(h.shape[0]):
                for j in range(h.shape[1]):
                    total += h[i, j] * np.exp(-2 * (s_out[i] - s_in[j]))
                if layer.bias is not None:
                    total += diagonal[layer.bias_name][i] * np.exp(-2 * s_out[i])
        return total

    return f, int(offsets[-1])


@given(seed=st.integers(0, 2 ** 16))
@settings(max_examples=4, deadline=None)
def test_newton_agrees_with_scipy_on_the_entrywise_objective(seed):
    built = mlp(seed, (3, 3, 2, 3))
    imported, summary, run = measured(built, oracle.data(built, 9, seed=seed + 1))
    f, n = entrywise_objective(imported.network, run.diagonal)
    got = neuron_optimum(imported.network, run.diagonal).result
    if not got.attained:
        return
    best = min((minimize(f, x0, method="BFGS", options={"gtol": 1e-12}).fun
                for x0 in (np.zeros(n), np.full(n, 0.5))), default=np.inf)
    assert got.value == pytest.approx(best, rel=1e-7)  # BFGS's accuracy
    assert got.value <= best * (1 + 1e-12)
    assert got.gradient_norm <= 1e-12


@pytest.mark.parametrize("dense_variables", [4096, 0])
def test_sparse_steps_equal_the_dense_least_squares_steps(dense_variables, monkeypatch):
    """The one solver: the same problem as sparse rows (Cholesky, or sparse LU with
    DENSE_VARIABLES = 0) and as dense rows (least squares)."""
    import minsharp_ref.sharpness as sharpness

    monkeypatch.setattr(sharpness, "DENSE_VARIABLES", dense_variables)
    rng = np.random.default_rng(0)
    m, v = 60, 12
    a = np.zeros((m, v))
    for t in range(m):
        i, j = rng.choice(v + 1, 2, replace=False)
        if i < v:
            a[t, i] = -2.0
        if j < v:
            a[t, j] = 2.0
    a[:v, :] = -2 * np.eye(v)  # every unit pinned towards the fixed node
    a[v:2 * v, :] = 2 * np.eye(v)
    c = rng.uniform(0.1, 3.0, m)
    dense = minimise_exponential_sum(a, c, np.zeros(v))
    sparse_ = minimise_exponential_sum(sparse.csr_matrix(a), c, np.zeros(v))
    f = lambda x: float(np.sum(c * np.exp(a @ x)))  # noqa: E731
    assert f(sparse_[0]) == pytest.approx(f(dense[0]), rel=1e-13)
    np.testing.assert_allclose(sparse_[0], dense[0], atol=1e-9)
    assert sparse_[1] <= 1e-12


def test_a_unit_whose_terms_vanish_on_one_side_is_an_unattained_infimum():
    """Hidden unit 0's outgoing weights are zero: its incoming diagonal is zero (no signal),
    its outgoing one is not; scaling it down drives those terms to 0."""
    built = mlp(3, (4, 3, 3), biases=False)
    values = built.values()
    w2 = values[built.weights[1]].copy()
    w2[:, 0] = 0.0
    built = built.with_values({built.weights[1]: w2})
    imported, _, run = measured(built, oracle.data(built, 8))
    got = neuron_optimum(imported.network, run.diagonal).result
    assert not got.attained and got.free_units == 1 and got.dropped_terms == 1  # (unit 0, logits)
    h1, h2 = run.diagonal[built.weights[0]], run.diagonal[built.weights[1]]
    assert h1[0].sum() == 0 and h2[:, 0].sum() > 0
    want = float(np.sum(2 * np.sqrt(h1.sum(axis=1) * h2.sum(axis=0))[1:]))  # unit 0: → 0
    assert got.value == pytest.approx(want, rel=1e-12)


def _rescaled(built: oracle.Built, imported, s) -> oracle.Built:
    params = unit_parameters(imported.network, unit_map(imported.network), s)
    return oracle.Built(apply_to_proto(built.proto, params), built.weights, built.biases,
                        built.input_shape, built.num_classes)


def _scored_trace(summary) -> float:
    return summary.folded["trace"] if summary.folded else summary.trace


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings, bn_stem=st.booleans(),
       spread=st.floats(0.5, 2.0), chain=st.booleans())
def test_invariant_under_neuron_wise_rescalings_and_below_ms(seed, wiring, bn_stem, spread, chain):
    """Random e^s per unit of a drawn chain or DAG (BatchNorm rescaled exactly): the logits
    do not move (reference evaluator), the neuron-wise MS does not move (1e-9), MS and the
    naive trace do; neuron-wise MS ≤ MS."""
    built = small_cnn(seed) if chain else draw_dag(seed, wiring, bn_stem)
    x = oracle.data(built, 6, seed=seed + 1)
    imported, base, run = measured(built, x)
    value = neuron_optimum(imported.network, run.diagonal).result.value
    assert value <= base.minimum_sharpness * (1 + 1e-12)
    units = unit_map(imported.network)
    s = np.random.default_rng(seed).uniform(-spread, spread, units.size) * np.log(10)
    scaled = _rescaled(built, imported, s)
    before, after = oracle.Oracle(built).logits(x), oracle.Oracle(scaled).logits(x)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-11 * np.abs(before).max())
    imported2, moved, run2 = measured(scaled, x)
    assert neuron_optimum(imported2.network, run2.diagonal).result.value == pytest.approx(value, rel=RTOL)
    assert abs(moved.minimum_sharpness / base.minimum_sharpness - 1) > 1e-6
    assert abs(_scored_trace(moved) / _scored_trace(base) - 1) > 1e-6


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings, bn_stem=st.booleans(), chain=st.booleans())
def test_the_network_at_the_minimiser_has_the_value_as_naive_trace(seed, wiring, bn_stem, chain):
    """Its (folded) naive trace equals the neuron-wise MS (1e-9), and so does its MS."""
    built = small_cnn(seed) if chain else draw_dag(seed, wiring, bn_stem)
    x = oracle.data(built, 6, seed=seed + 1)
    imported, _, run = measured(built, x)
    opt = neuron_optimum(imported.network, run.diagonal)
    if not opt.result.attained:
        return
    scaled = oracle.Built(apply_to_proto(built.proto, opt.params), built.weights, built.biases,
                          built.input_shape, built.num_classes)
    np.testing.assert_allclose(oracle.Oracle(scaled).logits(x), oracle.Oracle(built).logits(x),
                               rtol=0, atol=1e-11 * np.abs(oracle.Oracle(built).logits(x)).max())
    _, at, _ = measured(scaled, x)
    assert _scored_trace(at) == pytest.approx(opt.result.value, rel=RTOL)
    assert at.minimum_sharpness == pytest.approx(opt.result.value, rel=RTOL)
    assert sum(opt.result.traces) == pytest.approx(opt.result.value, rel=1e-12)


def test_units_of_the_fixtures():
    """ResNet: the channels summed by each Add share a unit (8 + 8 + 8 + 16 + 16); LeNet: one
    unit per channel and per hidden unit; the dense after a flatten reads channels."""
    from minsharp_ref.onnx_import import import_model

    resnet = import_model(FIXTURES / "resnet_bn_torchscript.onnx").network
    assert unit_map(folded_view(resnet)).size == 8 + 8 + 8 + 16 + 16
    lenet = import_model(FIXTURES / "lenet_torchscript.onnx").network
    units = unit_map(lenet)
    assert units.size == 6 + 16 + 120 + 84
    dense_in = units.layer_in[3]  # 84 × 5880: 120 channels × 7 × 7
    assert dense_in.shape == (5880,)
    np.testing.assert_array_equal(dense_in, np.repeat(units.layer_out[2], 49))


def test_score_measures_and_rescale_to_neuron_minimum(tmp_path):
    """The CLI end to end on a float64 MLP (onnxruntime, which checks the rescaled model,
    has no float64 Conv on the CPU): score --measures reports the value below MS with its
    s.e. (the second pass's trace equals the value), rescale --to-neuron-minimum writes a
    model whose naive trace is the value (1e-9), and both engines agree (1e-4)."""
    from typer.testing import CliRunner

    from minsharp_ref.cli import app

    built = mlp(5, (6, 8, 5, 3))
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(built.proto.SerializeToString())
    np.savez(data, x=oracle.data(built, 40, seed=2), y=oracle.labels(built, 40))
    runner = CliRunner()
    common = ["--data", str(data), "--x-key", "x", "--provider", "numpy"]
    r = runner.invoke(app, ["score", str(model), *common, "--y-key", "y", "--measures",
                            "--json", str(tmp_path / "a.json"), "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "a.json").read_text())
    n = doc["measures"]["neuron_minimum_sharpness"]
    assert n["value"] <= doc["minimum_sharpness"] and n["stderr"] > 0 and n["attained"]
    assert n["solver"]["second_pass_trace"] == pytest.approx(n["value"], rel=RTOL)
    assert sum(t["value"] for t in n["traces"]) == pytest.approx(n["value"], rel=1e-12)
    out = tmp_path / "at.onnx"
    r = runner.invoke(app, ["rescale", str(model), "-o", str(out), "--to-neuron-minimum",
                            "--data", str(data), "--x-key", "x", "--provider", "numpy", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["score", str(out), *common, "--json", str(tmp_path / "b.json"), "-q"])
    assert r.exit_code == 0, r.output
    after = json.loads((tmp_path / "b.json").read_text())
    assert after["trace"] == pytest.approx(n["value"], rel=RTOL)
    r = runner.invoke(app, ["score", str(model), "--data", str(data), "--x-key", "x",
                            "--engine", "onnxruntime", "--measures", "--json",
                            str(tmp_path / "c.json"), "-q"])
    assert r.exit_code == 0, r.output
    fast = json.loads((tmp_path / "c.json").read_text())["measures"]["neuron_minimum_sharpness"]
    assert fast["value"] == pytest.approx(n["value"], rel=1e-4)


def test_rescale_to_neuron_minimum_needs_data(tmp_path):
    from typer.testing import CliRunner

    from minsharp_ref.cli import app

    model = tmp_path / "m.onnx"
    model.write_bytes(mlp(1).proto.SerializeToString())
    r = CliRunner().invoke(app, ["rescale", str(model), "-o", str(tmp_path / "o.onnx"),
                                 "--to-neuron-minimum"])
    assert r.exit_code == 2 and "error: --to-neuron-minimum needs --data" in r.output
    assert not (tmp_path / "o.onnx").exists()


def test_both_engines_give_the_folded_diagonal_of_a_densenet():
    """DenseNet keeps 7 BatchNorms as diagonal layers: their folded diagonal comes from the
    trace graph too (float32), and the neuron-wise MS agrees with the float64 reference."""
    from minsharp_ref.data import Preprocessing, batches, open_dataset
    from minsharp_ref.onnx_import import import_model

    imported = import_model(FIXTURES / "densenet_torchscript.onnx")
    dataset = open_dataset(MNIST, "train", None, None, 16)
    xs = list(batches(dataset, imported.network.input_shape, Preprocessing([0.5], [0.5]), 16))
    dataset.close()
    values = []
    for engine in ("numpy", "onnxruntime"):
        run = traces_over(imported, iter(xs), None, "cpu", diagonal=True, engine=engine, check=False)
        assert any(k.endswith("(folded)") for k in run.diagonal)
        values.append(neuron_optimum(imported.network, run.diagonal).result.value)
    assert values[1] == pytest.approx(values[0], rel=1e-5)


@pytest.mark.parametrize("name", ["tv_shufflenet_v2.onnx", "tv_shufflenet_v2_dynamo.onnx"])
def test_neuron_wise_through_channel_slices_and_shuffles(name):
    """ShuffleNetV2 as torch.onnx writes it (channel split as Slice / SplitToSequence, the
    channel shuffle Reshape → Transpose → Reshape): random e^s per unit keep the function in
    onnxruntime (the rescaled ONNX file, independent of the IR), and the neuron-wise MS does
    not move (1e-9, float64) while MS does."""
    from minsharp_ref.onnx_import import import_model
    from minsharp_ref.runtime import OrtForward

    imported = import_model(FIXTURES / name)
    network = imported.network
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4,) + network.input_shape)
    units = unit_map(network)
    s = rng.uniform(-1.0, 1.0, units.size) * np.log(10)
    params = unit_parameters(network, units, s)
    before = OrtForward(imported.proto, network, "cpu")(x)[0]
    after = OrtForward(apply_to_proto(imported.proto, params), network.with_parameters(params),
                       "cpu")(x)[0]
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4 * np.abs(before).max())
    moved = ImportedModel(None, "", imported.proto, network.with_parameters(params))
    values, ms = [], []
    for model in (imported, moved):
        run = traces_over(model, [x], None, "numpy", diagonal=True, check=False)
        values.append(neuron_optimum(model.network, run.diagonal).result.value)
        ms.append(summarise(model, run.sums, False).minimum_sharpness)
    assert values[1] == pytest.approx(values[0], rel=RTOL)
    assert values[0] <= ms[0] * (1 + 1e-12)
    assert abs(ms[1] / ms[0] - 1) > 1e-6
