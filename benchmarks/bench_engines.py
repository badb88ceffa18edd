"""The NumPy engine, the onnxruntime engine (the trace graph) and BackPACK DiagGGNExact,
side by side in ONE process, interleaved round by round, on the paper's MLP
784-512-128-512-10 and LeNet (fixtures/lenet_torchscript.onnx), 1,000 MNIST samples.

Seconds are wall-clock, the fastest of the rounds, end to end for 1,000 samples (the CPU
seconds of the process are printed too: on a loaded machine they are the steadier figure): for the two engines
``api.traces_over`` with its checks (import fidelity; the onnxruntime engine also builds
its session and certifies itself against the float64 NumPy engine on its first batch, at most 64 samples); for
BackPACK the extended torch model (built from the same IR, same weights) on the same
batches. The FLOP bound is the multiply-adds the exact computation needs (forward, K − 1
back-propagated signals, the cheaper trace contraction per conv layer), at the numpy
float32 GEMM rate measured in this process. The machine is shared: compare ratios.

    python benchmarks/bench_engines.py [--models mlp512,lenet] [--rounds 3] [--samples 1000]

BackPACK is optional (``pip install -e '.[bench]'``): skipped with a message when absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_score import gemm_rate, mnist, random_mlp  # noqa: E402
from minsharp_ref.api import DEFAULT_MEMORY_BUDGET, batch_size_for, traces_over  # noqa: E402
from minsharp_ref.engine import conv_trace_flops, first_param_index, signal_rows  # noqa: E402
from minsharp_ref.ir import (AvgPool2d, Conv2d, Dense, MaxPool2d, Pad2d, Relu,  # noqa: E402
                             Reshape)
from minsharp_ref.onnx_import import import_model  # noqa: E402


def flop_bound(network) -> float:
    """FLOPs per sample (2 per multiply-add) of forward + back-propagation of K − 1 signals
    + trace contractions (the cheaper form per conv layer)."""
    k = signal_rows(network)
    shapes = network.layer_shapes()
    start = first_param_index(network)
    macs = 0
    for i, layer in enumerate(network.layers):
        if isinstance(layer, Dense):
            m = layer.matrix.size
            macs += m + (k * m if i > start else 0) + k * layer.out_features
        elif isinstance(layer, Conv2d):
            p = int(np.prod(shapes[i + 1][1:]))
            m = layer.weight.size * p  # forward multiply-adds
            flops = conv_trace_flops(layer, shapes[i], k)
            macs += m + (k * m if i > start else 0) + min(flops.values())
    return 2.0 * macs


def torch_model(network):
    """The IR as a torch.nn.Sequential with the same weights (chains of Conv2d, Dense,
    ReLU, MaxPool, AvgPool, Pad, Reshape), for BackPACK."""
    import torch
    from torch import nn

    mods = []
    for layer in network.layers:
        if isinstance(layer, Dense):
            lin = nn.Linear(layer.matrix.shape[1], layer.out_features, bias=layer.bias is not None)
            lin.weight.data = torch.tensor(layer.matrix, dtype=torch.float32)
            if layer.bias is not None:
                lin.bias.data = torch.tensor(layer.effective_bias, dtype=torch.float32)
            mods.append(lin)
        elif isinstance(layer, Conv2d):
            g = layer.geometry
            conv = nn.Conv2d(layer.weight.shape[1] * layer.groups, layer.out_channels, g.kernel,
                             g.stride, (g.pads[0], g.pads[1]), g.dilation, layer.groups,
                             bias=layer.bias is not None)
            conv.weight.data = torch.tensor(layer.weight_coef * layer.weight, dtype=torch.float32)
            if layer.bias is not None:
                conv.bias.data = torch.tensor(layer.effective_bias.reshape(-1), dtype=torch.float32)
            mods.append(conv)
        elif isinstance(layer, Relu):
            mods.append(nn.ReLU())
        elif isinstance(layer, MaxPool2d):
            g = layer.geometry
            mods.append(nn.MaxPool2d(g.kernel, g.stride, 0, g.dilation, ceil_mode=g.ceil_mode))
        elif isinstance(layer, AvgPool2d):
            g = layer.geometry
            mods.append(nn.AvgPool2d(g.kernel, g.stride, 0, ceil_mode=g.ceil_mode))
        elif isinstance(layer, Pad2d):
            t, l, b, r = layer.pads
            mods.append(nn.ZeroPad2d((l, r, t, b)))
        elif isinstance(layer, Reshape):
            mods.append(nn.Flatten())
        else:
            raise NotImplementedError(type(layer).__name__)
    return nn.Sequential(*mods)


def backpack_runner(network, x: np.ndarray, batch_size: int):
    """A callable that runs BackPACK DiagGGNExact over x and returns the naive trace, or
    None with a message when torch or backpack-for-pytorch is missing."""
    try:
        import torch
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact
    except ImportError as exc:
        print(f"BackPACK skipped: {exc} (pip install -e '.[bench]')")
        return None
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook")
    torch.set_num_threads(2)
    model = extend(torch_model(network))
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    xt = torch.tensor(x, dtype=torch.float32)

    def run():
        total = 0.0
        for i in range(0, len(xt), batch_size):
            xb = xt[i:i + batch_size]
            model.zero_grad()
            with torch.no_grad():  # the Hessian does not depend on the labels: use argmax
                y = model(xb).argmax(dim=1)
            with backpack(DiagGGNExact()):
                loss_fn(model(xb), y).backward()
            total += sum(float(p.diag_ggn_exact.sum()) for p in model.parameters())
        return total / len(xt)

    return run


def timed(fn):
    """(wall seconds, CPU seconds of this process, fn's value)."""
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - t, time.process_time() - c, value


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="mlp512,lenet")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    models = {
        "mlp512": ("MLP 784-512-128-512-10", lambda: random_mlp([784, 512, 128, 512, 10])),
        "lenet": ("LeNet", lambda: import_model(ROOT.parent / "fixtures" / "lenet_torchscript.onnx")),
    }
    rate = gemm_rate(np.float32)
    print(f"numpy float32 GEMM in this process: {rate:.0f} GFLOP/s; {args.samples} samples, "
          f"fastest of {args.rounds} interleaved rounds")
    x = mnist(args.samples)
    rows = []
    for key in args.models.split(","):
        label, make = models[key]
        imported = make()
        net = imported.network

        def engine_run(engine, bs):
            xs = (x[i:i + bs] for i in range(0, len(x), bs))
            run = traces_over(imported, xs, None, "cpu", engine=engine)
            return float(run.sums.mean.sum())

        bs_np = batch_size_for(net, DEFAULT_MEMORY_BUDGET, None, "float64", "numpy")
        bs_ort = batch_size_for(net, DEFAULT_MEMORY_BUDGET, None, "float32", "onnxruntime")
        methods = {"numpy": lambda: engine_run("numpy", bs_np),
                   "onnxruntime": lambda: engine_run("onnxruntime", bs_ort)}
        bp = backpack_runner(net, x, 256)
        if bp is not None:
            methods["backpack"] = bp
        best = {m: float("inf") for m in methods}
        cpu = dict(best)
        traces = {}
        for _ in range(args.rounds):
            for m, fn in methods.items():
                seconds, cpu_seconds, traces[m] = timed(fn)
                best[m] = min(best[m], seconds)
                cpu[m] = min(cpu[m], cpu_seconds)
        bound = flop_bound(net) * len(x) / 1e9
        rows.append((label, best, bound, bound / rate, traces))
        print(f"{label}: CPU seconds of this process (fastest round): "
              + ", ".join(f"{m} {v:.3f}" for m, v in cpu.items()))
    print(f"{'model':<24}{'NumPy s':>9}{'ORT s':>9}{'BackPACK s':>11}{'bound s':>9}"
          f"{'NumPy/ORT':>10}{'BackPACK/ORT':>13}{'ORT/bound':>10}  Tr H (numpy, ort, backpack)")
    for label, best, gflop, bound_s, traces in rows:
        bp = best.get("backpack")
        ort_s = best["onnxruntime"]
        print(f"{label:<24}{best['numpy']:>9.3f}{best['onnxruntime']:>9.3f}"
              f"{(f'{bp:.3f}' if bp else '-'):>11}{bound_s:>9.3f}"
              f"{best['numpy'] / best['onnxruntime']:>10.2f}"
              f"{(f'{bp / ort_s:.2f}' if bp else '-'):>13}"
              f"{best['onnxruntime'] / bound_s:>10.1f}  "
              + ", ".join(f"{traces[m]:.6g}" for m in traces))
        print(f"{'':<24}FLOP bound {gflop:.1f} GFLOP")


if __name__ == "__main__":
    main()
