"""examples/label_noise_study (docs/case-study.md): the random-label study end to end.

The end-to-end test runs the study's ``--smoke`` size (2 noise levels × 1 seed × both
architectures, 200 training images, 8 epochs: about 20 s on two CPU cores; ``--quick`` is
the same code with more images and epochs) and checks the outputs' structure and that each
α-rescaled copy, which computes the same function, scores its original's minimum sharpness
to 1e-9 relative and the same gap, while its naive trace moves. Needs torch and
matplotlib (the ``study`` extra) and is skipped, visibly, without them."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, MNIST, ROOT

STUDY = ROOT / "examples" / "label_noise_study"
sys.path.insert(0, str(STUDY))

import study  # noqa: E402
import study_measures  # noqa: E402
import study_report  # noqa: E402

HAS_STUDY_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("torch", "matplotlib"))
BASE_FIELDS = {"architecture": str, "noise": float, "seed": int, "rescaled": bool,
               "train_accuracy": float, "test_accuracy": float, "gap": float,
               "loss_gap": float, "epochs": int}


def test_noisy_labels_replace_the_given_fraction():
    y = np.load(MNIST)["y_train"][:1000].astype(np.int64)
    for noise in (0.0, 0.2, 1.0):
        a, b = study.noisy_labels(y, noise, 3), study.noisy_labels(y, noise, 3)
        np.testing.assert_array_equal(a, b)  # reproducible
        changed = (a != y).mean()
        # round(p·N) labels are redrawn uniformly; each keeps its class with probability 1/10
        assert changed <= noise and changed >= 0.8 * noise
    assert not np.array_equal(study.noisy_labels(y, 0.6, 0), study.noisy_labels(y, 0.6, 1))


def test_adapters_omit_measures_this_minsharp_ref_does_not_report():
    doc = {"trace": 3.0, "trace_stderr": 0.1, "minimum_sharpness": 2.0,
           "minimum_sharpness_stderr": 0.2, "measures": {"normalised_sharpness": {"value": 5.0}}}
    assert study_measures.from_score(doc) == {
        "trace": 3.0, "trace_stderr": 0.1, "minimum_sharpness": 2.0,
        "minimum_sharpness_stderr": 0.2, "normalised_sharpness": 5.0,
        "normalised_sharpness_stderr": None}
    doc["measures"]["neuron_minimum_sharpness"] = {"value": 1.5, "stderr": 0.05, "units": 7}
    fields = study_measures.from_score(doc)
    assert fields["neuron_minimum_sharpness"] == 1.5 and fields["neuron_minimum_sharpness_stderr"] == 0.05


def test_spectrum_fields_read_lambda_max_as_given_and_at_alpha_star():
    doc = {"top": [{"value": 7.5, "residual": 1e-10}, {"value": 3.0, "residual": 1e-9}],
           "lambda_max_at_alpha_star": {"value": 2.5, "residual": 1e-10}}
    assert study_measures.spectrum_fields(doc) == {
        "lambda_max": 7.5, "lambda_max_stderr": None,
        "lambda_max_at_alpha_star": 2.5, "lambda_max_at_alpha_star_stderr": None}
    assert study_measures.spectrum_fields({"top": [4.0], "lambda_max_at_alpha_star": None}) == {
        "lambda_max": 4.0, "lambda_max_stderr": None}


@pytest.mark.slow
@pytest.mark.skipif(not study_measures.spectrum_available(),
                    reason="this minsharp-ref has no spectrum (λ_max) yet")
def test_lambda_max_moves_under_rescaling_and_at_alpha_star_does_not(tmp_path):
    """The λ_max adapter on a shipped MLP and its power-of-two α-rescaled copy (as the study
    makes them): λ_max moves, λ_max at α* does not (to the Lanczos tolerance)."""
    original, copy = FIXTURES / "mlp_torchscript.onnx", tmp_path / "copy.onnx"
    alpha = study.rescale_copy(original, copy, [0, 0, 21], 6)
    assert np.prod(alpha) == 1.0 and any(a != 1 for a in alpha)
    r, c = (study_measures.from_spectrum(p, MNIST, 64, 0.5, 0.5) for p in (original, copy))
    assert abs(c["lambda_max"] / r["lambda_max"] - 1) > 0.01
    assert c["lambda_max_at_alpha_star"] == pytest.approx(r["lambda_max_at_alpha_star"], rel=1e-6)


def test_kendall_table_on_a_monotone_and_a_reversed_measure():
    records = [{"architecture": a, "noise": g, "seed": 0, "rescaled": False, "gap": g,
                "loss_gap": 2 * g, "trace": 10 - g, "minimum_sharpness": 1 + g}
               for a in ("lenet", "mlp") for g in (0.0, 0.1, 0.5, 0.9)]
    assert study_report.kendall(records, "minimum_sharpness", "gap")[:1] == (pytest.approx(1.0),)
    assert study_report.kendall(records, "trace", "gap")[0] == pytest.approx(-1.0)
    text = study_report.kendall_markdown(records)
    assert "| lenet (n = 4) | mlp (n = 4) | pooled (n = 8) |" in text
    assert "| `minimum_sharpness` | +1.00" in text and "| `trace` | -1.00" in text


def test_bad_input_is_one_error_line_and_no_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert study.main(["--seeds", "0", "--out", str(out)]) == 2
    assert study.main(["--report-only", "--out", str(out)]) == 2
    assert study.main(["--data", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["error"] * 3, err
    assert "--seeds must be at least 1" in err[0] and "missing.npz" in err[2]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_STUDY_EXTRA, reason="needs torch and matplotlib: pip install 'minsharp-ref[study]'")
def test_smoke_study_outputs_and_rescaled_copies(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(STUDY / "study.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "kendall.md", "measures_vs_gap.png", "results.json", "study.json", "summary.md"]  # no temporary files
    records = json.loads((out / "results.json").read_text())
    measures = study_measures.present(records)
    assert {"trace", "minimum_sharpness", "normalised_sharpness"} <= set(measures)
    assert len(records) == 2 * 2 * 2  # architectures × noise levels × (original, copy)
    for r in records:
        for key, kind in BASE_FIELDS.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"], abs=1e-15)
        for m in measures:
            assert r[m] > 0 and f"{m}_stderr" in r
        assert r["trace_stderr"] > 0 and r["minimum_sharpness_stderr"] > 0
    originals = {(r["architecture"], r["noise"], r["seed"]): r for r in records if not r["rescaled"]}
    copies = {(r["architecture"], r["noise"], r["seed"]): r for r in records if r["rescaled"]}
    assert originals.keys() == copies.keys() and len(originals) == 4
    for key, r in originals.items():
        c = copies[key]
        assert c["minimum_sharpness"] == pytest.approx(r["minimum_sharpness"], rel=1e-9, abs=0)
        for m in set(measures) & set(study_measures.INVARIANT):  # those this minsharp-ref has
            assert c[m] == pytest.approx(r[m], rel=1e-9, abs=0), m
        assert c["gap"] == r["gap"] and c["train_accuracy"] == r["train_accuracy"]
        assert c["loss_gap"] == pytest.approx(r["loss_gap"], rel=1e-12)
        assert np.prod(c["alpha"]) == 1.0 and any(a != 1 for a in c["alpha"])
        for m in set(measures) & set(study_measures.SCALE_DEPENDENT):
            assert abs(c[m] / r[m] - 1) > 0.01, m  # while the naive trace moves
    assert {r["architecture"] for r in records} == {"lenet", "mlp"}
    table = (out / "kendall.md").read_text()
    assert "pooled (n = 4)" in table and "pooled (n = 8)" in table
    assert (out / "measures_vs_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
