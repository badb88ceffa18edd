"""The head: found structurally (onnx_import/head.py), stripped, and deciding the loss; the
binary and mse losses against float64 oracles on drawn networks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from typer.testing import CliRunner

from conftest import FIXTURES, MNIST
from minsharp_ref import score, score_arrays
from minsharp_ref.cli import app
from minsharp_ref.errors import MinsharpError
from minsharp_ref.onnx_import import convert, import_model
from minsharp_ref.runtime import check_fidelity

from oracle import KinkError, Oracle, build, data, trace_for_loss
from test_import import const

RNG = np.random.default_rng(0)


def two_layer(k=3, features=4):
    """x → Gemm → Relu → Gemm (the logits "z", k outputs)."""
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="g1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "W2", "b2"], ["z"], name="g2", transB=1)]
    inits = [const("W1", (5, features)), const("b1", (5,)), const("W2", (k, 5)), const("b2", (k,))]
    return nodes, inits


def graph_model(nodes, inits, outputs, features=4, ml=False):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    m = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(m)
    return m


def out(name, elem=TensorProto.FLOAT, shape=("N", None)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def imported(m, features=4):
    net = convert(m)
    check_fidelity(m, net, RNG.standard_normal((5, features)))
    return net


# ------------------------------------------------------------------ structural detection


def test_topk_cast_identity_chain_and_two_outputs_are_the_head():
    nodes, inits = two_layer()
    nodes += [helper.make_node("Identity", ["z"], ["z1"], name="id1"),
              helper.make_node("Identity", ["z1"], ["z2"], name="id2"),
              helper.make_node("TopK", ["z2", "k"], ["vals", "idx"], name="topk", axis=1),
              helper.make_node("Cast", ["idx"], ["idx32"], name="cast", to=TensorProto.INT32),
              helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=1)]
    inits.append(const("k", value=[2], dtype=np.int64))
    m = graph_model(nodes, inits, [out("p"), out("idx32", TensorProto.INT32), out("vals")])
    net = imported(m)
    assert net.logits_name == "z" and net.loss == "cross-entropy"
    assert net.postprocessing == ("Identity (id1)", "Identity (id2)", "TopK (topk)", "Cast (cast)",
                                  "Softmax (softmax)")


def test_array_feature_extractor_label_branch_is_the_head():
    """skl2onnx's label branch ArgMax → ArrayFeatureExtractor → Reshape → Cast."""
    nodes, inits = two_layer()
    nodes += [helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=1),
              helper.make_node("ArgMax", ["p"], ["am"], name="argmax", axis=1),
              helper.make_node("ArrayFeatureExtractor", ["classes", "am"], ["lab"], name="afe",
                               domain="ai.onnx.ml"),
              helper.make_node("Reshape", ["lab", "shape"], ["lab1"], name="reshape"),
              helper.make_node("Cast", ["lab1"], ["label"], name="cast", to=TensorProto.INT64)]
    inits += [const("classes", value=[0, 1, 2], dtype=np.int64), const("shape", value=[-1], dtype=np.int64)]
    m = graph_model(nodes, inits, [out("label", TensorProto.INT64, ("N",)), out("p")], ml=True)
    net = imported(m)
    assert net.logits_name == "z" and net.loss == "cross-entropy"
    assert [p.split(" ")[0] for p in net.postprocessing] == ["Softmax", "ArgMax", "ArrayFeatureExtractor",
                                                             "Reshape", "Cast"]


def test_logits_as_an_output_and_a_head_beside_it():
    nodes, inits = two_layer()
    nodes += [helper.make_node("LogSoftmax", ["z"], ["logp"], name="ls", axis=1)]
    net = imported(graph_model(nodes, inits, [out("z"), out("logp")]))
    assert net.logits_name == "z" and net.postprocessing == ("LogSoftmax (ls)",)


def test_sigmoid_on_one_logit_is_binary_and_skl2onnx_two_class_head():
    """skl2onnx's two-class MLPClassifier: Sigmoid, then [1 − p, p] with Sub and Concat."""
    nodes, inits = two_layer(k=1)
    nodes += [helper.make_node("Sigmoid", ["z"], ["p1"], name="sigmoid"),
              helper.make_node("Sub", ["one", "p1"], ["p0"], name="sub"),
              helper.make_node("Concat", ["p0", "p1"], ["probs"], name="concat", axis=1)]
    inits.append(const("one", value=[1.0]))
    net = imported(graph_model(nodes, inits, [out("probs")]))
    assert net.loss == "binary" and net.num_classes == 1
    assert [p.split(" ")[0] for p in net.postprocessing] == ["Sigmoid", "Sub", "Concat"]


