"""The loss's standard error over samples (``loss_stderr``) against an independent float64
computation: the per-sample losses from the model's float64 logits (a stable log-softmax,
log(1 + e^z) by ``np.logaddexp``, squared differences), their sample standard deviation
(ddof 1) over √n. The run keeps only sums (Σ ℓ, Σ ℓ²), so shards add up exactly."""

import numpy as np
import pytest

from minsharp_ref import score
from minsharp_ref.onnx_import import import_model

from conftest import FIXTURES, MNIST

N = 300


def per_sample_losses(model, y_key: str, loss: str) -> np.ndarray:
    """Float64 per-sample losses of the first N training samples (uint8 / 255, no other
    preprocessing) from the logits of the float64 forward."""
    network = import_model(FIXTURES / model).network
    with np.load(MNIST) as d:
        x = d["x_train"][:N].astype(np.float64) / 255.0
        y = d[y_key][:N]
    z = network.forward(x.reshape((N,) + network.input_shape))
    if loss == "cross-entropy":
        shifted = z - z.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_softmax[np.arange(N), y.astype(np.int64)]
    if loss == "binary":  # −y log σ(z) − (1 − y) log(1 − σ(z)) = log(1 + e^z) − y z
        return np.logaddexp(0.0, z[:, 0]) - y.astype(np.float64) * z[:, 0]
    return np.mean((z - y.astype(np.float64).reshape(N, -1)) ** 2, axis=1)  # mse


@pytest.mark.parametrize("model,y_key,loss", [
    ("mlp_torchscript.onnx", "y_train", "cross-entropy"),
    ("sklearn_mlp_binary.onnx", "y_binary_train", "binary"),
    ("sklearn_mlp_regressor.onnx", "y_train", "mse"),
])
def test_loss_stderr_is_the_sample_standard_deviation_over_root_n(model, y_key, loss):
    losses = per_sample_losses(model, y_key, loss)
    r = score(FIXTURES / model, MNIST, y_key=y_key, limit=N, provider="numpy")
    assert r.loss_kind == loss
    assert r.loss == pytest.approx(losses.mean(), rel=1e-12)
    assert r.loss_stderr == pytest.approx(np.std(losses, ddof=1) / np.sqrt(N), rel=1e-9)
    doc = r.to_dict()
    assert doc["loss_stderr"] == r.loss_stderr


def test_loss_stderr_of_shards_and_of_the_fast_engine():
    """Shards add Σ ℓ and Σ ℓ² (1e-12); the onnxruntime engine's float32 logits give the
    same standard error to 1e-5; no labels, no loss and no standard error."""
    whole = score(FIXTURES / "mlp_torchscript.onnx", MNIST, limit=N, provider="numpy")
    sharded = score(FIXTURES / "mlp_torchscript.onnx", MNIST, limit=N, provider="numpy",
                    shard_size=70)
    assert sharded.loss_stderr == pytest.approx(whole.loss_stderr, rel=1e-12, abs=0)
    fast = score(FIXTURES / "mlp_torchscript.onnx", MNIST, limit=N, provider="cpu",
                 engine="onnxruntime")
    assert fast.loss_stderr == pytest.approx(whole.loss_stderr, rel=1e-5, abs=0)
    unlabelled = score(FIXTURES / "mlp_torchscript.onnx", MNIST, x_key="x_train", split="test",
                       limit=20, provider="numpy")
    assert unlabelled.loss is None and unlabelled.loss_stderr is None
    single = score(FIXTURES / "mlp_torchscript.onnx", MNIST, limit=1, provider="numpy")
    assert single.loss is not None and single.to_dict()["loss_stderr"] is None  # NaN → null
