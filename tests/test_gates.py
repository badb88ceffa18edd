"""Release gates against the last release's report (--baseline, --max-increase, --gate,
--sigma), the markdown summary and the plot. Baselines are the fixture's own JSON with
perturbed values, so the boundary cases are exact in floating point."""

import hashlib
import json
import math
import re
import struct
import sys
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from minsharp_ref.cli import app

from conftest import FIXTURES, MNIST, ROOT
from test_terminal_output import check_golden

MLP = FIXTURES / "mlp_torchscript.onnx"
SCORE = ["score", MLP.relative_to(ROOT), "--data", MNIST.relative_to(ROOT), "--mean", "0.5",
         "--std", "0.5", "--limit", "200", "--provider", "numpy"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in SCORE + list(args)])


@pytest.fixture(autouse=True)
def in_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def now(tmp_path_factory) -> dict:
    """This run's own report (the float64 numpy path: every rerun gives the same numbers)."""
    out = tmp_path_factory.mktemp("now") / "now.json"
    r = CliRunner().invoke(app, [str(a) for a in SCORE + ["--json", out, "--quiet"]])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def baseline(tmp_path, doc, **changes):
    """``doc`` with top-level values replaced, written as a baseline file."""
    path = tmp_path / "base.json"
    path.write_text(json.dumps({**doc, **changes}))
    return path


def failures(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("gate failed: ")]


def test_relative_gate_passes_at_the_boundary_and_fails_just_past_it(tmp_path, now):
    ms = now["minimum_sharpness"]
    base = baseline(tmp_path, now, minimum_sharpness=ms / 2)  # exactly +100%
    assert invoke("--baseline", base, "--max-increase", "100%").exit_code == 0
    r = invoke("--baseline", base, "--max-increase", "99.9999%")
    assert r.exit_code == 1
    assert failures(r) == [f"gate failed: minimum sharpness {ms:.6g} > {ms / 2 * 1.999999:.6g} "
                           f"(baseline {ms / 2:.6g} + 99.9999%)"]


def test_absolute_gate_passes_at_the_boundary_and_fails_just_past_it(tmp_path, now):
    ms = now["minimum_sharpness"]
    assert (ms - 1.0) + 1.0 == ms  # the boundary is exact
    base = baseline(tmp_path, now, minimum_sharpness=ms - 1.0)
    assert invoke("--baseline", base, "--max-increase", "1").exit_code == 0
    assert invoke("--baseline", base, "--max-increase", "0.999999").exit_code == 1
    # a decrease never fails an increase gate
    assert invoke("--baseline", baseline(tmp_path, now, minimum_sharpness=ms * 3),
                  "--max-increase", "0").exit_code == 0


def test_every_failed_gate_is_one_line_and_the_json_records_verdicts(tmp_path, now):
    jsonschema = pytest.importorskip("jsonschema")
    base = baseline(tmp_path, now, minimum_sharpness=now["minimum_sharpness"] / 2,
                    trace=now["trace"] / 2, accuracy=now["accuracy"] + 0.05, loss=now["loss"] * 0.999)
    out = tmp_path / "r.json"
    r = invoke("--baseline", base, "--max-increase", "10%", "--gate", "trace,accuracy:0.01,loss:1%",
               "--json", out)
    assert r.exit_code == 1, r.output
    lines = failures(r)
    assert len(lines) == 3 and r.stderr.count("\n") == 3
    assert [l.split()[2] for l in lines] == ["minimum", "naive", "accuracy"]
    doc = json.loads(out.read_text())
    assert doc["baseline"]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert doc["baseline"]["model_sha256"] == now["model"]["sha256"]
    verdicts = {g["quantity"]: g["passed"] for g in doc["gates"]}
    assert verdicts == {"minimum_sharpness": False, "trace": False, "accuracy": False, "loss": True}
    acc = next(g for g in doc["gates"] if g["quantity"] == "accuracy")
    assert acc["limit"] == pytest.approx(now["accuracy"] + 0.04, abs=1e-15)  # a decrease is gated
    schema = json.loads((ROOT / "docs" / "score.schema.json").read_text())
    jsonschema.validate(doc, schema)


