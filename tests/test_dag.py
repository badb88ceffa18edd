"""Residual / DenseNet-style networks and BatchNorm (docs/method.md sections 9 and 10).

Oracles: finite-difference Jacobians of onnx's ReferenceEvaluator (tests/oracle.py) on
hypothesis-drawn small DAGs with random Add/Concat wiring and BatchNorm with random running
statistics; the chain solver of section 4 (for DAG problems that are chains); a brute-force
minimisation over ℓ; function-preserving rescalings checked in the reference evaluator.
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import oracle
from conftest import FIXTURES, MNIST
from minsharp_ref.api import summarise, traces_over
from minsharp_ref.engine import tensor_columns
from minsharp_ref.errors import MinsharpError
from minsharp_ref.group import Group, folded_view, group_sharpness, rescaling_group
from minsharp_ref.onnx_import import ImportedModel, convert, import_model
from minsharp_ref.rescale import apply_to_proto, group_parameters
from minsharp_ref.sharpness import minimum_sharpness

RTOL = 1e-9


def draw_dag(seed: int, wiring: list[tuple[str, bool, bool]], bn_stem: bool) -> oracle.Built:
    """Stem conv (optionally + BN), then one block per ``wiring`` entry (join op, BN in the
    branch, projection shortcut): branch conv [BN] ReLU conv [BN], joined with the block
    input (or its 1×1 projection) by Add or Concat, then ReLU; GAP, Flatten, Gemm."""
    b = oracle._Builder((2, 5, 5), np.random.default_rng(seed), gain=1.2)
    b.conv(3, kernel=(3, 3), pads=(1, 1, 1, 1), bias=not bn_stem)
    if bn_stem:
        b.batchnorm()
    b.relu()
    for join, bn, project in wiring:
        skip = b.cur
        c = b.shape()[0]
        b.conv(c, pads=(1, 1, 1, 1), bias=not bn)
        if bn:
            b.batchnorm()
        b.relu()
        b.conv(c, pads=(1, 1, 1, 1), bias=not bn)
        if bn:
            b.batchnorm()
        branch = b.cur
        if project:
            b.cur = skip
            b.conv(c, kernel=(1, 1), bias=True)
            skip = b.cur
            b.cur = branch
        b.join(join, skip)
        b.relu()
    b.gap()
    b.flatten()
    b.gemm(3)
    return b.finish()


wirings = st.lists(st.tuples(st.sampled_from(["Add", "Concat"]), st.booleans(), st.booleans()),
                   min_size=1, max_size=2)


def ours(built: oracle.Built, x: np.ndarray):
    imported = ImportedModel(None, "", built.proto, convert(built.proto))
    run = traces_over(imported, [x], None, "numpy", check=False)
    names = [n for _, _, n in tensor_columns(imported.network)]
    return imported, run, dict(zip(names, run.sums.mean[:len(names)]))


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings, bn_stem=st.booleans())
def test_dag_traces_match_finite_differences(seed, wiring, bn_stem):
    """Every W, b, γ and β trace of a drawn DAG equals the finite-difference oracle's."""
    built = draw_dag(seed, wiring, bn_stem)
    x = oracle.data(built, 5, seed=seed + 1)
    _, _, got = ours(built, x)
    try:
        want = oracle.Oracle(built).traces(x)
    except oracle.KinkError:
        reject()  # a finite-difference step crossed a kink: an oracle limit, not a finding
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=RTOL, abs=1e-12 * max(want.values())), name


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings, bn_stem=st.booleans(),
       spread=st.floats(0.5, 3.0))
def test_minimum_sharpness_invariant_under_the_group(seed, wiring, bn_stem, spread):
    """Random ℓ per free class (BatchNorm: γ, β and μ rescaled exactly): the reference
    evaluator's logits are unchanged, the naive trace moves and MS does not (1e-9)."""
    built = draw_dag(seed, wiring, bn_stem)
    x = oracle.data(built, 6, seed=seed + 1)
    imported, run, _ = ours(built, x)
    base = summarise(imported, run.sums, False)
    group = rescaling_group(imported.network)
    ell = np.random.default_rng(seed).uniform(-spread, spread, group.size) * np.log(10)
    params = group_parameters(imported.network, ell, group)
    scaled = oracle.Built(apply_to_proto(built.proto, params), built.weights, built.biases,
                          built.input_shape, built.num_classes)
    before, after = oracle.Oracle(built).logits(x), oracle.Oracle(scaled).logits(x)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-11 * np.abs(before).max())
    imported2, run2, _ = ours(scaled, x)
    moved = summarise(imported2, run2.sums, False)
    assert moved.minimum_sharpness == pytest.approx(base.minimum_sharpness, rel=RTOL)
    if group.size and spread > 1:
        assert abs(moved.trace / base.trace - 1) > 1e-3


