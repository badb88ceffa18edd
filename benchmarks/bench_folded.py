"""The NumPy engine on a BatchNorm network: the original and folded traces from one backward
pass (``folded_traces.traces_with_folded``) against the two passes it replaced (the original
network's, then the folded network's own), side by side in one process, interleaved round by
round, on the same forward activations; the fastest round of each, their ratio, and the
largest relative difference between the two results.

    python benchmarks/bench_folded.py [--model resnet_bn_torchscript] [--samples 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minsharp_ref.engine import per_sample_traces  # noqa: E402
from minsharp_ref.folded_traces import traces_with_folded  # noqa: E402
from minsharp_ref.group import folded_inputs, folded_view  # noqa: E402
from minsharp_ref.onnx_import import import_model  # noqa: E402
from minsharp_ref.runtime import make_forward  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet_bn_torchscript")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    imported = import_model(ROOT / "fixtures" / f"{args.model}.onnx")
    network, folded = imported.network, folded_view(imported.network)
    with np.load(ROOT / "fixtures" / "mnist_subset.npz") as d:
        x = ((d["x_train"][:args.samples] / 255.0 - 0.5) / 0.5).reshape(-1, 1, 28, 28)
    logits, inputs = make_forward(imported.proto, network, "numpy", threads=1)(x)

    def shared():
        t, tf, _ = traces_with_folded(network, folded, inputs, logits)
        return np.hstack([t, tf])

    def two_passes():
        return np.hstack([per_sample_traces(network, inputs, logits),
                          per_sample_traces(folded, folded_inputs(network, folded, inputs), logits)])

    best = {"shared": np.inf, "two passes": np.inf}
    results = {}
    for r in range(args.rounds):
        order = [("shared", shared), ("two passes", two_passes)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    diff = np.max(np.abs(results["shared"] - results["two passes"]) /
                  np.maximum(np.abs(results["two passes"]), 1e-300))
    print(f"{args.model}, {args.samples} samples, best of {args.rounds} interleaved rounds "
          f"(engine only, same forward): shared {best['shared']:.3f} s, two passes "
          f"{best['two passes']:.3f} s, ratio {best['two passes'] / best['shared']:.2f}x; "
          f"max relative difference {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
