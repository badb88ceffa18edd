"""`rescale --alpha` on networks with branches or BatchNorm: one α per free class of the
group of docs/method.md section 9, named by a tensor in it as the score report names them.

Oracles: applying the report's α* per class must give the minimiser itself, so the
rescaled network's naive trace (the folded one with BatchNorm) equals the original's minimum
sharpness, with the function checked in onnx's float64 ReferenceEvaluator (drawn DAGs,
1e-9) or in onnxruntime (the fixtures, float32 files: 1e-5).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import oracle
from conftest import FIXTURES, MNIST
from minsharp_ref.api import score, summarise
from minsharp_ref.cli import app
from minsharp_ref.errors import MinsharpError
from minsharp_ref.group import rescaling_group
from minsharp_ref.onnx_import import import_model
from minsharp_ref.rescale import apply_to_proto, class_log_scales, group_parameters
from test_dag import draw_dag, ours, wirings

NORM = ["--mean", "0.5", "--std", "0.5"]


def pairs(classes) -> str:
    return ",".join(f"{c['tensor']}={c['alpha']!r}" for c in classes)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings, bn_stem=st.booleans())
def test_alpha_star_per_class_reaches_the_minimum(seed, wiring, bn_stem):
    """The α* per class of a drawn DAG's report, applied as tensor=α: the logits are the
    same (oracle), the new (folded) naive trace is the old MS and the new α* are 1 (1e-9)."""
    built = draw_dag(seed, wiring, bn_stem)
    x = oracle.data(built, 6, seed=seed + 1)
    imported, run, _ = ours(built, x)
    base = summarise(imported, run.sums, False)
    if base.solver["method"] == "dead-layer" or not base.classes:
        return  # no minimiser to apply
    group = rescaling_group(imported.network)
    ell = class_log_scales(group, pairs(base.classes))
    scaled = oracle.Built(apply_to_proto(built.proto, group_parameters(imported.network, ell, group)),
                          built.weights, built.biases, built.input_shape, built.num_classes)
    before, after = oracle.Oracle(built).logits(x), oracle.Oracle(scaled).logits(x)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-11 * np.abs(before).max())
    imported2, run2, _ = ours(scaled, x)
    moved = summarise(imported2, run2.sums, False)
    naive = moved.folded["trace"] if moved.folded else moved.trace
    assert naive == pytest.approx(base.minimum_sharpness, rel=1e-9)
    assert moved.minimum_sharpness == pytest.approx(base.minimum_sharpness, rel=1e-9)
    assert [c["alpha"] for c in moved.classes] == pytest.approx([1.0] * len(moved.classes), rel=1e-6)


@pytest.mark.parametrize("stem", ["densenet_torchscript", "resnet_dynamo"])
def test_cli_applies_the_reports_alpha_per_class(stem, tmp_path):
    """score --json, then rescale --alpha with its classes (as pairs, and as the plain list in
    the report's order: the same file), checked in onnxruntime by the test too; the rescaled
    model's naive trace is the original MS (1e-5: float32 storage)."""
    ort = pytest.importorskip("onnxruntime")
    path = FIXTURES / f"{stem}.onnx"
    report = tmp_path / "s.json"
    runner = CliRunner()
    common = ["--data", str(MNIST), *NORM, "--limit", "32"]
    r = runner.invoke(app, ["score", str(path), *common, "--json", str(report), "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    out_pairs, out_list = tmp_path / "pairs.onnx", tmp_path / "list.onnx"
    r = runner.invoke(app, ["rescale", str(path), "-o", str(out_pairs), "--alpha",
                            pairs(doc["classes"]), "--data", str(MNIST), *NORM])
    assert r.exit_code == 0, r.output
    assert "scale per class" in r.output and "logits agree" in r.output
    r = runner.invoke(app, ["rescale", str(path), "-o", str(out_list), "--alpha",
                            ",".join(repr(c["alpha"]) for c in doc["classes"])])
    assert r.exit_code == 0, r.output
    assert out_list.read_bytes() == out_pairs.read_bytes()
    x = np.random.default_rng(0).uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32)
    logits = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
              for p in (path, out_pairs)]
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-4 * np.abs(logits[0]).max())
    moved = score(out_pairs, MNIST, mean=[0.5], std=[0.5], limit=32, provider="numpy")
    naive = moved.folded["trace"] if moved.folded else moved.trace
    assert naive == pytest.approx(doc["minimum_sharpness"], rel=1e-5)
    assert moved.minimum_sharpness == pytest.approx(doc["minimum_sharpness"], rel=1e-5)
    assert naive < 0.5 * (doc["folded"]["trace"] if doc.get("folded") else doc["trace"])


@pytest.mark.parametrize("alpha, message", [
    ("nosuch=2", r"tensor 'nosuch' is in no free class \(the free classes are named"),
    ("input=2", r"tensor 'input' is in no free class"),
    ("getitem=2,relu=3", r"'getitem' and 'relu' are in the same class"),
    ("getitem=2,3", "either plain values or tensor=value pairs"),
    ("2,3", r"needs 14 values \(one per free class"),
    ("getitem=-1", "positive and finite"),
    ("getitem=abc", "'abc' for 'getitem' is not a number"),
])
def test_bad_alpha_per_class_is_one_line_exit_2(alpha, message, tmp_path):
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(app, ["rescale", str(FIXTURES / "densenet_dynamo.onnx"), "-o", str(out),
                                 "--alpha", alpha])
    assert r.exit_code == 2 and not out.exists()
    assert len(r.output.strip().splitlines()) == 1
    assert re.search(message, r.output), r.output


def test_neurons_and_normalize_are_refused_for_dags(tmp_path):
    for extra in (["--neurons"], ["--alpha", "getitem=2", "--normalize"]):
        r = CliRunner().invoke(app, ["rescale", str(FIXTURES / "densenet_dynamo.onnx"), "-o",
                                     str(tmp_path / "o.onnx"), *extra])
        assert r.exit_code == 2 and "one scale per class of tied tensors" in r.output, r.output


def test_class_log_scales_names_any_tensor_of_a_class():
    group = rescaling_group(import_model(FIXTURES / "densenet_dynamo.onnx").network)
    j = next(k for k, m in enumerate(group.members) if len(m) > 1)
    first, other = group.members[j][0], group.members[j][-1]
    a = class_log_scales(group, f"{first}=4")
    b = class_log_scales(group, f"{other}=4")
    assert a.tolist() == b.tolist() and a[j] == pytest.approx(np.log(4)) and np.count_nonzero(a) == 1
    with pytest.raises(MinsharpError):
        class_log_scales(group, "")
