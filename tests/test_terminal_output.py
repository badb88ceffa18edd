"""What the commands print: a live progress bar with rate and time left under a real
pseudo-terminal; byte-stable plain text (golden files) without one; --quiet; NO_COLOR;
warnings on stderr."""

import json
import os
import re
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from minsharp_ref.cli import app

from conftest import FIXTURES, MNIST, ROOT
from terminal import pty_available, run_in_pty, screens
from test_cli import float64_conv_model

GOLDEN = ROOT / "tests" / "golden"
MLP = FIXTURES / "mlp_torchscript.onnx"
NORM = ["--mean", "0.5", "--std", "0.5"]
CLI = [sys.executable, "-m", "minsharp_ref.cli"]

needs_pty = pytest.mark.skipif(not pty_available(), reason="no pseudo-terminals here")

#: the only machine-dependent parts of the plain score report: wall-clock seconds, the
#: float32 onnxruntime fidelity, and the solver's round-off-level final gradient
VOLATILE = [
    (re.compile(r"seconds [0-9.]+ \(summed over the engine workers: forward [0-9.]+, traces [0-9.]+\)"),
     "seconds <timings>"),
    (re.compile(r"import fidelity [0-9.e+-]+ "), "import fidelity <fidelity> "),
    (re.compile(r"\[Newton, \d+ steps, gradient [0-9.e+-]+\]"), "[Newton, <steps>, <gradient>]"),
]


