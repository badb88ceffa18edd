"""Cross-check of the full torchvision models (developer tooling; skipped without torchvision).

Each model is built as a user builds it (fixtures/make_torchvision_fixtures.py:
``torchvision.models.<name>(num_classes=10)``, BatchNorm statistics from real images, eval
mode, the legacy exporter with ``do_constant_folding=False``), exported to a temporary
directory and scored on two images by both engines; the oracle is torch float64 autograd on
the nn.Module itself. Per tensor: 1e-9 (NumPy engine) and 1e-5 (onnxruntime engine) relative
to the tensor's trace plus 1e-9 of the total trace.

By default the three models of issue 20's definition of done (minutes on 2 cores);
``MINSHARP_TORCHVISION=all`` (or a comma-separated list of names, ``name:dynamo`` for the
dynamo exporter) runs more. Install: ``pip install -e '.[crosscheck-torchvision]'``.
"""

from __future__ import annotations

import os
import sys

import pytest

try:  # a torchvision built for another torch fails at import with a RuntimeError
    import torchvision  # noqa: F401
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"torchvision not usable ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                "torchvision cross-check skipped (pip install -e '.[crosscheck-torchvision]')",
                allow_module_level=True)

from conftest import ROOT  # noqa: E402
from minsharp_ref import score_arrays  # noqa: E402
from minsharp_ref.onnx_import import import_model  # noqa: E402

sys.path.insert(0, str(ROOT / "fixtures"))
import make_torchvision_fixtures as tv  # noqa: E402

DEFAULT = ["squeezenet1_1", "googlenet", "shufflenet_v2_x0_5"]
ALL = DEFAULT + ["squeezenet1_0", "shufflenet_v2_x0_5:dynamo", "googlenet:dynamo",
                 "googlenet+transform_input", "resnet18", "resnet50",
                 "wide_resnet50_2", "resnext50_32x4d", "densenet121", "mnasnet0_5",
                 "regnet_x_400mf", "inception_v3", "vgg11", "vgg11_bn", "alexnet"]
CHOICE = os.environ.get("MINSHARP_TORCHVISION", "")
NAMES = ALL if CHOICE == "all" else (CHOICE.split(",") if CHOICE else DEFAULT)
TOLERANCE = {"numpy": 1e-9, "onnxruntime": 1e-5}


@pytest.mark.parametrize("name", NAMES)
def test_full_model_matches_torch_float64(name, tmp_path):
    base, dynamo = name.split(":")[0], name.endswith(":dynamo")
    model, size = tv.full_model(base)
    entry = tv.build(base, lambda: model, size, str(tmp_path), dynamo=dynamo)
    imported = import_model(tmp_path / entry["file"])
    x = tv.inputs(entry["samples"], size)
    want, total = entry["traces"], entry["trace"]
    for engine, rtol in TOLERANCE.items():
        layers, _, _ = score_arrays(imported, x, engine=engine,
                                    provider="numpy" if engine == "numpy" else "cpu")
        got = {}
        for layer in layers:
            got[layer.weight] = layer.trace_weight
            if layer.bias is not None:
                got[layer.bias] = layer.trace_bias
        assert set(got) == set(want), name
        bad = {k: (got[k], v) for k, v in want.items()
               if not abs(got[k] - v) <= rtol * (abs(v) + 1e-9 * total)}
        assert not bad, f"{name} on {engine}: (ours, torch) {bad}"
