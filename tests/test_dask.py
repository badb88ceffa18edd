"""Scoring on a Dask cluster (``--dask``, ``score(client=...)``): the same numbers as a
local run, byte-identical reports across runs, recovery from a killed worker, and the local
run's one-line errors when a shard fails on a worker. One LocalCluster of 2 single-threaded
worker processes serves the whole module (docs/dask.md)."""

import json
import os
import signal
import sys
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

import minsharp_ref
from minsharp_ref.cli import app

from conftest import FIXTURES, MNIST

try:
    import distributed  # noqa: F401
    HAVE_DASK = True
except ImportError:
    HAVE_DASK = False

needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="needs pip install 'minsharp-ref[dask]'")
runner = CliRunner()
MLP = FIXTURES / "mlp_torchscript.onnx"
LENET = FIXTURES / "lenet_torchscript.onnx"
NORM = ["--mean", "0.5", "--std", "0.5"]


@pytest.fixture(scope="module")
def client():
    from minsharp_ref.distributed import connect

    with connect("local:2") as c:
        yield c


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def report(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    r = invoke("score", *args, "--json", out)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def numbers(doc, path=""):
    """Every number of a report (path → value), without timings, the distributed object
    and the solver's diagnostics (its gradient norm is rounding noise, ~1e-16)."""
    if isinstance(doc, dict):
        skip = {"timings", "distributed", "gradient_norm", "iterations"}
        return {k: v for key, value in doc.items() if key not in skip
                for k, v in numbers(value, f"{path}.{key}").items()}
    if isinstance(doc, list):
        return {k: v for i, value in enumerate(doc) for k, v in numbers(value, f"{path}[{i}]").items()}
    return {path: doc}


def assert_same_numbers(ours, theirs, rel=1e-12):
    a, b = numbers(ours), numbers(theirs)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=0), key
        else:
            assert a[key] == b[key], key
    for doc in (ours, theirs):
        assert doc["solver"]["gradient_norm"] < 1e-12


def without_timings(doc):
    doc = dict(doc, timings=None)
    if doc.get("distributed"):
        doc["distributed"] = dict(doc["distributed"], seconds=None)
    return json.dumps(doc, indent=2)


@needs_dask
@pytest.mark.parametrize("model,limit,shard", [(MLP, 1000, 128), (LENET, 172, 43)])
def test_same_numbers_as_a_local_run(client, tmp_path, model, limit, shard):
    """Every number of the JSON report equals the local run's to 1e-12 relative (the
    shards' sums are added in another order than the batches' sums), and a second
    distributed run writes the same bytes."""
    address = client.scheduler.address
    args = [model, "--data", MNIST, *NORM, "--limit", limit]
    local = report(tmp_path, "local", *args)
    first = report(tmp_path, "dask1", *args, "--dask", address, "--shard-size", shard)
    second = report(tmp_path, "dask2", *args, "--dask", address, "--shard-size", shard)
    assert first["distributed"]["workers"] == 2
    assert first["distributed"]["shards"] == -(-limit // shard) > 1
    assert first["distributed"]["scheduler"] == address
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(first, json.loads((FIXTURES.parent / "docs" / "score.schema.json").read_text()))
    assert local["distributed"] is None
    assert_same_numbers(local, first)
    assert without_timings(first) == without_timings(second)


@needs_dask
def test_diagonal_and_per_sample_and_scatter_data(client, tmp_path):
    """--diag and --per-sample through Dask; --scatter-data gives the same bytes; a local
    run with the same --shard-size runs the same shards and gives the same bytes too."""
    args = [MLP, "--data", MNIST, *NORM, "--limit", 600, "--shard-size", 100]
    files = {}
    docs = {}
    for name, extra in [("local", []), ("dask", ["--dask", client.scheduler.address]),
                        ("scatter", ["--dask", client.scheduler.address, "--scatter-data"])]:
        files[name] = (tmp_path / f"{name}_diag.npz", tmp_path / f"{name}_ps.npz")
        docs[name] = report(tmp_path, name, *args, *extra, "--diag", files[name][0],
                            "--per-sample", files[name][1])
    assert docs["scatter"]["distributed"]["scatter_data"] is True
    docs["local"]["distributed"] = docs["dask"]["distributed"]
    assert without_timings(docs["local"]) == without_timings(docs["dask"])
    docs["scatter"]["distributed"]["scatter_data"] = False
    assert without_timings(docs["scatter"]) == without_timings(docs["dask"])
    for i in range(2):
        with np.load(files["local"][i]) as a, np.load(files["dask"][i]) as b, \
                np.load(files["scatter"][i]) as c:
            assert sorted(a) == sorted(b) == sorted(c)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
                np.testing.assert_array_equal(a[k], c[k])


@needs_dask
def test_a_killed_worker_changes_nothing(client):
    """SIGKILL a worker process while it runs a shard (after the first shard is done): Dask
    recomputes its shards on the other worker (its nanny restarts it) and the result is
    the local run's."""
    kwargs = dict(mean=[0.5], std=[0.5], limit=301, provider="cpu")
    local = minsharp_ref.score(LENET, MNIST, **kwargs).to_dict()
    pids = client.run(os.getpid)
    killed = {}

    def kill_once(_samples):
        if killed:
            return
        busy = [w for w, keys in client.processing().items() if keys]
        assert busy, "no shard left running: the test would not kill anything"
        killed[busy[0]] = client.processing()[busy[0]]
        os.kill(pids[busy[0]], signal.SIGKILL)

    result = minsharp_ref.score(LENET, MNIST, client=client, shard_size=43, progress=kill_once,
                                **kwargs).to_dict()
    assert killed
    assert_same_numbers(local, result)
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != set(pids.values())  # one was replaced


def _float_data(tmp_path, name, x):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x.astype(np.float32), y=np.arange(len(x)) % 10)
    return path


