"""The worked pipeline of docs/pipelines.md, run as CI would run it: examples/release_gate.sh
on two separately trained fixture MLPs. A first release (no baseline) passes and writes the
baseline; the other model, about 30% sharper, is blocked (exit 1) with a ❌ in the job
summary; a baseline on other data is refused (exit 2)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "examples" / "release_gate.sh"
OPTIONS = ["--data", "fixtures/mnist_subset.npz", "--mean", "0.5", "--std", "0.5",
           "--limit", "300", "--provider", "cpu"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def gate(model, baseline, out, *extra, **env):
    """The script as a CI job runs it (the summary file only where the test gives one)."""
    environ = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    environ.update(PLOT="1" if HAS_MATPLOTLIB else "0", **env,
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT), f"fixtures/{model}", str(baseline), str(out),
                           *OPTIONS, *extra], capture_output=True, text=True, cwd=ROOT, env=environ)


def test_release_gate_script_passes_blocks_and_refuses(tmp_path):
    first = gate("mlp_torchscript.onnx", tmp_path / "none.json", tmp_path / "v1")
    assert first.returncode == 0, first.stderr
    assert "scoring without a gate" in first.stdout
    release = tmp_path / "v1" / "sharpness.json"
    assert "gates" not in json.loads(release.read_text())

    summary = tmp_path / "step_summary.md"
    sharper = gate("mlp_dynamo.onnx", release, tmp_path / "v2", GITHUB_STEP_SUMMARY=str(summary))
    assert sharper.returncode == 1, sharper.stderr
    assert sharper.stderr.startswith("gate failed: minimum sharpness ")
    assert "\r" not in sharper.stderr + sharper.stdout  # a CI log: no progress display
    assert "release blocked" in sharper.stderr
    assert "| ❌ | minimum sharpness |" in summary.read_text()
    assert summary.read_text() == (tmp_path / "v2" / "summary.md").read_text()
    doc = json.loads((tmp_path / "v2" / "sharpness.json").read_text())
    assert [g["passed"] for g in doc["gates"]] == [False]
    assert doc["baseline"]["model_sha256"] != doc["model"]["sha256"]
    assert (tmp_path / "v2" / "traces.png").exists() == HAS_MATPLOTLIB

    other = gate("mlp_torchscript.onnx", release, tmp_path / "v3", "--limit", "400")
    assert other.returncode == 2
    assert "sample count differs: baseline 300, now 400" in other.stderr