def test_no_head_single_output_is_mse_and_several_are_cross_entropy():
    nodes, inits = two_layer(k=1)
    assert imported(graph_model(nodes, inits, [out("z")])).loss == "mse"
    nodes, inits = two_layer(k=3)
    nodes.append(helper.make_node("Identity", ["z"], ["y"], name="id"))
    net = imported(graph_model(nodes, inits, [out("y")]))
    assert net.loss == "cross-entropy" and net.logits_name == "z" and net.postprocessing == ()


def test_bias_add_after_the_last_matmul_belongs_to_the_logits():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["z"], name="add"),
             helper.make_node("Softmax", ["z"], ["p"], name="sm", axis=-1)]
    net = imported(graph_model(nodes, [const("W", (4, 3)), const("b", (3,))], [out("p")]))
    assert net.logits_name == "z" and net.param_layers[0].bias_name == "b"


@pytest.mark.parametrize("op", ["Sigmoid", "Softmax", "Tanh"])
def test_non_homogeneous_op_between_layers_is_still_refused(op):
    nodes, inits = two_layer()
    nodes[1] = helper.make_node(op, ["h"], ["a"], name="between", **({"axis": 1} if op == "Softmax" else {}))
    nodes.append(helper.make_node("Softmax", ["z"], ["p"], name="sm", axis=1))
    with pytest.raises(MinsharpError, match=rf'^node "between" \({op}\): not positively homogeneous'):
        convert(graph_model(nodes, inits, [out("p")]))


def test_sigmoid_on_several_logits_and_two_output_layers_are_refused():
    nodes, inits = two_layer(k=3)
    nodes.append(helper.make_node("Sigmoid", ["z"], ["p"], name="sig"))
    with pytest.raises(MinsharpError, match="multi-label head"):
        convert(graph_model(nodes, inits, [out("p")]))
    nodes, inits = two_layer(k=3)
    nodes.append(helper.make_node("Gemm", ["a", "W3"], ["z3"], name="g3", transB=1))
    inits.append(const("W3", (2, 5)))
    with pytest.raises(MinsharpError, match=r'2 last layers \("g2", "g3"\)'):
        convert(graph_model(nodes, inits, [out("z"), out("z3")]))


# ------------------------------------------------- binary and mse against float64 oracles


def crosses_kink(oracle, x, name, h) -> bool:
    """Whether the logits are not linear in any one coordinate of ``name`` over [θ − h, θ + h]
    (a ReLU switches inside the step): z(θ + h) + z(θ − h) − 2 z(θ) is then not ~0."""
    theta = oracle.values[name]
    f = oracle._partial(x, name)
    z0 = f(theta)
    tol = 64 * np.finfo(float).eps * (1 + np.max(np.abs(z0)))
    for i in range(theta.size):
        up, dn, _, _ = oracle._perturbed(theta, i, h)
        if np.max(np.abs(f(up) + f(dn) - 2 * z0)) > tol:
            return True
    return False


@st.composite
def small_heads(draw):
    loss = draw(st.sampled_from(["binary", "mse"]))
    features = draw(st.integers(2, 3))
    hidden = draw(st.lists(st.integers(2, 4), min_size=1, max_size=2))
    k = 1 if loss == "binary" else draw(st.integers(1, 3))
    layers = []
    for width in hidden:
        layers += [("gemm", dict(out=width, transB=draw(st.sampled_from([0, 1])))), ("relu", {})]
    layers.append(("matmul", dict(out=k)))
    return loss, features, layers, draw(st.integers(0, 2 ** 16)), draw(st.integers(2, 4))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_heads())
