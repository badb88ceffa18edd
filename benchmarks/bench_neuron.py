"""Neuron-wise minimum sharpness (docs/method.md section 13): per fixture family, the naive
trace, MS and the neuron-wise MS with its standard error, the units, the free units, the
Newton steps and the solve's time against the scoring pass's; and (``--synthetic``) the
sparse Newton steps against the dense least-squares steps on a ResNet-like unit graph with
thousands of channels, side by side, interleaved.

    python benchmarks/bench_neuron.py [--samples 256] [--models lenet_torchscript,...]
    python benchmarks/bench_neuron.py --synthetic [--width 64] [--rounds 3] [--dense]

(``--dense`` also runs the dense-rows iteration, side by side: only for small widths, its
rows matrix is terms × units.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minsharp_ref.api import score  # noqa: E402
from minsharp_ref.neuron import Terms, neuron_sharpness  # noqa: E402

#: fixture → score keywords (fixtures/README.md: torch models expect --mean 0.5 --std 0.5,
#: the Keras and JAX ones x / 255 only)
FAMILIES = {
    "mlp_torchscript": dict(mean=[0.5], std=[0.5]),
    "lenet_torchscript": dict(mean=[0.5], std=[0.5]),
    "resnet_bn_torchscript": dict(mean=[0.5], std=[0.5]),
    "densenet_torchscript": dict(mean=[0.5], std=[0.5]),
    "keras_cnn": {}, "keras_mlp": {}, "jax_cnn": {}, "jax_mlp": {},
}


def fixture_table(models: list[str], samples: int) -> None:
    print(f"{samples} samples of fixtures/mnist_subset.npz, NumPy engine, --provider auto\n")
    print("| model | naive trace | MS | neuron-wise MS (± s.e.) | units | free | steps | "
          "solve s | scoring s | second pass s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in models:
        t0 = time.perf_counter()
        r = score(ROOT / "fixtures" / f"{name}.onnx", ROOT / "fixtures" / "mnist_subset.npz",
                  limit=samples, measures=True, **FAMILIES[name])
        total = time.perf_counter() - t0
        n = r.measures["neuron_minimum_sharpness"]
        trace = r.folded["trace"] if r.folded else r.trace
        s = n["solver"]
        first = total - s["second_pass_s"] - s["seconds"]
        se = "" if n["stderr"] is None else f" ± {n['stderr']:.3g}"
        print(f"| {name}{' (folded)' if r.folded else ''} | {trace:.6g} | "
              f"{r.minimum_sharpness:.6g} | {n['value']:.6g}{se} | {n['units']} | "
              f"{n['free_units']} | {s['iterations']} | {s['seconds']:.3f} | {first:.2f} | "
              f"{s['second_pass_s']:.2f} |", flush=True)


def resnet_like_terms(width: int, seed: int = 0) -> tuple[Terms, int]:
    """Random positive terms on the unit graph of a ResNet-18-like network: stem, four stages
    of two residual blocks at width·(1, 2, 4, 8) channels (each block's output tied to its
    input: one unit set per stage, plus the projection), dense head to the logits."""
    rng = np.random.default_rng(seed)
    outs, ins = [], []
    next_unit = 0

    def new(c):
        nonlocal next_unit
        next_unit += c
        return np.arange(next_unit - c, next_unit)

    def layer(o, i):
        oo, ii = np.meshgrid(o, i, indexing="ij")
        outs.append(oo.ravel()), ins.append(ii.ravel())
        outs.append(o), ins.append(np.full(o.size, -1))  # biases

    x = new(width)
    layer(x, np.array([-1, -1, -1]))  # stem from 3 input channels
    for stage in range(4):
        c = width * 2 ** stage
        if stage:
            y = new(c)
            layer(y, x)  # projection shortcut
            x = y
        for _ in range(2):
            h = new(c)
            layer(h, x)
            layer(x, h)  # conv2 writes into the block's (tied) output units
    layer(np.full(10, -1), x)  # head to the logits
    out, inp = np.concatenate(outs), np.concatenate(ins)
    coef = rng.lognormal(0.0, 2.0, out.size)
    return Terms(out, inp, coef, np.zeros(out.size, np.int64), ("all",)), next_unit


def synthetic(width: int, rounds: int, dense: bool) -> None:
    import minsharp_ref.sharpness as sharpness

    terms, units = resnet_like_terms(width)
    print(f"ResNet-like unit graph: {units} units, {terms.coef.size} terms (width {width})")
    kinds = ("sparse", "dense") if dense else ("sparse",)
    times: dict = {k: [] for k in kinds}
    values = {}
    original = sharpness.minimise_exponential_sum

    def dense_solver(rows, coefs, ell):  # the same iteration on dense rows (lstsq steps)
        return original(rows.toarray(), coefs, ell)

    for _ in range(rounds):
        for kind in kinds:
            if kind == "dense":
                import minsharp_ref.neuron as neuron

                neuron.minimise_exponential_sum = dense_solver
            t0 = time.perf_counter()
            ns = neuron_sharpness(terms, units)
            times[kind].append(time.perf_counter() - t0)
            values[kind] = (ns.value, ns.iterations, ns.gradient_norm)
            import minsharp_ref.neuron as neuron

            neuron.minimise_exponential_sum = original
    for kind in times:
        v, it, g = values[kind]
        print(f"{kind:6s}: best of {rounds} {min(times[kind]):.3f} s, value {v:.15g}, "
              f"{it} steps, relative gradient {g:.2g}")
    if dense:
        print(f"dense / sparse time: {min(times['dense']) / min(times['sparse']):.1f}×")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dense", action="store_true")
    args = ap.parse_args(argv)
    if args.synthetic:
        synthetic(args.width, args.rounds, args.dense)
    else:
        fixture_table(args.models.split(","), args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
