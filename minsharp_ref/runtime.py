"""Forward passes: onnxruntime (CUDA when it really loads, else CPU) or the IR's own
float64 NumPy forward (the reference path).

A forward returns the logits and the inputs of the layers the engine reads
(``engine.needed_inputs``), as float64. For onnxruntime the model is rewritten so that those
intermediate tensors are its graph outputs (and nothing after the logits is run).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from typing import Optional

import numpy as np
import onnx

from .engine import needed_inputs
from .errors import MinsharpError, first_line
from .ir import Network

PROVIDERS = ("auto", "cuda", "cpu", "numpy")


class OrtUnavailable(MinsharpError):
    """onnxruntime cannot load or run the model."""


#: One redirection of the process's file descriptors at a time: two threads that overlap
#: (the onnxruntime engine builds its session while its first-batch checks build theirs)
#: would otherwise restore each other's sink, and stderr stays lost for good.
_QUIET_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet_stderr(capture: Optional[list] = None):
    """Silence native-library logging on file descriptor 2 (CUDA probe error spam); with
    ``capture``, also file descriptor 1, and append what was written to the list."""
    with _QUIET_LOCK:
        yield from _redirected(capture)


def _redirected(capture: Optional[list]):
    fds = (1, 2) if capture is not None else (2,)
    try:
        saved = [os.dup(fd) for fd in fds]
    except OSError:
        yield
        return
    with tempfile.TemporaryFile("w+b") as sink:
        for fd in fds:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            for fd, old in zip(fds, saved):
                os.dup2(old, fd)
                os.close(old)
            if capture is not None:
                sink.seek(0)
                capture.append(sink.read().decode("utf-8", "replace"))


_CUDA_USABLE: Optional[bool] = None
_CUDA_PROBLEM = ""


def cuda_usable() -> bool:
    """Whether onnxruntime's CUDA provider really loads: preloads the CUDA/cuDNN libraries
    of NVIDIA's pip wheels (``onnxruntime.preload_dlls``, where it exists), builds a one-node
    session with the provider, with the native logging captured, and checks that CUDA is
    what the session got. ``cuda_problem`` says why not."""
    global _CUDA_USABLE, _CUDA_PROBLEM
    if _CUDA_USABLE is None:
        import onnxruntime as ort

        _CUDA_USABLE = False
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            _CUDA_PROBLEM = "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
            return False
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        log: list[str] = []
        try:
            with quiet_stderr(capture=log):
                if hasattr(ort, "preload_dlls"):
                    ort.preload_dlls()
                session = ort.InferenceSession(model.SerializeToString(), options,
                                               providers=["CUDAExecutionProvider"])
                session.run(None, {"x": np.ones(1, np.float32)})
            _CUDA_USABLE = session.get_providers()[0] == "CUDAExecutionProvider"
        except Exception as exc:
            log.append(str(exc))
        if not _CUDA_USABLE:
            _CUDA_PROBLEM = missing_library("\n".join(log))
    return _CUDA_USABLE


def missing_library(log: str) -> str:
    """The first shared library that onnxruntime's log says could not be loaded."""
    found = re.search(r"([\w.+-]+\.(?:so(?:\.\d+)*|dll))\W+cannot open shared object file", log) \
        or re.search(r"(lib[\w+-]+\.so(?:\.\d+)*|\w+64_\d+\.dll)", log)
    return f"missing {found.group(1)}" if found else "the provider failed to initialise"


def cuda_problem() -> str:
    """Why the CUDA provider does not load, for the one-line error of --provider cuda."""
    return _CUDA_PROBLEM


def cuda_error() -> MinsharpError:
    return MinsharpError(f"--provider cuda: onnxruntime's CUDA provider does not load on this "
                         f"machine ({cuda_problem()}); install NVIDIA's CUDA and cuDNN "
                         f"libraries with: pip install 'minsharp-ref[cuda]'")


class NumpyForward:
    """The IR's forward: float64, the reference path (or, on a network cast with
    ``Network.astype(np.float32)`` and ``dtype`` float32, the same in float32). The logits
    are returned in float64."""

    name = "numpy"

    def __init__(self, network: Network, dtype=np.float64):
        self.network, self.dtype = network, dtype
        self.keep = needed_inputs(network)

    def __call__(self, x: np.ndarray):
        logits, inputs = self.network.forward(x, keep_inputs=True, dtype=self.dtype)
        keep = set(self.keep)
        return (logits.astype(np.float64, copy=False),
                [a if i in keep else None for i, a in enumerate(inputs)])


