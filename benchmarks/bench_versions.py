"""Chain speed of this checkout against another checkout of minsharp-ref, in one process,
interleaved round by round (the DAG support must not slow chains down).

Both packages are imported side by side (the baseline under the alias ``baseline_ref``);
each round scores every model once with each version (onnxruntime CPU forward + exact
traces, float64, 1,000 MNIST samples) and the fastest round per version is reported, with
the ratio this/baseline. Traces must agree to 1e-12.

    python benchmarks/bench_versions.py /path/to/baseline/checkout [--models mlp,lenet] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"mlp": "mlp_torchscript.onnx", "lenet": "lenet_torchscript.onnx",
          "smallcnn": "smallcnn_torchscript.onnx", "resnet": "resnet_torchscript.onnx"}


def import_as(checkout: Path, alias: str):
    """Import the ``minsharp_ref`` package of ``checkout`` and re-register it as ``alias``."""
    sys.path.insert(0, str(checkout))
    try:
        for name in ("api", "onnx_import"):
            importlib.import_module(f"minsharp_ref.{name}")
        mods = {k: v for k, v in sys.modules.items() if k == "minsharp_ref" or k.startswith("minsharp_ref.")}
        for k, v in mods.items():
            del sys.modules[k]
            sys.modules[alias + k[len("minsharp_ref"):]] = v
        return mods["minsharp_ref.api"], mods["minsharp_ref.onnx_import"]
    finally:
        sys.path.remove(str(checkout))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline", type=Path)
    ap.add_argument("--models", default="mlp,lenet")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args(argv)
    base_api, base_imp = import_as(args.baseline.resolve(), "baseline_ref")
    this_api, this_imp = import_as(ROOT, "this_ref")
    with np.load(ROOT / "fixtures" / "mnist_subset.npz", allow_pickle=False) as d:
        x = ((d["x_train"][:args.samples].astype(np.float32) / 255 - 0.5) / 0.5)[:, None]
    versions = {"baseline": (base_api, base_imp), "this": (this_api, this_imp)}
    for model in args.models.split(","):
        path = ROOT / "fixtures" / MODELS[model]
        best = {}
        means = {}
        for r in range(args.rounds):
            for name, (api, imp) in list(versions.items())[::(-1) ** r]:  # alternate the order
                imported = imp.import_model(path)
                bs = api.batch_size_for(imported.network, api.DEFAULT_MEMORY_BUDGET, None)
                batches = [x[i:i + bs] for i in range(0, len(x), bs)]
                t0 = time.perf_counter()
                run = api.traces_over(imported, iter(batches), None, "cpu", check=False)
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
                means[name] = run.sums.mean
        agree = np.allclose(means["this"], means["baseline"], rtol=1e-12, atol=0)
        print(f"{model:<8} baseline {best['baseline']:.3f} s   this {best['this']:.3f} s   "
              f"ratio this/baseline {best['this'] / best['baseline']:.3f}   "
              f"(fastest of {args.rounds} interleaved rounds, {len(x)} samples; traces agree "
              f"to 1e-12: {agree})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
