"""`verify`, the exact diagonal, per-sample contributions and the extra measures."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.optimize import minimize
from typer.testing import CliRunner

from conftest import FIXTURES, MNIST
from minsharp_ref import score
from minsharp_ref.cli import app
from minsharp_ref.measures import normalised_sharpness, normalised_sharpness_layer
from minsharp_ref.onnx_import import import_model
from minsharp_ref.rescale import neuron_parameters

runner = CliRunner()
MLP = FIXTURES / "mlp_torchscript.onnx"
NORM = dict(mean=[0.5], std=[0.5])
DATA = ["--data", str(MNIST), "--mean", "0.5", "--std", "0.5", "--limit", "300"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    r = runner.invoke(app, ["score", str(MLP), *DATA, "--provider", "numpy", "--json", str(d / "ours.json"),
                            "--per-sample", str(d / "per.npz")])
    assert r.exit_code == 0, r.output
    # the diagonal in a run of its own: its traces come from a different rule (measure_diagonal)
    r = runner.invoke(app, ["score", str(MLP), *DATA, "--provider", "numpy", "--diag", str(d / "diag.npz")])
    assert r.exit_code == 0, r.output
    return d


def verify(*args):
    return runner.invoke(app, ["verify", str(MLP), *DATA, *map(str, args)])


def test_verify_passes_on_our_own_document(reference):
    r = verify("--expected", reference / "ours.json", "--expected-diag", reference / "diag.npz")
    assert r.exit_code == 0, r.output
    assert "PASS: 14 passed, 0 failed" in r.stdout


def test_verify_fails_on_one_trace_perturbed_by_one_percent(reference, tmp_path):
    doc = json.loads((reference / "ours.json").read_text())
    doc["layers"][1]["trace_weight"] *= 1.01
    (tmp_path / "theirs.json").write_text(json.dumps(doc))
    out = tmp_path / "cmp.json"
    r = verify("--expected", tmp_path / "theirs.json", "--json", out)
    assert r.exit_code == 1
    failing = [line for line in r.stdout.splitlines() if line.endswith("FAIL")]
    assert len(failing) == 1 and failing[0].startswith("trace_weight") and "3.weight" in failing[0]
    assert "1.00e-02" in failing[0]
    report = json.loads(out.read_text())
    assert report["schema"] == "minsharp-ref/verify/v1" and not report["passed"]
    # a looser per-quantity tolerance lets it pass
    assert verify("--expected", tmp_path / "theirs.json", "--rtol", "trace_weight:0.02").exit_code == 0


def test_verify_expected_format_data_mismatch_unknown_and_missing(tmp_path):
    ours = score(MLP, MNIST, limit=300, provider="numpy", **NORM)
    doc = {"schema": "minsharp-ref/expected/v1", "producer": "test",
           "data": {"samples": 1000, "preprocessing": ["uint8 scaled by 1/255"]},
           "traces": {"1.weight": ours.layers[0].trace_weight, "layer2.weight": ours.layers[1].trace_weight,
                      "not.a.tensor": 1.0}}
    (tmp_path / "e.json").write_text(json.dumps(doc))
    r = verify("--expected", tmp_path / "e.json")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0] == "data mismatch: sample count differs: theirs 1000, ours 300"
    assert lines[1].startswith("data mismatch: preprocessing differs")
    assert any("not.a.tensor" in l and l.endswith("UNKNOWN") for l in lines)
    assert any(l.startswith("trace_weight") and "3.weight" in l and l.endswith("PASS") for l in lines)
    assert any(l.startswith("trace_bias") and l.endswith("MISSING") for l in lines)


@pytest.mark.parametrize("args,text", [
    (["--rtol", "abc"], "--rtol 'abc': not a number"),
    (["--rtol", "bogus:1e-3"], "unknown quantity 'bogus'"),
    (["--atol", "-1"], "must be non-negative"),
])
def test_verify_bad_options(reference, args, text):
    r = verify("--expected", reference / "ours.json", *args)
    assert r.exit_code == 2 and text in r.stderr


def test_verify_bad_documents(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"schema": "other"}))
    (tmp_path / "c.json").write_text(json.dumps({"schema": "minsharp-ref/expected/v1", "traces": {"1.weight": "x"}}))
    for name, text in [("a.json", "not JSON"), ("b.json", "unknown schema 'other'"),
                       ("c.json", 'value of "1.weight" is not a finite number')]:
        r = verify("--expected", tmp_path / name)
        assert r.exit_code == 2 and text in r.stderr, r.output


def test_diagonal_and_per_sample_files_agree_with_the_traces(reference):
    doc = json.loads((reference / "ours.json").read_text())
    diag, per = np.load(reference / "diag.npz"), np.load(reference / "per.npz")
    for layer in doc["layers"]:
        assert diag[layer["weight"]].shape == tuple(layer["weight_shape"])
        assert diag[layer["weight"]].sum() == pytest.approx(layer["trace_weight"], rel=1e-12)
        assert per[layer["weight"]].mean() == pytest.approx(layer["trace_weight"], rel=1e-12)
        assert per[layer["bias"]].mean() == pytest.approx(layer["trace_bias"], rel=1e-12)
    assert len(per["trace"]) == 300
    assert per["trace"].mean() == pytest.approx(doc["trace"], rel=1e-12)
    # the standard error of the naive trace is that of a mean over samples
    assert doc["trace_stderr"] == pytest.approx(per["trace"].std(ddof=1) / np.sqrt(300), rel=1e-9)


def test_traces_at_alpha_star_are_all_ms_over_d_without_biases():
    r = score(FIXTURES / "mlp_nobias.onnx", MNIST, limit=300, measures=True, provider="numpy", **NORM)
    at = [l["weight"] for l in r.measures["traces_at_alpha"]]
    assert at == pytest.approx([r.minimum_sharpness / 3] * 3, rel=1e-12)


def test_traces_at_alpha_star_sum_to_ms_with_biases():
    r = score(MLP, MNIST, limit=300, measures=True, provider="numpy", **NORM)
    total = sum(l["weight"] + l["bias"] for l in r.measures["traces_at_alpha"])
    assert total == pytest.approx(r.minimum_sharpness, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_normalised_sharpness_matches_brute_force(rows, cols, seed):
    rng = np.random.default_rng(seed)
    h, w2 = rng.lognormal(0, 2, (rows, cols)), rng.lognormal(0, 2, (rows, cols))
    ours = normalised_sharpness_layer(h, w2)

    def f(z):
        s = np.outer(np.exp(z[:rows]), np.exp(z[rows:])) ** 2
        return (h * s + w2 / s).sum()

    brute = min(minimize(f, rng.normal(size=rows + cols), method="BFGS", options={"gtol": 1e-12}).fun
                for _ in range(3))
    assert ours.value == pytest.approx(brute, rel=1e-8)  # BFGS's own accuracy
    assert ours.value >= ours.lower_bound * (1 - 1e-12)


def test_normalised_sharpness_is_invariant_under_neuron_rescaling():
    imported = import_model(FIXTURES / "cnn_avgpool_strided.onnx")
    from minsharp_ref.api import traces_over
    ds = np.load(MNIST)["x_train"][:40]
    x = ((ds / 255.0 - 0.5) / 0.5).reshape(-1, 1, 28, 28)
    run = traces_over(imported, [x], None, "numpy", diagonal=True)
    base = [n.value for n in normalised_sharpness(imported.network, run.diagonal)]
    params = neuron_parameters(imported.network, np.random.default_rng(3), 4.0)
    from minsharp_ref.onnx_import import ImportedModel
    from minsharp_ref.rescale import apply_to_proto
    moved = ImportedModel(imported.path, "", apply_to_proto(imported.proto, params),
                          imported.network.with_parameters(params))
    run2 = traces_over(moved, [x], None, "numpy", diagonal=True)
    after = [n.value for n in normalised_sharpness(moved.network, run2.diagonal)]
    assert after == pytest.approx(base, rel=1e-8)
    assert run2.sums.mean.sum() != pytest.approx(run.sums.mean.sum(), rel=1e-3)  # naive trace moved


@pytest.mark.parametrize("fixture", ["cnn_avgpool_strided", "smallcnn_torchscript"])
def test_conv_diagonal_sums_to_the_traces_of_the_plain_run(fixture):
    """The diagonal rule (im2col products) against the trace rule (im2col or Gram form,
    whichever is cheaper) on conv nets: two code paths, one number (1e-12)."""
    path = FIXTURES / f"{fixture}.onnx"
    plain = score(path, MNIST, limit=24, provider="numpy", **NORM)
    with_diag = score(path, MNIST, limit=24, provider="numpy", diagonal=True, **NORM)
    for layer in plain.layers:
        assert with_diag.diagonal[layer.weight].sum() == pytest.approx(layer.trace_weight, rel=1e-12)
        assert with_diag.diagonal[layer.bias].sum() == pytest.approx(layer.trace_bias, rel=1e-12)
