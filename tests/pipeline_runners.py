"""Just enough of GitHub Actions, GitLab CI and pre-commit to run the jobs of
docs/pipelines.md as written, on this machine (tests/test_pipeline_example.py).

The commands come from the document itself: ``doc_blocks`` reads its fenced code blocks,
and the runners execute the YAML's ``run:``/``script:``/``entry:`` strings unchanged, in
a scratch repository laid out as the document assumes (``build/model.onnx``,
``data/val.npz``, ``examples/release_gate.sh``). What cannot run here is replaced by a
stand-in on PATH: ``pip`` (the package is installed already: the call is logged), ``gh``
(a release's assets are a folder) and ``curl`` (GitLab's job-artifacts API is a folder).
Anything the runners do not know (another action, another ``if:`` expression, another
command for a stand-in) fails loudly, so the document cannot drift from what is tested.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "pipelines.md"
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.S | re.M)


def doc_blocks(heading: str, language: str) -> list[str]:
    """The fenced ``language`` blocks under the ``## heading`` of docs/pipelines.md (up to
    the next ``## ``), dedented."""
    text = DOC.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else len(text)]
    return [textwrap.dedent(body) for indent, lang, body in FENCE.findall(section)
            if lang == language]


# ---------------------------------------------------------------- stand-ins on PATH

GH = r'''
import os, shutil, sys
from pathlib import Path
assets = Path(os.environ["FAKE_RELEASE_ASSETS"])  # the latest release's assets
with open(assets.parent / "gh.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
if not os.environ.get("GH_TOKEN"):
    sys.exit("gh: GH_TOKEN is not set")
if args[:2] == ["release", "download"]:
    dest = Path(args[args.index("--dir") + 1])
    found = sorted(assets.glob(args[args.index("--pattern") + 1])) if assets.is_dir() else []
    if not found:
        sys.exit("no assets match the file pattern")
    dest.mkdir(parents=True, exist_ok=True)
    for f in found:
        shutil.copy(f, dest)
elif args[:2] == ["release", "upload"] and "--clobber" in args:
    assets.mkdir(exist_ok=True)
    for f in [a for a in args[3:] if not a.startswith("--")]:
        shutil.copy(f, assets)
else:
    sys.exit(f"gh stand-in: unsupported command {args}")
'''

CURL = r'''
import os, re, shutil, sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse
store = Path(os.environ["FAKE_GITLAB_ARTIFACTS"])  # ref/job/path
args = sys.argv[1:]
with open(store.parent / "curl.log", "a") as log:
    log.write(" ".join(args) + "\n")
assert "--fail" in args and "--location" in args, args
headers = [args[i + 1] for i, a in enumerate(args) if a == "--header"]
url = urlparse(next(a for a in args if a.startswith("http")))
m = re.fullmatch(re.escape(urlparse(os.environ["CI_API_V4_URL"]).path)
                 + r"/projects/(\d+)/jobs/artifacts/([^/]+)/raw/(.+)", url.path)
job = parse_qs(url.query).get("job", [""])[0]
if not m or m.group(1) != os.environ["CI_PROJECT_ID"] \
        or f"JOB-TOKEN: {os.environ['CI_JOB_TOKEN']}" not in headers:
    sys.exit(f"curl stand-in: not the job-artifacts API of this project: {args}")
source = store / m.group(2) / job / m.group(3)
if not source.is_file():
    print("curl: (22) The requested URL returned error: 404", file=sys.stderr)
    sys.exit(22)
shutil.copy(source, args[args.index("--output") + 1])
'''

PIP = r'''
import os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
'''


def stand_ins(folder: Path) -> Path:
    """A folder of the stand-in commands, to put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in (("gh", GH), ("curl", CURL), ("pip", PIP)):
        path = folder / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return folder


def environment(bin_dir: Path, home: Path, **extra) -> dict:
    """A CI job's environment: the stand-ins, then this Python's scripts (minsharp-ref),
    then the system; none of this machine's CI variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "CI_", "GIT_")) and k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                     os.environ["PATH"]]), HOME=str(home),
               GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.com",
               GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@example.com")
    env.update(extra)
    return env


# ---------------------------------------------------------------- GitHub Actions

EXPRESSION = re.compile(r"\$\{\{\s*([\w.]+)\s*\}\}")


def github_job(workflow: dict, job: str, repo: Path, env: dict, context: dict,
               artifacts: Path) -> list[tuple[str, str, subprocess.CompletedProcess]]:
    """Run the steps of ``job`` as the runner would: ``run:`` in ``bash --noprofile
    --norc -eo pipefail``, ``${{ … }}`` replaced from ``context``, ``if:`` evaluated (the
    default is success()), later steps skipped after a failure unless their ``if:`` says
    always(). Returns (step name, "success" | "failure" | "skipped", process or None)."""
    def expand(text: str) -> str:
        return EXPRESSION.sub(lambda m: context[m.group(1)], text)

    def condition(text: str, failed: bool) -> bool:
        text = text.strip()
        if text in ("always()",):
            return True
        if text in ("success()",):
            return not failed
        m = re.fullmatch(r"([\w.]+) == '([^']*)'", text)
        if m:
            return not failed and context[m.group(1)] == m.group(2)
        raise AssertionError(f"the runner does not know the condition {text!r}")

    failed, results = False, []
    for step in workflow["jobs"][job]["steps"]:
        name = step.get("name") or step.get("uses") or step["run"]
        if not condition(step.get("if", "success()"), failed):
            results.append((name, "skipped", None))
            continue
        if "uses" in step:
            action = step["uses"].split("@")[0]
            if action == "actions/upload-artifact":
                shutil.copytree(repo / step["with"]["path"], artifacts / step["with"]["name"],
                                dirs_exist_ok=True)
            elif action not in ("actions/checkout", "actions/setup-python"):
                raise AssertionError(f"the runner does not know the action {action}")
            results.append((name, "success", None))
            continue
        step_env = {**env, **{k: expand(str(v)) for k, v in step.get("env", {}).items()}}
        p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                            expand(step["run"])], cwd=repo, env=step_env, capture_output=True,
                           text=True)
        failed = failed or p.returncode != 0
        results.append((name, "failure" if p.returncode else "success", p))
    return results


# ---------------------------------------------------------------- GitLab CI


def gitlab_job(pipeline: dict, job: str, repo: Path, env: dict, ref: str,
               store: Path) -> subprocess.CompletedProcess:
    """Run ``job``'s ``script`` lines in one bash with ``set -eo pipefail`` (as GitLab's
    shell executor does), with its ``variables`` and the predefined CI_JOB_NAME and
    CI_COMMIT_REF_NAME; then keep its ``artifacts`` under ``store/REF/JOB`` (with
    ``when: always`` also for a failed job), where the curl stand-in serves them."""
    spec = pipeline[job]
    job_env = {**env, **{k: str(v) for k, v in spec.get("variables", {}).items()},
               "CI_JOB_NAME": job, "CI_COMMIT_REF_NAME": ref}
    script = "set -eo pipefail\n" + "\n".join(spec["script"])
    p = subprocess.run(["bash", "-c", script], cwd=repo, env=job_env, capture_output=True, text=True)
    artifacts = spec.get("artifacts", {})
    if p.returncode == 0 or artifacts.get("when") == "always":
        for path in artifacts.get("paths", []):
            if (repo / path).exists():
                shutil.copytree(repo / path, store / ref / job / path, dirs_exist_ok=True)
    return p
