"""The folded view's traces from the original network's signals (minsharp_ref/folded_traces.py,
docs/method.md section 10) against a backward pass through the folded network itself
(``per_sample_traces`` on ``folded_view``, whose function is checked against the oracle in
test_dag.py and whose traces against the trace graph in test_trace_graph.py), per sample and
per column: BNs folded into convs, BNs kept as diagonal layers (after Concat, ReLU, Add),
drawn DAGs and the BN fixtures of both exporters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from conftest import FIXTURES, MNIST
from minsharp_ref.engine import per_sample_traces
from minsharp_ref.folded_traces import traces_with_folded
from minsharp_ref.group import folded_inputs, folded_view
from minsharp_ref.onnx_import import convert, import_model
from minsharp_ref.runtime import make_forward
from test_dag import draw_dag, wirings


def both_ways(network, proto, x, dtype=np.float64, diagonal=False):
    logits, inputs = make_forward(proto, network, "numpy", threads=1)(x)
    folded = folded_view(network)
    sig, sig_f = (network, folded) if dtype == np.float64 else (network.astype(dtype), folded.astype(dtype))
    shared = traces_with_folded(sig, sig_f, inputs, logits, dtype, diagonal)
    if diagonal:
        plain, diag = per_sample_traces(sig, inputs, logits, dtype, diagonal=True)
    else:
        plain, diag = per_sample_traces(sig, inputs, logits, dtype), None
    two_pass = per_sample_traces(sig_f, folded_inputs(network, folded, inputs), logits, dtype,
                                 diagonal=diagonal)
    if diagonal:  # the folded view's own tensors' diagonal, from its own backward pass
        two_pass, diag_f = two_pass
        diag = {**diag_f, **diag}
    return shared, (plain, two_pass, diag)


def assert_same(shared, reference, rtol):
    (t, tf, d), (plain, two_pass, diag) = shared, reference
    assert t.shape == plain.shape and tf.shape == two_pass.shape
    np.testing.assert_allclose(t, plain, rtol=rtol, atol=rtol * 1e-3 * plain.max())
    np.testing.assert_allclose(tf, two_pass, rtol=rtol, atol=rtol * 1e-3 * two_pass.max())
    if diag is not None:
        assert set(d) == set(diag)
        for k in diag:
            np.testing.assert_allclose(d[k], diag[k], rtol=rtol, atol=rtol * 1e-3 * diag[k].max())


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 16), wiring=wirings)
def test_drawn_dags_with_batchnorm(seed, wiring):
    built = draw_dag(seed, [(j, True, p) for j, _, p in wiring], True)
    network = convert(built.proto)
    x = oracle.data(built, 5, seed=seed + 1)
    assert_same(*both_ways(network, built.proto, x, diagonal=seed % 2 == 0), 1e-12)


@pytest.mark.parametrize("stem", ["resnet_bn_torchscript", "resnet_bn_dynamo", "cnn_bn_dynamo",
                                  "densenet_torchscript", "densenet_dynamo"])
def test_bn_fixtures(stem):
    imported = import_model(FIXTURES / f"{stem}.onnx")
    with np.load(MNIST) as d:
        x = ((d["x_train"][:6] / 255.0 - 0.5) / 0.5).reshape(6, 1, 28, 28)
    network = imported.network
    kinds = {type(l).__name__ for l in folded_view(network).param_layers}
    assert "Conv2d" in kinds
    assert_same(*both_ways(network, imported.proto, x), 1e-12)
    assert_same(*both_ways(network, imported.proto, x, np.float32), 1e-4)  # float32 signals


def test_densenet_keeps_diagonal_layers_and_folds_convs():
    """Both kinds of folded layer occur in the DenseNet fixture (so the test above covers them)."""
    network = import_model(FIXTURES / "densenet_dynamo.onnx").network
    folded = folded_view(network)
    kinds = [type(l).__name__ for l in folded.param_layers]
    assert kinds.count("BatchNorm") == 7 and kinds.count("Conv2d") == 12
