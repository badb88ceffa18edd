"""Running the trace graph: one onnxruntime session per score, reused for every batch
through I/O binding; provider and precision resolved (and reported) once."""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from ..errors import MinsharpError, first_line
from ..ir import Network
from ..runtime import PROVIDERS, quiet_stderr, cuda_error, cuda_usable
from . import DIAGONAL_PREFIX, INPUT, LOGITS, TRACES, build_trace_graph
from .export import DTYPES


def resolve_provider(provider: str) -> str:
    """--provider for the onnxruntime engine: 'cuda' or 'cpu'."""
    if provider not in PROVIDERS:
        raise MinsharpError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "numpy":
        raise MinsharpError("--provider numpy runs no onnxruntime: use --engine numpy, or "
                            "--provider auto, cuda or cpu with --engine onnxruntime")
    if provider == "cuda" and not cuda_usable():
        raise cuda_error()
    if provider == "auto":
        return "cuda" if cuda_usable() else "cpu"
    return provider


#: Graphs with at most this many nodes get all of onnxruntime's graph optimisers
#: (ORT_ENABLE_ALL: about 10% faster runs on the fixtures, for 0.03–0.2 s of session);
#: larger graphs only KEPT_OPTIMISERS (docs/method.md section 11, "Set-up").
OPTIMISE_NODES = 2000
#: The optimisers a large graph keeps: constant folding and the rule-based fusions (which
#: fold the BatchNorm constants into the convolutions) and the blocked (NCHWc) convolution
#: kernels. Without them the float32 forward of densenet121 is about 4× less accurate
#: (1.6e-6 against 4e-7 of the logits), and more ReLUs within rounding of 0 take the other
#: side than in float64; with only them its session takes about a third of the full set's.
KEPT_OPTIMISERS = ("ConstantFolding", "Level1_RuleBasedTransformer",
                   "Level2_RuleBasedTransformer", "NchwcTransformer")
#: onnxruntime's (1.31) other optimisers at ORT_ENABLE_ALL, disabled for large graphs
#: (names it does not know are ignored)
OTHER_OPTIMISERS = (
    "AttentionFusion", "BiasDropoutFusion", "BiasGeluFusion", "BiasSkipLayerNormFusion",
    "BiasSoftmaxFusion", "CastFloat16Transformer", "CommonSubexpressionElimination",
    "ConstantSharing", "ConvActivationFusion", "ConvAddActivationFusion",
    "DoubleQDQPairsRemover", "DynamicQuantizeMatMulFusion", "EmbedLayerNormFusion",
    "EnsureUniqueDQForNodeUnit", "FastGeluFusion", "FreeDimensionOverrideTransformer",
    "FuseFp16InitializerToFp32NodeTransformer", "GatherSliceToSplitFusion",
    "GatherToSliceFusion", "GeluFusionL1", "GeluFusionL2", "GemmActivationFusion",
    "GroupQueryAttentionFusion", "GroupQueryAttentionPreNormFusion", "LayerNormFusionL1",
    "LayerNormFusionL2", "MatMulActivationFusion", "MatMulAddFusion",
    "MatMulIntegerToFloatFusion", "MatMulNBitsFusion", "MatMulScaleFusion",
    "MatmulTransposeFusion", "NhwcTransformer", "QDQFinalCleanupTransformer",
    "QDQPropagationTransformer", "QDQS8ToU8Transformer", "QDQSelectorActionTransformer",
    "QuickGeluFusion", "RemoveDuplicateCastTransformer", "ReshapeFusion",
    "SimplifiedLayerNormFusion", "SkipLayerNormFusion", "SliceConcatToSpaceToDepthFusion",
    "TransposeOptimizer", "WeightBiasQuantization", "WhereDummyDq")


def session_settings(provider: str, model) -> tuple[object, list[str]]:
    """onnxruntime's session options for the trace graph ``model`` on ``provider`` ('cuda'
    or 'cpu'), and the optimisers to disable (``InferenceSession(disabled_optimizers=…)``).
    The set-up cost of a large graph (docs/method.md section 11, "Set-up"): no memory reuse
    plan (its planning is super-linear in the graph's values: most of densenet121's 57 s of
    session; the arena still reuses freed buffers, and peak memory measured the same), and
    above OPTIMISE_NODES nodes only KEPT_OPTIMISERS. CUDA: one run at a time on the device,
    all threads; CPU: one single-threaded run per engine worker."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_reuse = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 0 if provider == "cuda" else 1
    large = len(model.graph.node) > OPTIMISE_NODES
    return options, list(OTHER_OPTIMISERS) if large else []


class TraceGraphRunner:
    """The trace graph of a network in one onnxruntime session.

    ``precision`` float64 runs the float64 graph where the provider has a float64 kernel
    for every op, else the float32 graph (``warning`` says so); ``precision`` is then what
    actually ran. Calling it on a batch returns (per-sample traces (N, T) float64, logits
    (N, K) float64, diagonal batch sums or None). It may be called from several threads at
    once (each gets its own I/O binding): on the CPU, ``workers`` single-threaded runs side
    by side beat one run on that many threads, whose threads wait for each other after
    every node; on CUDA one run at a time (``workers`` is then 1).
    """

    def __init__(self, network: Network, provider: str = "auto", precision: str = "float32",
                 diagonal: bool = False, workers: int = 1):
        import onnxruntime as ort

        if precision not in DTYPES:
            raise MinsharpError(f"--precision must be float64 or float32, not {precision!r}")
        self.provider = resolve_provider(provider)
        self.network = network
        self.warning: Optional[str] = None
        # CUDA: one run at a time on the device; CPU: one single-threaded run per worker
        self.workers = 1 if self.provider == "cuda" else workers
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.provider == "cuda"
                     else ["CPUExecutionProvider"])
        tried = [precision] if precision == "float32" else ["float64", "float32"]
        for p in tried:
            self.model = build_trace_graph(network, DTYPES[p], diagonal)
            try:
                with quiet_stderr():
                    options, disabled = session_settings(self.provider, self.model)
                    self.session = ort.InferenceSession(
                        self.model.SerializeToString(), options, providers=providers,
                        disabled_optimizers=disabled)
            except Exception as exc:
                if p == "float32":
                    raise MinsharpError(f"onnxruntime cannot run the trace graph: "
                                        f"{first_line(exc)}") from None
                self.warning = (f"the {self.provider} provider cannot run the trace graph in "
                                f"float64 ({first_line(exc)}); it ran in float32")
                continue
            self.precision = p
            break
        self.dtype = DTYPES[self.precision]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.local = threading.local()

    def __call__(self, x: np.ndarray):
        binding = getattr(self.local, "binding", None)
        if binding is None:
            binding = self.local.binding = self.session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(INPUT, np.ascontiguousarray(x, dtype=self.dtype))
        for name in self.outputs:
            binding.bind_output(name)  # on the provider's device; copied below
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise MinsharpError(f"onnxruntime failed on the trace graph: {first_line(exc)}") from None
        got = dict(zip(self.outputs, binding.copy_outputs_to_cpu()))
        diagonal = {name[len(DIAGONAL_PREFIX):]: np.asarray(value, np.float64)
                    for name, value in got.items() if name.startswith(DIAGONAL_PREFIX)}
        return (np.asarray(got[TRACES], np.float64), np.asarray(got[LOGITS], np.float64),
                diagonal or None)
