"""The onnxruntime engine's fixed cost against graph size: building the trace graph
(``build_trace_graph``) and creating its onnxruntime session, before and after the set-up
changes of docs/method.md section 11 ("Set-up"), side by side in ONE process, interleaved
round by round:

- build: ``GraphBuilder.fresh`` as it was (a suffix search from 0 for every name: quadratic
  in the nodes that share a stem) against now (resumed per stem); the graphs are
  byte-identical (checked);
- session: onnxruntime's defaults (ORT_ENABLE_ALL, memory reuse plan) against the runner's
  settings (``runner.session_settings``: no memory reuse plan; every optimiser up to
  ``runner.OPTIMISE_NODES`` nodes, only ``runner.KEPT_OPTIMISERS`` above);
- accuracy: the largest deviation of the engine check (``certificate.certify``) of each
  session's traces against the float64 NumPy engine on the batch;
- run: one batch of ``--batch`` samples in each session (the set-up must not cost run
  time), fastest of three runs per round and of the rounds.

Then, with ``--score``, ``score_arrays`` on ``--batch`` random inputs with either engine
(the onnxruntime engine's time includes set-up and its certification).

Models: the fixtures below, and any .onnx given with ``--models`` (torchvision exports, e.g.
densenet121 and resnet50 with ``num_classes=10`` at 64×64: see docs/method.md section 11).
Seconds are wall-clock, fastest of ``--rounds``; the machine is shared: compare ratios.

    python benchmarks/bench_graph_setup.py [--models /tmp/densenet121.onnx ...] [--rounds 1] [--score]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from minsharp_ref.api import score_arrays  # noqa: E402
from minsharp_ref.certificate import RTOL, Reference, certify, column_groups  # noqa: E402
from minsharp_ref.engine import tensor_columns  # noqa: E402
from minsharp_ref.group import folded_view  # noqa: E402
from minsharp_ref.scoring import reference_traces  # noqa: E402
from minsharp_ref.onnx_import import import_model  # noqa: E402
from minsharp_ref.trace_graph import build_trace_graph  # noqa: E402
from minsharp_ref.trace_graph import runner  # noqa: E402
from minsharp_ref.trace_graph.builder import GraphBuilder  # noqa: E402

FIXTURES = ["lenet_torchscript", "resnet_bn_torchscript", "densenet_torchscript"]


def old_fresh(self, stem: str, exact: bool = False) -> str:
    """``GraphBuilder.fresh`` before: the suffix search starts at 0 for every name."""
    if exact:
        self.used.add(stem)
        return stem
    name, i = stem, 0
    while name in self.used or name in self.reserved:
        i += 1
        name = f"{stem}#{i}"
    self.used.add(name)
    return name


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def build(network, old: bool):
    saved = GraphBuilder.fresh
    if old:
        GraphBuilder.fresh = old_fresh
    try:
        return build_trace_graph(network, np.float32)
    finally:
        GraphBuilder.fresh = saved


def session(model, old: bool):
    import onnxruntime as ort

    if old:
        options, disabled = ort.SessionOptions(), []
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
    else:
        options, disabled = runner.session_settings("cpu", model)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)


def measure(path: Path, rounds: int, batch: int, score: bool):
    imported = import_model(path)
    network = imported.network
    x = np.random.default_rng(0).random((batch, *network.input_shape))
    best, graphs, deviation = {}, {}, {}
    logits, inputs = network.forward(x, keep_inputs=True)
    folded = folded_view(network)
    parts = [tensor_columns(network)] + ([] if folded is None else [tensor_columns(folded)])
    reference = Reference(reference_traces(network, logits, inputs),
                          tuple(name for part in parts for _, _, name in part),
                          column_groups([len(part) for part in parts]))
    for _ in range(rounds):
        for old in (True, False):
            tb, graph = timed(lambda: build(network, old))
            ts, sess = timed(lambda: session(graph, old))
            tr = min(timed(lambda: sess.run(None, {"input": x.astype(np.float32)}))[0]
                     for _ in range(3))
            deviation[old] = certify(reference, sess.run(None, {"input": x.astype(np.float32)})[0])
            graphs[old] = hashlib.sha256(graph.SerializeToString()).hexdigest()
            for key, value in (("build", tb), ("session", ts), ("run", tr)):
                best[key, old] = min(best.get((key, old), np.inf), value)
    assert graphs[True] == graphs[False], "the builders' graphs differ"
    nodes = len(graph.graph.node)
    before = best["build", True] + best["session", True]
    after = best["build", False] + best["session", False]
    print(f"{path.stem}: {len(network.param_layers)} parameterised layers, {nodes} graph nodes "
          f"({'all' if nodes <= runner.OPTIMISE_NODES else 'the kept'} optimisers after)")
    for key in ("build", "session", "run"):
        b, a = best[key, True], best[key, False]
        print(f"  {key:8s} before {b:8.3f} s  after {a:8.3f} s  after/before {a / b:6.3f}")
    print(f"  set-up   before {before:8.3f} s  after {after:8.3f} s  after/before {after / before:6.3f}")
    print(f"  engine check deviation before {deviation[True].worst.deviation:.2g}, after "
          f"{deviation[False].worst.deviation:.2g} (tolerance {RTOL:g})")
    if score:
        tn, _ = timed(lambda: score_arrays(imported, x, provider="numpy"))
        to, _ = timed(lambda: score_arrays(imported, x, provider="cpu", engine="onnxruntime"))
        print(f"  score {batch} samples: numpy engine {tn:.3f} s, onnxruntime engine {to:.3f} s "
              f"(set-up after: {after / to:.0%} of it); onnxruntime/numpy {to / tn:.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--score", action="store_true")
    p.add_argument("--no-fixtures", action="store_true")
    args = p.parse_args()
    paths = ([] if args.no_fixtures else [ROOT.parent / "fixtures" / f"{n}.onnx" for n in FIXTURES])
    for path in paths + [Path(m) for m in args.models]:
        measure(path, args.rounds, args.batch, args.score)


if __name__ == "__main__":
    main()
