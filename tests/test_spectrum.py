"""Exact Hessian-vector products and the spectrum (docs/method.md section 14).

Oracle: explicit dense Hessians of tiny networks from exact four-point differences of the
IR's float64 forward (tests/hessian_oracle.py; nothing of hvp.py), for a dense chain, a
conv net with max pool, DAGs with BatchNorm, binary and mse heads and hypothesis-drawn
chains; numpy.linalg.eigvalsh for the eigenvalues; score's exact trace; torch
double-backward products on the shipped fixtures (skipped without torch).
"""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import hessian_oracle as ho
import oracle
from conftest import FIXTURES, MNIST, ROOT
from minsharp_ref import hessian_operator
from minsharp_ref.api import score_arrays
from minsharp_ref.onnx_import import convert
from minsharp_ref.spectrum import extreme_eigenpairs, slq_density

RTOL = 1e-9


def tiny_dag(seed, join="Add"):
    """conv+BN+ReLU, then a 1×1 conv+BN joined with it by Add or Concat, ReLU, GAP, Gemm."""
    b = oracle._Builder((1, 3, 3), np.random.default_rng(seed), gain=1.2)
    b.conv(2, kernel=(3, 3), pads=(1, 1, 1, 1), bias=False)
    b.batchnorm()
    b.relu()
    skip = b.cur
    b.conv(2, kernel=(1, 1), bias=False)
    b.batchnorm()
    b.join(join, skip)
    b.relu()
    b.gap()
    b.flatten()
    b.gemm(3)
    return b.finish()


CASES = {
    "chain": (lambda: oracle.build((5,), [("gemm", dict(out=4)), ("relu", {}), ("gemm", dict(out=4)),
                                          ("relu", {}), ("gemm", dict(out=3))], seed=3), "cross-entropy"),
    "conv-maxpool": (lambda: oracle.build((1, 5, 5), [("conv", dict(out=2)), ("relu", {}),
                                                      ("maxpool", dict(kernel=(2, 2))), ("flatten", {}),
                                                      ("gemm", dict(out=3))], seed=4), "cross-entropy"),
    "dag-bn-add": (lambda: tiny_dag(0), "cross-entropy"),
    "dag-bn-concat": (lambda: tiny_dag(7, "Concat"), "cross-entropy"),
    "binary": (lambda: oracle.build((4,), [("gemm", dict(out=5)), ("leaky", {}),
                                           ("matmul", dict(out=1))], seed=3), "binary"),
    "mse": (lambda: oracle.build((4,), [("gemm", dict(out=5, transB=0, alpha=0.5, beta=2.0)),
                                        ("relu", {}), ("gemm", dict(out=2))], seed=3), "mse"),
}


def labels_for(loss, n, k, seed=2):
    rng = np.random.default_rng(seed)
    if loss == "binary":
        return rng.integers(0, 2, size=n)
    if loss == "mse":
        return rng.normal(size=(n, k))
    return rng.integers(0, k, size=n)


def case(name, n=4):
    make, loss = CASES[name]
    built = make()
    net = replace(convert(built.proto), loss=loss)
    x = oracle.data(built, n)
    y = labels_for(loss, n, net.num_classes)
    h, g = ho.dense_hessian(net, x, y, loss)
    return built, net, x, y, h, g


@pytest.fixture(scope="module", params=sorted(CASES))
def dense(request):
    return (request.param,) + case(request.param)


def dense_of(op):
    return op.matmat(np.eye(op.shape[0]))


def test_products_match_the_explicit_hessian(dense):
    name, built, net, x, y, h, g = dense
    for matrix, expected in (("hessian", h), ("ggn", g)):
        op = hessian_operator(net, (x, y), matrix=matrix, batch_size=3)
        ours = dense_of(op)
        scale = np.abs(expected).max()
        assert np.abs(ours - expected).max() <= RTOL * scale, (name, matrix)
        assert op.hvps == op.shape[0]
    if name != "mse":  # the cross terms are there: H is not G (mse on a 1-hidden net too)
        assert np.abs(h - g).max() > 1e-3 * np.abs(h).max()


