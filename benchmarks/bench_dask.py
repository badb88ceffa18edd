"""Overhead of scoring through Dask: LeNet on 5,000 MNIST samples, a local run against the
same run on a LocalCluster of 2 single-threaded worker processes (``--dask local:2``).

Both score the same .npz (the fixture's 4,000 training and 1,000 test samples, written to a
temporary file) in the same process, interleaved round by round, fastest of the rounds.
The cluster is started once, before the rounds; its start-up time is reported separately.
On this 2-core machine both runs use both cores (the local run: two engine threads), so
the ratio is the cost of going through Dask: scattering the model, one task per shard,
each worker reading its rows, the merge. The local run's samples per second per core is
the speed-up model of docs/dask.md.

    python benchmarks/bench_dask.py [--rounds 3] [--samples 5000] [--model lenet_torchscript]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minsharp_ref  # noqa: E402


def dataset(directory: Path, samples: int) -> Path:
    with np.load(ROOT / "fixtures" / "mnist_subset.npz") as d:
        x = np.concatenate([d["x_train"], d["x_test"]])
        y = np.concatenate([d["y_train"], d["y_test"]])
    reps = -(-samples // len(x))
    path = directory / "mnist.npz"
    np.savez(path, x=np.tile(x, (reps, 1, 1))[:samples], y=np.tile(y, reps)[:samples])
    return path


def main():
    from minsharp_ref.distributed import connect

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--model", default="lenet_torchscript")
    p.add_argument("--shard-size", type=int, default=None)
    args = p.parse_args()
    model = minsharp_ref.onnx_import.import_model(ROOT / "fixtures" / f"{args.model}.onnx")
    kwargs = dict(mean=[0.5], std=[0.5], provider="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp), args.samples)
        t = time.perf_counter()
        cluster = connect("local:2")  # as --dask local:2 does
        client = cluster.__enter__()
        startup = time.perf_counter() - t
        minsharp_ref.score(model, data, limit=200, client=client, **kwargs)  # workers import
        local, dask = [], []
        for r in range(args.rounds):
            t = time.perf_counter()
            a = minsharp_ref.score(model, data, **kwargs)
            local.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = minsharp_ref.score(model, data, client=client, shard_size=args.shard_size, **kwargs)
            dask.append(time.perf_counter() - t)
            print(f"round {r + 1}: local {local[-1]:.2f} s, dask local:2 {dask[-1]:.2f} s "
                  f"({b.distributed['shards']} shards of {b.distributed['shard_size']}), "
                  f"ratio {dask[-1] / local[-1]:.3f}", flush=True)
        cluster.__exit__(None, None, None)
    rel = abs(b.minimum_sharpness / a.minimum_sharpness - 1)
    best_local, best_dask = min(local), min(dask)
    print(f"{args.model}, {args.samples} samples: local {best_local:.2f} s "
          f"({args.samples / best_local / 2:.0f} samples/s per core), dask local:2 "
          f"{best_dask:.2f} s; overhead {100 * (best_dask / best_local - 1):+.1f}% (fastest "
          f"of {args.rounds}); median ratio {np.median(np.array(dask) / np.array(local)):.3f}")
    print(f"cluster start-up (not included above): {startup:.1f} s; minimum sharpness "
          f"local vs dask: relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