def test_batchnorm_folded_network_computes_the_same_function():
    built = draw_dag(3, [("Add", True, True), ("Concat", True, False)], True)
    net = convert(built.proto)
    folded = folded_view(net)
    assert not any(l.kind == "batchnorm" for l in folded.param_layers)  # all BNs follow convs
    x = oracle.data(built, 4)
    np.testing.assert_allclose(folded.forward(x), oracle.Oracle(built).logits(x), rtol=1e-12,
                               atol=1e-12)


# ----------------------------------------------------------------------------- the solver


def chain_group(d: int) -> Group:
    return Group((-1,) + tuple(range(d - 1)), tuple(range(d - 1)) + (-1,),
                 tuple(f"t{i}" for i in range(d - 1)), tuple((f"t{i}",) for i in range(d - 1)))


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 6), seed=st.integers(0, 2 ** 16), biases=st.booleans())
def test_general_solver_equals_the_chain_formula_on_chains(d, seed, biases):
    rng = np.random.default_rng(seed)
    t = 10.0 ** rng.uniform(-3, 3, d)
    u = 10.0 ** rng.uniform(-3, 3, d) * (rng.random(d) < 0.7) if biases else np.zeros(d)
    group = chain_group(d)
    assert group.is_chain
    chain = minimum_sharpness(t, u)
    general = group_sharpness(group, t, u, chain_formula=False)
    assert general.value == pytest.approx(chain.value, rel=1e-12)
    assert group_sharpness(group, t, u).value == chain.value  # the chain path: identical
    if d > 1:
        alpha, _ = general.layer_scales(group)
        np.testing.assert_allclose(alpha, chain.alpha, rtol=1e-6)


def brute_force(group: Group, t, u, levels=12) -> float:
    """Zooming grid search over ℓ ∈ R² (F is convex): 41² points per level, the grid step
    divided by 10 each level around the best point."""
    ell, h = np.zeros(group.size), 0.5
    e_in, e_out = np.array(group.layer_in), np.array(group.layer_out)

    def f(points):  # (P, m) → (P,)
        full = np.concatenate([points, np.zeros((len(points), 1))], axis=1)
        lin, lout = full[:, e_in], full[:, e_out]
        return (t * np.exp(-2 * (lout - lin)) + u * np.exp(-2 * lout)).sum(axis=1)

    for _ in range(levels):
        axes = [c + h * np.arange(-20, 21) for c in ell]
        points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, group.size)
        values = f(points)
        ell = points[np.argmin(values)]
        h /= 10
    return float(f(ell[None])[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16))
def test_newton_agrees_with_brute_force(seed):
    """A residual block's group: stem (in → a), branch conv1 (a → h), conv2 (h → a: the Add
    ties its output with its input a), head (a → logits): free classes a and h."""
    rng = np.random.default_rng(seed)
    group = Group((-1, 0, 1, 0), (0, 1, 0, -1), ("a", "h"), (("a",), ("h",)))
    t = 10.0 ** rng.uniform(-2, 2, 4)
    u = 10.0 ** rng.uniform(-2, 2, 4) * (rng.random(4) < 0.6)
    ms = group_sharpness(group, t, u)
    assert ms.method == "newton" and ms.converged
    assert ms.value == pytest.approx(brute_force(group, t, u), rel=1e-9)