def test_binary_and_mse_traces_match_jacobian_and_loss_second_differences(case):
    """Per tensor: the package (numpy, float64) vs the Jacobian oracle with the loss's A at
    1e-9, and vs second central differences of the loss itself at 1e-6 (their own error)."""
    loss, features, layers, seed, n = case
    built = build((features,), layers, seed=seed)
    x = data(built, n, seed)
    rng = np.random.default_rng(seed)
    k = built.num_classes
    y = rng.integers(0, 2, n) if loss == "binary" else rng.normal(size=(n, k))
    oracle = Oracle(built)
    z = oracle.logits(x)
    try:
        jac = {p: trace_for_loss(oracle.jacobian(x, p), z, loss) for p in built.params}
    except KinkError:
        reject()
    # steps of 2^-12 relative to max|θ| but not below 2^-16 (a one-element bias can be tiny);
    # the rounding error of a second difference is ≲ 4·eps·s/h² per entry, s the size of the
    # terms the loss sums (|L| + mean |z|(1 + |y|)): 4x that is allowed
    steps = {p: 2.0 ** -12 / min(1.0, max(np.max(np.abs(oracle.values[p])), 2.0 ** -4))
             for p in built.params}
    for p in built.params:  # the second differences are exact only without a kink in ±h
        if crosses_kink(oracle, x, p, oracle._step(p, steps[p])):
            reject()
    # Richardson extrapolation of steps h and h/2 cancels the O(h²) truncation error of the
    # (curved) binary loss; the rounding error grows by (4·4 + 1)/3 < 6
    second = {p: (4 * oracle.loss_second_difference_trace(x, y, p, rel_step=steps[p] / 2, kind=loss)
                  - oracle.loss_second_difference_trace(x, y, p, rel_step=steps[p], kind=loss)) / 3
              for p in built.params}
    size = abs(oracle.loss(x, y, kind=loss)) + np.mean(np.abs(z)) * (1 + np.mean(np.abs(y)))
    rounding = {p: 6 * 16 * np.finfo(float).eps * size * oracle.values[p].size
                / oracle._step(p, steps[p]) ** 2 for p in built.params}
    layers_out, total, _ = score_arrays(built.proto, x, loss=loss)
    got = {}
    for layer in layers_out:
        got[layer.weight] = layer.trace_weight
        if layer.bias is not None:
            got[layer.bias] = layer.trace_bias
    scale = sum(jac.values())
    for p in built.params:
        assert got[p] == pytest.approx(jac[p], rel=1e-9, abs=1e-12 * scale), p
        assert second[p] == pytest.approx(jac[p], rel=1e-6, abs=rounding[p]), p


def test_binary_factor_is_stable_for_confident_logits():
    from minsharp_ref.engine import loss_hessian_factor

    z = np.array([[-800.0], [-40.0], [-1.5], [0.0], [1.5], [40.0], [800.0]])
    s = loss_hessian_factor(z, "binary")[:, 0, 0]
    # σ(z)(1 − σ(z)) = 1/(4 cosh²(z/2)): for |z| ≥ 40 it is e^{−|z|}(1 − 2e^{−|z|}) to 1e-17
    want = 1 / (2 * np.cosh(z[2:5, 0] / 2))
    np.testing.assert_allclose(s[2:5], want, rtol=1e-15, atol=0)
    for i, t in ((0, 800.0), (1, 40.0), (5, 40.0), (6, 800.0)):
        assert s[i] == pytest.approx(np.exp(-t / 2) * (1 - np.exp(-t)), rel=1e-15), t
    assert s[0] > 0  # 1.9e-174, not rounded to 0 as the naive √(p(1 − p)) is


# ------------------------------------------------------------- labels, --loss, reports


def test_labels_that_do_not_fit_the_loss_are_one_line_errors(tmp_path):
    binary = FIXTURES / "sklearn_mlp_binary.onnx"
    with pytest.raises(MinsharpError, match=r'labels "y_train" out of range 0..1 for the binary loss.*--y-key'):
        score(binary, MNIST, limit=10, provider="numpy")
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.zeros((3, 784), np.float32), y=np.zeros(3))
    with pytest.raises(MinsharpError, match=r'are floats, not class indices, but the loss is cross-entropy; '
                                            r'pass --loss mse'):
        score(FIXTURES / "sklearn_mlp.onnx", floats, provider="numpy")
    with pytest.raises(MinsharpError, match="--loss binary needs a single logit; the model has 10 outputs"):
        score(FIXTURES / "sklearn_mlp.onnx", MNIST, limit=3, loss="binary")
    with pytest.raises(MinsharpError, match="--loss must be one of"):
        score(FIXTURES / "sklearn_mlp.onnx", MNIST, limit=3, loss="hinge")


