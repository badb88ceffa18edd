"""λ_max of the Hessian of the mean cross-entropy: minsharp-ref's exact float64 operator +
Lanczos against PyHessian (power iteration, ``hessian(...).eigenvalues()``, at its default
tolerance 1e-3 and at 1e-6) and curvlinops (``HessianLinearOperator`` + SciPy ``eigsh`` at
1e-6), on the paper's MLP 784-512-128-512-10 and LeNet (fixtures/lenet_torchscript.onnx),
1,000 MNIST samples (mean 0.5, std 0.5), labels from the file.

Every method runs in its own process (imports, model building and the data in memory are
not timed; the clock covers building the operator and computing λ_max), in alternating
order round by round; each reports the fastest of its rounds. Every method runs in float64
(the torch models are built from the same IR with the same weights) with one BLAS / torch
thread, so that they compare on equal terms on a shared machine. The relative error is
against a float64 reference: minsharp-ref's Lanczos at tol 1e-12 whose residual certifies
it. The machine is shared by other processes: compare ratios.

    python benchmarks/bench_spectrum.py [--models mlp512,lenet] [--rounds 3] [--samples 1000]
                                        [--threads 1]

PyHessian and curvlinops are optional (``pip install -e '.[bench]'``): skipped when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

METHODS = ("minsharp-1e-6", "minsharp-1e-8", "minsharp-1e-3", "pyhessian-default", "pyhessian-1e-6",
           "curvlinops-1e-6")
ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def load(model: str, samples: int):
    from bench_score import random_mlp

    from minsharp_ref.onnx_import import import_model

    if model == "mlp512":
        network = random_mlp([784, 512, 128, 512, 10]).network
    else:
        network = import_model(ROOT.parent / "fixtures" / "lenet_torchscript.onnx").network
    with np.load(ROOT.parent / "fixtures" / "mnist_subset.npz") as d:
        x = d["x_train"][:samples].astype(np.float64)
        y = d["y_train"][:samples].astype(np.int64)
    x = ((x / 255.0 - 0.5) / 0.5).reshape((-1,) + tuple(network.input_shape))
    return network, x, y


def run_minsharp(network, x, y, tol):
    from minsharp_ref import hessian_operator
    from minsharp_ref.spectrum import extreme_eigenpairs

    threads = int(os.environ.get("BENCH_THREADS", "1"))
    start = time.perf_counter()  # with N threads: N batches side by side, one BLAS thread each
    op = hessian_operator(network, (x, y), batch_size=-(-len(x) // (2 * threads)) if threads > 1
                          else len(x), workers=threads)
    pair = extreme_eigenpairs(op, 1, "LA", tol=tol)[0]
    seconds = time.perf_counter() - start
    return pair.value, seconds, op.hvps - 1  # the residual's product is not part of the run


def torch_setup(network, x, y):
    import torch
    from bench_engines import torch_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(0)
    model = torch_model(network).double().eval()
    return torch, model, torch.as_tensor(x), torch.as_tensor(y)


def run_pyhessian(network, x, y, tol):
    from pyhessian import hessian

    torch, model, xt, yt = torch_setup(network, x, y)
    start = time.perf_counter()
    h = hessian(model, torch.nn.CrossEntropyLoss(), data=(xt, yt), cuda=False)
    values, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=1)
    return float(values[0]), time.perf_counter() - start, None


def run_curvlinops(network, x, y, tol):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    torch, model, xt, yt = torch_setup(network, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    op = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(xt, yt)],
                               check_deterministic=False).to_scipy()
    counter = {"n": 0}

    def matvec(v):
        counter["n"] += 1
        return op @ v

    from scipy.sparse.linalg import LinearOperator
    wrapped = LinearOperator(op.shape, matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])
    values = eigsh(wrapped, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return float(values[0]), time.perf_counter() - start, counter["n"]


def worker(method: str, model: str, samples: int) -> None:
    network, x, y = load(model, samples)
    if method == "reference":
        value, seconds, hvps = run_minsharp(network, x, y, 1e-12)
    else:
        kind, tol = method.split("-", 1)
        tol = "1e-3" if tol == "default" else tol  # PyHessian's default
        fn = {"minsharp": run_minsharp, "pyhessian": run_pyhessian,
              "curvlinops": run_curvlinops}[kind]
        value, seconds, hvps = fn(network, x, y, float(tol))
    print(json.dumps({"value": value, "seconds": seconds, "hvps": hvps}))


def spawn(method: str, model: str, samples: int) -> dict:
    env = dict(os.environ, **ENV)
    if os.environ.get("BENCH_THREADS"):
        env.update({k: os.environ["BENCH_THREADS"] for k in ENV})
    r = subprocess.run([sys.executable, __file__, "--worker", method, "--models", model,
                        "--samples", str(samples)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="mlp512,lenet")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--worker", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="threads per method (BLAS, torch; minsharp-ref: batches side by side)")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.models, args.samples)
        return
    os.environ["BENCH_THREADS"] = str(args.threads)
    methods = args.methods.split(",")
    print(f"{args.samples} MNIST samples, float64, {args.threads} thread(s) per process, {args.rounds} rounds, "
          "alternating order; shared machine: compare ratios")
    for model in args.models.split(","):
        ref = spawn("reference", model, args.samples)
        print(f"\n{model}: reference λ_max = {ref['value']:.15g} ({ref['hvps']} products, "
              f"{ref['seconds']:.1f} s)")
        best: dict = {m: None for m in methods}
        for r in range(args.rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for m in order:
                out = spawn(m, model, args.samples)
                if "error" in out:
                    best[m] = out
                    continue
                if best[m] is None or "error" in best[m] or out["seconds"] < best[m]["seconds"]:
                    best[m] = out
        base = best.get("minsharp-1e-6")
        print(f"{'method':<20} {'seconds':>9} {'vs minsharp 1e-6':>17} {'products':>9} "
              f"{'rel. error':>11}")
        for m in methods:
            out = best[m]
            if out is None or "error" in out:
                print(f"{m:<20} skipped: {out and out['error']}")
                continue
            ratio = out["seconds"] / base["seconds"] if base and "error" not in base else float("nan")
            err = abs(out["value"] - ref["value"]) / abs(ref["value"])
            hv = "-" if out["hvps"] is None else str(out["hvps"])
            print(f"{m:<20} {out['seconds']:>9.2f} {ratio:>16.2f}x {hv:>9} {err:>11.2e}")


if __name__ == "__main__":
    main()