def test_eigenvalues_match_eigvalsh(dense):
    name, built, net, x, y, h, g = dense
    exact = np.linalg.eigvalsh(0.5 * (h + h.T))
    op = hessian_operator(net, (x, y), batch_size=3)
    top = extreme_eigenpairs(op, 3, "LA", tol=1e-12)
    low = extreme_eigenpairs(op, 1, "SA", tol=1e-12)[0]
    scale = np.abs(exact).max()
    np.testing.assert_allclose([p.value for p in top], exact[::-1][:3], rtol=0, atol=RTOL * scale)
    assert abs(low.value - exact[0]) <= RTOL * scale
    assert all(p.residual <= 1e-8 for p in top)


def test_trace_equals_score_naive_trace(dense):
    """Tr H = Tr G = score's exact naive trace (docs/method.md section 14)."""
    name, built, net, x, y, h, g = dense
    from minsharp_ref.onnx_import import ImportedModel
    from pathlib import Path
    imported = ImportedModel(Path("<memory>"), "", built.proto, net)
    _, trace, _ = score_arrays(imported, x, loss=net.loss)
    assert abs(np.trace(h) - trace) <= RTOL * abs(trace)
    assert abs(np.trace(g) - trace) <= RTOL * abs(trace)


def test_blocks_slices_streaming_and_bits():
    built, net, x, y, h, _ = case("dag-bn-add")
    op = hessian_operator(net, (x, y), batch_size=3)
    streamed = hessian_operator(net, (x, y), batch_size=3, cache_bytes=0)
    v = np.random.default_rng(5).standard_normal(op.shape[0])
    first = op.matvec(v)
    assert np.array_equal(first, op.matvec(v))  # cached: the same bits
    assert np.array_equal(first, streamed.matvec(v))  # streamed: the same bits
    for workers in (1, 2, 3):  # batches multiplied side by side, added in batch order
        assert np.array_equal(first, hessian_operator(net, (x, y), batch_size=3,
                                                      workers=workers).matvec(v))
    assert streamed._shared.streaming and streamed._shared.cache is None
    for name, s in op.slices.items():
        block = op.block(name)
        assert block.shape == (s.stop - s.start,) * 2
        np.testing.assert_allclose(dense_of(block), h[s, s], rtol=0,
                                   atol=RTOL * np.abs(h).max())
        top = extreme_eigenpairs(block, 1, "LA", tol=1e-12)[0]
        assert abs(top.value - np.linalg.eigvalsh(h[s, s])[-1]) <= RTOL * np.abs(h).max()


def test_slq_density_is_a_quadrature_of_the_spectrum():
    built, net, x, y, h, _ = case("chain")
    op = hessian_operator(net, (x, y))
    nodes, weights = slq_density(op, runs=3, steps=op.shape[0], seed=1)
    assert abs(weights.sum() - 1.0) < 1e-12
    # with as many steps as the dimension, the nodes are eigenvalues and the weighted mean is
    # Tr H / P in expectation; every node lies in the spectrum's range
    exact = np.linalg.eigvalsh(h)
    assert nodes.min() >= exact[0] - 1e-9 * abs(exact).max()
    assert nodes.max() <= exact[-1] + 1e-9 * abs(exact).max()


@settings(max_examples=6)
@given(st.integers(0, 10_000), st.lists(st.integers(2, 4), min_size=1, max_size=2),
       st.sampled_from(["relu", "leaky"]))
def test_drawn_chains(seed, widths, act):
    layers = []
    for w in widths:
        layers += [("gemm", dict(out=w)), (act, {})]
    built = oracle.build((3,), layers + [("gemm", dict(out=3))], seed=seed)
    net = convert(built.proto)
    x = oracle.data(built, 3, seed=seed + 1)
    y = labels_for("cross-entropy", 3, 3, seed)
    try:
        h, _ = ho.dense_hessian(net, x, y, "cross-entropy")
    except ho.KinkError:
        reject()
    ours = dense_of(hessian_operator(net, (x, y), batch_size=2))
    assert np.abs(ours - h).max() <= RTOL * np.abs(h).max()


