"""torchvision's ReLU classifiers (docs/exporting.md, "torchvision"): small members of the
families the importer learned for them, built by fixtures/make_torchvision_fixtures.py with
torchvision's own modules, BatchNorm statistics from real images, eval mode, exported by the
legacy exporter (``do_constant_folding=False``) and, for ShuffleNetV2, by dynamo.

* tv_squeezenet1_1: the classifier Conv → ReLU → GlobalAveragePool → Flatten after the last
  parameterised layer belongs to the network (docs/method.md section 4, "The head");
* tv_shufflenet_v2(_dynamo): ``torch.chunk`` (Slice; dynamo: SplitToSequence/SequenceAt) and
  the channel shuffle (Reshape → Transpose → Reshape) in both engines and the rescaling group
  (docs/method.md section 9);
* tv_googlenet_small: GoogLeNet's Inception blocks, max pools 3×3 stride 1 padding 1 in
  ceil_mode over ReLU outputs (where windows tie: tests/test_maxpool_ties.py), and
  ``transform_input`` (each input channel by Gather, then Mul, Add, Concat: input
  preprocessing before the first conv);
* tv_regnet_x: RegNet's X block (grouped convolutions).

Oracle: fixtures/torchvision_expected.json, exact per-tensor traces computed by torch
float64 autograd on the nn.Module itself (not the ONNX file). Tolerance per tensor:
1e-9 (NumPy engine) and 1e-5 (onnxruntime engine) relative to the tensor's trace plus 1e-9
of the total trace. Needs neither torch nor torchvision.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest

from conftest import FIXTURES, MNIST
from minsharp_ref import ir, score_arrays
from minsharp_ref.engine import tensor_columns
from minsharp_ref.group import rescaling_group
from minsharp_ref.onnx_import import import_model
from minsharp_ref.rescale import apply_to_proto, group_parameters

DOC = json.loads((FIXTURES / "torchvision_expected.json").read_text())
STEMS = sorted(DOC["models"])
TOLERANCE = {"numpy": 1e-9, "onnxruntime": 1e-5}


def inputs(n: int, size: int) -> np.ndarray:
    """make_torchvision_fixtures.inputs: the first n MNIST training images, (x/255 − 0.5)/0.5,
    nearest-neighbour resized (row i reads row ⌊28 i / size⌋), replicated to 3 channels."""
    with np.load(MNIST, allow_pickle=False) as d:
        x = d["x_train"][:n].astype(np.float64)
    idx = (np.arange(size) * 28) // size
    x = ((x / 255.0 - 0.5) / 0.5)[:, idx][:, :, idx]
    return np.repeat(x[:, None], 3, axis=1)


@lru_cache(maxsize=None)
def imported(stem: str):
    return import_model(FIXTURES / DOC["models"][stem]["file"])


def per_tensor(layers) -> dict[str, float]:
    out = {}
    for layer in layers:
        out[layer.weight] = layer.trace_weight
        if layer.bias is not None:
            out[layer.bias] = layer.trace_bias
    return out


def test_fixtures_are_small_and_references_cover_every_parameter():
    total = 0
    for stem in STEMS:
        entry = DOC["models"][stem]
        path = FIXTURES / entry["file"]
        total += path.stat().st_size
        # the legacy exporter stores bit-identical initializers (fresh BatchNorm γ = 1, β = 0)
        # once and feeds the other uses through an Identity named after the parameter
        params = {name for _, _, name in tensor_columns(imported(stem).network)}
        assert set(entry["traces"]) == params, stem
        assert entry["trace"] == pytest.approx(sum(entry["traces"].values()), rel=1e-12)
    assert total < 1_500_000


@pytest.mark.parametrize("engine", ["numpy", "onnxruntime"])
@pytest.mark.parametrize("stem", STEMS)
def test_traces_match_torch_float64(stem, engine):
    entry = DOC["models"][stem]
    x = inputs(entry["samples"], entry["size"])
    layers, trace, _ = score_arrays(imported(stem), x, engine=engine,
                                    provider="numpy" if engine == "numpy" else "cpu")
    got, want, total = per_tensor(layers), entry["traces"], entry["trace"]
    assert set(got) == set(want)
    rtol = TOLERANCE[engine]
    bad = {k: (got[k], v) for k, v in want.items()
           if not abs(got[k] - v) <= rtol * (abs(v) + 1e-9 * total)}
    assert not bad, f"{stem} on {engine}: (ours, torch) {bad}"
    assert trace == pytest.approx(total, rel=rtol)


def test_squeezenet_classifier_belongs_to_the_network():
    """The last parameterised layer is followed by ReLU, global average pooling and Flatten:
    all in the network (no head stripped), logits of shape (10,)."""
    net = imported("tv_squeezenet1_1").network
    tail = [type(l).__name__ for l in net.layers[-4:]]
    assert tail == ["Conv2d", "Relu", "AvgPool2d", "Reshape"]
    assert net.postprocessing == () and net.num_classes == 10


@pytest.mark.parametrize("stem", ["tv_shufflenet_v2", "tv_shufflenet_v2_dynamo"])
def test_shufflenet_channel_split_and_shuffle(stem):
    """chunk(2, dim=1) becomes two channel Slices (one of them read by the Concat, the other
    by the branch's first conv; stride-2 blocks read the whole input); the shuffle a 5-D
    Reshape, a Transpose of its first two per-sample axes and a Reshape back. In the
    layer-wise group each slice shares its input's class, and so does the shuffle."""
    net = imported(stem).network
    slices = [l for l in net.layers if isinstance(l, ir.Slice)]
    assert len(slices) == 6 and all(l.axis == 0 for l in slices)
    assert sorted({(l.start, l.stop) for l in slices}) == [(0, 8), (0, 16), (0, 32), (8, 16),
                                                           (16, 32), (32, 64)]
    shuffles = [l for l in net.layers if isinstance(l, ir.Transpose)]
    assert len(shuffles) == 6 and all(l.perm == (1, 0, 2, 3) for l in shuffles)
    group = rescaling_group(net)
    where = {name: j for j, members in enumerate(group.members) for name in members}
    for layer in slices + shuffles:
        assert where[layer.input_name] == where[layer.output_name]


def test_legacy_and_dynamo_shufflenet_agree():
    """The two exporters' files of the same module score the same traces (1e-12)."""
    entry = DOC["models"]["tv_shufflenet_v2"]
    x = inputs(entry["samples"], entry["size"])
    a = per_tensor(score_arrays(imported("tv_shufflenet_v2"), x)[0])
    b = per_tensor(score_arrays(imported("tv_shufflenet_v2_dynamo"), x)[0])
    assert set(a) == set(b)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12), key


