#!/usr/bin/env python
"""Does minimum sharpness predict generalisation? The random-label study of Ibayashi et al.
(2021), end to end, on the MNIST subset shipped in fixtures/.

For each architecture (LeNet-5 and a 784-256-256-10 MLP), each fraction p of randomised
training labels and each seed, the script trains a network in PyTorch until its training
accuracy (on the labels it is trained on) reaches 0.99 or its epoch budget runs out, exports
it to ONNX (the legacy TorchScript exporter), writes one function-preserving α-rescaled copy
(powers of two, so the float32 copy computes exactly the same function), scores both with
minsharp-ref's Python API on their training images, and measures both networks'
generalisation gap with onnxruntime. Then it writes

    OUT/results.json        one record per scored network (the copy has "rescaled": true)
    OUT/kendall.md          Kendall τ between each measure and the gap
    OUT/summary.md          per architecture and noise level, the means over seeds
    OUT/measures_vs_gap.png each measure against the gap, rescaled copies marked

Run from the repository root (needs the ``study`` extra: torch==2.13.0, matplotlib):

    python examples/label_noise_study/study.py --quick --out study/

See examples/label_noise_study/README.md and docs/case-study.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))  # study_report, run as a script or imported by the test

import study_measures  # noqa: E402
import study_report  # noqa: E402

MEAN, STD = 0.5, 0.5
CLASSES = 10
OPSET = 17
IR_VERSION_MAX = 10
ARCHITECTURES = ("lenet", "mlp")


@dataclass(frozen=True)
class Config:
    """One study's size. ``epochs`` is each architecture's epoch budget: training stops at
    the first epoch whose training accuracy reaches ``target_accuracy``, or after it."""

    noise: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    architectures: tuple[str, ...] = ARCHITECTURES
    train_images: int = 1000        # the first n training images of the subset
    score_images: int = 1000        # the first n of those scored by minsharp-ref
    spectrum_images: int = 128      # the first n of those for λ_max (when available; 0: off)
    epochs: tuple[tuple[str, int], ...] = (("lenet", 200), ("mlp", 200))
    target_accuracy: float = 0.99
    learning_rate: float = 1e-3
    batch_size: int = 64
    alpha_octaves: int = 6          # log2 α per layer drawn from −6..6, Π α = 1
    threads: int = 1

    def epoch_budget(self, architecture: str) -> int:
        return dict(self.epochs)[architecture]


FULL = Config()
# λ_max costs about 90 Hessian-vector products per network (Lanczos, as given and at α*):
# minutes for a LeNet on a shared CPU, so the quick and smoke sizes leave it out
QUICK = Config(noise=(0.0, 0.6, 1.0), seeds=(0,), train_images=500, score_images=500,
               spectrum_images=0, epochs=(("lenet", 80), ("mlp", 80)))
SMOKE = Config(noise=(0.0, 1.0), seeds=(0,), train_images=200, score_images=100,
               spectrum_images=0, epochs=(("lenet", 8), ("mlp", 8)))


class StudyError(Exception):
    """Bad input: reported as one ``error:`` line, exit status 2."""


# --------------------------------------------------------------------------- data
def load_data(path: Path, config: Config):
    """(x_train uint8, y_train true labels, x_test uint8, y_test) of the fixture subset."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in keys if k not in d.files]
            if missing:
                raise StudyError(f"{path} has no {', '.join(missing)}")
            x, y, xt, yt = (d[k] for k in keys)
    except (OSError, ValueError) as e:
        raise StudyError(f"cannot read {path}: {e}") from None
    n = config.train_images
    if n > len(x) or x.dtype != np.uint8 or x.shape[1:] != (28, 28):
        raise StudyError(f"{path}: needs at least {n} uint8 28×28 training images, has "
                         f"{len(x)} of {x.dtype} {x.shape[1:]}")
    return x[:n], y[:n].astype(np.int64), xt, yt.astype(np.int64)


