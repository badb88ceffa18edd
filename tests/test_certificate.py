"""The fast engine's certificate (minsharp_ref/certificate.py, docs/method.md section 11).

Unit tests of ``certify`` on hand-made traces, and the onnxruntime engine on a network
whose early signals vanish: a dense ReLU chain (tests/oracle.py builders) whose third and
fourth layers nearly annihilate each other (B·A = O(1e-5)) with small-gain layers before
them, so that the first four tensors carry 1e-12 to 1e-17 of the total trace and float32
cancellation leaves them 2 to 3 correct digits (as googlenet's stem). The reference is the
float64 NumPy engine (itself checked against the finite-difference oracle in
test_oracle_traces.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minsharp_ref.api import traces_over
from minsharp_ref.certificate import FLOOR, FLOORED_LIMIT, RTOL, Reference, certify, column_groups
from minsharp_ref.engine import per_sample_traces, tensor_columns
from minsharp_ref.errors import MinsharpError
from minsharp_ref.onnx_import import ImportedModel, convert
from minsharp_ref.report import engine_line

from oracle import build, data

# ------------------------------------------------------------------------- certify, unit


def reference(means, groups=None) -> Reference:
    """Two identical samples whose mean traces are ``means``."""
    means = np.asarray(means, float)
    return Reference(np.vstack([means, means]), tuple(f"t{j}" for j in range(len(means))),
                     groups or column_groups([len(means)]))


def test_significant_tensor_off_by_more_than_rtol_fails():
    ref = reference([1.0, 2.0, 1e-3])
    for j in range(3):
        fast = ref.traces.copy()
        fast[:, j] *= 1 + 3 * RTOL
        c = certify(ref, fast)
        assert c.failed is not None and c.failed.name == f"t{j}"
        assert "engine check failed" in c.message() and f"'t{j}'" in c.message()
    ok = ref.traces * (1 + 0.5 * RTOL)
    assert certify(ref, ok).failed is None


def test_floor_share_and_limits():
    """A tensor at 1e-12 of the total (below φ = 2⁻²³): off by 5e-3 of itself passes (its
    deviation is 5e-3·1e-12/φ against the floor) and is reported; off by 2× fails by the
    own-relative limit (2); a tensor at 1e-6 of the total (above φ) off by 5e-3 fails (1)."""
    ref = reference([1.0, 1e-12, 1e-6])
    fast = ref.traces.copy()
    fast[:, 1] *= 1 + 5e-3
    c = certify(ref, fast)
    assert c.failed is None
    doc = c.as_dict()
    assert doc["floored_tensors"] == 1 and doc["floor"] == FLOOR
    assert doc["worst_floored"]["tensor"] == "t1"
    assert doc["worst_floored"]["relative_deviation"] == pytest.approx(5e-3, rel=1e-2)
    assert doc["max_relative_deviation"] <= RTOL
    fast[:, 1] = 2e-12
    c = certify(ref, fast)
    assert c.failed.name == "t1" and "of itself" in c.message()
    assert c.failed.relative_deviation > FLOORED_LIMIT
    fast = ref.traces.copy()
    fast[:, 2] *= 1 + 5e-3
    assert certify(ref, fast).failed.name == "t2"


def test_each_parametrisation_has_its_own_total():
    """BatchNorm: the folded view's columns are judged against the folded total, not the
    original's: a folded total 1e-10 of the original's does not make them negligible."""
    ref = reference([1.0, 2.0, 1e-10, 3e-10], column_groups([2, 2]))
    fast = ref.traces.copy()
    fast[:, 3] *= 1 + 3 * RTOL
    c = certify(ref, fast)
    assert c.failed.name == "t3" and c.as_dict()["floored_tensors"] == 0
    assert certify(reference([1.0, 2.0, 1e-10, 3e-10]), fast).failed is None  # one total


def test_zero_reference():
    """A tensor whose reference trace is 0: passes when the fast one is 0 or within the
    floor's tolerance, fails beyond it."""
    ref = reference([1.0, 0.0])
    assert certify(ref, ref.traces).failed is None
    fast = ref.traces.copy()
    fast[:, 1] = 0.5 * RTOL * FLOOR
    assert certify(ref, fast).failed is None
    fast[:, 1] = 2 * RTOL * FLOOR
    assert certify(ref, fast).failed.name == "t1"


# --------------------------------------------------------- a network whose signals vanish