@pytest.mark.parametrize("stem", ["tv_shufflenet_v2", "tv_googlenet_small"])
def test_group_rescaling_preserves_function_and_minimum_sharpness(stem):
    """Random ℓ per free class of the group (slices and shuffles tie the classes they map),
    written to a float32 copy: onnxruntime's logits stay, per-tensor traces move by orders of
    magnitude and the naive trace moves, minimum sharpness stays (1e-6: the copy's float32
    rounding)."""
    ort = pytest.importorskip("onnxruntime")
    source = imported(stem)
    group = rescaling_group(source.network)
    ell = np.random.default_rng(1).uniform(-1.5, 1.5, group.size) * np.log(10)
    model = apply_to_proto(source.proto, group_parameters(source.network, ell, group))
    entry = DOC["models"][stem]
    x = inputs(entry["samples"], entry["size"])

    def logits(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input": x.astype(np.float32)})[0]

    before = logits(source.proto)
    np.testing.assert_allclose(logits(model), before, rtol=0, atol=1e-4 * np.abs(before).max())
    layers, trace, ms = score_arrays(source, x)
    moved_layers, moved_trace, moved_ms = score_arrays(model, x)
    before, after = per_tensor(layers), per_tensor(moved_layers)
    assert max(abs(np.log(after[k] / before[k])) for k in before if before[k] > 0) > np.log(1e3)
    assert moved_trace != pytest.approx(trace, rel=0.1)
    assert moved_ms == pytest.approx(ms, rel=1e-6)


def test_legacy_split_becomes_two_slices():
    """``torch.split(x, [2, 4], dim=1)``: the legacy exporter writes an ONNX Split, imported
    as one channel slice per used output."""
    import onnx

    path = FIXTURES / DOC["models"]["tv_split_legacy"]["file"]
    assert "Split" in [n.op_type for n in onnx.load(str(path)).graph.node]
    slices = [l for l in imported("tv_split_legacy").network.layers if isinstance(l, ir.Slice)]
    assert [(l.axis, l.start, l.stop) for l in slices] == [(0, 0, 2), (0, 2, 6)]


def test_googlenet_transform_input_is_input_preprocessing():
    """``transform_input=True``: ``x[:, i]`` (Gather) → Unsqueeze → Mul → Add per channel,
    Concat: slices, reshapes and fixed input transforms, all before the first conv."""
    net = imported("tv_googlenet_small").network
    first = next(i for i, l in enumerate(net.layers) if ir.is_parameterised(l))
    kinds = [type(l).__name__ for l in net.layers[:first]]
    assert kinds.count("Slice") == 3 and kinds.count("InputAffine") == 6 and kinds[-1] == "Concat"


# ------------------------------------------------------------------------------ refusals


def _gated(kind: str):
    """Conv → (activation written as torchvision's exporters write it) → Conv → GAP → Gemm,
    hand-built: ReLU6 (Clip 0..6), hardswish, SiLU (x·σ(x)), a squeeze-and-excitation gate
    (x·σ(conv(GAP(x))))."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name, shape):
        return numpy_helper.from_array(np.full(shape, 0.1, dtype=np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "W1"], ["u"], name="conv1")]
    inits = [init("W1", (4, 3, 1, 1)), init("W2", (4, 4, 1, 1)), init("W3", (10, 4)),
             numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    if kind == "relu6":
        nodes.append(helper.make_node("Clip", ["u", "lo", "hi"], ["a"], name="/act/Clip"))
    elif kind == "hardswish":
        nodes.append(helper.make_node("HardSwish", ["u"], ["a"], name="/act/HardSwish"))
    elif kind == "silu":
        nodes += [helper.make_node("Sigmoid", ["u"], ["s"], name="/act/Sigmoid"),
                  helper.make_node("Mul", ["u", "s"], ["a"], name="/act/Mul")]
    else:  # squeeze-and-excitation
        inits.append(init("Wse", (4, 4, 1, 1)))
        nodes += [helper.make_node("GlobalAveragePool", ["u"], ["p"], name="/se/pool"),
                  helper.make_node("Conv", ["p", "Wse"], ["q"], name="/se/fc"),
                  helper.make_node("Sigmoid", ["q"], ["s"], name="/se/Sigmoid"),
                  helper.make_node("Mul", ["s", "u"], ["a"], name="/se/Mul")]
    nodes += [helper.make_node("Conv", ["a", "W2"], ["v"], name="conv2"),
              helper.make_node("GlobalAveragePool", ["v"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "W3"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, 4, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind,node,why", [
    ("relu6", "/act/Clip", "a clipped ReLU such as ReLU6 saturates"),
    ("hardswish", "/act/HardSwish", "hardswish u·ReLU6(u + 3)/6"),
    ("silu", "/act/Sigmoid", "SiLU / swish u·σ(u)"),
    ("se", "/se/Sigmoid", "a gate σ(·) multiplying another computed tensor, as in "
                          "squeeze-and-excitation"),
])
def test_non_homogeneous_families_are_refused_naming_node_and_why(kind, node, why):
    """MobileNetV2 (ReLU6), MobileNetV3 (hardswish), EfficientNet (SiLU), RegNetY /
    MobileNetV3 / EfficientNet (squeeze-and-excitation gates): one line, the node, why."""
    from minsharp_ref.errors import MinsharpError
    from minsharp_ref.onnx_import import convert

    with pytest.raises(MinsharpError) as e:
        convert(_gated(kind))
    op = node.rsplit("/", 1)[1]
    assert str(e.value) == (f'node "{node}" ({op}): not positively homogeneous, minimum '
                            f"sharpness is not defined for this network ({why}" +
                            (": f(c·u) ≠ c·f(u) once c·u passes the clip)" if kind == "relu6"
                             else ")"))