# ------------------------------------------------------------------------ torch cross-check


@pytest.mark.parametrize("stem,samples", [("mlp_torchscript", 32), ("smallcnn_torchscript", 8),
                                          ("resnet_bn_torchscript", 4)])
def test_products_match_torch_double_backward(stem, samples):
    torch = pytest.importorskip(
        "torch", reason="torch not installed: cross-checks skipped (pip install -e '.[crosscheck]')")
    sys.path.insert(0, str(ROOT / "examples"))
    import torch_reference as ref

    x, y = ref.load_inputs(MNIST, "train", samples)
    op = hessian_operator(FIXTURES / f"{stem}.onnx", MNIST, mean=[0.5], std=[0.5], limit=samples)
    graph = ref.load_graph(FIXTURES / f"{stem}.onnx")
    v = np.random.default_rng(0).standard_normal(op.shape[0])
    parts = op.split(v)
    params = {k: p.detach().requires_grad_(k in parts) for k, p in graph.params.items()}
    loss = torch.nn.functional.cross_entropy(graph.forward(torch.as_tensor(x), params),
                                             torch.as_tensor(y))
    names = list(parts)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    dot = sum((g * torch.as_tensor(parts[n])).sum() for g, n in zip(grads, names))
    hv = torch.autograd.grad(dot, [params[n] for n in names])
    theirs = np.concatenate([t.detach().numpy().reshape(-1) for t in hv])
    ours = op.matvec(v)
    assert np.linalg.norm(ours - theirs) <= 1e-10 * np.linalg.norm(theirs)


# ------------------------------------------------------------------------------------ CLI


def cli(*args, cwd=None):
    import os

    # one BLAS thread: the products are many small GEMMs, which threads slow down on a
    # shared machine
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", "from minsharp_ref.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env)