def test_sigma_turns_a_small_increase_within_noise_into_a_pass(tmp_path, now):
    ms, se = now["minimum_sharpness"], now["minimum_sharpness_stderr"]
    base = baseline(tmp_path, now, minimum_sharpness=ms - 0.8 * se)  # z = 0.8/√2 ≈ 0.57
    assert 0.8 * se > 0.05 * (ms - 0.8 * se)  # more than the 5% allowed
    failed = invoke("--baseline", base, "--max-increase", "5%")
    assert failed.exit_code == 1 and "within noise" in failed.stdout
    passed = invoke("--baseline", base, "--max-increase", "5%", "--sigma", "2")
    assert passed.exit_code == 0, passed.output
    assert "PASS (within noise)" in passed.stdout and not failures(passed)
    tight = invoke("--baseline", base, "--max-increase", "5%", "--sigma", "0.5")
    assert tight.exit_code == 1 and "+0.6 s.e. of the difference (--sigma 0.5)" in failures(tight)[0]


def test_sigma_discounts_a_small_loss_increase_exactly_at_the_boundary(tmp_path, now):
    """The loss carries its standard error now: an increase of d = 0.5 s.e. (beyond the 1%
    allowed) fails without --sigma, passes at the smallest K with d ≤ K·√(s² + s_b²) and
    fails at the float just below that K."""
    loss, se = now["loss"], now["loss_stderr"]
    base_loss = loss - 0.5 * se
    d = loss - base_loss  # exact (Sterbenz)
    assert d > 0.01 * base_loss
    s = math.hypot(se, se)  # the baseline's standard error: the same as this run's
    k = d / s
    while k * s < d:
        k = math.nextafter(k, math.inf)
    while math.nextafter(k, 0) * s >= d:
        k = math.nextafter(k, 0)
    base = baseline(tmp_path, now, loss=base_loss, loss_stderr=se)
    assert invoke("--baseline", base, "--gate", "loss:1%").exit_code == 1
    out = tmp_path / "r.json"
    passed = invoke("--baseline", base, "--gate", "loss:1%", "--sigma", repr(k), "--json", out)
    assert passed.exit_code == 0, passed.output
    assert "PASS (within noise)" in passed.stdout and not failures(passed)
    gate = json.loads(out.read_text())["gates"][0]
    assert gate["exceeded"] and gate["passed"] and gate["note"] is None
    below = invoke("--baseline", base, "--gate", "loss:1%", "--sigma", repr(math.nextafter(k, 0)))
    assert below.exit_code == 1
    assert failures(below) == [f"gate failed: loss {loss:.6g} > {base_loss * 1.01:.6g} (baseline "
                               f"{base_loss:.6g} + 1%), +0.4 s.e. of the difference (--sigma "
                               f"{math.nextafter(k, 0):g})"]


def test_sigma_discounts_a_small_accuracy_decrease(tmp_path, now):
    """Accuracy's binomial standard error √(p(1−p)/n): a drop of 0.02 at n = 200 is about
    0.7 s.e. of the difference."""
    base = baseline(tmp_path, now, accuracy=now["accuracy"] + 0.02)
    assert invoke("--baseline", base, "--gate", "accuracy:0.01").exit_code == 1
    r = invoke("--baseline", base, "--gate", "accuracy:0.01", "--sigma", "2")
    assert r.exit_code == 0 and "PASS (within noise)" in r.stdout, r.output


