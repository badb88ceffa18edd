"""Models exported with a fixed batch size (fixtures/make_static_batch_fixtures.py): the
legacy exporter without ``dynamic_axes`` (which also folds ``x.view(x.size(0), -1)`` into a
Reshape to [2, 392]) and the dynamo exporter without ``dynamic_shapes``. Oracle: the same
torch module exported with a dynamic batch; every number must agree."""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import FIXTURES, MNIST
from minsharp_ref.cli import app
from minsharp_ref.onnx_import import import_model
from minsharp_ref.runtime import OrtForward, free_the_batch

runner = CliRunner()
NORM = ["--mean", "0.5", "--std", "0.5", "--limit", "100", "--batch-size", "64"]


def _score(tmp_path, stem, *extra):
    out = tmp_path / f"{stem}.json"
    model = FIXTURES / "static_batch" / f"{stem}.onnx"
    r = runner.invoke(app, ["score", str(model), "--data", str(MNIST), *NORM, "--json", str(out),
                            *extra])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def test_the_fixtures_have_a_fixed_batch_and_a_batch_in_a_reshape():
    for stem in ("cnn_torchscript", "cnn_dynamo"):
        proto = onnx.load(str(FIXTURES / "static_batch" / f"{stem}.onnx"))
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
        assert "Reshape" in [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("stem", ["cnn_torchscript", "cnn_dynamo"])
@pytest.mark.parametrize("options", [(), ("--engine", "onnxruntime"), ("--provider", "numpy")])
def test_a_fixed_batch_scores_as_the_dynamic_export(tmp_path, stem, options):
    """Batches of 64 and 36 (not 2) through the onnxruntime forward, the fidelity check and
    both engines: per-tensor traces, MS and loss as the dynamic export's, to 1e-12. The
    imported IR is the same, so the NumPy engine and the trace graph (built from the IR) see
    the same numbers; the onnxruntime forwards of the three files agree to the bit (measured:
    0 difference), 1e-12 leaves room for summation order only."""
    got, want = _score(tmp_path, stem, *options), _score(tmp_path, "cnn_dynamic", *options)
    rtol = 1e-12
    g = [x for layer in got["layers"] for x in (layer["trace_weight"], layer["trace_bias"])]
    w = [x for layer in want["layers"] for x in (layer["trace_weight"], layer["trace_bias"])]
    np.testing.assert_allclose(g, w, rtol=rtol)
    for key in ("minimum_sharpness", "trace", "loss"):
        assert got[key] == pytest.approx(want[key], rel=rtol), key
    assert got["fidelity"]["max_scaled_difference"] <= 1e-5


def test_free_the_batch_leaves_a_dynamic_graph_alone_and_the_file_unchanged():
    dynamic = onnx.load(str(FIXTURES / "static_batch" / "cnn_dynamic.onnx"))
    copy = onnx.ModelProto()
    copy.CopyFrom(dynamic)
    free_the_batch(copy, copy.graph.input[0].name)
    assert copy == dynamic
    imported = import_model(FIXTURES / "static_batch" / "cnn_torchscript.onnx")
    before = imported.proto.SerializeToString()
    x = np.random.default_rng(0).standard_normal((5,) + imported.network.input_shape)
    logits = OrtForward(imported.proto, imported.network, "cpu")(x)[0]
    assert logits.shape == (5, 10)
    np.testing.assert_allclose(logits, imported.network.forward(x), rtol=1e-4, atol=1e-5)
    assert imported.proto.SerializeToString() == before
