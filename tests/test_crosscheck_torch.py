"""Cross-checks against PyTorch autodiff (developer tooling; skipped without torch).

The shipped fixture models are rebuilt in torch float64 from their ONNX initializers by
``examples/torch_reference.py``; the exact per-tensor Hessian traces and diagonals of the mean
cross-entropy computed there from per-sample Jacobians (torch.func), and a few diagonal
entries by double back-propagation of the loss, must match ours to rtol 1e-9.
"""

import importlib.util
import json
import sys
from functools import lru_cache

import numpy as np
import onnx
import pytest

torch = pytest.importorskip(
    "torch", reason="torch not installed: cross-checks skipped (pip install -e '.[crosscheck]')")

from conftest import FIXTURES, MNIST, ROOT  # noqa: E402
from minsharp_ref.api import traces_over  # noqa: E402
from minsharp_ref.engine import tensor_columns  # noqa: E402
from minsharp_ref.onnx_import import import_model  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
import torch_reference as ref  # noqa: E402

RTOL = 1e-9

#: Samples per fixture: enough to exercise many activation patterns, few enough to keep the
#: file quick (the per-sample Jacobians of LeNet's 494k-entry dense weight are the costly part).
SAMPLES = {
    "mlp_torchscript": 128, "mlp_dynamo": 128, "mlp_nobias": 32, "mlp_softmax_leaky": 128,
    "smallcnn_torchscript": 24, "smallcnn_dynamo": 16, "cnn_avgpool_strided": 24,
    "lenet_torchscript": 8, "lenet_dynamo": 8,
    "resnet_torchscript": 8, "resnet_dynamo": 8, "resnet_bn_torchscript": 8,
    "resnet_bn_dynamo": 8, "cnn_bn_torchscript": 8, "cnn_bn_dynamo": 8,
    "densenet_torchscript": 8, "densenet_dynamo": 8, "cnn_gmp_dynamo": 16,
}
#: Fixtures made by other exporters are checked against their own framework's reference
#: (fixtures/*_reference.json, tests/test_exporters.py).
OTHER_EXPORTERS = {stem for f in FIXTURES.glob("*_reference.json")
                   for stem in json.loads(f.read_text())["models"]}
#: torchvision's models against torch float64 on the modules themselves (test_torchvision.py)
OTHER_EXPORTERS |= set(json.loads((FIXTURES / "torchvision_expected.json").read_text())["models"])
MODELS = sorted(p.stem for p in FIXTURES.glob("*.onnx") if p.stem not in OTHER_EXPORTERS)


def test_every_fixture_has_a_sample_count():
    assert set(MODELS) == set(SAMPLES)


@lru_cache(maxsize=None)
def computed(stem):
    """(inputs, labels, our EngineRun, our columns, torch traces, torch diagonals, torch graph)."""
    path = FIXTURES / f"{stem}.onnx"
    x, y = ref.load_inputs(MNIST, "train", SAMPLES[stem])
    imp = import_model(path)
    run = traces_over(imp, [x], None, "numpy", diagonal=True)
    graph = ref.load_graph(path)
    traces, diag = ref.jacobian_hessian(graph, x)
    return x, y, run, tensor_columns(imp.network), traces, diag, graph


@pytest.mark.parametrize("stem", MODELS)
def test_torch_rebuild_matches_onnxruntime(stem):
    """The torch network really is the ONNX model (else the comparisons below prove nothing)."""
    ort = pytest.importorskip("onnxruntime")
    x, _, _, _, _, _, graph = computed(stem)
    sess = ort.InferenceSession(str(FIXTURES / f"{stem}.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, {"input": x[:16].astype(np.float32)})
    with torch.no_grad():
        logits = graph.forward(torch.as_tensor(x[:16])).numpy()
    if stem == "mlp_softmax_leaky":  # this file's output holds softmax probabilities
        logits = np.exp(logits - logits.max(axis=1, keepdims=True))
        logits /= logits.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("stem", MODELS)
def test_traces_match_torch_func(stem):
    _, _, run, cols, traces, _, _ = computed(stem)
    assert sorted(name for _, _, name in cols) == sorted(traces)  # the same tensors
    ours = run.sums.mean[:len(cols)]  # (BatchNorm: the folded network's columns follow)
    theirs = np.array([traces[name] for _, _, name in cols])
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=0)
    np.testing.assert_allclose(ours.sum(), theirs.sum(), rtol=RTOL, atol=0)


@pytest.mark.parametrize("stem", MODELS)
def test_diagonals_match_torch_func(stem):
    """Every original tensor's diagonal (a BatchNorm network's run also holds the folded
    view's, ``<name> (folded)``, for the neuron-wise measure)."""
    _, _, run, columns, _, diag, graph = computed(stem)
    assert {name for _, _, name in columns} == set(diag)
    assert set(diag) <= set(run.diagonal)
    assert all(k.endswith(" (folded)") for k in set(run.diagonal) - set(diag))
    for name, theirs in diag.items():
        ours = run.diagonal[name]
        assert ours.shape == theirs.shape == tuple(graph.params[name].shape), name
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-12 * np.abs(theirs).max(),
                                   err_msg=f"diag H of {name}")