def test_an_older_baseline_without_the_loss_stderr_gets_the_plain_comparison(tmp_path, now):
    """A report written before ``loss_stderr``: the standard error of the difference is
    unknown; the verdict says so and --sigma does not discount the increase."""
    old = {k: v for k, v in now.items() if k != "loss_stderr"}
    base = baseline(tmp_path, old, loss=now["loss"] - 0.5 * now["loss_stderr"])
    out = tmp_path / "r.json"
    r = invoke("--baseline", base, "--gate", "loss:1%", "--sigma", "2", "--json", out)
    assert r.exit_code == 1
    note = "no standard error of the loss in baseline: --sigma 2 not applied, plain comparison"
    assert len(failures(r)) == 1 and failures(r)[0].endswith(f"(baseline {old['loss'] - 0.5 * now['loss_stderr']:.6g} + 1%); {note}")
    assert "FAIL (no s.e.)" in r.stdout and f"note: {note}" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["gates"][0]["note"] == note
    change = next(c for c in doc["baseline"]["changes"] if c["quantity"] == "loss")
    assert change["stderr_difference"] is None and change["stderr_missing"] == ["baseline"]
    md = invoke("--baseline", base, "--gate", "loss:50%", "--sigma", "2", "--format", "markdown")
    assert md.exit_code == 0 and "| ✅ | loss | ≤ baseline + 50% and beyond 2 s.e." in md.stdout
    assert "PASS (no s.e.)" in md.stdout and f"Note: {note}." in md.stdout


@pytest.mark.parametrize("change,difference", [
    ({"samples": 1000}, "sample count differs: baseline 1000, now 200"),
    ({"preprocessing": ["uint8 scaled by 1/255"]}, "preprocessing differs: baseline uint8 scaled by 1/255, now"),
    ({"path": "data/other.npz"}, "data file differs: baseline other.npz, now mnist_subset.npz"),
    ({"x_key": "x_test", "y_key": "y_test"}, "data keys differ: baseline [x_test, y_test], now [x_train, y_train]"),
])
def test_baselines_on_other_data_are_refused_naming_the_difference(tmp_path, now, change, difference):
    base = baseline(tmp_path, now, data={**now["data"], **change})
    out = tmp_path / "r.json"
    r = invoke("--baseline", base, "--max-increase", "5%", "--json", out)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {base}: not comparable with this run: ") and difference in r.stderr
    assert r.stderr.count("\n") == 1 and not out.exists()


def test_baselines_of_another_architecture_are_refused(tmp_path, now):
    layers = [dict(l) for l in now["layers"]]
    layers[1]["weight_shape"] = [30, 20]
    r = invoke("--baseline", baseline(tmp_path, now, layers=layers), "--max-increase", "5%")
    assert r.exit_code == 2
    assert "layer structure differs at layer 2: baseline dense 30x20+bias, now dense 20x20+bias" in r.stderr
    r = invoke("--baseline", baseline(tmp_path, now, layers=layers[:2]), "--max-increase", "5%")
    assert r.exit_code == 2 and "layer structure differs: baseline 2 layers, now 3" in r.stderr


