"""The worked pipeline of docs/pipelines.md, run as CI would run it: examples/release_gate.sh
on two separately trained fixture MLPs. A first release (no baseline) passes and writes the
baseline; the other model, about 30% sharper, is blocked (exit 1) with a ❌ in the job
summary; a baseline on other data is refused (exit 2).

Then the document's own commands, read from its code blocks (tests/pipeline_runners.py):
the GitHub Actions job and the GitLab CI job through a release and a blocked change, the
pre-commit hook, the pre-push hook, the gate command and the script's usage line."""

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, MNIST, ROOT
from pipeline_runners import doc_blocks, environment, github_job, gitlab_job, stand_ins

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



# ------------------------------------------------- the document's commands, as written

RELEASED, SHARPER = "mlp_torchscript.onnx", "mlp_dynamo.onnx"
# the jobs install minsharp-ref[plot] and draw the figure
needs_jobs_tools = pytest.mark.skipif(
    not HAS_MATPLOTLIB or importlib.util.find_spec("yaml") is None,
    reason="needs the plot extra (matplotlib) and pyyaml (the test extra)")


def repository(folder: Path, model: str) -> Path:
    """A checkout laid out as docs/pipelines.md assumes, with ``model`` as the build."""
    for sub in ("build", "data", "examples"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / model, folder / "build" / "model.onnx")
    shutil.copy(MNIST, folder / "data" / "val.npz")
    shutil.copy(SCRIPT, folder / "examples" / "release_gate.sh")
    return folder


def jobs_env(tmp_path: Path, **extra) -> dict:
    return environment(stand_ins(tmp_path / "bin"), tmp_path, FAKE_PIP_LOG=str(tmp_path / "pip.log"),
                       **extra)


def installs(tmp_path: Path) -> list[str]:
    """What the jobs asked pip for (the stand-in logs it; the package is installed)."""
    return (tmp_path / "pip.log").read_text().splitlines()


@needs_jobs_tools
def test_the_github_actions_job_of_the_docs(tmp_path):
    import yaml

    [block] = doc_blocks("GitHub Actions", "yaml")
    workflow = yaml.safe_load(block)
    assert set(workflow.get("on", workflow.get(True))) == {"pull_request", "release"}  # YAML 1.1: on = true
    [job] = workflow["jobs"]
    assets, artifacts = tmp_path / "release-assets", tmp_path / "artifacts"

    def run(event: str, model: str, tag: str = ""):
        summary = tmp_path / f"summary-{event}.md"
        env = jobs_env(tmp_path, FAKE_RELEASE_ASSETS=str(assets), GITHUB_STEP_SUMMARY=str(summary))
        context = {"github.token": "token", "github.event_name": event,
                   "github.event.release.tag_name": tag}
        steps = github_job(workflow, job, repository(tmp_path / event, model), env, context, artifacts)
        return {name: (status, p) for name, status, p in steps}, summary

    # the first release is published: no report to download, scored without a gate, and
    # its report attached to the release
    steps, _ = run("release", RELEASED, "v1")
    assert all(status == "success" for status, _ in steps.values()), \
        {name: p.stderr for name, (status, p) in steps.items() if p is not None and p.returncode}
    assert "scoring without a gate" in steps["Gate"][1].stdout
    release = json.loads((assets / "sharpness.json").read_text())
    assert "gates" not in release and release["model"]["sha256"] == _sha256(FIXTURES / RELEASED)
    # a pull request with the 30% sharper model is blocked against that report
    steps, summary = run("pull_request", SHARPER)
    status, gate = steps["Gate"]
    assert status == "failure" and gate.returncode == 1, gate.stderr
    assert gate.stderr.startswith("gate failed: minimum sharpness ") and "release blocked" in gate.stderr
    assert steps["Keep the report and the plot"][0] == "success"  # if: always()
    assert steps["Attach the report to the release (the next baseline)"][0] == "skipped"
    assert "| ❌ | minimum sharpness |" in summary.read_text()
    doc = json.loads((artifacts / "sharpness" / "sharpness.json").read_text())
    assert doc["baseline"]["sha256"] == _sha256(assets / "sharpness.json")
    assert (artifacts / "sharpness" / "traces.png").is_file()
    assert set(installs(tmp_path)) == {"install minsharp-ref[plot]"}


