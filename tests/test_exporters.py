"""Models written by real exporters (skl2onnx, Keras 3 / tf2onnx, jax2onnx) against their own
framework's float64 reference traces, and what each exporter is known to write.

The references (fixtures/*_reference.json) were computed by the fixture scripts in the
exporting framework itself, without minsharp_ref: scikit-learn from its coefs_/intercepts_
with explicit per-sample Jacobians, TensorFlow with GradientTape Jacobians in float64, JAX with
jax.jacrev under jax_enable_x64, all on the first 256 samples of x_train scaled by 1/255.
Tolerances: 1e-9 relative on the float64 numpy forward (the models' float32 weights are exact
in float64, so both sides compute the same function), 1e-5 relative through onnxruntime's
float32 forward (its rounding moves the layer inputs by ~1e-7 relative).
"""

from __future__ import annotations

import json
from functools import lru_cache

import onnx
import pytest
from typer.testing import CliRunner

from conftest import FIXTURES, MNIST
from minsharp_ref import ir, score
from minsharp_ref.cli import app
from minsharp_ref.onnx_import import import_model

REFERENCES = {stem: (doc, model) for f in sorted(FIXTURES.glob("*_reference.json"))
              for doc in [json.loads(f.read_text())] for stem, model in doc["models"].items()}
TOLERANCE = {"numpy": 1e-9, "cpu": 1e-5}


@lru_cache(maxsize=None)
def scored(stem: str, provider: str):
    doc, model = REFERENCES[stem]
    y_key = "y_binary_train" if model["loss"] == "binary" else "y_train"
    return score(FIXTURES / f"{stem}.onnx", MNIST, limit=doc["data"]["samples"], y_key=y_key,
                 provider=provider)


def test_every_reference_names_a_fixture_and_a_recorded_exporter_version():
    assert len(REFERENCES) == 12
    for stem, (doc, _) in REFERENCES.items():
        assert (FIXTURES / f"{stem}.onnx").is_file()
        assert (FIXTURES / f"{stem}.onnx").stat().st_size < 300_000
        assert doc["data"] == {"path": "fixtures/mnist_subset.npz", "x_key": "x_train",
                               "samples": 256, "preprocessing": "uint8 / 255"}


@pytest.mark.parametrize("provider", ["numpy", "cpu"])
@pytest.mark.parametrize("stem", sorted(REFERENCES))
def test_traces_match_the_framework_reference(stem, provider):
    _, model = REFERENCES[stem]
    r = scored(stem, provider)
    assert r.loss_kind == model["loss"]
    assert len(r.layers) == len(model["layers"])
    rtol = TOLERANCE[provider]
    for got, want in zip(r.layers, model["layers"]):
        assert got.trace_weight == pytest.approx(want["weight"], rel=rtol), (got.name, "weight")
        if got.bias is None:  # none in the model, or all-zero and dropped by tf2onnx
            assert want["bias"] is None or want["bias_all_zero"], got.name
        else:
            assert got.trace_bias == pytest.approx(want["bias"], rel=rtol), (got.name, "bias")


# ------------------------------------------------------------- what each exporter writes


def ops(stem):
    return [n.op_type for n in onnx.load(str(FIXTURES / f"{stem}.onnx")).graph.node]


def kinds(net):
    return [type(l).__name__ for l in net.layers]


def test_skl2onnx_heads_zipmap_and_regressor():
    """skl2onnx: Cast of the input, MatMul + Add per layer, Softmax → Identity beside the
    label branch ArgMax → ArrayFeatureExtractor → Reshape → Cast (ZipMap and a second Cast
    with zipmap on); two classes: Sigmoid, Sub, Concat; the regressor ends with Reshape."""
    heads = {stem: import_model(FIXTURES / f"{stem}.onnx").network for stem in
             ("sklearn_mlp", "sklearn_mlp_zipmap", "sklearn_mlp_binary", "sklearn_mlp_regressor")}
    strip = {k: [p.split(" ")[0] for p in v.postprocessing] for k, v in heads.items()}
    assert strip["sklearn_mlp"] == ["Softmax", "Identity", "ArgMax", "ArrayFeatureExtractor", "Reshape", "Cast"]
    assert strip["sklearn_mlp_zipmap"] == ["Softmax", "ArgMax", "ZipMap", "ArrayFeatureExtractor", "Reshape",
                                           "Cast", "Cast"]
    assert strip["sklearn_mlp_binary"][:3] == ["Sigmoid", "Sub", "Concat"]
    assert strip["sklearn_mlp_regressor"] == [] and "Reshape" == ops("sklearn_mlp_regressor")[-1]
    assert [v.loss for v in heads.values()] == ["cross-entropy", "cross-entropy", "binary", "mse"]
    assert kinds(heads["sklearn_mlp"]) == ["Dense", "Relu", "Dense"]  # the input Cast is an alias
    assert all(l.weight_transposed for v in heads.values() for l in v.param_layers)  # (in, out)