def test_dead_layer_in_a_dag_is_an_unattained_infimum():
    group = Group((-1, 0, 1, 0), (0, 1, 0, -1), ("a", "h"), (("a",), ("h",)))
    ms = group_sharpness(group, [1.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.5])
    assert ms.method == "dead-layer" and ms.log_scale is None and ms.dead_layers == (1,)
    # the conv2 term can be sent to 0 through h; the rest is a 1-D problem in ℓ_a:
    # e^{−2a} + 3 e^{2a} + 0.5 (head bias: fixed), minimised at e^{4a} = 1/3
    assert ms.value == pytest.approx(2 * np.sqrt(3) + 0.5, rel=1e-9)


# ------------------------------------------------------------------- fixtures and importer


@pytest.mark.parametrize("stem", ["resnet_torchscript", "resnet_dynamo"])
def test_resnet_fixture_group(stem):
    """Stem, two identity blocks, one projection block: the classes are the stem/block
    outputs (tied by the shortcuts: one class for the first three) and each block's inner
    tensors."""
    net = import_model(FIXTURES / f"{stem}.onnx").network
    group = rescaling_group(net)
    assert not net.is_chain and len(net.param_layers) == 9
    assert group.size == 5  # the tied trunk at 14×14, 3 inner block tensors, the 7×7 trunk
    assert sorted(len(m) for m in group.members)[-1] >= 6


def test_score_cli_on_resnet_bn(tmp_path):
    from typer.testing import CliRunner

    from minsharp_ref.cli import app

    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["score", str(FIXTURES / "resnet_bn_torchscript.onnx"), "--data",
                                 str(MNIST), "--mean", "0.5", "--std", "0.5", "--limit", "32",
                                 "--provider", "numpy", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "folded parametrisation" in r.output and "alpha* per free class" in r.output
    doc = json.loads(out.read_text())
    kinds = [l["kind"] for l in doc["layers"]]
    assert kinds.count("batchnorm") == 8 and doc["solver"]["problem"] == "dag"
    assert "blocks.2.shortcut.1.bias" in {l["bias"] for l in doc["layers"]}  # the Identity copy
    assert all(l["kind"] != "batchnorm" for l in doc["folded"]["layers"])
    assert len(doc["classes"]) == doc["solver"]["free_classes"] > 0
    assert doc["trace"] == pytest.approx(sum(l["trace_weight"] + (l["trace_bias"] or 0)
                                             for l in doc["layers"]), rel=1e-12)


def _bn_model(training_mode=0, extra_outputs=False):
    from onnx import TensorProto, helper, numpy_helper

    c = 2
    inits = [numpy_helper.from_array(np.ones((c, 1, 1, 1)), "w"),
             *(numpy_helper.from_array(np.full(c, v), n)
               for n, v in (("g", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))),
             numpy_helper.from_array(np.ones((3, c)), "W")]
    outs = ["y", "rm", "rv"] if extra_outputs else ["y"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], group=c),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], outs, name="bn",
                              training_mode=training_mode),
             helper.make_node("GlobalAveragePool", ["y"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["z"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", c, 2, 2])],
                              [helper.make_tensor_value_info("z", TensorProto.DOUBLE, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def test_batchnorm_training_mode_is_refused_with_the_export_hint():
    with pytest.raises(MinsharpError, match=r'"bn".*training_mode=1.*do_constant_folding=False'):
        convert(_bn_model(training_mode=1))
    with pytest.raises(MinsharpError, match=r'"bn".*training-only outputs'):
        convert(_bn_model(extra_outputs=True))
    assert len(convert(_bn_model()).param_layers) == 3


def test_diagonal_and_per_sample_cover_every_tensor_of_a_bn_resnet():
    """--diag and --per-sample as for chains: one entry per W, b, γ, β tensor, the diagonal
    sums and the per-sample means are the traces (1e-12)."""
    from minsharp_ref.api import score

    result = score(FIXTURES / "resnet_bn_dynamo.onnx", MNIST, mean=[0.5], std=[0.5], limit=12,
                   provider="numpy", diagonal=True, per_sample=True)
    traces = {}
    for l in result.layers:
        traces[l.weight] = l.trace_weight
        if l.bias is not None:
            traces[l.bias] = l.trace_bias
    assert set(result.diagonal) == set(traces) and len(traces) == 26
    for name, value in traces.items():
        assert result.diagonal[name].sum() == pytest.approx(value, rel=1e-12)
        assert result.per_sample[name].mean() == pytest.approx(value, rel=1e-12)
