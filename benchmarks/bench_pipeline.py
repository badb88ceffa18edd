"""Side by side, each method in its own process, methods alternating round by round (the
best round kept): the run pipeline's modes against BackPACK DiagGGNExact, the cost of the
float64 forward, and the worker scaling.

Every child process imports the model once and runs the method twice on the same samples
(the first call warms up: imports, first-touch allocations, BLAS and onnxruntime thread
pools); the second call's wall and CPU seconds are reported. The machine is shared: compare
ratios from one invocation only.

    python benchmarks/bench_pipeline.py backpack [--rounds 3] [--samples 1000]
    python benchmarks/bench_pipeline.py forward  [--rounds 3] [--samples 1000]
    python benchmarks/bench_pipeline.py workers  [--rounds 3] [--samples 4000] [--workers 1,2]

Methods (``--methods`` to choose): ``numpy64`` the default run (float64 end to end: the
IR's float64 forward and float64 signals), ``numpy64-ort`` the same engine on onnxruntime's
float32 activations (``--provider cpu``), ``numpy32`` float32 signals from the float64
forward, ``numpy32-ort`` float32 signals from onnxruntime's forward, ``onnxruntime`` the
trace graph (float32), ``backpack`` BackPACK DiagGGNExact in float32 (torch, 2 threads).
The engines run ``scoring.traces_over`` with its checks (import fidelity; the trace graph
also builds its session and certifies its first batch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

MODELS = {"mlp512": "MLP 784-512-128-512-10", "lenet": "LeNet",
          "resnet_bn": "ResNet with BatchNorm (fixture)"}
METHODS = {"numpy64": dict(engine="numpy", precision="float64", provider="auto"),
           "numpy64-ort": dict(engine="numpy", precision="float64", provider="cpu"),
           "numpy32": dict(engine="numpy", precision="float32", provider="auto"),
           "numpy32-ort": dict(engine="numpy", precision="float32", provider="cpu"),
           "onnxruntime": dict(engine="onnxruntime", precision="float32", provider="cpu")}


def load(model: str):
    from minsharp_ref.onnx_import import import_model

    if model == "mlp512":
        from bench_score import random_mlp

        return random_mlp([784, 512, 128, 512, 10])
    name = {"lenet": "lenet_torchscript.onnx", "resnet_bn": "resnet_bn_torchscript.onnx"}[model]
    return import_model(ROOT.parent / "fixtures" / name)


def child(model: str, method: str, samples: int, workers: int) -> dict:
    """Run ``method`` twice in this process; the second call's seconds and its naive trace."""
    import numpy as np

    from bench_score import mnist

    imported = load(model)
    shape = imported.network.input_shape
    x = mnist(samples)
    if x.shape[1:] != shape:
        x = np.resize(x, (samples,) + shape)
    if method == "backpack":
        from bench_engines import backpack_runner

        fn = backpack_runner(imported.network, x, 256)
    else:
        from minsharp_ref.options import RunOptions
        from minsharp_ref.scoring import batch_size_for, traces_over

        options = RunOptions(workers=workers, **METHODS[method])
        bs = batch_size_for(imported.network, options.memory_budget, None, options.precision,
                            options.engine, options.provider)

        def fn():
            xs = (x[i:i + bs] for i in range(0, len(x), bs))
            return float(traces_over(imported, xs, None, options).sums.mean.sum())
    fn()
    t, c = time.perf_counter(), time.process_time()
    trace = fn()
    return {"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "trace": trace}


def compare(models: list[str], methods: list[str], samples: int, rounds: int,
            workers: list[int]) -> dict:
    """Best wall (and CPU) seconds per (model, method, workers), rounds alternating."""
    best: dict = {}
    for _ in range(rounds):
        for model in models:
            for method in methods:
                for w in (workers if method != "backpack" else [0]):
                    out = subprocess.run([sys.executable, __file__, "child", model, method,
                                          str(samples), str(w)], capture_output=True, text=True)
                    if out.returncode != 0:
                        print(out.stderr.strip().splitlines()[-1], file=sys.stderr)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"  {model} {method} workers {w or '-'}: wall {r['wall']:.3f} s, "
                          f"CPU {r['cpu']:.3f} s", flush=True)
                    key = (model, method, w)
                    old = best.get(key)
                    best[key] = r if old is None or r["wall"] < old["wall"] else \
                        dict(old, cpu=min(old["cpu"], r["cpu"]))
    return best


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        model, method, samples, workers = sys.argv[2:6]
        print(json.dumps(child(model, method, int(samples), int(workers))))
        return
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["backpack", "forward", "workers"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--models", default=None)
    p.add_argument("--methods", default=None)
    p.add_argument("--workers", default=None)
    args = p.parse_args()
    defaults = {"backpack": ("mlp512,lenet", "backpack,numpy64,numpy32,numpy32-ort,onnxruntime", 1000, "2"),
                "forward": ("lenet,resnet_bn", "numpy64,numpy64-ort", 1000, "2"),
                "workers": ("lenet", "numpy64,onnxruntime", 4000, "1,2")}[args.what]
    models = (args.models or defaults[0]).split(",")
    methods = (args.methods or defaults[1]).split(",")
    samples = args.samples or defaults[2]
    workers = [int(w) for w in (args.workers or defaults[3]).split(",")]
    best = compare(models, methods, samples, args.rounds, workers)
    print(f"{samples} samples, best of {args.rounds} alternating rounds, one process per "
          f"method; seconds of the second call in the process")
    print(f"{'model':<32}{'method':<14}{'workers':>8}{'wall s':>9}{'CPU s':>9}  naive trace")
    for (model, method, w), r in best.items():
        print(f"{MODELS[model]:<32}{method:<14}{w or '-':>8}{r['wall']:>9.3f}{r['cpu']:>9.3f}"
              f"  {r['trace']:.10g}")
    for model in models:
        rows = {(m, w): r["wall"] for (mo, m, w), r in best.items() if mo == model}
        if args.what == "backpack" and ("backpack", 0) in rows:
            fastest = min((v, k) for k, v in rows.items() if k[0] != "backpack")
            print(f"{MODELS[model]}: BackPACK / fastest exact mode ({fastest[1][0]}) = "
                  f"{rows[('backpack', 0)] / fastest[0]:.2f}x")
        if args.what == "forward" and {("numpy64", workers[0]), ("numpy64-ort", workers[0])} <= rows.keys():
            w = workers[0]
            print(f"{MODELS[model]}: float64 IR forward / onnxruntime float32 forward = "
                  f"{rows[('numpy64', w)] / rows[('numpy64-ort', w)]:.2f}x")
        if args.what == "workers":
            for m in methods:
                if (m, 1) in rows:
                    print(f"{MODELS[model]} {m}: " + ", ".join(
                        f"{w} workers {rows[(m, 1)] / v:.2f}x" for (mm, w), v in rows.items()
                        if mm == m))


if __name__ == "__main__":
    main()
