"""ONNX import: what real exporters write is accepted and faithful; everything else is
refused with one line naming the node, the op type and the reason."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import FIXTURES
from minsharp_ref import ir
from minsharp_ref.errors import MinsharpError
from minsharp_ref.onnx_import import convert, import_model
from minsharp_ref.runtime import OrtForward, check_fidelity

RNG = np.random.default_rng(0)


def const(name, shape=None, value=None, dtype=np.float32):
    arr = np.asarray(RNG.standard_normal(shape) if value is None else value).astype(dtype)
    return numpy_helper.from_array(arr, name)


def model(nodes, inits, in_shape, out="y", opset=17, in_name="x", value_info=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", "K"])], inits, value_info=list(value_info))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def faithful(m, shape, n=5):
    """Import, then check the IR against onnxruntime (raises when not faithful)."""
    net = convert(m)
    x = RNG.standard_normal((n, *shape))
    check_fidelity(m, net, x)
    return net


def kinds(net):
    return [type(l).__name__ for l in net.layers]


@pytest.mark.parametrize("name", ["mlp_torchscript", "mlp_dynamo", "mlp_nobias", "mlp_softmax_leaky",
                                  "smallcnn_torchscript", "smallcnn_dynamo", "lenet_torchscript",
                                  "lenet_dynamo", "cnn_avgpool_strided"])
def test_fixtures_import_faithfully(name):
    imported = import_model(FIXTURES / f"{name}.onnx")
    x = RNG.standard_normal((4, 1, 28, 28))
    assert check_fidelity(imported.proto, imported.network, x) < 1e-5
    assert imported.network.num_classes == 10


def test_lenet_layers_and_initializer_names():
    net = import_model(FIXTURES / "lenet_dynamo.onnx").network
    assert kinds(net) == ["Conv2d", "Relu", "MaxPool2d", "Conv2d", "Relu", "MaxPool2d", "Conv2d",
                          "Relu", "Reshape", "Dense", "Relu", "Dense"]
    assert [l.weight_name for l in net.param_layers] == ["0.weight", "3.weight", "6.weight", "9.weight", "11.weight"]
    assert net.param_layers[3].weight.shape == (84, 5880)


def test_softmax_is_stripped_and_reported():
    net = import_model(FIXTURES / "mlp_softmax_leaky.onnx").network
    assert net.postprocessing == ("Softmax (/softmax/Softmax)",)
    assert net.logits_name != net.output_name
    assert isinstance(net.layers[2], ir.LeakyRelu) and float(net.layers[2].slope) == pytest.approx(0.1)


def test_matmul_add_bias_either_side_gemm_alpha_beta_and_transb0():
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["b1", "h1"], ["z1"], name="add1"),  # bias on the left
        helper.make_node("Relu", ["z1"], ["a1"], name="r1"),
        helper.make_node("Gemm", ["a1", "W2", "b2"], ["z2"], name="gemm2", alpha=0.5, beta=2.0, transB=0),
        helper.make_node("LeakyRelu", ["z2"], ["a2"], name="lr", alpha=0.2),
        helper.make_node("MatMul", ["a2", "W3"], ["z3"], name="mm3"),
        helper.make_node("Add", ["z3", "b3"], ["y"], name="add3"),
    ]
    inits = [const("W1", (6, 5)), const("b1", (5,)), const("W2", (5, 4)), const("b2", (1, 4)),
             const("W3", (4, 3)), const("b3", (3,))]
    net = faithful(model(nodes, inits, [6]), (6,))
    dense = net.param_layers
    assert [(l.weight_name, l.bias_name) for l in dense] == [("W1", "b1"), ("W2", "b2"), ("W3", "b3")]
    assert dense[1].weight_coef == 0.5 and dense[1].bias_coef == 2.0 and dense[1].weight_transposed


def test_shape_arithmetic_reshape_preprocessing_identity_dropout_constant():
    """x.view(x.size(0), -1) as the TorchScript exporter writes it, preprocessing by constants,
    Identity/Dropout, and a weight held in a Constant node."""
    nodes = [
        helper.make_node("Sub", ["x", "mu"], ["xc"], name="sub"),
        helper.make_node("Div", ["xc", "sd"], ["xn"], name="div"),
        helper.make_node("Shape", ["xn"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["xn", "target"], ["flat"], name="reshape"),
        helper.make_node("Identity", ["flat"], ["flat2"], name="id"),
        helper.make_node("Constant", [], ["W"], name="wconst",
                         value=const("Wv", (3, 12))),
        helper.make_node("Gemm", ["flat2", "W", "b"], ["z"], name="gemm", transB=1),
        helper.make_node("Dropout", ["z"], ["y"], name="drop"),
    ]
    inits = [const("mu", value=0.5), const("sd", value=[[[2.0]], [[4.0]], [[0.5]]]),
             const("zero", value=0, dtype=np.int64), const("axes0", value=[0], dtype=np.int64),
             const("minus1", value=[-1], dtype=np.int64), const("b", (3,))]
    net = faithful(model(nodes, inits, [3, 2, 2]), (3, 2, 2))
    assert kinds(net) == ["InputAffine", "InputAffine", "Reshape", "Dense"]
    assert net.param_layers[0].weight_name == "W"


def test_conv_pool_pad_and_nhwc_transpose():
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Pad", ["nchw", "pads"], ["padded"], name="pad", mode="constant"),
        helper.make_node("Conv", ["padded", "Wc"], ["c1"], name="conv_same", auto_pad="SAME_UPPER",
                         strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="maxpool_ceil", kernel_shape=[2, 2],
                         strides=[2, 2], ceil_mode=1),
        helper.make_node("Conv", ["p1", "Wd", "bd"], ["c2"], name="depthwise", group=4,
                         kernel_shape=[2, 2], pads=[1, 0, 0, 1], dilations=[1, 1]),
        helper.make_node("AveragePool", ["c2"], ["p2"], name="avg", kernel_shape=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=0, ceil_mode=1, strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], name="head", transB=1),
    ]
    inits = [const("pads", value=[0, 0, 1, 2, 0, 0, 1, 0], dtype=np.int64), const("Wc", (4, 2, 3, 3)),
             const("Wd", (4, 1, 2, 2)), const("bd", (4,)), const("Wf", (3, 4)), const("bf", (3,))]
    net = faithful(model(nodes, inits, [11, 9, 2]), (11, 9, 2))
    assert kinds(net)[:2] == ["Transpose", "Pad2d"]
    assert net.param_layers[1].groups == 4


@pytest.mark.parametrize("op,reason", [
    ("Sigmoid", "not positively homogeneous, minimum sharpness is not defined for this network"),
    ("Tanh", "not positively homogeneous, minimum sharpness is not defined for this network"),
    ("Softmax", "not positively homogeneous, minimum sharpness is not defined for this network"),
])
def test_refuses_non_homogeneous_activation(op, reason):
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["z1"], name="g1", transB=1),
             helper.make_node(op, ["z1"], ["a1"], name=f"/act/{op}"),
             helper.make_node("Gemm", ["a1", "W2"], ["y"], name="g2", transB=1)]
    with pytest.raises(MinsharpError) as e:
        convert(model(nodes, [const("W1", (4, 3)), const("W2", (2, 4))], [3]))
    assert str(e.value) == f'node "/act/{op}" ({op}): {reason}'


def test_batchnorm_imports_and_other_normalisations_are_refused():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="/bn/BatchNormalization"),
             helper.make_node("Flatten", ["bn"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W2"], ["y"], name="g", transB=1)]
    inits = [const("W", (2, 1, 3, 3)), const("s", (2,)), const("b", (2,)), const("m", (2,)),
             const("v", value=[1.0, 1.0]), const("W2", (3, 18))]
    assert [l.kind for l in convert(model(nodes, inits, [1, 5, 5])).param_layers] == \
        ["conv2d", "batchnorm", "dense"]
    nodes[1] = helper.make_node("InstanceNormalization", ["c", "s", "b"], ["bn"], name="/in")
    with pytest.raises(MinsharpError, match=r'^node "/in" \(InstanceNormalization\): normalises '
                                            r"with the sample's own statistics"):
        convert(model(nodes, inits, [1, 5, 5]))


def test_residual_add_and_concat_import_and_other_joins_are_refused():
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["z1"], name="g1", transB=1),
             helper.make_node("Relu", ["z1"], ["a1"], name="r"),
             helper.make_node("Add", ["a1", "z1"], ["res"], name="/res/Add"),
             helper.make_node("Gemm", ["res", "W2"], ["y"], name="g2", transB=1)]
    net = convert(model(nodes, [const("W1", (3, 3)), const("W2", (2, 3))], [3]))
    assert not net.is_chain and net.layers[2].inputs == ("a1", "z1")
    nodes[2] = helper.make_node("Concat", ["a1", "z1"], ["res"], name="/cat", axis=1)
    assert convert(model(nodes, [const("W1", (3, 3)), const("W2", (2, 6))], [3])).layers[2].sizes == (3, 3)
    nodes[2] = helper.make_node("Mul", ["a1", "z1"], ["res"], name="/mul")
    with pytest.raises(MinsharpError, match=r'^node "/mul" \(Mul\): combines two computed tensors'):
        convert(model(nodes, [const("W1", (3, 3)), const("W2", (2, 3))], [3]))
    nodes[2] = helper.make_node("Concat", ["a1", "z1"], ["res"], name="/cat0", axis=0)
    with pytest.raises(MinsharpError, match=r"\(Concat\): axis=0: only concatenation along channels"):
        convert(model(nodes, [const("W1", (3, 3)), const("W2", (2, 6))], [3]))


def test_refuses_constant_add_after_a_layer_and_unknown_ops():
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z1"], name="g1", transB=1),
             helper.make_node("Add", ["z1", "c"], ["y"], name="shift")]
    with pytest.raises(MinsharpError, match="not positively homogeneous"):
        convert(model(nodes, [const("W1", (3, 3)), const("b1", (3,)), const("c", (3,))], [3]))
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["z1"], name="g1", transB=1),
             helper.make_node("TopK", ["z1", "k"], ["v", "i"], name="topk"),
             helper.make_node("Gemm", ["v", "W2"], ["y"], name="g2", transB=1)]
    with pytest.raises(MinsharpError, match=r'^node "topk" \(TopK\): op type not supported'):
        convert(model(nodes, [const("W1", (3, 3)), const("k", value=[2], dtype=np.int64),
                              const("W2", (3, 2))], [3]))


def test_refuses_shared_and_computed_weights():
    nodes = [helper.make_node("Gemm", ["x", "W"], ["z1"], name="g1", transB=1),
             helper.make_node("Relu", ["z1"], ["a1"], name="r"),
             helper.make_node("Gemm", ["a1", "W"], ["y"], name="g2", transB=1)]
    with pytest.raises(MinsharpError, match='initializer "W" is also used by node "g1"'):
        convert(model(nodes, [const("W", (3, 3))], [3]))
    nodes = [helper.make_node("Mul", ["W", "two"], ["W2"], name="scale_w"),
             helper.make_node("Gemm", ["x", "W2"], ["y"], name="g1", transB=1)]
    with pytest.raises(MinsharpError, match='weight "W2" is computed by other nodes'):
        convert(model(nodes, [const("W", (3, 3)), const("two", value=2.0)], [3]))


def test_transposed_weight_initializer_keeps_its_name():
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")]
    net = faithful(model(nodes, [const("W", (2, 3))], [3]), (3,))
    layer = net.param_layers[0]
    assert layer.weight_name == "W" and not layer.weight_transposed


def test_opset_9_gemm_mlp():
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="g", transB=1)]
    faithful(model(nodes, [const("W", (3, 8)), const("b", (3,))], [2, 4], opset=9), (2, 4))


def test_fidelity_check_catches_an_unfaithful_import():
    imported = import_model(FIXTURES / "mlp_torchscript.onnx")
    wrong = imported.network.with_parameters({"1.bias": imported.network.param_layers[0].bias + 1.0})
    with pytest.raises(MinsharpError, match="the import is not faithful"):
        check_fidelity(imported.proto, wrong, RNG.standard_normal((4, 1, 28, 28)))


def test_ort_forward_exposes_layer_inputs():
    imported = import_model(FIXTURES / "smallcnn_torchscript.onnx")
    x = RNG.standard_normal((3, 1, 28, 28))
    logits, inputs = OrtForward(imported.proto, imported.network, "cpu")(x)
    ref_logits, ref_inputs = imported.network.forward(x, keep_inputs=True)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
    for got, ref in zip(inputs, ref_inputs):
        if got is not None:
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * (1 + np.abs(ref).max()))


def test_postprocessing_tail_argmax_logsoftmax_cast_zipmap():
    """A classifier tail as sklearn-style converters write it: Softmax → ZipMap (ai.onnx.ml)
    beside ArgMax → Cast, and a LogSoftmax output; all stripped, the Gemm output scored."""
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["z"], name="head", transB=1),
        helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=1),
        helper.make_node("ZipMap", ["p"], ["probs"], name="zipmap", domain="ai.onnx.ml",
                         classlabels_int64s=[0, 1, 2]),
        helper.make_node("ArgMax", ["z"], ["label64"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Cast", ["label64"], ["label"], name="cast", to=TensorProto.INT32),
        helper.make_node("LogSoftmax", ["z"], ["logp"], name="logsoftmax", axis=1),
    ]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT32, ["N"]),
        helper.make_tensor_value_info("logp", TensorProto.FLOAT, ["N", 3]),
        helper.make_value_info("probs", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              outputs, [const("W", (3, 4)), const("b", (3,))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
                          ir_version=8)
    onnx.checker.check_model(m)
    net = faithful(m, (4,))
    assert net.logits_name == "z"
    assert {p.split(" ")[0] for p in net.postprocessing} == {"Softmax", "ZipMap", "ArgMax", "Cast", "LogSoftmax"}


def test_per_channel_scale_without_shift_and_spatial_sum_without_div_are_refused():
    """A per-channel Mul after a layer is accepted only with its shift Add (a decomposed
    BatchNorm, tests/test_oracle_traces.py); a spatial ReduceSum only as a mean (its Div)."""
    from oracle import _Builder, build

    scale_only = build((4,), [("matmul", dict(out=3)), ("channel_affine", dict(shift=False)),
                              ("relu", {}), ("gemm", dict(out=2))])
    with pytest.raises(MinsharpError, match=r'^node "Mul\d+" \(Mul\): a per-channel scale after a '
                                            r"layer is supported only as a decomposed batch"):
        convert(scale_only.proto)
    b = _Builder((1, 4, 4), np.random.default_rng(0))
    b.conv(out=2)
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    two = numpy_helper.from_array(np.array(2.0), "two")
    nodes = b.nodes + [
        helper.make_node("ReduceSum", [b.cur, "axes"], ["s"], name="/sum", keepdims=0),
        helper.make_node("Div", ["s", "two"], ["m"], name="/div"),
        helper.make_node("Gemm", ["m", "W"], ["y"], name="/fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE,
                                                                         ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 3])],
                              b.inits + [axes, two, numpy_helper.from_array(np.ones((3, 2)), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(MinsharpError, match=r'^node "/sum" \(ReduceSum\): a sum over the 4 spatial '
                                            r"positions is supported only as a mean \(followed by a "
                                            r"Div by 4\)"):
        convert(model)
    next(t for t in model.graph.initializer if t.name == "two").CopyFrom(
        numpy_helper.from_array(np.array(4.0), "two"))
    net = convert(model)
    assert [type(l).__name__ for l in net.layers] == ["Conv2d", "AvgPool2d", "Reshape", "Dense"]
    assert net.layers[-2].nodes == ("/div",)