def test_binary_loss_and_accuracy_are_computed_from_their_definitions():
    r = score(FIXTURES / "sklearn_mlp_binary.onnx", MNIST, y_key="y_binary_train", limit=200,
              provider="numpy")
    assert r.loss_kind == "binary" and r.accuracy > 0.8
    with np.load(MNIST) as d:
        x = d["x_train"][:200].reshape(200, -1) / 255.0
        y = d["y_binary_train"][:200].astype(np.float64)
    z = import_model(FIXTURES / "sklearn_mlp_binary.onnx").network.forward(x)[:, 0]
    p = 1 / (1 + np.exp(-z))
    assert r.loss == pytest.approx(np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p)), rel=1e-10)
    assert r.accuracy == pytest.approx(np.mean((p > 0.5) == (y == 1)))


def test_cli_loss_override_and_json_loss_kind(tmp_path):
    runner = CliRunner()
    out_json = tmp_path / "r.json"
    r = runner.invoke(app, ["score", str(FIXTURES / "sklearn_mlp.onnx"), "--data", str(MNIST),
                            "--limit", "50", "--provider", "numpy", "--loss", "mse",
                            "--json", str(out_json)])
    assert r.exit_code == 2 and 'have shape (50,); the regressor (--loss mse) has 10 outputs' in r.stderr
    assert not out_json.exists()
    r = runner.invoke(app, ["score", str(FIXTURES / "sklearn_mlp_regressor.onnx"), "--data", str(MNIST),
                            "--limit", "50", "--provider", "numpy", "--json", str(out_json)])
    assert r.exit_code == 0, r.stderr
    assert "loss: mse" in r.stdout and "accuracy -" in r.stdout
    doc = json.loads(out_json.read_text())
    assert doc["loss_kind"] == "mse" and doc["accuracy"] is None and doc["loss"] > 0


def test_mse_override_with_two_dimensional_targets(tmp_path):
    """--loss mse on K = 2 raw outputs: targets (N, 2); loss = mean over samples and outputs
    of (z − y)², written directly; no accuracy; targets of the wrong shape are refused."""
    built = build((3,), [("gemm", dict(out=4)), ("relu", {}), ("gemm", dict(out=2))], seed=5)
    path = tmp_path / "reg.onnx"
    path.write_bytes(built.proto.SerializeToString())
    x = data(built, 20, 3)
    y = np.random.default_rng(4).normal(size=(20, 2))
    np.savez(tmp_path / "d.npz", x=x, y=y, y1=y[:, 0])
    assert convert(built.proto).loss == "cross-entropy"  # two raw outputs: a classifier by default
    r = score(path, tmp_path / "d.npz", loss="mse", provider="numpy")
    z = Oracle(built).logits(x)
    assert r.loss_kind == "mse" and r.accuracy is None
    assert r.loss == pytest.approx(np.mean((z - y) ** 2), rel=1e-12)
    with pytest.raises(MinsharpError, match=r'labels "y1" have shape \(20,\); the regressor \(--loss mse\) has 2 outputs'):
        score(path, tmp_path / "d.npz", y_key="y1", loss="mse", provider="numpy")


def test_a_temperature_before_the_heads_softmax_is_refused():
    """Softmax(z / T): scoring the cross-entropy of z would not be the model's loss."""
    nodes, inits = two_layer()
    nodes += [helper.make_node("Div", ["z", "T"], ["zt"], name="temperature"),
              helper.make_node("Softmax", ["zt"], ["p"], name="sm", axis=1),
              helper.make_node("ArgMax", ["p"], ["label"], name="am", axis=1)]
    inits.append(const("T", value=[2.0]))
    with pytest.raises(MinsharpError, match=r'^node "sm" \(Softmax\) in the head reads the logits "z" '
                                            r'through other operations'):
        convert(graph_model(nodes, inits, [out("p"), out("label", TensorProto.INT64, ("N",))]))


def test_a_baseline_scored_with_another_loss_is_not_comparable():
    from minsharp_ref.gates import mismatches

    doc = score(FIXTURES / "sklearn_mlp_regressor.onnx", MNIST, limit=20, provider="numpy").to_dict()
    other = json.loads(json.dumps(doc))
    assert mismatches(doc, other) == []
    other["loss_kind"] = "cross-entropy"
    assert mismatches(doc, other) == ["loss differs: baseline cross-entropy, now mse"]