def vanishing_network(eps: float = 2e-5, gain: float = 0.01, seed: int = 0):
    """Dense chain 6-8-8-16-16-16-5 (ReLU): layers 1 and 2 with weights times ``gain``,
    layer 3's weight A (16 × 8, unit norm), layer 4's B = Q (P + eps·R/4) with P the
    projector onto range(A)⊥ (so B·A = O(eps)); biases 3 + |b| keep every ReLU on."""
    layers = [("gemm", dict(out=8)), ("relu", {}), ("gemm", dict(out=8)), ("relu", {}),
              ("gemm", dict(out=16)), ("relu", {}), ("gemm", dict(out=16)), ("relu", {}),
              ("gemm", dict(out=16)), ("relu", {}), ("gemm", dict(out=5))]
    built = build((6,), layers, seed=seed)
    rng = np.random.default_rng(seed + 10)
    v, w, b = built.values(), built.weights, built.biases
    a = rng.normal(size=(16, 8))
    a /= np.linalg.norm(a)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    p = np.eye(16) - a @ np.linalg.pinv(a)
    new = {w[0]: gain * v[w[0]], w[1]: gain * v[w[1]], w[2]: a,
           w[3]: q @ (p + eps * rng.normal(size=(16, 16)) / 4)}
    new.update({b[d]: 3.0 + np.abs(v[b[d]]) for d in range(4)})
    built = built.with_values(new)
    return built, ImportedModel(Path("<memory>"), "", built.proto, convert(built.proto))


@pytest.fixture(scope="module")
def vanishing():
    built, imported = vanishing_network()
    x = data(built, 64)
    network = imported.network
    logits, inputs = network.forward(x, keep_inputs=True)
    ref = per_sample_traces(network, inputs, logits).mean(axis=0)
    return imported, x, ref, [name for _, _, name in tensor_columns(network)]


def test_vanishing_signals_pass_with_values_right(vanishing):
    """The first four tensors carry < 1e-11 of the total and float32 resolves them to worse
    than 10⁻⁴ of themselves (the certificate before the floor failed this run), yet every
    fast per-tensor trace is within 1e-5 of (its reference + 1e-9 of the total): the run is
    certified, with those tensors counted as floored and the worst of them named."""
    imported, x, ref, names = vanishing
    total = ref.sum()
    assert np.all(ref[:4] < 1e-11 * total) and np.all(ref[4:] > 1e-4 * total)
    run = traces_over(imported, [x], None, "cpu", engine="onnxruntime", per_sample=True)
    fast = run.per_sample.mean(axis=0)
    own = np.abs(fast - ref) / ref
    assert own[:4].max() > RTOL  # what the old certificate (own deviation ≤ RTOL) refused
    assert np.all(np.abs(fast - ref) <= 1e-5 * (ref + 1e-9 * total))
    check = run.engine_check
    assert check["floored_tensors"] == 4 and check["max_relative_deviation"] <= RTOL
    assert check["worst_floored"]["tensor"] == names[int(np.argmax(own[:4]))]
    assert check["worst_floored"]["relative_deviation"] == pytest.approx(own[:4].max(), rel=0.05)
    assert check["worst"]["share"] < 1 and check["samples"] == 64
    line = engine_line({"engine": "onnxruntime", "provider": "cpu", "precision": "float32",
                        "engine_check": check})
    assert line.endswith("(tolerance 0.0001; 4 tensors below 1.2e-07 of the total trace "
                         "judged against that floor)")


def _corrupt(monkeypatch, column: int, factor: float):
    from minsharp_ref.trace_graph import runner as runner_module

    original = runner_module.TraceGraphRunner.__call__

    def corrupted(self, x):
        traces, logits, diagonal = original(self, x)
        traces = traces.copy()
        traces[:, column] *= factor
        return traces, logits, diagonal

    monkeypatch.setattr(runner_module.TraceGraphRunner, "__call__", corrupted)


def test_corrupted_significant_tensor_fails(vanishing, monkeypatch):
    imported, x, ref, names = vanishing
    j = int(np.argmax(ref))
    _corrupt(monkeypatch, j, 1 + 1e-3)
    with pytest.raises(MinsharpError, match=f"engine check failed.*by 0.001 .*'{names[j]}'"):
        traces_over(imported, [x], None, "cpu", engine="onnxruntime")


def test_corrupted_negligible_tensor_passes_and_is_reported(vanishing, monkeypatch):
    """The first weight (about 1e-17 of the total) off by 5e-3 of itself: passes, named
    as the worst floored tensor; off by 2×: fails (the own-relative limit)."""
    imported, x, ref, names = vanishing
    _corrupt(monkeypatch, 0, 1 + 5e-3)
    check = traces_over(imported, [x], None, "cpu", engine="onnxruntime").engine_check
    assert check["worst_floored"]["tensor"] == names[0]
    assert 2e-3 < check["worst_floored"]["relative_deviation"] < FLOORED_LIMIT
    _corrupt(monkeypatch, 0, 2.0)
    with pytest.raises(MinsharpError, match=f"trace of '{names[0]}'.*of itself"):
        traces_over(imported, [x], None, "cpu", engine="onnxruntime")
