"""The matrix of hostile and broken inputs: each gives exit code 2, one line on stderr that
names the file and the node, key, shape or value at fault, no traceback, no output file."""

import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import FIXTURES, MNIST
from minsharp_ref.cli import app

runner = CliRunner()
MLP = str(FIXTURES / "mlp_torchscript.onnx")


def _model(nodes, inits, inputs=None, opset=17, domains=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *domains], ir_version=8)


def _gemm(x="x"):
    return helper.make_node("Gemm", [x, "W"], ["y"], name="head", transB=1)


def _external(location):
    t = numpy_helper.from_array(np.ones((2, 3), np.float32), "W")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    return _model([_gemm()], [t])


W = numpy_helper.from_array(np.ones((2, 3), np.float32), "W")


def bad_models(d):
    """name → (model bytes, expected error text)."""
    (d / "secret.bin").write_bytes(np.ones(6, np.float32).tobytes())
    os.makedirs(d / "m", exist_ok=True)
    os.symlink(d / "secret.bin", d / "m" / "link.bin")
    mlp = (FIXTURES / "mlp_torchscript.onnx").read_bytes()
    cases = {
        "truncated": (mlp[: len(mlp) // 2], "not an ONNX model (protobuf parse failed)"),
        "not_protobuf": (b"\x00\xff" * 40, "not an ONNX model"),
        "empty": (b"", "empty file, not an ONNX model"),
        "checker": (_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="g")], [W], opset=7),
                    "fails the ONNX checker"),
        "opset_unknown": (_model([_gemm()], [W], opset=99), "default-domain opset 99 is not supported"),
        "custom_domain": (_model([helper.make_node("Foo", ["x"], ["h"], name="foo", domain="com.acme"), _gemm("h")],
                                 [W], domains=[helper.make_opsetid("com.acme", 1)]),
                          "node \"foo\" (Foo): custom domain 'com.acme' is not supported"),
        "no_input": (_model([helper.make_node("Gemm", ["c", "W"], ["y"], name="g", transB=1)],
                            [W, numpy_helper.from_array(np.ones((1, 3), np.float32), "c")],
                            inputs=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3])]),
                     "exactly one data input, it has none"),
        "two_inputs": (_model([helper.make_node("Add", ["x", "x2"], ["h"], name="add"), _gemm("h")], [W],
                              inputs=[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("x", "x2")]),
                       'exactly one data input, it has "x", "x2"'),
        "dynamic_dim": (_model([_gemm()], [W], inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "F"])]),
                        "input \"x\" has a dynamic dimension 'F' at axis 1"),
        "nan_initializer": (_model([_gemm()], [numpy_helper.from_array(np.array([[np.nan, 1, 1], [1, 1, np.inf]], np.float32), "W")]),
                            'initializer "W" contains 2 NaN/Inf values'),
        "duplicate_initializer": (_model([_gemm()], [W, W]), "W initializer name is not unique"),
        "duplicate_node_name": (_model([helper.make_node("Relu", ["x"], ["h"], name="head"), _gemm("h")], [W]),
                                'node name "head" is used twice'),
        "int_input": (_model([_gemm()], [W], inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 3])]),
                      'input "x" is not a float tensor'),
        "sigmoid": (_model([helper.make_node("Sigmoid", ["x"], ["h"], name="/act/Sigmoid"), _gemm("h")], [W]),
                    'node "/act/Sigmoid" (Sigmoid): not positively homogeneous'),
        "ext_absolute": (_external("/etc/passwd"), 'external data at "/etc/passwd": refused'),
        "ext_dotdot": (_external("../secret.bin"), 'external data at "../secret.bin": refused'),
        "ext_symlink": (_external("link.bin"), "resolves outside the model's directory"),
        "ext_missing": (_external("nothere.bin"), 'external data at "nothere.bin": no such file'),
    }
    return {k: (v if isinstance(v, bytes) else v.SerializeToString(), text) for k, (v, text) in cases.items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    cases = bad_models(d)
    for name, (data, _) in cases.items():
        (d / "m" / f"{name}.onnx").write_bytes(data)
    return d, cases


MODEL_CASES = ["truncated", "not_protobuf", "empty", "checker", "opset_unknown", "custom_domain",
               "no_input", "two_inputs", "dynamic_dim", "nan_initializer", "duplicate_initializer",
               "duplicate_node_name", "int_input", "sigmoid", "ext_absolute", "ext_dotdot",
               "ext_symlink", "ext_missing"]


def check_clean_error(result, expected, out_files=()):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert "Traceback" not in result.output
    for f in out_files:
        assert not os.path.exists(f)
        assert not [p for p in os.listdir(os.path.dirname(f)) if p.endswith(".tmp")]


@pytest.mark.parametrize("name", MODEL_CASES)
def test_bad_model(model_dir, name, tmp_path):
    d, cases = model_dir
    path = d / "m" / f"{name}.onnx"
    out = tmp_path / "report.json"
    r = runner.invoke(app, ["score", str(path), "--data", str(MNIST), "--json", str(out)])
    check_clean_error(r, cases[name][1], [out])
    assert str(path) in r.stderr  # names the file


def _data(tmp_path, name, **arrays):
    p = tmp_path / f"{name}.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("name,make,expected", [
    ("non_numeric", lambda t: _data(t, "s", x=np.array([["a"] * 784] * 3)), 'key "x" has non-numeric dtype <U1'),
    ("complex", lambda t: _data(t, "c", x=np.zeros((3, 784), np.complex64)), "non-numeric dtype complex64"),
    ("labels_length", lambda t: _data(t, "l", x=np.zeros((3, 784)), y=np.zeros(4, int)), 'labels "y" have shape (4,)'),
    ("labels_float", lambda t: _data(t, "f", x=np.zeros((3, 784)), y=np.zeros(3)), "are floats, not class indices, but the loss is cross-entropy; pass --loss mse"),
    ("labels_negative", lambda t: _data(t, "n", x=np.zeros((3, 784)), y=np.array([0, -1, 2])), "first -1 at sample 1"),
    ("inf_values", lambda t: _data(t, "i", x=np.full((3, 784), np.inf)), "contains 2352 NaN/Inf values (first in sample 0)"),
    ("scalar_x", lambda t: _data(t, "sc", x=np.float64(3.0)), 'key "x" has shape (); need (samples, ...)'),
    ("fortran", lambda t: _data(t, "fo", x=np.asfortranarray(np.zeros((3, 784)))), "Fortran order"),
    ("no_x_key", lambda t: _data(t, "k", images=np.zeros((3, 784))), "no x_train or x key (keys: images); use --x-key"),
])
def test_bad_data(tmp_path, name, make, expected):
    r = runner.invoke(app, ["score", MLP, "--data", str(make(tmp_path))])
    check_clean_error(r, expected)