@needs_dask
def test_nan_samples_in_shard_3_fail_like_a_local_run(client, tmp_path):
    with np.load(MNIST) as d:
        x = d["x_train"][:400].astype(np.float32) / 255
    x[3 * 50 + 7, 5, 5] = np.nan
    path = _float_data(tmp_path, "nan", x)
    out = tmp_path / "out.json"
    args = ["score", MLP, "--data", path, "--shard-size", 50, "--json", out]
    local = invoke(*args)
    dask = invoke(*args, "--dask", client.scheduler.address)
    for r in (local, dask):
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
        assert str(path) in r.stderr and "(first in sample 157)" in r.stderr
        assert "in samples 150..199" in r.stderr
    assert local.stderr == dask.stderr.replace(str(path.resolve()), str(path))
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


@needs_dask
def test_unreadable_rows_fail_like_a_local_run(client, tmp_path):
    """An .npz whose x array stops after 300 of the 400 rows its header declares: the shard
    that reads sample 300 fails on its worker with the local run's message."""
    with np.load(MNIST) as d:
        x, y = d["x_train"][:400], d["y_train"][:400]
    header = tmp_path / "h.npy"
    np.save(header, x)
    data = header.read_bytes()
    path = tmp_path / "truncated.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", data[:len(data) - 100 * 784])
        with open(tmp_path / "y.npy", "wb") as f:
            np.save(f, y)
        z.write(tmp_path / "y.npy", "y.npy")
    out = tmp_path / "out.json"
    args = ["score", MLP, "--data", path, *NORM, "--shard-size", 64, "--json", out]
    local = invoke(*args)
    dask = invoke(*args, "--dask", client.scheduler.address)
    for r in (local, dask):
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert r.stderr.count("\n") == 1
        assert 'truncated.npz: key "x" is truncated: sample 300 is missing' in r.stderr
    assert local.stderr == dask.stderr.replace(str(path.resolve()), str(path))
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--dask", "local:0"], "use local:N with N ≥ 1"),
    (["--scatter-data"], "--scatter-data needs --dask"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
])
def test_bad_dask_options(args, expected):
    r = invoke("score", MLP, "--data", MNIST, "--limit", 10, *args)
    assert r.exit_code == 2 and expected in r.stderr, r.output


def test_without_dask_the_option_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    r = invoke("score", MLP, "--data", MNIST, "--limit", 10, "--dask", "local:2")
    assert r.exit_code == 2
    assert r.stderr == "error: --dask needs Dask's distributed scheduler: pip install 'minsharp-ref[dask]'\n"


@needs_dask
def test_run_options_reach_a_worker_unchanged(client):
    """The RunOptions value travels to a worker process by pickle and comes back equal (a
    worker's copy and its repr, computed there); a run sends it with workers=1 (one batch
    per Dask thread), every other field as given."""
    import copy

    from minsharp_ref.distributed import THREADS_PER_TASK
    from minsharp_ref.options import RunOptions

    options = RunOptions(engine="onnxruntime", precision="float64", provider="cpu", workers=5,
                         batch_size=33, memory_budget=123456789, diagonal=True,
                         per_sample=True, loss="mse")
    assert client.submit(copy.copy, options, pure=False).result() == options
    assert client.submit(repr, options, pure=False).result() == repr(options)
    sent = options.but(workers=THREADS_PER_TASK)
    assert client.submit(copy.copy, sent, pure=False).result() == sent
    assert [f for f in vars(sent) if getattr(sent, f) != getattr(options, f)] == ["workers"]
