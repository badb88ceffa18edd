"""The ResNet fixture on 1,000 MNIST samples beside BackPACK, side by side, interleaved.

Optional tooling: needs torch and backpack-for-pytorch (``pip install --no-deps
backpack-for-pytorch unfoldNd einops`` keeps the project's CPU torch). The torch model is
``fixtures/make_resnet_fixtures.py``'s ResNet, with the parameters and running
statistics read from the ONNX file (the legacy export keeps the module names); in float32,
as the performance anchors are (BackPACK's conv rules fail on float64 here). BackPACK
handles the residual Adds through its graph converter (``extend(model,
use_converter=True)``) and computes the exact diagonal of the generalised Gauss-Newton
matrix (``DiagGGNExact``), which for these piecewise-linear networks is the Hessian's
diagonal (docs/method.md section 2): its per-tensor sums are our traces. Each round times
minsharp-ref (NumPy float64 reference forward, or onnxruntime with ``--provider cpu``;
BatchNorm networks also get the folded network's traces) and BackPACK once, alternating the
order; the fastest round of each is reported with the ratio, and the traces are compared.

    python benchmarks/bench_resnet.py [--model resnet_bn_torchscript] [--samples 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import warnings
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "fixtures"))

from minsharp_ref.api import traces_over  # noqa: E402
from minsharp_ref.engine import tensor_columns  # noqa: E402
from minsharp_ref.onnx_import import import_model  # noqa: E402


def torch_model(path: Path, bn: bool):
    import torch

    from make_resnet_fixtures import ResNet

    proto = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:  # the legacy exporter's merged copies
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    model = ResNet(bn=bn).eval()  # float32: BackPACK's conv rules build float32 modules
    state = {k: torch.from_numpy(values[k].astype(np.float32)) if k in values else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


def backpack_traces(model, x: np.ndarray, batch: int) -> dict[str, float]:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model = extend(model, use_converter=True)
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    sums: dict[str, float] = {}
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(x[s:s + batch].astype(np.float32))
        model.zero_grad()
        logits = model(xb)
        y = logits.argmax(dim=1)  # the GGN does not depend on the labels
        with backpack(DiagGGNExact()):
            loss_fn(logits, y).backward()
        for name, p in model.named_parameters():
            sums[name] = sums.get(name, 0.0) + float(p.diag_ggn_exact.sum())
    return {k: v / len(x) for k, v in sums.items()}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet_bn_torchscript")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--provider", default="numpy")
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="Full backward hook")
    path = ROOT / "fixtures" / f"{args.model}.onnx"
    with np.load(ROOT / "fixtures" / "mnist_subset.npz", allow_pickle=False) as d:
        x = ((d["x_train"][:args.samples].astype(np.float64) / 255 - 0.5) / 0.5)[:, None]
    imported = import_model(path)
    model = torch_model(path, imported.network.has_batchnorm)
    best = {"minsharp-ref": np.inf, "backpack": np.inf}
    for r in range(args.rounds):
        for who in (["minsharp-ref", "backpack"] if r % 2 == 0 else ["backpack", "minsharp-ref"]):
            t0 = time.perf_counter()
            if who == "minsharp-ref":
                batches = [x[i:i + args.batch] for i in range(0, len(x), args.batch)]
                run = traces_over(imported, iter(batches), None, args.provider, check=False)
            else:
                theirs = backpack_traces(model, x, args.batch)
            best[who] = min(best[who], time.perf_counter() - t0)
    cols = [n for _, _, n in tensor_columns(imported.network)]
    ours = dict(zip(cols, run.sums.mean[:len(cols)]))
    rel = max(abs(ours[k] - theirs[k]) / theirs[k] for k in cols)
    print(f"{args.model}, {len(x)} samples: minsharp-ref ({args.provider}) {best['minsharp-ref']:.2f} s, "
          f"BackPACK DiagGGNExact {best['backpack']:.2f} s, ratio minsharp-ref/BackPACK "
          f"{best['minsharp-ref'] / best['backpack']:.2f} (fastest of {args.rounds} interleaved "
          f"rounds); per-tensor traces agree to {rel:.1e} relative")
    return 0


if __name__ == "__main__":
    sys.exit(main())
