"""``--loss`` on every command that scores: ``invariance`` and ``verify`` take it with the
semantics and the errors of ``score`` (labels that do not fit the loss: one line, exit 2),
and record the loss kind."""

import json

import pytest
from typer.testing import CliRunner

from minsharp_ref import score
from minsharp_ref.cli import app

from conftest import FIXTURES, MNIST

BINARY = FIXTURES / "sklearn_mlp_binary.onnx"
MLP = FIXTURES / "mlp_torchscript.onnx"
UNLABELLED = ["--x-key", "x_train", "--split", "test"]  # x_train without its labels


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("model,extra,text", [
    (BINARY, [], 'labels "y_train" out of range 0..1 for the binary loss: 22 values, first 4 at '
                 'sample 0 (pick 0/1 labels with --y-key)'),
    (MLP, ["--loss", "binary"], "--loss binary needs a single logit; the model has 10 outputs"),
    (MLP, ["--loss", "mse"], 'labels "y_train" have shape (30,); the regressor (--loss mse) has 10 outputs'),
    (MLP, ["--loss", "hinge"], "--loss must be one of cross-entropy, binary, mse, not 'hinge'"),
    (BINARY, ["--loss", "cross-entropy"], "--loss cross-entropy needs at least 2 logits; the model has 1"),
])
def test_invariance_and_verify_refuse_what_score_refuses_in_the_same_words(tmp_path, model, extra, text):
    expected = tmp_path / "theirs.json"
    expected.write_text(json.dumps({"schema": "minsharp-ref/expected/v1", "traces": {}}))
    common = [model, "--data", MNIST, "--limit", 30, *extra]
    lines = set()
    for command in (["score"], ["invariance", "--trials", 2], ["verify", "--expected", expected]):
        r = invoke(*command[:1], *common, *command[1:])
        assert r.exit_code == 2, (command, r.output)
        assert r.stderr.count("\n") == 1 and r.stdout == "", (command, r.stderr)
        lines.add(r.stderr)
    assert len(lines) == 1 and text in lines.pop()


def test_invariance_traces_the_loss_asked_for(tmp_path):
    """The unscaled minimum sharpness is score's with the same --loss; the JSON and the
    report name the loss; binary labels picked with --y-key pass the check."""
    out = tmp_path / "inv.json"
    r = invoke("invariance", MLP, "--data", MNIST, *UNLABELLED, "--limit", 40, "--trials", 3,
               "--loss", "mse", "--json", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    mse = score(MLP, MNIST, x_key="x_train", split="test", limit=40, provider="numpy", loss="mse")
    ce = score(MLP, MNIST, x_key="x_train", split="test", limit=40, provider="numpy")
    assert doc["loss_kind"] == "mse" and doc["passed"]
    assert doc["base"]["minimum_sharpness"] == pytest.approx(mse.minimum_sharpness, rel=1e-12)
    assert abs(mse.minimum_sharpness / ce.minimum_sharpness - 1) > 0.1  # the loss matters
    assert "40 samples, mse loss)" in r.stdout
    r = invoke("invariance", BINARY, "--data", MNIST, "--y-key", "y_binary_train", "--limit", 30,
               "--trials", 2, "--json", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["loss_kind"] == "binary" and doc["data"]["y_key"] == "y_binary_train"


def test_verify_takes_loss_and_names_a_loss_mismatch_first(tmp_path):
    theirs = tmp_path / "theirs.json"
    args = ["--data", MNIST, *UNLABELLED, "--limit", 40]
    assert invoke("score", MLP, *args, "--loss", "mse", "--json", theirs, "--quiet").exit_code == 0
    r = invoke("verify", MLP, *args, "--expected", theirs)
    assert r.exit_code == 1
    assert r.stdout.startswith("data mismatch: loss differs: theirs mse, ours cross-entropy (see --loss)\n")
    out = tmp_path / "v.json"
    r = invoke("verify", MLP, *args, "--expected", theirs, "--loss", "mse", "--json", out)
    assert r.exit_code == 0, r.output
    assert "mismatch" not in r.stdout and json.loads(out.read_text())["loss_kind"] == "mse"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "minsharp-ref/expected/v1", "traces": {}, "loss_kind": "l1"}))
    r = invoke("verify", MLP, *args, "--expected", bad)
    assert r.exit_code == 2 and r.stderr == (f'error: {bad}: "loss_kind" must be one of '
                                             "cross-entropy, binary, mse, not 'l1'\n")