@pytest.mark.parametrize("stem", ["mlp_torchscript", "mlp_nobias", "mlp_softmax_leaky",
                                  "smallcnn_torchscript", "cnn_avgpool_strided",
                                  "resnet_torchscript", "resnet_bn_torchscript",
                                  "densenet_torchscript"])
def test_diagonal_entries_by_double_backprop(stem):
    """A second, independent autodiff method: H e_i by differentiating the loss gradient."""
    x, y, run, _, _, diag, graph = computed(stem)
    rng = np.random.default_rng(0)
    for name, theirs in diag.items():
        ours = run.diagonal[name].reshape(-1)
        idx = np.unique(np.concatenate([[np.argmax(ours)], rng.choice(ours.size, 3, replace=False)]))
        exact = ref.double_backprop_diag(graph, x, y, name, idx)
        assert np.all(exact >= 0)
        np.testing.assert_allclose(ours[idx], exact, rtol=RTOL, atol=1e-12 * np.abs(ours).max(),
                                   err_msg=f"diag H of {name} at flat indices {idx}")
        np.testing.assert_allclose(theirs.reshape(-1)[idx], exact, rtol=RTOL,
                                   atol=1e-12 * np.abs(ours).max())


def test_script_output_is_accepted_by_verify(tmp_path):
    """The script writes the expected JSON (valid against docs/expected.schema.json) and the
    diagonal npz, and ``minsharp-ref verify`` passes them at rtol 1e-9 (MatMul weights: the
    diagonals must come out in ONNX's (in, out) layout)."""
    out, diag_out = tmp_path / "expected.json", tmp_path / "expected_diag.npz"
    model = FIXTURES / "mlp_nobias.onnx"  # MatMul weights, stored (in, out)
    assert ref.main([str(model), str(MNIST), "--limit", "8", "--split", "test",
                     "--out", str(out), "--diag-out", str(diag_out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "minsharp-ref/expected/v1"
    assert doc["producer"].startswith(f"torch {torch.__version__}")
    assert doc["data"] == {"samples": 8, "split": "test", "preprocessing": [
        "uint8 scaled by 1/255", "normalised (x - 0.5) / 0.5"]}
    inits = {i.name: tuple(i.dims) for i in onnx.load(str(model)).graph.initializer}
    assert set(doc["traces"]) == set(inits)
    assert doc["trace"] == pytest.approx(sum(doc["traces"].values()), rel=1e-15)
    with np.load(diag_out) as diag:
        assert {k: diag[k].shape for k in diag.files} == inits
        assert all(diag[k].dtype == np.float64 for k in diag.files)
        for k in diag.files:
            assert diag[k].sum() == pytest.approx(doc["traces"][k], rel=1e-12)
    if importlib.util.find_spec("jsonschema"):
        import jsonschema

        schema = json.loads((ROOT / "docs" / "expected.schema.json").read_text())
        jsonschema.validate(doc, schema)

    from typer.testing import CliRunner

    from minsharp_ref.cli import app

    r = CliRunner().invoke(app, [
        "verify", str(model), "--data", str(MNIST), "--split", "test", "--mean", "0.5",
        "--std", "0.5", "--limit", "8", "--expected", str(out), "--expected-diag", str(diag_out),
        "--rtol", "1e-9", "--atol", "0", "--atol", "diagonal:1e-15"])
    assert r.exit_code == 0, r.output
    assert "data mismatch" not in r.output and "FAIL" not in r.output


@pytest.mark.parametrize("stem", MODELS)
def test_verify_passes_on_torch_document_and_fails_on_one_percent(stem, tmp_path):
    """Issue 5's definition of done, for every fixture: `verify` passes on the document the
    torch cross-check writes, and fails (exit 1, one FAIL row) once one trace is off by 1%."""
    from typer.testing import CliRunner

    from minsharp_ref.cli import app

    out, diag_out = tmp_path / "expected.json", tmp_path / "expected_diag.npz"
    model = FIXTURES / f"{stem}.onnx"
    assert ref.main([str(model), str(MNIST), "--limit", "4", "--out", str(out),
                     "--diag-out", str(diag_out)]) == 0
    # diagonal entries far below their tensor's largest lose relative accuracy in torch's
    # explicit diag(Jᵀ A J) (A's diagonal cancels): an absolute slack of 1e-12 covers them
    args = ["verify", str(model), "--data", str(MNIST), "--mean", "0.5", "--std", "0.5",
            "--limit", "4", "--rtol", "1e-9", "--atol", "0", "--atol", "diagonal:1e-12"]
    r = CliRunner().invoke(app, [*args, "--expected", str(out), "--expected-diag", str(diag_out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    first = next(iter(doc["traces"]))
    doc["traces"][first] *= 1.01
    out.write_text(json.dumps(doc))
    r = CliRunner().invoke(app, [*args, "--expected", str(out)])
    assert r.exit_code == 1, r.output
    failing = [line for line in r.stdout.splitlines() if line.rstrip().endswith("FAIL")]
    assert len(failing) == 1 and first in failing[0]
