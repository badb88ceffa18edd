"""The command line: exit codes, the JSON document, one-line errors without tracebacks."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from minsharp_ref.cli import app

from conftest import FIXTURES, MNIST

runner = CliRunner()
MLP = FIXTURES / "mlp_torchscript.onnx"
NORM = ["--mean", "0.5", "--std", "0.5"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_score_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    r = invoke("score", MLP, "--data", MNIST, *NORM, "--limit", 300, "--provider", "cpu", "--json", out)
    assert r.exit_code == 0, r.output
    assert "minimum sharpness" in r.stdout and "/1/Gemm" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "minsharp-ref/score/v1"
    assert doc["data"]["samples"] == 300 and doc["data"]["x_key"] == "x_train"
    assert [l["weight"] for l in doc["layers"]] == ["1.weight", "3.weight", "5.weight"]
    assert [l["bias"] for l in doc["layers"]] == ["1.bias", "3.bias", "5.bias"]
    assert doc["layers"][0]["weight_shape"] == [20, 784]
    assert doc["trace"] == pytest.approx(sum(l["trace_weight"] + l["trace_bias"] for l in doc["layers"]), rel=1e-12)
    assert doc["minimum_sharpness"] <= doc["trace"] * (1 + 1e-12)
    assert 0 <= doc["accuracy"] <= 1 and doc["loss"] > 0
    assert len(doc["model"]["sha256"]) == 64 and doc["provider"] == "cpu"
    assert not list(tmp_path.glob(".*tmp"))


def test_json_matches_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "r.json"
    assert invoke("score", MLP, "--data", MNIST, *NORM, "--limit", 50, "--json", out).exit_code == 0
    schema = json.loads((FIXTURES.parent / "docs" / "score.schema.json").read_text())
    jsonschema.validate(json.loads(out.read_text()), schema)


def test_gate_exit_code(tmp_path):
    base = ["score", MLP, "--data", MNIST, *NORM, "--limit", 100]
    assert invoke(*base, "--max-sharpness", 1e9).exit_code == 0
    r = invoke(*base, "--max-sharpness", 1.0)
    assert r.exit_code == 1 and "gate failed" in r.stderr


def test_softmax_stripped_is_reported():
    r = invoke("score", FIXTURES / "mlp_softmax_leaky.onnx", "--data", MNIST, *NORM, "--limit", 50)
    assert r.exit_code == 0 and "Softmax (/softmax/Softmax)" in r.stdout


def test_split_test_and_no_labels(tmp_path):
    data = tmp_path / "x_only.npz"
    np.savez(data, x=np.load(MNIST)["x_test"][:20])
    r = invoke("score", MLP, "--data", data, *NORM)
    assert r.exit_code == 0 and "no labels" in r.stdout and "accuracy" not in r.stdout
    r = invoke("score", MLP, "--data", MNIST, "--split", "test", *NORM, "--limit", 20)
    assert r.exit_code == 0 and "x_test" in r.stdout


def _bad_inputs(tmp_path):
    x = np.load(MNIST)["x_train"][:10]
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}] * 10, dtype=object))
    np.savez(tmp_path / "nan.npz", x=np.where(np.arange(10)[:, None, None] == 3, np.nan, x / 255.0))
    np.savez(tmp_path / "shape.npz", x=np.zeros((10, 27, 27)))
    np.savez(tmp_path / "labels.npz", x=x, y=np.full(10, 12))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 28, 28)))
    (tmp_path / "notzip.npz").write_bytes(b"hello")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (tmp_path / "empty.onnx").write_bytes(b"")
    return [
        (["score", tmp_path / "missing.onnx", "--data", MNIST], "no such model file"),
        (["score", MLP, "--data", tmp_path / "missing.npz"], "no such data file"),
        (["score", MLP, "--data", MNIST, "--x-key", "images"], 'no key "images" (keys: x_train, y_train, x_test, y_test, y_binary_train, y_binary_test)'),
        (["score", MLP, "--data", tmp_path / "pickled.npz"], "holds Python objects"),
        (["score", MLP, "--data", tmp_path / "nan.npz"], "contains 784 NaN/Inf values (first in sample 3)"),
        (["score", MLP, "--data", tmp_path / "shape.npz"], "have shape (27, 27) (729 values) but the model expects (1, 28, 28) (784 values)"),
        (["score", MLP, "--data", tmp_path / "labels.npz"], "out of range 0..9"),
        (["score", MLP, "--data", tmp_path / "empty.npz"], "zero samples"),
        (["score", MLP, "--data", tmp_path / "notzip.npz"], "not an .npz file"),
        (["score", tmp_path / "garbage.onnx", "--data", MNIST], "not an ONNX model"),
        (["score", tmp_path / "empty.onnx", "--data", MNIST], "empty file"),
        (["score", MLP, "--data", MNIST, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["score", MLP, "--data", MNIST, "--provider", "tpu"], "unknown provider 'tpu'"),
        (["score", MLP, "--data", MNIST, "--mean", "0.1,0.2"], "--mean has 2 values; the model has 1 input channels"),
        (["score", MLP, "--data", MNIST, "--memory-budget", "lots"], "is not a size"),
        (["score", MLP, "--data", MNIST, "--json", tmp_path / "nodir" / "r.json"], "does not exist"),
    ]


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
    for args, expected in _bad_inputs(tmp_path):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        err = r.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err, (args, err)
        assert expected in err, (args, err)
        assert "Traceback" not in r.output
    assert not (tmp_path / "nodir").exists()


def test_no_traceback_from_the_real_console_script(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    p = subprocess.run([sys.executable, "-m", "minsharp_ref.cli", "score", str(tmp_path / "bad.onnx"),
                        "--data", str(MNIST)], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cuda_provider_is_probed_quietly(capfd):
    """auto falls back to the CPU without native error spam (the onnxruntime engine probes
    CUDA; the NumPy engine's auto runs the IR in float64); an explicit --provider cuda on a
    machine where CUDA does not load is a clean error."""
    from minsharp_ref.runtime import cuda_usable

    r = invoke("score", MLP, "--data", MNIST, *NORM, "--limit", 20)
    assert r.exit_code == 0 and "forward: numpy-float64, signals float64;" in r.stdout
    r = invoke("score", MLP, "--data", MNIST, *NORM, "--limit", 20, "--engine", "onnxruntime")
    assert r.exit_code == 0
    expected = "forward: trace-graph-cuda" if cuda_usable() else "forward: trace-graph-cpu"
    assert expected in r.stdout
    assert "CUDA" not in capfd.readouterr().err  # nothing from the native libraries
    if not cuda_usable():
        r = invoke("score", MLP, "--data", MNIST, "--provider", "cuda")
        assert r.exit_code == 2
        assert "--provider cuda: onnxruntime's CUDA provider does not load on this machine" in r.stderr


def test_input_shape_fixes_dynamic_dimensions(tmp_path):
    import onnx

    model = onnx.load(str(FIXTURES / "smallcnn_dynamo.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, str(path))
    base = ["score", path, "--data", MNIST, *NORM, "--limit", 16]
    r = invoke(*base)
    assert r.exit_code == 2 and "dynamic dimension 'height' at axis 2" in r.stderr and "--input-shape" in r.stderr
    fixed = invoke(*base, "--input-shape", "1,28,28", "--json", tmp_path / "a.json")
    assert fixed.exit_code == 0, fixed.output
    same = invoke("score", FIXTURES / "smallcnn_dynamo.onnx", "--data", MNIST, *NORM, "--limit", 16,
                  "--json", tmp_path / "b.json")
    assert same.exit_code == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["minimum_sharpness"] == b["minimum_sharpness"] and a["trace"] == b["trace"]
    for shape, text in [("1,28", "has 2 dimensions"), ("2,28,28", "gives 2 at axis 1"), ("1,x,28", "integers")]:
        r = invoke(*base, "--input-shape", shape)
        assert r.exit_code == 2 and text in r.stderr, (shape, r.stderr)


def float64_conv_model(tmp_path):
    """A float64 conv net (onnxruntime has no float64 Conv kernel) and 6 samples for it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "Wd"], ["y"], name="head", transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)), "Wc"),
             numpy_helper.from_array(rng.standard_normal((3, 18)), "Wd")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 1, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((6, 1, 5, 5)))
    return tmp_path / "m.onnx", tmp_path / "d.npz"


def test_numpy_path_reports_an_unchecked_fidelity(tmp_path):
    """onnxruntime has no float64 Conv kernel: the numpy path scores the model anyway and the
    report says the fidelity was not checked (it used to crash formatting a None)."""
    model, data = float64_conv_model(tmp_path)
    r = invoke("score", model, "--data", data, "--provider", "numpy")
    assert r.exit_code == 0, r.output
    assert "import fidelity not checked" in r.stdout
    assert "warning: import fidelity not checked: onnxruntime cannot load the model" in r.stderr
    assert "warning:" not in r.stdout