def preprocess(x_uint8: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 → (N, 1, 28, 28) float32, (x/255 − 0.5) / 0.5 (as score's mean/std)."""
    return ((x_uint8.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]


def noisy_labels(y: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Replace the labels of round(noise·N) training images, chosen at random, by labels
    drawn uniformly from the 10 classes (a replaced label equals the true one with
    probability 1/10, as in Zhang et al. 2017)."""
    rng = np.random.default_rng([seed, round(noise * 100)])
    out = y.copy()
    chosen = rng.choice(len(y), size=round(noise * len(y)), replace=False)
    out[chosen] = rng.integers(0, CLASSES, size=len(chosen))
    return out


# --------------------------------------------------------------------------- models
def build(architecture: str):
    """LeNet-5 (three convolutions and one hidden fully connected layer, as in the paper's
    appendix D; ReLU and max pooling) or a three-layer MLP, 784-256-256-10."""
    import torch.nn as nn

    if architecture == "lenet":
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 28 → 28 → 14
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),            # 14 → 10 → 5
            nn.Conv2d(16, 120, 5), nn.ReLU(),                           # 5 → 1
            nn.Flatten(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, CLASSES),
        )
    if architecture == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, CLASSES),
        )
    raise ValueError(architecture)


def train(architecture: str, x: np.ndarray, y: np.ndarray, seed: int, config: Config):
    """Adam (lr ``config.learning_rate``, no weight decay), mini-batches of
    ``config.batch_size`` reshuffled each epoch, until the training accuracy on ``y``
    reaches ``config.target_accuracy`` or the architecture's epoch budget is spent.
    Returns (model in eval mode, epochs run, final training accuracy)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = build(architecture)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    X, Y = torch.from_numpy(preprocess(x)), torch.from_numpy(y)
    epochs, accuracy = 0, 0.0
    while epochs < config.epoch_budget(architecture) and accuracy < config.target_accuracy:
        model.train()
        perm = torch.randperm(len(X), generator=generator)
        for i in range(0, len(X), config.batch_size):
            idx = perm[i:i + config.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
        epochs += 1
        model.eval()
        with torch.no_grad():
            accuracy = float((model(X).argmax(1) == Y).double().mean())
    return model, epochs, accuracy


def export(model, path: Path) -> None:
    """Legacy TorchScript exporter (dynamo=False), opset 17, dynamic batch, ir_version ≤ 10."""
    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    if proto.ir_version > IR_VERSION_MAX:
        proto.ir_version = IR_VERSION_MAX
        onnx.save(proto, str(path))


def rescale_copy(path: Path, out: Path, seed: list[int], octaves: int) -> list[float]:
    """Write an α-rescaled copy of ``path`` (docs/method.md section 5: W_d → α_d W_d,
    b_d → (Π_{j≤d} α_j) b_d, Π α_d = 1) with α_d = 2^k_d, k_d drawn from −octaves..octaves:
    multiplying float32 weights by powers of two is exact, so the copy computes bit for bit
    the function of the original and its minimum sharpness must agree to rounding."""
    import onnx
    from minsharp_ref.onnx_import import import_model
    from minsharp_ref.rescale import alpha_parameters, apply_to_proto

    imported = import_model(path)
    d = len(imported.network.param_layers)
    rng = np.random.default_rng(seed)
    while True:
        k = rng.integers(-octaves, octaves + 1, size=d - 1)
        k = np.append(k, -k.sum())
        if np.any(k != 0) and abs(k[-1]) <= octaves:
            break
    alpha = 2.0 ** k.astype(np.float64)
    onnx.save(apply_to_proto(imported.proto, alpha_parameters(imported.network, alpha)), str(out))
    return alpha.tolist()


# --------------------------------------------------------------------------- evaluation
def evaluate(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the ONNX model at ``path`` on images ``x`` against
    labels ``y``, in onnxruntime (float32 logits, float64 stable log-softmax)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    z = session.run(None, {session.get_inputs()[0].name: preprocess(x)})[0].astype(np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float((z.argmax(axis=1) == y).mean()), float(-log_p[np.arange(len(y)), y].mean())


def network_record(path: Path, data_npz: Path, base: dict, x_train, y_noisy, x_test, y_test,
                   config: Config) -> dict:
    """Score one ONNX network and measure its gap: one record of results.json."""
    import minsharp_ref

    train_acc, train_loss = evaluate(path, x_train, y_noisy)
    test_acc, test_loss = evaluate(path, x_test, y_test)
    start = time.perf_counter()
    doc = minsharp_ref.score(path, data_npz, mean=[MEAN], std=[STD], measures=True,
                             limit=config.score_images).to_dict()
    record = dict(base, train_accuracy=train_acc, test_accuracy=test_acc,
                  gap=train_acc - test_acc, train_loss=train_loss, test_loss=test_loss,
                  loss_gap=test_loss - train_loss, scored_samples=doc["data"]["samples"],
                  scored_accuracy=doc["accuracy"], alpha_star=[l["alpha"] for l in doc["layers"]])
    record.update(study_measures.from_score(doc))
    if config.spectrum_images > 0:
        record.update(study_measures.from_spectrum(
            path, data_npz, min(config.spectrum_images, config.train_images), MEAN, STD))
    record["score_seconds"] = time.perf_counter() - start
    return record


# --------------------------------------------------------------------------- the study
def write_json(path: Path, value) -> None:
    """Atomically: a temporary file in the same folder, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is not what a results file should have
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def one_network(architecture: str, noise: float, seed: int, data, config: Config,
                work: Path) -> list[dict]:
    """Train, export, rescale and score one network: its record and its copy's."""
    x_train, y_true, x_test, y_test = data
    y_noisy = noisy_labels(y_true, noise, seed)
    start = time.perf_counter()
    model, epochs, accuracy = train(architecture, x_train, y_noisy, seed, config)
    train_seconds = time.perf_counter() - start
    stem = f"{architecture}_p{round(noise * 100):03d}_s{seed}"
    original, copy, data_npz = work / f"{stem}.onnx", work / f"{stem}_rescaled.onnx", work / f"{stem}.npz"
    export(model, original)
    np.savez(data_npz, x_train=x_train, y_train=y_noisy)  # scored on the labels trained on
    alpha = rescale_copy(original, copy, [seed, round(noise * 100), 21], config.alpha_octaves)
    base = dict(architecture=architecture, noise=noise, seed=seed, epochs=epochs,
                epoch_budget=config.epoch_budget(architecture),
                reached_target=accuracy >= config.target_accuracy,
                labels_changed=float((y_noisy != y_true).mean()), train_seconds=train_seconds)
    records = []
    for path, rescaled in ((original, False), (copy, True)):
        records.append(network_record(path, data_npz, dict(base, rescaled=rescaled,
                                                           alpha=alpha if rescaled else None),
                                      x_train, y_noisy, x_test, y_test, config))
    for p in (original, copy, data_npz):
        p.unlink()
    return records


def run(config: Config, data_path: Path, out: Path, mode: str) -> list[dict]:
    data = load_data(data_path, config)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("matplotlib") is None:
        raise StudyError("the study needs torch and matplotlib: pip install 'minsharp-ref[study]'")
    import torch

    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    start = time.perf_counter()
    runs = [(a, p, s) for s in config.seeds for p in config.noise for a in config.architectures]
    with tempfile.TemporaryDirectory(prefix="label_noise_") as work:
        for i, (architecture, noise, seed) in enumerate(runs, 1):
            records += one_network(architecture, noise, seed, data, config, Path(work))
            r = records[-2]
            print(f"[{i}/{len(runs)}] {architecture} noise {noise:.0%} seed {seed}: "
                  f"{r['epochs']} epochs, train {r['train_accuracy']:.3f} test "
                  f"{r['test_accuracy']:.3f}, MS {r['minimum_sharpness']:.4g} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            write_json(out / "results.json", records)  # partial results survive an interrupt
    meta = dict(mode=mode, config=asdict(config), wall_seconds=time.perf_counter() - start,
                torch=torch.__version__, measures=study_measures.present(records))
    write_json(out / "study.json", meta)
    return records


def _records(args, config: Config, mode: str) -> list[dict]:
    """Run the study, or read OUT/results.json with --report-only."""
    if args.report_only:
        try:
            with open(args.out / "results.json") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise StudyError(f"cannot read {args.out / 'results.json'}: {e}") from None
    for key in ("train_images", "score_images", "threads"):
        if getattr(config, key) < 1:
            raise StudyError(f"--{key.replace('_', '-')} must be at least 1")
    if config.spectrum_images < 0:
        raise StudyError("--spectrum-images must be at least 0")
    if not config.seeds:
        raise StudyError("--seeds must be at least 1")
    return run(config, args.data, args.out, mode)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 noise levels × 1 seed, 500 images (≤ 5 min)")
    size.add_argument("--smoke", action="store_true", help="tiny run for the test (under a minute)")
    parser.add_argument("--out", type=Path, default=Path("study"), help="output folder")
    parser.add_argument("--data", type=Path, default=ROOT / "fixtures" / "mnist_subset.npz")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..n−1)")
    parser.add_argument("--architectures", choices=ARCHITECTURES, nargs="+",
                        help="train only these (default: both)")
    parser.add_argument("--train-images", type=int)
    parser.add_argument("--score-images", type=int)
    parser.add_argument("--spectrum-images", type=int,
                        help="samples for λ_max when available (full: 128; 0: leave it out)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite kendall.md and the figure from OUT/results.json")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    config = {"quick": QUICK, "smoke": SMOKE, "full": FULL}[mode]
    if args.architectures:
        config = replace(config, architectures=tuple(args.architectures))
    if args.seeds is not None:
        config = replace(config, seeds=tuple(range(args.seeds)))
    for key in ("train_images", "score_images", "spectrum_images", "threads"):
        if getattr(args, key) is not None:
            config = replace(config, **{key: getattr(args, key)})
    config = replace(config, score_images=min(config.score_images, config.train_images))
    try:
        records = _records(args, config, mode)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    study_report.write_report(records, args.out)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'kendall.md'}, "
          f"{args.out / 'summary.md'}, {args.out / study_report.FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
