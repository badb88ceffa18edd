"""DenseNet fixtures from both PyTorch exporters (docs/method.md sections 9 and 10).

Oracles: fixtures/densenet_*_expected.json, the exact per-tensor traces computed by
fixtures/make_densenet_fixtures.py from the trained nn.Module itself in float64 (per-sample
Jacobians, a few diagonal entries by double back-propagation), not from the ONNX file;
onnxruntime's forward of the function-preserving rescalings of the group.
Tolerances: 1e-9 relative on the NumPy engine (the float32 weights are exact in float64, so
both sides compute the same function), 1e-5 on the onnxruntime engine (float32 forward).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import FIXTURES, MNIST
from minsharp_ref import ir
from minsharp_ref.api import score
from minsharp_ref.cli import app
from minsharp_ref.group import folded_view, rescaling_group
from minsharp_ref.onnx_import import import_model
from minsharp_ref.rescale import apply_to_proto, group_parameters

STEMS = ["densenet_torchscript", "densenet_dynamo"]
TOLERANCE = {"numpy": 1e-9, "onnxruntime": 1e-5}


def expected(stem: str) -> dict:
    return json.loads((FIXTURES / f"{stem}_expected.json").read_text())


@lru_cache(maxsize=None)
def scored(stem: str, engine: str):
    doc = expected(stem)
    return score(FIXTURES / f"{stem}.onnx", MNIST, mean=[0.5], std=[0.5],
                 limit=doc["data"]["samples"], provider="numpy" if engine == "numpy" else "cpu",
                 engine=engine, diagonal=engine == "numpy")


def traces_by_name(result) -> dict[str, float]:
    out = {}
    for layer in result.layers:
        out[layer.weight] = layer.trace_weight
        if layer.bias is not None:
            out[layer.bias] = layer.trace_bias
    return out


def test_fixtures_are_small_and_references_cover_every_parameter():
    for stem in STEMS:
        path = FIXTURES / f"{stem}.onnx"
        assert path.stat().st_size < 200_000
        doc = expected(stem)
        assert doc["data"]["samples"] == 64 and set(doc["double_backprop"]) == set(doc["traces"])
        params = {i.name for i in onnx.load(str(path)).graph.initializer
                  if not i.name.endswith(("running_mean", "running_var"))}
        assert set(doc["traces"]) == params and len(params) == 40


@pytest.mark.parametrize("engine", ["numpy", "onnxruntime"])
@pytest.mark.parametrize("stem", STEMS)
def test_traces_match_the_torch_module(stem, engine):
    """Every W, b, γ and β trace, and the total, against torch float64 on the nn.Module."""
    doc, result = expected(stem), scored(stem, engine)
    got = traces_by_name(result)
    assert set(got) == set(doc["traces"])
    rtol = TOLERANCE[engine]
    for name, want in doc["traces"].items():
        assert got[name] == pytest.approx(want, rel=rtol, abs=0), name
    assert result.trace == pytest.approx(doc["trace"], rel=rtol, abs=0)


@pytest.mark.parametrize("stem", STEMS)
def test_diagonal_entries_match_double_backprop(stem):
    result = scored(stem, "numpy")
    for name, entries in expected(stem)["double_backprop"].items():
        ours = result.diagonal[name].reshape(-1)
        np.testing.assert_allclose(ours[entries["index"]], entries["value"], rtol=1e-9,
                                   atol=1e-12 * np.abs(ours).max(), err_msg=name)


def concat_arities(stem: str) -> list[int]:
    """Input counts of the Concats of activations (not dynamo's Concat of the view's shape)."""
    nodes = onnx.load(str(FIXTURES / f"{stem}.onnx")).graph.node
    activations = {n.output[0] for n in nodes if n.op_type in ("Relu", "Conv", "AveragePool")}
    return [len(n.input) for n in nodes if n.op_type == "Concat" and set(n.input) <= activations]


@pytest.mark.parametrize("stem", STEMS)
def test_what_the_exporters_write_and_the_import(stem):
    """torch.cat of 1..4 tensors: legacy writes a one-input Concat, dynamo an Identity; both
    import as the same DAG: Concats of 2, 3, 4 branches, 13 BatchNorms. In the folded view
    the BNs after a bias-free conv fold into it (6), those after a Concat or ReLU stay as
    per-channel diagonal layers (7)."""
    want = [1, 2, 3, 4, 1, 2, 3] if stem.endswith("torchscript") else [2, 3, 4, 2, 3]
    assert concat_arities(stem) == want
    net = import_model(FIXTURES / f"{stem}.onnx").network
    concats = [l for l in net.layers if isinstance(l, ir.Concat)]
    assert [l.sizes for l in concats] == [(8, 4), (8, 4, 4), (8, 4, 4, 4), (10, 4), (10, 4, 4)]
    assert sum(isinstance(l, ir.BatchNorm) for l in net.layers) == 13
    folded = folded_view(net)
    kept = [l for l in folded.param_layers if isinstance(l, ir.BatchNorm)]
    assert len(folded.param_layers) == 20 and len(kept) == 7
    assert all(l.weight_name.startswith(("block1.layers.0.norm1", "block1.layers.1.norm1",
                                         "block1.layers.2.norm1", "transition.0",
                                         "block2.layers.0.norm1", "block2.layers.1.norm1",
                                         "norm5")) for l in kept)
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28))
    np.testing.assert_allclose(folded.forward(x), net.forward(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stem", STEMS)
def test_group_rescaling_preserves_the_function_in_onnxruntime_and_ms(stem, tmp_path):
    """Random ℓ per free class of the (unfolded) group written to a float32 copy: the copy's
    onnxruntime logits equal the original's, its naive trace moves by orders of magnitude and
    its minimum sharpness stays (1e-6: the copy's float32 rounding)."""
    ort = pytest.importorskip("onnxruntime")
    path = FIXTURES / f"{stem}.onnx"
    imported = import_model(path)
    group = rescaling_group(imported.network)
    ell = np.random.default_rng(1).uniform(-2, 2, group.size) * np.log(10)
    model = apply_to_proto(imported.proto, group_parameters(imported.network, ell, group))
    x = np.random.default_rng(2).uniform(-1, 1, size=(16, 1, 28, 28)).astype(np.float32)

    def logits(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x})[0]

    before = logits(imported.proto)
    np.testing.assert_allclose(logits(model), before, rtol=0, atol=1e-4 * np.abs(before).max())
    kw = dict(mean=[0.5], std=[0.5], limit=16, provider="numpy")
    base = score(path, MNIST, **kw)
    moved_path = tmp_path / "rescaled.onnx"
    onnx.save(model, str(moved_path))
    moved = score(moved_path, MNIST, **kw)
    assert abs(np.log(moved.trace / base.trace)) > np.log(10)
    assert moved.minimum_sharpness == pytest.approx(base.minimum_sharpness, rel=1e-6)


