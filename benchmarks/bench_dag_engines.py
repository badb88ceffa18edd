"""The two engines on a DAG/BatchNorm fixture, side by side in ONE process, interleaved round
by round: what ``minsharp-ref score MODEL --data fixtures/mnist_subset.npz --mean 0.5 --std
0.5 --limit N [--engine onnxruntime]`` runs (``api.score`` with the CLI's defaults: the
onnxruntime engine includes building its session and certifying itself on its first batch).

Also the trace graph's BatchNorm design (docs/trace-graph.md, "DAGs and BatchNorm"): one
graph whose ``traces`` hold the original and the folded view's columns (the folded view
measured from the same signals) against the alternative, two graphs, one for the network
and one for ``folded_view(network)``, each run on the same batches; the two-graph time is
the sum of the two sessions' runs. Seconds are wall-clock, fastest of the rounds; the machine
is shared: compare ratios.

    python benchmarks/bench_dag_engines.py [--model resnet_bn_torchscript] [--samples 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import minsharp_ref.trace_graph as trace_graph  # noqa: E402
from minsharp_ref.api import DEFAULT_MEMORY_BUDGET, batch_size_for, score  # noqa: E402
from minsharp_ref.group import folded_view  # noqa: E402
from minsharp_ref.onnx_import import import_model  # noqa: E402
from minsharp_ref.trace_graph.runner import TraceGraphRunner  # noqa: E402

FIXTURES = ROOT.parent / "fixtures"


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def original_only(network):
    """A runner of the graph without the folded columns (the first of the two graphs)."""
    saved = trace_graph.traced_layers
    trace_graph.traced_layers = lambda net: net.param_layers
    try:
        return TraceGraphRunner(network, "cpu")
    finally:
        trace_graph.traced_layers = saved


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet_bn_torchscript")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    path = FIXTURES / f"{args.model}.onnx"
    data = FIXTURES / "mnist_subset.npz"
    common = dict(mean=[0.5], std=[0.5], limit=args.samples)
    methods = {e: (lambda e=e: score(path, data, engine=e, **common)) for e in ("numpy", "onnxruntime")}
    best = {m: float("inf") for m in methods}
    results = {}
    for r in range(args.rounds):
        for m in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            seconds, results[m] = timed(methods[m])
            best[m] = min(best[m], seconds)
    a, b = results["numpy"], results["onnxruntime"]
    print(f"{args.model}, {args.samples} samples, fastest of {args.rounds} interleaved rounds "
          f"(api.score, CLI defaults)")
    print(f"  --engine numpy        {best['numpy']:8.3f} s   Tr H {a.trace:.8g}  MS {a.minimum_sharpness:.8g}")
    print(f"  --engine onnxruntime  {best['onnxruntime']:8.3f} s   Tr H {b.trace:.8g}  "
          f"MS {b.minimum_sharpness:.8g}  engine check {b.engine_check['max_relative_deviation']:.2g}")
    print(f"  numpy / onnxruntime   {best['numpy'] / best['onnxruntime']:8.2f}")

    network = import_model(path).network
    folded = folded_view(network)
    if folded is None:
        return
    with np.load(data) as d:
        x = ((d["x_train"][:args.samples] / 255.0 - 0.5) / 0.5).reshape((-1,) + network.input_shape)
    bs = batch_size_for(network, DEFAULT_MEMORY_BUDGET, None, "float32", "onnxruntime")
    batches = [x[i:i + bs] for i in range(0, len(x), bs)]
    one = TraceGraphRunner(network, "cpu")
    two = (original_only(network), TraceGraphRunner(folded, "cpu"))

    def run(runners):
        return [np.hstack([r(xb)[0] for r in runners]) for xb in batches]

    layouts = {"one graph (shared signals)": lambda: run([one]),
               "two graphs (network + folded view)": lambda: run(two),
               "network only (no folded columns)": lambda: run(two[:1])}
    times = {k: float("inf") for k in layouts}
    out = {}
    for r in range(args.rounds):
        for k in (list(layouts) if r % 2 == 0 else list(layouts)[::-1]):
            seconds, out[k] = timed(layouts[k])
            times[k] = min(times[k], seconds)
    ref = np.concatenate(out["one graph (shared signals)"]).mean(axis=0)
    alt = np.concatenate(out["two graphs (network + folded view)"]).mean(axis=0)
    print(f"trace graph runs only, batches of {bs}, single-threaded sessions:")
    base = times["one graph (shared signals)"]
    for k, v in times.items():
        print(f"  {k:<36}{v:8.3f} s   ratio to one graph {v / base:5.2f}")
    print(f"  max relative difference of the columns, one vs two graphs: "
          f"{np.max(np.abs(alt - ref) / np.abs(ref)):.2g}")


if __name__ == "__main__":
    main()