def test_cli_done_means_on_lenet(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "s.json"
    vectors = tmp_path / "v.npz"
    r = cli("spectrum", str(FIXTURES / "lenet_torchscript.onnx"), "--data", str(MNIST),
            "--mean", "0.5", "--std", "0.5", "--limit", "4", "--top", "3", "--smallest",
            "--json", str(out), "--eigenvectors", str(vectors))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    schema = json.loads((ROOT / "docs" / "spectrum.schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert [p["value"] for p in doc["top"]] == sorted((p["value"] for p in doc["top"]), reverse=True)
    assert all(p["residual"] <= 1e-8 for p in doc["top"] + [doc["smallest"]])
    assert doc["smallest"]["value"] < 0 < doc["top"][0]["value"]
    for line in ("λ1", "λ2", "λ3", "smallest"):
        assert line in r.stdout
    with np.load(vectors) as z:
        assert z["0.weight"].shape == (3, 6, 1, 5, 5) and "0.weight:smallest" in z.files


def test_cli_check_and_ggn(tmp_path):
    out = tmp_path / "s.json"
    r = cli("spectrum", str(FIXTURES / "mlp_torchscript.onnx"), "--data", str(MNIST),
            "--mean", "0.5", "--std", "0.5", "--limit", "16", "--check", "--matrix", "ggn",
            "--per-tensor", "--json", str(out), "--quiet", "--density", str(tmp_path / "d.svg"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d.svg").read_text().lstrip().startswith("<?xml")
    assert r.stdout == ""
    doc = json.loads(out.read_text())
    assert doc["matrix"] == "ggn" and doc["check"]["diagonal"]["passed"]
    assert doc["check"]["trace"]["passed"]
    assert doc["top"][0]["value"] > 0
    assert set(doc["per_tensor"]) == set(doc["per_tensor_residual"])
    assert all(0 < v <= doc["top"][0]["value"] * (1 + 1e-9) for v in doc["per_tensor"].values())


@pytest.mark.parametrize("args,message", [
    (["--matrix", "fisher"], "--matrix must be hessian or ggn"),
    (["--top", "0"], "--top must be at least 1"),
    (["--density", "d.pdf"], "must end in .png or .svg"),
])
def test_cli_errors(tmp_path, args, message):
    out = tmp_path / "s.json"
    r = cli("spectrum", str(FIXTURES / "mlp_torchscript.onnx"), "--data", str(MNIST),
            "--limit", "4", "--json", str(out), *args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()


def test_lambda_max_at_alpha_star_is_alpha_invariant(tmp_path):
    """λ_max moves under an α-scale transformation; λ_max at α* does not (docs/method.md
    section 14)."""
    import onnx

    from minsharp_ref.spectrum_run import DataOptions, SpectrumOptions, run_spectrum

    built = oracle.build((4,), [("gemm", dict(out=5)), ("relu", {}), ("gemm", dict(out=4)),
                                ("relu", {}), ("gemm", dict(out=3))], seed=11)
    x = oracle.data(built, 12)
    y = oracle.labels(built, 12)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    docs = []
    for i, b in enumerate([built, oracle.rescale(built, [4.0, 0.5, 0.5])]):
        onnx.save(b.proto, tmp_path / f"m{i}.onnx")
        run = run_spectrum(str(tmp_path / f"m{i}.onnx"), DataOptions(str(tmp_path / "d.npz")),
                           SpectrumOptions(tol=1e-12))
        docs.append(run.doc)
    a, b = docs
    assert abs(a["top"][0]["value"] - b["top"][0]["value"]) > 1e-2 * a["top"][0]["value"]
    assert abs(a["trace"] - b["trace"]) > 1e-2 * a["trace"]
    star_a, star_b = a["lambda_max_at_alpha_star"]["value"], b["lambda_max_at_alpha_star"]["value"]
    assert abs(star_a - star_b) <= 1e-8 * star_a
    assert abs(a["minimum_sharpness"] - b["minimum_sharpness"]) <= 1e-9 * a["minimum_sharpness"]


@pytest.mark.parametrize("name", ["tv_shufflenet_v2.onnx", "tv_squeezenet1_1.onnx"])
def test_products_through_torchvision_slices_and_heads(name):
    """torch.onnx's ShuffleNetV2 (channel split, shuffle) and SqueezeNet (Conv-ReLU-GAP head):
    the product's diagonal e_iᵀ H e_i and e_iᵀ G e_i equal the trace engine's exact diagonal
    (another algorithm: engine.measure_diagonal) to 1e-9, and H is symmetric."""
    from minsharp_ref.api import traces_over
    from minsharp_ref.onnx_import import import_model

    imported = import_model(FIXTURES / name)
    net = imported.network
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3,) + net.input_shape)
    y = rng.integers(0, net.num_classes, 3)
    run = traces_over(imported, [x], None, "numpy", diagonal=True, check=False)
    h, g = hessian_operator(net, (x, y)), hessian_operator(net, (x, y), matrix="ggn")
    for tensor, s in list(h.slices.items())[::7]:
        i = s.start + int(rng.integers(s.stop - s.start))
        e = np.zeros(h.shape[0])
        e[i] = 1.0
        want = run.diagonal[tensor].reshape(-1)[i - s.start]
        scale = abs(want) + 1e-12 * abs(run.sums.mean.sum())
        assert abs(h.matvec(e)[i] - want) <= RTOL * scale, tensor
        assert abs(g.matvec(e)[i] - want) <= RTOL * scale, tensor
    u, v = rng.standard_normal((2, h.shape[0]))
    hu, hv = h.matvec(u), h.matvec(v)
    assert abs(u @ hv - v @ hu) <= RTOL * np.linalg.norm(u) * np.linalg.norm(hv)