@pytest.mark.parametrize("args,expected", [
    (["score", MLP, "--data", str(MNIST), "--limit", "0"], "--limit must be at least 1"),
    (["score", MLP, "--data", str(MNIST), "--split", "val"], "--split must be train or test"),
    (["score", MLP, "--data", str(MNIST), "--std", "0"], "--std must be positive"),
    (["score", MLP, "--data", str(MNIST), "--mean", "nan"], "--mean must be finite"),
    (["score", MLP, "--data", str(MNIST), "--precision", "float16"], "--precision must be float64 or float32"),
    (["score", MLP, "--data", str(MNIST), "--memory-budget", "1K"], "more than --memory-budget"),
    (["score", MLP, "--data", str(MNIST), "--max-sharpness", "-1"], "--max-sharpness must be a non-negative number"),
    (["rescale", MLP, "-o", "OUT", "--alpha", "1,0,1"], "--alpha values must be positive and finite"),
    (["rescale", MLP, "-o", "OUT", "--alpha", "1,2,3"], "the product of --alpha is 6"),
    (["rescale", MLP, "-o", "OUT", "--random", "--spread", "0"], "--spread must be positive"),
    (["invariance", MLP, "--data", str(MNIST), "--trials", "0"], "--trials must be at least 1"),
    (["score", MLP, "--data", str(MNIST), "--no-such-option"], "No such option: --no-such-option"),
])
def test_bad_options(tmp_path, args, expected):
    args = [str(tmp_path / "out.onnx") if a == "OUT" else a for a in args]
    from minsharp_ref.cli import main
    import contextlib
    import io
    import sys
    if "--no-such-option" in args:  # usage errors go through the console entry point
        err = io.StringIO()
        old = sys.argv
        sys.argv = ["minsharp-ref", *args]
        try:
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
                main()
        finally:
            sys.argv = old
        assert e.value.code == 2 and err.getvalue().strip().startswith("error: ") and expected in err.getvalue()
        return
    r = runner.invoke(app, args)
    check_clean_error(r, expected)
    assert not (tmp_path / "out.onnx").exists()
