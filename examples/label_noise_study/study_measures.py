"""The measures of the label-noise study, one small adapter each.

Each score adapter reads one measure from minsharp-ref's score JSON document
(``ScoreResult.to_dict()``, docs/json.md) and returns ``{name: value, name_stderr: error}``
under the name the score JSON uses, or ``{}`` when this minsharp-ref does not report it, so
that a measure added to minsharp-ref appears in the study without restructuring it.
λ_max comes from the ``spectrum`` command (its JSON ``top[0].value`` and
``lambda_max_at_alpha_star``) when this minsharp-ref has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

Doc = dict
Fields = dict[str, Optional[float]]

#: every measure the study knows, in table order; a study records those available
MEASURES = ("trace", "minimum_sharpness", "normalised_sharpness", "neuron_minimum_sharpness",
            "lambda_max", "lambda_max_at_alpha_star")
#: unchanged by an α-scale transformation (docs/method.md section 5), and those it moves
INVARIANT = ("minimum_sharpness", "normalised_sharpness", "neuron_minimum_sharpness",
             "lambda_max_at_alpha_star")
SCALE_DEPENDENT = ("trace", "lambda_max")


def _pair(name: str, value, stderr) -> Fields:
    return {name: None if value is None else float(value),
            f"{name}_stderr": None if stderr is None else float(stderr)}


def trace(doc: Doc) -> Fields:
    """Naive trace Tr H (docs/method.md: the sum of the per-tensor traces) ± its stderr."""
    return _pair("trace", doc["trace"], doc.get("trace_stderr"))


def minimum_sharpness(doc: Doc) -> Fields:
    """Minimum sharpness (the trace minimised over α-scale transformations) ± its stderr."""
    return _pair("minimum_sharpness", doc["minimum_sharpness"], doc.get("minimum_sharpness_stderr"))


def _measure(doc: Doc, name: str) -> Fields:
    """``measures.<name>`` ({value, stderr, ...}) of a ``--measures`` report, or {}."""
    entry = (doc.get("measures") or {}).get(name)
    if not isinstance(entry, dict) or entry.get("value") is None:
        return {}
    return _pair(name, entry["value"], entry.get("stderr"))


def normalised_sharpness(doc: Doc) -> Fields:
    """Normalised sharpness (Tsuzuku et al. 2020, from the exact diagonal); the report gives
    no standard error for it, so ``_stderr`` is null."""
    return _measure(doc, "normalised_sharpness")


def neuron_minimum_sharpness(doc: Doc) -> Fields:
    """Neuron-wise minimum sharpness (minimised over per-unit rescalings), when reported."""
    return _measure(doc, "neuron_minimum_sharpness")


SCORE_ADAPTERS: tuple[Callable[[Doc], Fields], ...] = (
    trace, minimum_sharpness, normalised_sharpness, neuron_minimum_sharpness)


def from_score(doc: Doc) -> Fields:
    out: Fields = {}
    for adapter in SCORE_ADAPTERS:
        out.update(adapter(doc))
    return out


def spectrum_available() -> bool:
    """True when this minsharp-ref has the spectrum (λ_max) of docs/cli.md."""
    import minsharp_ref

    return hasattr(minsharp_ref, "hessian_operator")


def _value(entry):
    """A spectrum JSON eigenvalue: a number or {value, residual}."""
    return entry.get("value") if isinstance(entry, dict) else entry


def from_spectrum(model: Path, data: Path, limit: int, mean: float, std: float) -> Fields:
    """λ_max of the network as given and at its minimum-sharpness point α*, from
    ``minsharp-ref spectrum MODEL --data DATA --json`` on the first ``limit`` samples (the
    CLI's JSON is the documented contract). λ_max is not a sample mean: no stderr."""
    if not spectrum_available():
        return {}
    import minsharp_ref

    package_root = str(Path(minsharp_ref.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spectrum.json"
        cmd = [sys.executable, "-c", "from minsharp_ref.cli import main; main()", "spectrum",
               str(model), "--data", str(data), "--mean", str(mean), "--std", str(std),
               "--limit", str(limit), "--json", str(out), "--quiet"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"spectrum failed on {model}: {done.stderr.strip()}")
        return spectrum_fields(json.loads(out.read_text()))


def spectrum_fields(doc: Doc) -> Fields:
    """``lambda_max`` (``top[0]``) and ``lambda_max_at_alpha_star`` of a spectrum JSON
    document; each eigenvalue may be a number or {value, residual}."""
    fields = _pair("lambda_max", _value(doc["top"][0]), None)
    if doc.get("lambda_max_at_alpha_star") is not None:
        fields.update(_pair("lambda_max_at_alpha_star", _value(doc["lambda_max_at_alpha_star"]), None))
    return fields


def present(records: list[dict]) -> list[str]:
    """The measures recorded (with a value) in every record, in table order."""
    return [m for m in MEASURES if records and all(r.get(m) is not None for r in records)]