def normalise(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text


def check_golden(name: str, text: str) -> None:
    """``text`` equals tests/golden/NAME byte for byte (UPDATE_GOLDEN=1 rewrites it)."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text.encode())
    assert text.encode() == path.read_bytes(), f"differs from {path} (UPDATE_GOLDEN=1 rewrites it)"


def plain_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env["TERM"] = "xterm-256color"
    env.update(extra)
    return env


def run(args, **env):
    """The CLI with stdout and stderr on pipes, not a terminal (a CI log); run in-process."""
    r = CliRunner().invoke(app, [str(a) for a in args], env={"NO_COLOR": None, "FORCE_COLOR": None, **env})
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@pytest.fixture(autouse=True)
def in_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths: the reports name them as given


SCORE = ["score", MLP.relative_to(ROOT), "--data", MNIST.relative_to(ROOT), *NORM, "--limit", 300,
         "--provider", "numpy"]


def test_plain_report_is_golden_and_stderr_is_clean():
    p = run(SCORE)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no progress, no carriage return, no warning here
    check_golden("score_mlp.txt", normalise(p.stdout))


#: invariance's round-off-level parts: MS to 15 digits (kept to 10, the cell's width kept)
#: and the relative deviations (cells right-aligned under their header, width kept)
FIFTEEN_DIGITS = re.compile(r"( *)(\d+)\.(\d{9,})")
ROUNDOFF = re.compile(r"( *)\b(0|\d(?:\.\d+)?e-1\d)(?=  |\s\(rtol)")


def mask_roundoff(text: str) -> str:
    def digits(m):
        whole, frac = m.group(2), m.group(3)
        keep = max(0, 10 - len(whole))
        masked = f"{whole}.{frac[:keep]}" + "#" * (15 - len(whole) - keep)
        return " " * max(0, len(m.group(1)) + len(whole) + 1 + len(frac) - len(masked)) + masked

    def roundoff(m):
        return " " * max(0, len(m.group(0)) - 5) + "<r/o>"

    text = re.sub(r"deviation \S+ \(rtol", "deviation <r/o> (rtol", text)
    return ROUNDOFF.sub(roundoff, FIFTEEN_DIGITS.sub(digits, text))


#: one trial: hypothesis's first draw is α = 1; its later draws also pick constants from the
#: source of every module loaded from outside site-packages (hypothesis ≥ 6.131), so they
#: depend on which modules (tests included) the process has imported
INVARIANCE = ["invariance", *SCORE[1:], "--trials", 1]


def test_invariance_plain_report_is_golden():
    p = run(INVARIANCE)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    check_golden("invariance_mlp.txt", mask_roundoff(p.stdout))


def test_verify_plain_report_is_golden(tmp_path):
    ours = tmp_path / "ours.json"
    assert run(SCORE + ["--json", ours, "--quiet"]).returncode == 0
    p = run(["verify", *SCORE[1:], "--expected", ours])
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    check_golden("verify_mlp.txt", p.stdout)


@needs_pty
def test_terminal_shows_live_progress_with_rate_and_time_left_then_a_rich_table():
    code, stream = run_in_pty(CLI + ["score", str(MLP), "--data", str(MNIST), *NORM, "--limit", "1000",
                                     "--batch-size", "25"], env=plain_env(), columns=110)
    assert code == 0, stream
    frames = list(screens(stream))
    bar = re.compile(r"^scoring .* (\d+)/1000 samples +([\d,]+) samples/s +\d+:\d\d:\d\d +(\d+):(\d\d):(\d\d) left")
    live = [m for f in frames for line in f if (m := bar.match(line))]
    running = [m for m in live if int(m.group(1)) < 1000]
    assert running, "no frame showed a rate and a time left while scoring"
    assert all(int(m.group(2).replace(",", "")) > 0 for m in running)
    final = frames[-1]
    last_bar = [line for line in final if line.startswith("scoring ")]
    assert len(last_bar) == 1 and "1000/1000 samples" in last_bar[0] and "0:00:00 left" in last_bar[0]
    # the report follows as a rich table: a rule under the header, numbers right-aligned
    header = next(i for i, line in enumerate(final) if line.startswith("#") and "Tr H_W" in line)
    assert set(final[header + 1].strip()) == {"─"}
    rows = final[header + 2:header + 5]
    assert [r.split()[1] for r in rows] == ["/1/Gemm", "/3/Gemm", "/5/Gemm"]
    ends = {len(r.rstrip()) for r in rows}
    assert len(ends) == 1  # the right-aligned last column ends in one place
    assert "\x1b[" in stream  # colours on a terminal


@needs_pty
def test_no_color_in_a_terminal_gives_the_plain_report_and_no_escape_codes():
    code, stream = run_in_pty(CLI + [str(a) for a in SCORE], env=plain_env(NO_COLOR="1"), cwd=ROOT)
    assert code == 0, stream
    assert "\x1b" not in stream and "\r" not in stream
    check_golden("score_mlp.txt", normalise(stream))
    code, stream = run_in_pty(CLI + [str(a) for a in INVARIANCE],
                              env=plain_env(NO_COLOR="1"), cwd=ROOT)
    assert code == 0 and "\x1b" not in stream and "\r" not in stream, stream
    check_golden("invariance_mlp.txt", mask_roundoff(stream))


@needs_pty
def test_quiet_prints_nothing_but_errors(tmp_path):
    out = tmp_path / "r.json"
    code, stream = run_in_pty(CLI + [str(a) for a in SCORE] + ["--quiet", "--json", str(out)],
                              env=plain_env(), cwd=ROOT)
    assert code == 0 and stream == ""  # not even the progress bar on a terminal
    assert json.loads(out.read_text())["data"]["samples"] == 300
    p = run(SCORE + ["--quiet", "--max-sharpness", 1])
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("gate failed: minimum sharpness ") and p.stderr.count("\n") == 1
    p = run(SCORE + ["--quiet", "--limit", 0])
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith("error: ")
    p = run(["invariance", *SCORE[1:], "--trials", 3, "--quiet"])
    assert p.returncode == 0 and p.stdout == p.stderr == ""


@pytest.mark.parametrize("command", [["score"], ["invariance", "--trials", 2],
                                     ["verify", "--expected", "EXPECTED"]])
def test_warnings_go_to_stderr_one_line_each_in_the_json_words(tmp_path, command):
    """score, invariance and verify: each warning of the scoring once on stderr, as the
    JSON words it, never on stdout; --quiet drops them."""
    model, data = float64_conv_model(tmp_path)
    expected = tmp_path / "theirs.json"
    expected.write_text(json.dumps({"schema": "minsharp-ref/expected/v1", "traces": {}}))
    out = tmp_path / "r.json"
    args = [command[0], model, "--data", data, "--provider", "numpy", "--json", out,
            *[expected if a == "EXPECTED" else a for a in command[1:]]]
    p = run(args)
    assert p.returncode == 0, p.stderr
    warnings = json.loads(out.read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("import fidelity not checked: ")
    assert p.stderr.splitlines() == [f"warning: {w}" for w in warnings]
    assert "warning:" not in p.stdout
    quiet = run(args + ["--quiet"])
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


@needs_pty
def test_warnings_are_highlighted_on_a_terminal(tmp_path):
    model, data = float64_conv_model(tmp_path)
    code, stream = run_in_pty(CLI + ["score", str(model), "--data", str(data), "--provider", "numpy"],
                              env=plain_env())
    assert code == 0, stream
    assert re.search(r"\x1b\[[0-9;]*mwarning: \x1b\[0m[^\n]*import fidelity not checked", stream)


def test_a_maybe_slow_phase_keeps_its_line_only_when_slow(monkeypatch):
    """The solver's phase (``api.score``'s ``on_phase``): drawn while it runs, kept on
    screen only when it took SLOW_PHASE seconds or more; the bars before it stay."""
    import io
    import time

    from rich.console import Console

    import minsharp_ref.progress as progress

    monkeypatch.setattr(progress, "SLOW_PHASE", 0.3)
    buf = io.StringIO()
    with progress.Phases(console=Console(file=buf, force_terminal=True, width=100)) as phases:
        phases.start("scoring", 10, "samples")
        phases.advance(10)
        phases.maybe_slow("fast")
        phases.maybe_slow("slow")
        time.sleep(0.4)
    final = [line.split()[0] for line in list(screens(buf.getvalue()))[-1] if line.strip()]
    assert final == ["scoring", "slow"]


@needs_pty
def test_dask_shows_its_own_phases():
    """--dask: a bar while the cluster starts, then the scoring bar, named for the shards
    it advances by."""
    pytest.importorskip("distributed", reason="needs pip install 'minsharp-ref[dask]'")
    code, stream = run_in_pty(CLI + [str(a) for a in SCORE] + ["--dask", "local:1", "--limit", "200",
                                                             "--shard-size", "50"],
                              env=plain_env(), cwd=ROOT)
    assert code == 0, stream
    final = list(screens(stream))[-1]
    names = [line.split()[0] for line in final if line.split() and line.split()[0] in
             ("dask", "import", "shards", "scoring", "solver")]
    assert names == ["dask", "import", "shards"]
    assert any(line.startswith("shards ") and "200/200 samples" in line for line in final)