@needs_jobs_tools
def test_the_gitlab_ci_job_of_the_docs(tmp_path):
    import yaml

    [block] = doc_blocks("GitLab CI", "yaml")
    pipeline = yaml.safe_load(block)
    [job] = pipeline
    store = tmp_path / "gitlab-artifacts"
    env = jobs_env(tmp_path, FAKE_GITLAB_ARTIFACTS=str(store), CI_PROJECT_ID="7",
                   CI_API_V4_URL="https://gitlab.example.com/api/v4", CI_JOB_TOKEN="job-token")
    repo = repository(tmp_path / "repo", RELEASED)

    def git(*args):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first release")
    git("tag", "v1")
    # the tag pipeline of the first release: no tag before it, scored without a gate
    first = gitlab_job(pipeline, job, repo, env, "v1", store)
    assert first.returncode == 0, first.stderr
    assert "scoring without a gate" in first.stdout
    assert (store / "v1" / job / "sharpness" / "sharpness.json").is_file()
    # a merge request's pipeline with the sharper model: gated against v1's artifact
    git("clean", "-fdxq")  # a fresh clone
    shutil.copy(FIXTURES / SHARPER, repo / "build" / "model.onnx")
    git("commit", "-qam", "retrained")
    blocked = gitlab_job(pipeline, job, repo, env, "retrain", store)
    assert blocked.returncode == 1, blocked.stderr
    assert blocked.stderr.startswith("gate failed: minimum sharpness ") and "release blocked" in blocked.stderr
    fetched = (tmp_path / "curl.log").read_text()
    assert "/api/v4/projects/7/jobs/artifacts/v1/raw/sharpness/sharpness.json?job=" + job in fetched
    kept = store / "retrain" / job / "sharpness"  # artifacts when: always
    assert "| ❌ | minimum sharpness |" in (kept / "summary.md").read_text()
    assert json.loads((kept / "sharpness.json").read_text())["baseline"]["sha256"] == \
        _sha256(store / "v1" / job / "sharpness" / "sharpness.json")
    assert set(installs(tmp_path)) == {"install minsharp-ref[plot]"}


@needs_jobs_tools
def test_the_local_hooks_of_the_docs(tmp_path):
    import yaml

    [config] = doc_blocks("A local check before pushing", "yaml")
    [pre_push] = doc_blocks("A local check before pushing", "bash")
    [hook] = yaml.safe_load(config)["repos"][0]["hooks"]
    assert hook["language"] == "system" and hook["pass_filenames"] is False
    assert re.search(hook["files"], "build/model.onnx")
    repo = repository(tmp_path / "repo", RELEASED)
    env = jobs_env(tmp_path)
    entry = shlex.split(hook["entry"])  # what pre-commit runs for language: system
    first = subprocess.run(entry, cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0 and "scoring without a gate" in first.stdout, first.stderr
    (repo / "release").mkdir()
    shutil.copy(repo / ".sharpness" / "sharpness.json", repo / "release" / "sharpness.json")
    hook_file = tmp_path / "pre-push"
    hook_file.write_text(pre_push)
    passed = subprocess.run(["bash", str(hook_file)], cwd=repo, env=env, capture_output=True, text=True)
    assert passed.returncode == 0 and passed.stdout == "minimum-sharpness gate passed\n"
    assert passed.stderr == ""
    shutil.copy(FIXTURES / SHARPER, repo / "build" / "model.onnx")
    pushed = subprocess.run(["bash", str(hook_file)], cwd=repo, env=env, capture_output=True, text=True)
    assert pushed.returncode == 1 and pushed.stdout == ""
    lines = pushed.stderr.splitlines()  # --quiet: the failed gate and the verdict only
    assert len(lines) == 2 and lines[0].startswith("gate failed: minimum sharpness ")
    assert lines[1] == "minimum-sharpness gate failed: release blocked (see .sharpness/summary.md)"


@needs_jobs_tools
def test_the_script_line_and_the_gate_command_of_the_docs(tmp_path):
    [script_line] = doc_blocks("The script the jobs run", "bash")
    [command] = doc_blocks("The gate", "bash")
    repo = repository(tmp_path / "repo", RELEASED)
    env = jobs_env(tmp_path)
    first = subprocess.run(["bash", "-c", script_line], cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0 and "scoring without a gate" in first.stdout, first.stderr
    (repo / "last-release").mkdir()
    shutil.copy(repo / "sharpness" / "sharpness.json", repo / "last-release" / "sharpness.json")
    shutil.copy(FIXTURES / SHARPER, repo / "build" / "model.onnx")
    gated = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True)
    assert gated.returncode == 1 and gated.stderr.startswith("gate failed: minimum sharpness ")
    assert "| ❌ | minimum sharpness |" in (repo / "summary.md").read_text()
    assert (repo / "traces.png").is_file() and (repo / "sharpness.json").is_file()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
