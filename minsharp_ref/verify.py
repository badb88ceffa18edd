"""Compare another framework's numbers with ours, quantity by quantity (``verify``).

Accepted documents: our own ``score --json`` output (schema ``minsharp-ref/score/v1``) or
the minimal ``minsharp-ref/expected/v1`` format (docs/expected.schema.json):

    {"schema": "minsharp-ref/expected/v1", "producer": "...",
     "data": {"samples": 1000, "split": "train", "preprocessing": ["..."]},
     "traces": {"<initializer name>" or "layer<i>.weight"/"layer<i>.bias": value, ...},
     "trace": value, "minimum_sharpness": value}

Per-parameter diagonals come separately as an .npz keyed by initializer name, each array
shaped like the initializer. A quantity passes when |ours − theirs| ≤ atol + rtol·|ours|.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import MinsharpError

EXPECTED_SCHEMA = "minsharp-ref/expected/v1"
VERIFY_SCHEMA = "minsharp-ref/verify/v1"
QUANTITIES = ("trace_weight", "trace_bias", "trace", "minimum_sharpness", "diagonal")
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-8


@dataclass(frozen=True)
class Row:
    quantity: str
    name: str
    ours: Optional[float]
    theirs: Optional[float]
    abs_err: Optional[float]
    rel_err: Optional[float]
    status: str  # PASS, FAIL, MISSING (theirs lacks it), UNKNOWN (ours lacks it)


def parse_tolerances(values: list[str], option: str, default: float) -> dict[str, float]:
    """'1e-5' sets every quantity; 'trace_weight:1e-6' overrides one."""
    tol = {q: default for q in QUANTITIES}
    for v in values or []:
        key, _, num = v.rpartition(":")
        try:
            value = float(num)
        except ValueError:
            raise MinsharpError(f"{option} {v!r}: not a number") from None
        if not value >= 0:
            raise MinsharpError(f"{option} {v!r}: must be non-negative")
        if key and key not in QUANTITIES:
            raise MinsharpError(f"{option} {v!r}: unknown quantity {key!r} (one of {', '.join(QUANTITIES)})")
        for q in ([key] if key else QUANTITIES):
            tol[q] = value
    return tol


def load_expected(path) -> dict:
    """Their document, normalised to {'traces': {key: value}, 'trace', 'minimum_sharpness',
    'samples', 'preprocessing', 'split', 'loss_kind'}."""
    path = Path(path)
    if not path.is_file():
        raise MinsharpError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MinsharpError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MinsharpError(f"{path}: the document must be a JSON object")
    schema = doc.get("schema")
    out: dict = {"traces": {}}
    if schema == "minsharp-ref/score/v1":
        for layer in doc.get("layers", []):
            out["traces"][layer["weight"]] = layer["trace_weight"]
            if layer.get("bias") is not None:
                out["traces"][layer["bias"]] = layer["trace_bias"]
        data = doc.get("data", {})
        out.update(samples=data.get("samples"), preprocessing=data.get("preprocessing"),
                   split=None, trace=doc.get("trace"), minimum_sharpness=doc.get("minimum_sharpness"),
                   loss_kind=doc.get("loss_kind"))
    elif schema == EXPECTED_SCHEMA:
        traces = doc.get("traces", {})
        if not isinstance(traces, dict):
            raise MinsharpError(f'{path}: "traces" must be an object keyed by initializer name')
        out["traces"] = traces
        data = doc.get("data", {}) or {}
        out.update(samples=data.get("samples"), preprocessing=data.get("preprocessing"),
                   split=data.get("split"), trace=doc.get("trace"),
                   minimum_sharpness=doc.get("minimum_sharpness"), loss_kind=doc.get("loss_kind"))
    else:
        raise MinsharpError(f'{path}: unknown schema {schema!r}; expected "{EXPECTED_SCHEMA}" '
                            'or "minsharp-ref/score/v1"')
    from .onnx_import.head import LOSS_KINDS

    if out["loss_kind"] is not None and out["loss_kind"] not in LOSS_KINDS:
        raise MinsharpError(f'{path}: "loss_kind" must be one of {", ".join(LOSS_KINDS)}, not '
                            f'{out["loss_kind"]!r}')
    for key, value in list(out["traces"].items()) + [("trace", out["trace"]),
                                                      ("minimum_sharpness", out["minimum_sharpness"])]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise MinsharpError(f'{path}: value of "{key}" is not a finite number: {value!r}')
    return out


def load_expected_diagonal(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise MinsharpError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise MinsharpError(f"{path}: not a readable .npz without pickles ({exc})") from None


def _row(quantity, name, ours, theirs, rtol, atol) -> Row:
    if theirs is None:
        return Row(quantity, name, ours, None, None, None, "MISSING")
    err = abs(ours - theirs)
    rel = err / abs(ours) if ours != 0 else (0.0 if err == 0 else math.inf)
    ok = err <= atol[quantity] + rtol[quantity] * abs(ours)
    return Row(quantity, name, ours, float(theirs), err, rel, "PASS" if ok else "FAIL")


def compare(result, expected: dict, diagonal_ours: Optional[dict], diagonal_theirs: Optional[dict],
            rtol: dict, atol: dict) -> list[Row]:
    """One row per quantity; theirs keyed by initializer name or 'layer<i>.weight|bias'."""
    rows = []
    theirs = dict(expected["traces"])
    for layer in result.layers:
        for which, name in (("weight", layer.weight), ("bias", layer.bias)):
            if name is None:
                continue
            ours = layer.trace_weight if which == "weight" else layer.trace_bias
            value = theirs.pop(name, theirs.pop(f"layer{layer.index}.{which}", None))
            rows.append(_row(f"trace_{which}", name, ours, value, rtol, atol))
    for key, value in theirs.items():
        rows.append(Row("trace_?", key, None, value, None, None, "UNKNOWN"))
    rows.append(_row("trace", "Tr H", result.trace, expected.get("trace"), rtol, atol))
    rows.append(_row("minimum_sharpness", "MS", result.minimum_sharpness,
                     expected.get("minimum_sharpness"), rtol, atol))
    if diagonal_theirs is not None:
        remaining = dict(diagonal_theirs)
        for name, ours in diagonal_ours.items():
            mine = remaining.pop(name, None)
            if mine is None:
                rows.append(Row("diagonal", name, float(np.max(ours)), None, None, None, "MISSING"))
                continue
            if mine.shape != ours.shape:
                rows.append(Row("diagonal", f"{name} shape {mine.shape} != {ours.shape}", None, None,
                                None, None, "FAIL"))
                continue
            err = np.abs(ours - mine)
            bound = atol["diagonal"] + rtol["diagonal"] * np.abs(ours)
            worst = int(np.argmax(err / np.maximum(bound, np.finfo(float).tiny)))
            scale = float(np.max(np.abs(ours)))
            rel = float(np.max(err) / scale) if scale > 0 else float(np.max(err) > 0) * math.inf
            where = tuple(int(i) for i in np.unravel_index(worst, ours.shape))
            rows.append(Row("diagonal", f"{name} (worst entry {where})",
                            float(ours.flat[worst]), float(mine.flat[worst]), float(np.max(err)), rel,
                            "PASS" if np.all(err <= bound) else "FAIL"))
        for name in remaining:
            rows.append(Row("diagonal", name, None, None, None, None, "UNKNOWN"))
    return rows


def data_mismatches(result, expected: dict) -> list[str]:
    """Recorded differences in the data (and the loss): most mismatches in practice are
    data mismatches."""
    notes = []
    loss = expected.get("loss_kind")
    if loss is not None and loss != result.loss_kind:
        notes.append(f"loss differs: theirs {loss}, ours {result.loss_kind} (see --loss)")
    samples = expected.get("samples")
    if samples is not None and samples != result.data["samples"]:
        notes.append(f"sample count differs: theirs {samples}, ours {result.data['samples']}")
    prep = expected.get("preprocessing")
    if prep is not None:
        prep = [prep] if isinstance(prep, str) else list(prep)
        if [p.strip().lower() for p in prep] != [p.strip().lower() for p in result.data["preprocessing"]]:
            notes.append(f"preprocessing differs: theirs {prep}, ours {result.data['preprocessing']}")
    split = expected.get("split")
    if split is not None and result.data.get("x_key") and not result.data["x_key"].endswith(split) \
            and result.data["x_key"] not in ("x",):
        notes.append(f"split differs: theirs {split!r}, ours key {result.data['x_key']!r}")
    return notes


def table_rows(rows: list[Row]) -> list[list[str]]:
    """The comparison as text cells, header first."""
    fmt = lambda v: "-" if v is None else f"{v:.10g}"  # noqa: E731
    table = [["quantity", "name", "ours", "theirs", "abs err", "rel err", "status"]]
    for r in rows:
        table.append([r.quantity, r.name, fmt(r.ours), fmt(r.theirs),
                      "-" if r.abs_err is None else f"{r.abs_err:.2e}",
                      "-" if r.rel_err is None else f"{r.rel_err:.2e}", r.status])
    return table