def free_the_batch(model: onnx.ModelProto, input_name: str) -> None:
    """In place: a graph exported with a fixed batch size B (``torch.onnx.export`` without
    ``dynamic_axes`` writes the dummy input's) made to run on batches of any size, as the
    engines feed it: the input's first dimension becomes symbolic, the recorded value shapes
    are dropped (onnxruntime re-infers them), and a Reshape whose constant target starts
    with B gets 0 there instead (copy the input's batch). The import reads every Reshape as
    keeping the batch axis first (docs/exporting.md), and the fidelity check compares the
    result with the float64 IR on the first batch (``allowzero`` is cleared there, which
    changes nothing when the target has no other 0). A graph with a symbolic batch is left
    as it is."""
    inputs = [i for i in model.graph.input if i.name == input_name]
    if not inputs:
        return
    first = inputs[0].type.tensor_type.shape.dim[0]
    batch = first.dim_value if first.HasField("dim_value") else 0
    if batch <= 0:
        return
    first.Clear()
    first.dim_param = "batch"
    del model.graph.value_info[:]
    initializers = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        if node.input[1] in initializers:
            target = onnx.numpy_helper.to_array(initializers[node.input[1]])
        elif node.input[1] in constants and constants[node.input[1]].attribute[0].name == "value":
            target = onnx.numpy_helper.to_array(constants[node.input[1]].attribute[0].t)
        else:
            continue
        if target.ndim == 1 and target.size and target[0] == batch and 0 not in target:
            target = target.copy()
            target[0] = 0
            # allowzero=1 (the dynamo exporter's) reads 0 literally; without other zeros in
            # the target it means the same as allowzero=0, which makes the 0 copy the batch
            for a in node.attribute:
                if a.name == "allowzero":
                    a.i = 0
            name = f"{node.input[1]}__any_batch_{len(model.graph.initializer)}"
            model.graph.initializer.append(onnx.numpy_helper.from_array(target, name))
            node.input[1] = name


class OrtForward:
    """onnxruntime forward with the engine's intermediate tensors as extra graph outputs (a
    fixed batch size made free: ``free_the_batch``)."""

    def __init__(self, proto: onnx.ModelProto, network: Network, provider: str, threads: int = 0):
        import onnxruntime as ort

        self.network = network
        self.keep = needed_inputs(network)
        names = [network.logits_name] + [network.layers[i].input_name for i in self.keep]
        self.fetch = [n for n in dict.fromkeys(names) if n != network.input_name]
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        free_the_batch(model, network.input_name)
        elem = onnx.helper.np_dtype_to_tensor_dtype(network.input_dtype)
        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_tensor_value_info(n, elem, None) for n in self.fetch)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads  # 0: onnxruntime's default
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
        try:
            with quiet_stderr():
                self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except Exception as exc:
            raise OrtUnavailable(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        self.name = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(self, x: np.ndarray):
        feed = {self.network.input_name: x.astype(self.network.input_dtype, copy=False)}
        try:
            values = self.session.run(self.fetch, feed)
        except Exception as exc:
            raise OrtUnavailable(f"onnxruntime failed on the model: {first_line(exc)}") from None
        got = dict(zip(self.fetch, values))
        got[self.network.input_name] = feed[self.network.input_name]
        inputs: list = [None] * len(self.network.layers)
        for i in self.keep:
            inputs[i] = np.asarray(got[self.network.layers[i].input_name], dtype=np.float64)
        return np.asarray(got[self.network.logits_name], dtype=np.float64), inputs


def make_forward(proto: onnx.ModelProto, network: Network, provider: str, threads: int = 0):
    """The forward for --provider auto|cuda|cpu|numpy (``threads``: onnxruntime intra-op
    threads, 0 for its default)."""
    if provider not in PROVIDERS:
        raise MinsharpError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "numpy":
        return NumpyForward(network)
    if provider == "cuda" and not cuda_usable():
        raise cuda_error()
    if provider == "auto":
        provider = "cuda" if cuda_usable() else "cpu"
    return OrtForward(proto, network, provider, threads)


#: Fidelity tolerance between onnxruntime's logits and the float64 IR forward:
#: |ort − ref| ≤ FIDELITY_RTOL · (1 + max |ref|), elementwise (float32 rounding is ~1e-6).
FIDELITY_RTOL = 1e-4


def check_fidelity(proto: onnx.ModelProto, network: Network, x: np.ndarray,
                   ort_logits: Optional[np.ndarray] = None,
                   ref_logits: Optional[np.ndarray] = None) -> float:
    """Compare the IR's float64 logits (``ref_logits`` when already computed) with
    onnxruntime's (CPU, one thread, unless given) on a batch; raise when the import is not
    faithful. Returns the largest scaled difference."""
    if ort_logits is None:
        ort_logits = OrtForward(proto, network, "cpu", threads=1)(x)[0]
    ref = network.forward(x) if ref_logits is None else ref_logits
    scale = 1.0 + float(np.max(np.abs(ref)))
    # rounded to 2 significant digits: a diagnostic that must not depend on BLAS threading
    diff = float(f"{float(np.max(np.abs(ort_logits - ref))) / scale:.2g}")
    if not diff <= FIDELITY_RTOL:
        raise MinsharpError(
            f"the import is not faithful: the IR's logits differ from onnxruntime's by "
            f"{diff:.3g} (relative to 1 + max |logit|; tolerance {FIDELITY_RTOL:g})")
    return diff