@pytest.mark.parametrize("stem", STEMS)
def test_invariance_command_passes(stem, tmp_path):
    out = tmp_path / "inv.json"
    r = CliRunner().invoke(app, ["invariance", str(FIXTURES / f"{stem}.onnx"), "--data", str(MNIST),
                                 "--mean", "0.5", "--std", "0.5", "--limit", "16", "--trials", "3",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["passed"] and doc["max_deviation"] <= 1e-9 and doc["trace_ratio"] > 10


def test_verify_passes_on_the_reference_and_fails_on_one_percent(tmp_path):
    """The reference is a `verify --expected` document: it passes at 1e-9 and a trace moved
    by 1% fails (exit 1, one FAIL row naming it)."""
    path = FIXTURES / "densenet_torchscript.onnx"
    args = ["verify", str(path), "--data", str(MNIST), "--mean", "0.5", "--std", "0.5",
            "--limit", "64", "--rtol", "1e-9", "--atol", "0"]
    ref = FIXTURES / "densenet_torchscript_expected.json"
    r = CliRunner().invoke(app, [*args, "--expected", str(ref)])
    assert r.exit_code == 0, r.output
    doc = json.loads(ref.read_text())
    doc["traces"]["transition.0.weight"] *= 1.01
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(doc))
    r = CliRunner().invoke(app, [*args, "--expected", str(moved)])
    failing = [line for line in r.stdout.splitlines() if line.rstrip().endswith("FAIL")]
    assert r.exit_code == 1 and len(failing) == 1 and "transition.0.weight" in failing[0]