def test_tf2onnx_drops_zero_bias_fuses_conv_bias_and_names_batch_unk():
    mlp = import_model(FIXTURES / "keras_mlp.onnx").network
    assert [l.bias is None for l in mlp.param_layers] == [False, True, False]
    assert ops("keras_mlp").count("Add") == 2 and ops("keras_mlp").count("MatMul") == 3
    cnn_proto = onnx.load(str(FIXTURES / "keras_cnn.onnx"))
    convs = [n for n in cnn_proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and all(len(n.input) == 3 for n in convs)  # bias fused into Conv
    cnn = import_model(FIXTURES / "keras_cnn.onnx").network
    assert cnn.input_shape == (28, 28, 1)  # NHWC
    assert all(l.bias is not None for l in cnn.param_layers)
    for stem in ("keras_mlp", "keras_cnn", "keras_binary"):
        batch = onnx.load(str(FIXTURES / f"{stem}.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param.startswith("unk__"), stem
    assert {"Shape", "Gather", "Slice", "Concat"} <= set(ops("keras_cnn"))  # shape arithmetic
    binary = import_model(FIXTURES / "keras_binary.onnx").network
    assert binary.loss == "binary" and binary.postprocessing[0].startswith("Sigmoid")


def test_tf2onnx_writes_batchnorm_after_a_biased_layer_as_mul_add_a_diagonal_layer():
    """Keras BatchNormalization after a biased Conv2D or a Dense: tf2onnx writes Mul(x, γ s)
    then Add(β − γ s μ) (no BatchNormalization node); each pair is a per-channel diagonal
    layer whose two constants are scored (reference: fixtures/make_keras_fixtures.py)."""
    assert "BatchNormalization" not in ops("keras_bn") and ops("keras_bn").count("Mul") == 2
    net = import_model(FIXTURES / "keras_bn.onnx").network
    assert [type(l).__name__ for l in net.param_layers] == [
        "Conv2d", "BatchNorm", "Dense", "BatchNorm", "Dense"]
    diagonal = [l for l in net.param_layers if isinstance(l, ir.BatchNorm)]
    assert [l.weight_name.rsplit("/", 1)[-1] for l in diagonal] == ["mul:0", "mul:0"]
    assert all(l.bias is not None and not l.mean.any() and l.epsilon == 0 for l in diagonal)
    assert net.has_batchnorm and [l.weight.shape for l in diagonal] == [(8,), (16,)]


def test_jax2onnx_gemm_in_by_out_pretransposed_conv_kernels_and_nhwc_transposes():
    mlp = import_model(FIXTURES / "jax_mlp.onnx").network
    gemms = [n for n in onnx.load(str(FIXTURES / "jax_mlp.onnx")).graph.node if n.op_type == "Gemm"]
    assert all(onnx.helper.get_attribute_value(a) == 0 for n in gemms for a in n.attribute
               if a.name == "transB")
    assert [l.weight.shape for l in mlp.param_layers] == [(784, 32), (32, 32), (32, 10)]
    assert all(l.weight_transposed for l in mlp.param_layers) and mlp.postprocessing == ()
    cnn = import_model(FIXTURES / "jax_cnn.onnx").network
    convs = [l for l in cnn.param_layers if isinstance(l, ir.Conv2d)]
    assert [c.weight_name for c in convs] == ["kernel_oih_0", "kernel_oih_1"]  # stored OIHW
    assert [c.weight.shape for c in convs] == [(8, 1, 3, 3), (16, 8, 3, 3)]
    perms = [l.perm for l in cnn.layers if isinstance(l, ir.Transpose)]
    assert perms == [(2, 0, 1), (1, 2, 0)]  # NHWC → NCHW before the convs, back before Gemm
    assert cnn.postprocessing == ("Softmax (node_Softmax_21)",)


def test_jax2onnx_keeps_flax_batchnorm_and_writes_the_nhwc_mean_as_reducemean_axes_1_2():
    """Flax nnx.BatchNorm (inference) is a BatchNormalization node between the NCHW
    transposes; ``jnp.mean(h, axis=(1, 2))`` on NHWC is ReduceMean over axes (1, 2), imported
    as a Transpose to (C, H, W), a global average pool and a Reshape to (C,)."""
    proto = onnx.load(str(FIXTURES / "jax_resnet_bn.onnx"))
    mean = next(n for n in proto.graph.node if n.op_type == "ReduceMean")
    axes = next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
                if t.name == mean.input[1])
    assert axes.tolist() == [1, 2] and ops("jax_resnet_bn").count("BatchNormalization") == 3
    net = import_model(FIXTURES / "jax_resnet_bn.onnx").network
    at = next(i for i, l in enumerate(net.layers) if l.nodes == (mean.name,)
              and isinstance(l, ir.Transpose))
    assert [type(l).__name__ for l in net.layers[at:at + 3]] == ["Transpose", "AvgPool2d", "Reshape"]
    assert net.layers[at + 2].shape == (8,)
    assert [type(l).__name__ for l in net.param_layers].count("BatchNorm") == 3


def test_jax2onnx_nhwc_concat_on_axis_3_and_mean_as_reducesum_then_div():
    """``jnp.concatenate(..., axis=-1)`` on NHWC is Concat axis 3; ``h.mean(axis=(1, 2))`` is
    ReduceSum over (1, 2) then Div by H·W: imported as transposes around a channel Concat,
    and as one global average pool (the Div converted with its ReduceSum)."""
    proto = onnx.load(str(FIXTURES / "jax_concat_mean.onnx"))
    concat = next(n for n in proto.graph.node if n.op_type == "Concat")
    assert onnx.helper.get_attribute_value(concat.attribute[0]) == 3
    assert ops("jax_concat_mean")[-3:] == ["ReduceSum", "Div", "Gemm"]
    net = import_model(FIXTURES / "jax_concat_mean.onnx").network
    kinds = [type(l).__name__ for l in net.layers]
    assert "Transpose, Transpose, Concat, Transpose" in ", ".join(kinds)
    assert kinds[-4:] == ["Transpose", "AvgPool2d", "Reshape", "Dense"]
    assert net.layers[-2].nodes == (proto.graph.node[-2].name,)  # named by the Div


@pytest.mark.parametrize("stem", ["keras_mlp", "keras_cnn", "keras_bn", "jax_mlp", "jax_cnn",
                                  "jax_resnet_bn", "jax_concat_mean"])
def test_alpha_invariance_passes(stem, tmp_path):
    out = tmp_path / "inv.json"
    r = CliRunner().invoke(app, ["invariance", str(FIXTURES / f"{stem}.onnx"), "--data", str(MNIST),
                                 "--limit", "32", "--trials", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["passed"] and doc["max_deviation"] <= 1e-9 and doc["trace_ratio"] > 10


@pytest.mark.parametrize("stem", sorted(REFERENCES))
def test_cli_scores_every_exporter_fixture(stem):
    _, model = REFERENCES[stem]
    extra = ["--y-key", "y_binary_train"] if model["loss"] == "binary" else []
    r = CliRunner().invoke(app, ["score", str(FIXTURES / f"{stem}.onnx"), "--data", str(MNIST),
                                 "--limit", "64", *extra])
    assert r.exit_code == 0, r.output
    assert f"loss: {model['loss']}" in r.stdout


def test_dynamo_writes_adaptive_max_pool_as_reducemax_a_global_max_pool():
    """``nn.AdaptiveMaxPool2d(1)`` under ``dynamo=True`` is ReduceMax over (2, 3) (the legacy
    exporter writes MaxPool): imported as a global max pool (traces against torch float64
    Jacobians in tests/test_crosscheck_torch.py)."""
    assert "ReduceMax" in ops("cnn_gmp_dynamo") and "MaxPool" not in ops("cnn_gmp_dynamo")
    net = import_model(FIXTURES / "cnn_gmp_dynamo.onnx").network
    pool = next(l for l in net.layers if isinstance(l, ir.MaxPool2d))
    assert pool.geometry.kernel == (24, 24) and net.layers[net.layers.index(pool) + 1].shape == (8,)
