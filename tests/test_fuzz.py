"""Fuzzing: mutated models and data files give a result or a MinsharpError, nothing else.

The CI profile runs a few hundred cases; the long run is
`python -m pytest tests/test_fuzz.py --hypothesis-profile=fuzz` (10,000 cases per test).
"""

import io

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import FIXTURES, MNIST
from minsharp_ref import score
from minsharp_ref.errors import MinsharpError

MODELS = {name: (FIXTURES / f"{name}.onnx").read_bytes()
          for name in ("mlp_torchscript", "mlp_softmax_leaky", "cnn_avgpool_strided")}
SAMPLES = 4
QUIET = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                 deadline=None)


def run_or_clean_error(model_path, data_path, **kw):
    """Score; the only acceptable exception is the project's own error type."""
    try:
        score(model_path, data_path, limit=SAMPLES, mean=[0.5], std=[0.5], provider="cpu", **kw)
    except MinsharpError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), message
        return "error"
    return "ok"


@st.composite
def mutated_model(draw):
    name = draw(st.sampled_from(sorted(MODELS)))
    model = onnx.load_model_from_string(MODELS[name])
    graph = model.graph
    kind = draw(st.sampled_from(["drop_node", "duplicate_node", "attribute", "dims", "dtype",
                                 "opset", "rewire", "input_dims", "truncate", "flip_bytes",
                                 "op_type", "initializer_values"]))
    if kind == "drop_node" and len(graph.node) > 1:
        del graph.node[draw(st.integers(0, len(graph.node) - 1))]
    elif kind == "duplicate_node":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        graph.node.insert(draw(st.integers(0, len(graph.node))), node)
    elif kind == "attribute":
        nodes = [n for n in graph.node if n.attribute]
        if nodes:
            node = draw(st.sampled_from(nodes))
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = draw(st.integers(-3, 40))
            elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
                attr.ints[draw(st.integers(0, len(attr.ints) - 1))] = draw(st.integers(-3, 40))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            elif attr.type == onnx.AttributeProto.STRING:
                attr.s = draw(st.sampled_from([b"SAME_UPPER", b"VALID", b"bogus", b""]))
    elif kind == "dims" and len(graph.initializer):
        init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        if len(init.dims):
            init.dims[draw(st.integers(0, len(init.dims) - 1))] = draw(st.integers(0, 10 ** 6))
    elif kind == "dtype" and len(graph.initializer):
        init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        init.data_type = draw(st.integers(0, 16))
    elif kind == "opset":
        model.opset_import[0].version = draw(st.integers(1, 40))
    elif kind == "rewire":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        names = [i.name for i in graph.initializer] + [o for n in graph.node for o in n.output] + ["nowhere"]
        if len(node.input):
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
    elif kind == "input_dims":
        dims = graph.input[0].type.tensor_type.shape.dim
        d = dims[draw(st.integers(0, len(dims) - 1))]
        if draw(st.booleans()):
            d.dim_value = draw(st.integers(0, 100))
        else:
            d.dim_param = "free"
    elif kind == "op_type":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        node.op_type = draw(st.sampled_from(["Sigmoid", "MaxPool", "Conv", "Gemm", "Relu", "Add",
                                             "Softmax", "Identity", "Flatten", "BatchNormalization"]))
    elif kind == "initializer_values" and len(graph.initializer):
        init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        arr = onnx.numpy_helper.to_array(init).copy()
        if arr.size and arr.dtype.kind == "f":
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, 1e30, 0.0]))
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    data = model.SerializeToString()
    if kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "flip_bytes":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        data = bytes(data)
    return data


@QUIET
@given(mutated_model())
def test_mutated_models_fail_cleanly(tmp_path, data):
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    run_or_clean_error(path, MNIST)


def _npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@st.composite
def mutated_data(draw):
    n = draw(st.integers(0, 6))
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.float64, np.int16, np.bool_, np.complex64, "U3"]))
    shape = draw(st.sampled_from([(n, 28, 28), (n, 784), (n, 1, 28, 28), (n, 27, 27), (n,), (n, 28, 28, 1)]))
    x = np.zeros(shape, dtype=dtype)
    if np.dtype(dtype).kind == "f" and x.size and draw(st.booleans()):
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    arrays = {draw(st.sampled_from(["x", "x_train", "images"])): x}
    if draw(st.booleans()):
        ylen = draw(st.sampled_from([n, max(n - 1, 0), n + 1]))
        arrays[draw(st.sampled_from(["y", "y_train"]))] = np.asarray(
            draw(st.lists(st.integers(-2, 12), min_size=ylen, max_size=ylen)), dtype=np.int64)
    data = _npz(arrays)
    how = draw(st.sampled_from(["as_is", "truncate", "flip", "object"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        data = bytearray(data)
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 0xFF
        data = bytes(data)
    elif how == "object":
        buf = io.BytesIO()
        np.savez(buf, x=np.array([object()] * max(n, 1), dtype=object))
        data = buf.getvalue()
    return data


@QUIET
@given(mutated_data())
def test_mutated_data_fail_cleanly(tmp_path, data):
    path = tmp_path / "data.npz"
    path.write_bytes(data)
    run_or_clean_error(FIXTURES / "mlp_torchscript.onnx", path)
