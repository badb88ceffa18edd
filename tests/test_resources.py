"""Determinism, thread independence, flat memory and the memory budget."""

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from conftest import FIXTURES, MNIST
from minsharp_ref.api import batch_size_for
from minsharp_ref.engine import bytes_per_sample
from minsharp_ref.onnx_import import import_model

runner = CliRunner()
NORM = ["--mean", "0.5", "--std", "0.5"]


def _without_timings(path):
    doc = json.loads(path.read_text())
    doc.pop("timings")
    return json.dumps(doc, sort_keys=True)


def test_same_command_twice_gives_identical_json(tmp_path):
    args = ["score", str(FIXTURES / "cnn_avgpool_strided.onnx"), "--data", str(MNIST), *NORM, "--limit", "64",
            "--batch-size", "20"]
    for name in ("a.json", "b.json"):
        assert runner.invoke(app_(), [*args, "--json", str(tmp_path / name)]).exit_code == 0
    assert _without_timings(tmp_path / "a.json") == _without_timings(tmp_path / "b.json")


def app_():
    from minsharp_ref.cli import app
    return app


def _run_in_subprocess(tmp_path, name, threads, *extra):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out = tmp_path / name
    p = subprocess.run([sys.executable, "-m", "minsharp_ref.cli", "score", str(FIXTURES / "smallcnn_torchscript.onnx"),
                        "--data", str(MNIST), *NORM, "--limit", "48", "--json", str(out), *extra],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


def test_results_do_not_depend_on_the_number_of_threads(tmp_path):
    one = _run_in_subprocess(tmp_path, "one.json", 1)
    two = _run_in_subprocess(tmp_path, "two.json", 2)
    assert _without_timings(one) == _without_timings(two)


RSS_SCRIPT = """
import resource, sys, minsharp_ref
minsharp_ref.score(sys.argv[1], sys.argv[2], limit=int(sys.argv[3]), batch_size=32, mean=[0.5], std=[0.5])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(samples):
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(FIXTURES / "smallcnn_torchscript.onnx"), str(MNIST),
                        str(samples)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip().splitlines()[-1])


def test_memory_is_flat_in_the_number_of_samples():
    small, large = _peak_rss_kib(64), _peak_rss_kib(512)
    # 8x the samples: the peak may not grow by more than a generous 64 MiB of noise
    assert large - small < 64 * 1024, (small, large)


def test_memory_budget_sets_the_batch_size(tmp_path):
    net = import_model(FIXTURES / "smallcnn_torchscript.onnx").network
    budget = 32 * 2 ** 20
    bs = batch_size_for(net, budget, None)
    assert 1 <= bs and bs * bytes_per_sample(net) <= budget
    out = tmp_path / "r.json"
    r = runner.invoke(app_(), ["score", str(FIXTURES / "smallcnn_torchscript.onnx"), "--data", str(MNIST), *NORM,
                               "--limit", "50", "--memory-budget", "32M", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["data"]["batch_size"] == min(bs, 50) < 50


def test_memory_budget_caps_peak_rss():
    """Generous bound: with a 32 MiB engine budget, scoring the small CNN stays under the
    interpreter + libraries baseline plus a few budgets."""
    script = """
import resource, sys, minsharp_ref
minsharp_ref.score(sys.argv[1], sys.argv[2], limit=60, memory_budget=32 * 2**20, mean=[0.5], std=[0.5])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    base = subprocess.run([sys.executable, "-c", "import resource, minsharp_ref, onnxruntime, scipy.optimize;"
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True)
    p = subprocess.run([sys.executable, "-c", script, str(FIXTURES / "smallcnn_torchscript.onnx"), str(MNIST)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    grown = int(p.stdout.split()[-1]) - int(base.stdout.split()[-1])
    assert grown < 4 * 32 * 1024, grown  # KiB
