"""Speed and memory of `score` against the published anchors, calibrated in-process.

The anchors (shared/spec/performance-anchors.md) were measured on a machine whose numpy
GEMM ran at 195 GFLOP/s (float32) and 85 GFLOP/s (float64). This script first measures the
GEMM rate here, in the same process (the baseline), scales the anchors to this machine by
that ratio, then times the whole scoring path (onnxruntime forward + exact traces) on 1,000
MNIST samples, fastest of 3, in float64 (the reference) and float32 signals, then once on
5,000 samples. Peak memory is numpy's traced peak (tracemalloc) for 1,000 and 5,000 samples:
it must not grow. The GEMM rate of a shared 2-core VM varies from run to run by up to 2x,
and the scaled anchors with it: compare ratios from one run, not across runs.

    python benchmarks/bench_score.py [--models mlp,smallcnn,lenet] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minsharp_ref.api import batch_size_for, DEFAULT_MEMORY_BUDGET, traces_over  # noqa: E402
from minsharp_ref.onnx_import import ImportedModel, convert, import_model  # noqa: E402

ANCHOR_GEMM = {"float32": 195.0, "float64": 85.0}  # GFLOP/s of the anchors' machine
# seconds for 1,000 samples, float32 (performance-anchors.md)
ANCHORS = {
    "mlp-784-20-20-10": {"authors": 0.325, "backpack": 0.013, "vmap": 0.353},
    "mlp-784-100-100-10": {"authors": 1.71, "backpack": 0.021, "vmap": 1.92},
    "mlp-784-512-128-512-10": {"authors": 11.3, "backpack": 0.101, "vmap": 11.9},
    "smallcnn": {"authors": 2.85, "backpack": 1.19, "vmap": 1.38},
    "lenet": {"authors": 17.8, "backpack": 3.50, "vmap": 15.5},
    "cnn-avgpool-strided": {"authors": 0.383, "backpack": 0.406, "vmap": 0.289},
}
FLOP_BOUND = {"mlp-784-512-128-512-10": 3.8, "lenet": 115.0}  # GFLOP (anchors' estimates)


def gemm_rate(dtype, n=1500, repeats=3) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def random_mlp(widths, seed=0) -> ImportedModel:
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [helper.make_node("Flatten", ["input"], ["h0"], name="flatten")], [], "h0"
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}")]
        out = "logits" if i == len(widths) - 2 else f"z{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [out], name=f"gemm{i}", transB=1))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"], name=f"relu{i}"))
            prev = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", widths[-1]])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ImportedModel(Path(f"<mlp {widths}>"), "", proto, convert(proto))


def mnist(n: int) -> np.ndarray:
    with np.load(ROOT / "fixtures" / "mnist_subset.npz") as d:
        x = np.concatenate([d["x_train"], d["x_test"]])[:n]
    return ((x / 255.0 - 0.5) / 0.5).reshape(-1, 1, 28, 28)


def run(imported, x, precision, batch_size):
    xs = (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    return traces_over(imported, xs, None, "cpu", precision=precision).sums


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="mlp,mlp100,mlp512,smallcnn,lenet,avgpool")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    models = {
        "mlp": ("mlp-784-20-20-10", lambda: import_model(ROOT / "fixtures" / "mlp_torchscript.onnx")),
        "mlp100": ("mlp-784-100-100-10", lambda: random_mlp([784, 100, 100, 10])),
        "mlp512": ("mlp-784-512-128-512-10", lambda: random_mlp([784, 512, 128, 512, 10])),
        "smallcnn": ("smallcnn", lambda: import_model(ROOT / "fixtures" / "smallcnn_torchscript.onnx")),
        "lenet": ("lenet", lambda: import_model(ROOT / "fixtures" / "lenet_torchscript.onnx")),
        "avgpool": ("cnn-avgpool-strided", lambda: import_model(ROOT / "fixtures" / "cnn_avgpool_strided.onnx")),
    }
    rates = {dt: gemm_rate(np.dtype(dt)) for dt in ("float32", "float64")}
    scale = {dt: ANCHOR_GEMM[dt] / rates[dt] for dt in rates}
    print(f"baseline (this process): numpy GEMM {rates['float32']:.0f} GFLOP/s float32, "
          f"{rates['float64']:.0f} GFLOP/s float64; anchors' machine 195 / 85, so anchors are "
          f"scaled by x{scale['float32']:.2f} (float32 work) to this machine")
    x1000, x5000 = mnist(1000), mnist(5000)
    header = (f"{'model':<24}{'float64 s':>10}{'float32 s':>10}{'BackPACK*':>10}{'authors*':>10}"
              f"{'x faster f64':>13}{'x faster f32':>13}{'bound* s':>9}")
    print(header)
    for key in args.models.split(","):
        label, make = models[key]
        imported = make()
        bs = batch_size_for(imported.network, DEFAULT_MEMORY_BUDGET, None)
        times = {}
        for precision in ("float64", "float32"):
            run(imported, x1000[:bs], precision, bs)  # warm-up
            times[precision] = min(_timed(lambda: run(imported, x1000, precision, bs))
                                   for _ in range(args.repeats))
        anchor = ANCHORS[label]
        bp = anchor["backpack"] * scale["float32"]
        au = anchor["authors"] * scale["float32"]
        bound = FLOP_BOUND.get(label)
        bound_s = f"{bound / rates['float32']:.2f}" if bound else "-"
        print(f"{label:<24}{times['float64']:>10.3f}{times['float32']:>10.3f}{bp:>10.3f}{au:>10.3f}"
              f"{bp / times['float64']:>13.2f}{bp / times['float32']:>13.2f}{bound_s:>9}")
        if not args.no_memory:
            t5000 = _timed(lambda: run(imported, x5000, "float64", bs))
            peaks = []
            for x in (x1000, x5000):
                tracemalloc.start()
                run(imported, x, "float64", bs)
                peaks.append(tracemalloc.get_traced_memory()[1] / 2 ** 20)
                tracemalloc.stop()
            print(f"{'':<24}5,000 samples: {t5000 / 5:.3f} s per 1,000 (float64); peak traced "
                  f"memory (float64, batch {bs}): {peaks[0]:.0f} MiB at 1,000 samples, "
                  f"{peaks[1]:.0f} MiB at 5,000")
    print("* anchors scaled to this machine by the in-process GEMM baseline; 'x faster' = "
          "BackPACK* / ours (the targets: >= 2 on the MLP and LeNet)")


if __name__ == "__main__":
    main()
