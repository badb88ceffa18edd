"""`--measures` on networks with branches and BatchNorm (docs/method.md section 12).

Oracles: function-preserving rescalings of the group of section 9 (the function checked in
onnx's float64 ReferenceEvaluator, tests/oracle.py) under which normalised sharpness and
the traces at the minimiser must not move; a brute-force minimisation of the rank-one
objective for a diagonal (BatchNorm γ) layer; the float64 NumPy engine for the float32
onnxruntime engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from conftest import FIXTURES, MNIST
from minsharp_ref.api import score, summarise, traces_over
from minsharp_ref.group import rescaling_group
from minsharp_ref.measures import normalised_sharpness, normalised_sharpness_layer
from minsharp_ref.onnx_import import ImportedModel, convert
from minsharp_ref.rescale import apply_to_proto, group_parameters
from test_dag import draw_dag, wirings

NORM = dict(mean=[0.5], std=[0.5])


def measured(built: oracle.Built, x: np.ndarray):
    imported = ImportedModel(None, "", built.proto, convert(built.proto))
    run = traces_over(imported, [x], None, "numpy", diagonal=True, check=False)
    summary = summarise(imported, run.sums, False)
    return imported, summary, [n.value for n in normalised_sharpness(imported.network, run.diagonal)]


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings, bn_stem=st.booleans(),
       spread=st.floats(0.5, 2.0))
def test_measures_invariant_under_the_group(seed, wiring, bn_stem, spread):
    """Random ℓ per free class of a drawn DAG (BatchNorm rescaled exactly, section 10): the
    logits are unchanged (oracle), NS per layer (original parametrisation, γ included) and
    the traces at the minimiser (folded view) do not move; the latter sum to MS."""
    built = draw_dag(seed, wiring, bn_stem)
    x = oracle.data(built, 6, seed=seed + 1)
    imported, base, ns = measured(built, x)
    group = rescaling_group(imported.network)
    ell = np.random.default_rng(seed).uniform(-spread, spread, group.size) * np.log(10)
    scaled = oracle.Built(apply_to_proto(built.proto, group_parameters(imported.network, ell, group)),
                          built.weights, built.biases, built.input_shape, built.num_classes)
    before, after = oracle.Oracle(built).logits(x), oracle.Oracle(scaled).logits(x)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-11 * np.abs(before).max())
    _, moved, ns_moved = measured(scaled, x)
    assert ns_moved == pytest.approx(ns, rel=1e-8)  # L-BFGS's own accuracy
    at = [v for l in base.traces_at_alpha for v in l.values() if v is not None]
    at_moved = [v for l in moved.traces_at_alpha for v in l.values() if v is not None]
    if base.solver["method"] != "dead-layer":
        assert sum(at) == pytest.approx(base.minimum_sharpness, rel=1e-12)
        assert at_moved == pytest.approx(at, rel=1e-7, abs=1e-12 * sum(at))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_diagonal_layer_ns_is_the_am_gm_bound(n, seed):
    """A γ vector as a diagonal matrix: the rank-one minimisation over (a, b) reaches
    Σ 2|γ_i|√h_i, which is what is reported for a BatchNorm layer."""
    rng = np.random.default_rng(seed)
    h, g = rng.lognormal(0, 2, n), rng.normal(size=n)
    general = normalised_sharpness_layer(np.diag(h), np.diag(g ** 2))
    assert general.value == pytest.approx(2 * np.sum(np.abs(g) * np.sqrt(h)), rel=1e-9)


@pytest.mark.parametrize("stem", ["densenet_torchscript", "resnet_bn_dynamo", "resnet_torchscript"])
def test_measures_on_fixtures_both_engines(stem):
    """Every parameterised layer of the original parametrisation gets an NS (BN γ: the AM-GM
    bound), every layer of the folded view a trace at α*; they sum to MS (1e-12); the
    onnxruntime engine's are within 1e-5 of the NumPy engine's."""
    kw = dict(limit=32, measures=True, **NORM)
    ref = score(FIXTURES / f"{stem}.onnx", MNIST, provider="numpy", **kw)
    fast = score(FIXTURES / f"{stem}.onnx", MNIST, provider="cpu", engine="onnxruntime", **kw)
    m = ref.measures
    assert len(m["normalised_sharpness"]["layers"]) == len(ref.layers)
    scored = ref.folded["layers"] if ref.folded else ref.layers
    assert len(m["traces_at_alpha"]) == len(scored)
    total = sum(v for l in m["traces_at_alpha"] for v in l.values() if v is not None)
    assert total == pytest.approx(ref.minimum_sharpness, rel=1e-12)
    for layer, ns in zip(ref.layers, m["normalised_sharpness"]["layers"]):
        if layer.kind == "batchnorm":
            assert ns["value"] == ns["lower_bound"] > 0
        assert ns["value"] >= ns["lower_bound"] * (1 - 1e-12)
    assert fast.measures["normalised_sharpness"]["value"] == pytest.approx(
        m["normalised_sharpness"]["value"], rel=1e-5)
    for a, b in zip(fast.measures["traces_at_alpha"], m["traces_at_alpha"]):
        assert a["weight"] == pytest.approx(b["weight"], rel=1e-5)
        assert (a["bias"] is None) == (b["bias"] is None)