@pytest.mark.parametrize("args,text", [
    (["--max-increase", "5%"], "--max-increase, --gate and --sigma compare with a baseline"),
    (["--baseline", "nope.json", "--max-increase", "5%"], "nope.json: no such baseline file"),
    (["--baseline", MLP, "--max-increase", "5%"], "not JSON"),
    (["--baseline", FIXTURES / "README.md"], "not JSON"),
    (["--baseline", "BASE", "--max-increase", "ten%"], "--max-increase 'ten%': not a number"),
    (["--baseline", "BASE", "--max-increase", "-1"], "must be a finite non-negative number"),
    (["--baseline", "BASE", "--gate", "sharpness"], "unknown quantity 'sharpness'"),
    (["--baseline", "BASE", "--gate", "trace"], "--gate 'trace' needs a threshold"),
    (["--baseline", "BASE", "--max-increase", "5%", "--sigma", "-1"], "--sigma must be"),
    (["--format", "html"], "--format must be table, markdown or json"),
    (["--plot", "traces.pdf"], "the file name must end in .png or .svg"),
])
def test_gate_option_errors(tmp_path, now, args, text):
    base = baseline(tmp_path, now)
    r = invoke(*[base if a == "BASE" else a for a in args])
    assert r.exit_code == 2 and text in r.stderr, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_a_baseline_that_is_not_a_score_report_is_refused(tmp_path, now):
    path = tmp_path / "inv.json"
    path.write_text(json.dumps({"schema": "minsharp-ref/invariance/v1"}))
    r = invoke("--baseline", path, "--max-increase", "5%")
    assert r.exit_code == 2 and "not a score report (schema 'minsharp-ref/invariance/v1'" in r.stderr
    for change, text in [({"data": 5}, '"data" is missing or not a JSON object'),
                         ({"minimum_sharpness": "1"}, '"minimum_sharpness" is missing or not a JSON number'),
                         ({"layers": [1]}, '"layers" must hold objects'),
                         ({"accuracy": True}, '"accuracy" is not a number: True')]:
        r = invoke("--baseline", baseline(tmp_path, now, **change), "--max-increase", "5%")
        assert r.exit_code == 2 and text in r.stderr and "internal error" not in r.stderr, r.stderr


def test_markdown_summary_is_golden(tmp_path, now):
    base = baseline(tmp_path, now, minimum_sharpness=now["minimum_sharpness"] * 0.9,
                    trace=now["trace"] * 1.01, accuracy=now["accuracy"])
    r = invoke("--baseline", base, "--max-increase", "5%", "--gate", "trace,accuracy:1%",
               "--format", "markdown")
    assert r.exit_code == 1
    # the baseline file holds this machine's timings: mask its digest
    text = re.sub(r"Baseline `.*?` \(sha256 `[0-9a-f]{12}`", "Baseline `<baseline>` (sha256 `<digest>`", r.stdout)
    check_golden("score_mlp_gate.md", text)
    assert "| ❌ | minimum sharpness |" in text and "| ✅ | naive trace |" in text


def test_format_json_prints_the_document(tmp_path):
    out = tmp_path / "r.json"
    r = invoke("--format", "json", "--json", out)
    assert r.exit_code == 0 and r.stdout == out.read_text()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_png_and_svg(tmp_path, now):
    pytest.importorskip("matplotlib", reason="the [plot] extra is not installed")
    png, svg = tmp_path / "t.png", tmp_path / "t.svg"
    base = baseline(tmp_path, now, minimum_sharpness=now["minimum_sharpness"] * 0.99)
    assert invoke("--plot", png, "--baseline", base).exit_code == 0
    assert _png_size(png.read_bytes()) == (800, 450)
    assert invoke("--plot", svg).exit_code == 0
    root = ET.fromstring(svg.read_bytes())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (root.get("width"), root.get("height")) == ("576pt", "324pt")
    assert svg.read_text().count("/1/Gemm") == 1  # the layer names label the axis


def test_plot_without_matplotlib_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    png, out = tmp_path / "t.png", tmp_path / "r.json"
    r = invoke("--plot", png, "--json", out)
    assert r.exit_code == 2
    assert r.stderr == ("error: --plot needs matplotlib, the plot extra: pip install "
                        "'minsharp-ref[plot]' (or matplotlib)\n")
    assert not png.exists() and not out.exists()


def test_plotted_layer_traces_sum_to_the_naive_trace_and_the_minimum_sharpness(now):
    """Proposition 2: at α* the per-layer traces t_d/α*_d² + u_d/c*_d² add up to MS."""
    from minsharp_ref.plot import layer_traces

    naive, at_alpha = layer_traces(now)
    assert sum(naive) == pytest.approx(now["trace"], rel=1e-12)
    assert sum(at_alpha) == pytest.approx(now["minimum_sharpness"], rel=1e-9)
    assert all(a != n for a, n in zip(at_alpha, naive))  # α* ≠ 1: the two series differ
