"""Shards without Dask: a run split into shards of consecutive samples gives the numbers of
a run in one piece, errors name the sample in the whole data set, and α* does not depend on
rounding-level differences of the summed traces (docs/method.md section 7, "Shards")."""

import pickle

import numpy as np
import pytest

import minsharp_ref
from minsharp_ref.errors import MinsharpError
from minsharp_ref.runtime import OrtUnavailable
from minsharp_ref.shards import shard_ranges
from minsharp_ref.sharpness import minimum_sharpness

from conftest import FIXTURES, MNIST

MLP = FIXTURES / "mlp_torchscript.onnx"


def test_shard_ranges():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(3, 5) == [(0, 3)]
    with pytest.raises(MinsharpError, match="--shard-size must be at least 1"):
        shard_ranges(3, 0)


def test_sharded_local_run_equals_one_piece():
    """Shards that split batches too (shard 70, batch 256): the summation order and the
    batches differ, the numbers agree to 1e-12; per-sample rows and diagonal likewise."""
    kwargs = dict(mean=[0.5], std=[0.5], limit=500, diagonal=True, per_sample=True)
    whole = minsharp_ref.score(MLP, MNIST, **kwargs)
    sharded = minsharp_ref.score(MLP, MNIST, shard_size=70, **kwargs)
    for a, b in zip(whole.layers, sharded.layers):
        for field in ("trace_weight", "trace_bias", "alpha"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-12, abs=0)
    for field in ("trace", "trace_stderr", "minimum_sharpness", "minimum_sharpness_stderr", "loss",
                  "loss_stderr"):
        assert getattr(sharded, field) == pytest.approx(getattr(whole, field), rel=1e-12, abs=0)
    assert sharded.accuracy == whole.accuracy and sharded.data == whole.data
    assert sharded.fidelity == whole.fidelity
    for k in whole.diagonal:
        np.testing.assert_allclose(sharded.diagonal[k], whole.diagonal[k], rtol=1e-12, atol=0)
    for k in whole.per_sample:
        np.testing.assert_allclose(sharded.per_sample[k], whole.per_sample[k], rtol=1e-12, atol=0)


def test_errors_cross_process_boundaries_intact():
    """Dask ships a worker's exception to the client by pickling it."""
    for exc in (MinsharpError('x.npz: key "x" is truncated: sample 300 is missing'),
                OrtUnavailable("onnxruntime cannot load the model: bad")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)


# LeNet's summed traces from a run in one piece and from 6 shards: they differ at 1e-16.
# The solver used to stop where the line search stalled, and α* differed by 1.2e-12.
T1 = [14.237680582540959, 12.533788583393939, 4.7630996163000425, 10.305236926718635, 78.06284916102372]
U1 = [1.3119076184620442, 0.2356786123719681, 0.02516315294668638, 0.00453238089476198, 0.027536707632024447]
T2 = [14.237680582540955, 12.533788583393939, 4.763099616300043, 10.305236926718626, 78.0628491610237]
U2 = [1.3119076184620446, 0.23567861237196813, 0.025163152946686387, 0.004532380894761982, 0.027536707632024454]


def test_alpha_is_determined_to_rounding():
    a = minimum_sharpness(np.array(T1), np.array(U1))
    b = minimum_sharpness(np.array(T2), np.array(U2))
    np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-14, atol=0)
    assert a.value == pytest.approx(b.value, rel=1e-14)
    assert a.gradient_norm < 1e-14 and b.gradient_norm < 1e-14
