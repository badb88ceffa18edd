"""Release gates: compare a score report with the report of the last release (the
baseline) and decide (docs/method.md section 6, "Comparing two reports"). Pure functions on
the JSON documents (docs/json.md); the CLI wires them to ``--baseline``, ``--max-increase``,
``--gate``, ``--sigma`` and ``--max-sharpness``.

A gate on quantity q with baseline value b, current value v and allowance a (``10%``:
a = 0.10·|b|; ``3``: a = 3) fails when v > b + a (for accuracy, which gates a decrease:
v < b − a). With ``--sigma K`` it fails only when, in addition, the worsening exceeds K
standard errors of the difference, s = √(s_v² + s_b²) (the two reports' standard errors
over samples, treated as independent). A change with |v − b| ≤ K·s (K = 2 without
``--sigma``) is reported as within noise. Where a report has no standard error for the
quantity (a report written before ``loss_stderr`` existed, a single sample), s is unknown:
the verdict says so and ``--sigma`` does not apply (the plain comparison decides).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import MinsharpError

SCORE_SCHEMA = "minsharp-ref/score/v1"
#: quantity → (label, direction that worsens: +1 an increase, −1 a decrease)
QUANTITIES = {"minimum_sharpness": ("minimum sharpness", 1), "trace": ("naive trace", 1),
              "loss": ("loss", 1), "accuracy": ("accuracy", -1)}
NOISE_SIGMA = 2.0  # "within noise" in the report when --sigma is not given


@dataclass(frozen=True)
class Threshold:
    """An allowed worsening: a fraction of the baseline value (``10%``) or an absolute one."""

    value: float
    relative: bool
    text: str

    def allowance(self, baseline: float) -> float:
        return self.value * abs(baseline) if self.relative else self.value


def parse_threshold(text: str, option: str) -> Threshold:
    """``10%`` (relative to the baseline value) or ``2.5`` (absolute), non-negative."""
    t = text.strip()
    relative = t.endswith("%")
    try:
        value = float(t[:-1] if relative else t)
    except ValueError:
        raise MinsharpError(f"{option} {text!r}: not a number or a percentage like 10%") from None
    if not (value >= 0 and math.isfinite(value)):
        raise MinsharpError(f"{option} {text!r}: must be a finite non-negative number")
    return Threshold(value / 100 if relative else value, relative, t)


def parse_gates(spec: Optional[str], max_increase: Optional[str], sigma: Optional[float],
                with_baseline: bool) -> dict[str, Threshold]:
    """The gated quantities and their thresholds: minimum sharpness at ``--max-increase``,
    plus each ``--gate`` entry (``trace``, ``loss:2%``, ``accuracy:0.01``; an entry without
    a threshold takes ``--max-increase``). Checks ``--sigma`` too; all need a baseline."""
    if sigma is not None and not (sigma >= 0 and math.isfinite(sigma)):
        raise MinsharpError(f"--sigma must be a finite non-negative number, not {sigma}")
    if (max_increase is not None or spec is not None or sigma is not None) and not with_baseline:
        raise MinsharpError("--max-increase, --gate and --sigma compare with a baseline: "
                            "give --baseline LAST.json")
    default = None if max_increase is None else parse_threshold(max_increase, "--max-increase")
    gates = {} if default is None else {"minimum_sharpness": default}
    for entry in [] if spec is None else [e.strip() for e in spec.split(",")]:
        name, _, threshold = entry.partition(":")
        if name not in QUANTITIES:
            raise MinsharpError(f"--gate {entry!r}: unknown quantity {name!r} (one of "
                                f"{', '.join(QUANTITIES)})")
        if threshold:
            gates[name] = parse_threshold(threshold, f"--gate {name}")
        elif default is not None:
            gates[name] = default
        else:
            raise MinsharpError(f"--gate {entry!r} needs a threshold: give --max-increase or "
                                f"{name}:10%")
    return gates


def load_baseline(path) -> tuple[dict, str]:
    """The baseline score document and the sha256 of its bytes."""
    path = Path(path)
    if not path.is_file():
        raise MinsharpError(f"{path}: no such baseline file")
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MinsharpError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCORE_SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise MinsharpError(f'{path}: not a score report (schema {found!r}, expected '
                            f'"{SCORE_SCHEMA}": write it with score --json)')
    for key, kind in (("data", dict), ("layers", list), ("minimum_sharpness", (int, float)),
                      ("trace", (int, float))):
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise MinsharpError(f'{path}: "{key}" is missing or not a JSON {_kind_name(kind)}')
    if not all(isinstance(layer, dict) for layer in doc["layers"]):
        raise MinsharpError(f'{path}: "layers" must hold objects')
    for key in QUANTITIES:
        value = doc.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MinsharpError(f'{path}: "{key}" is not a number: {value!r}')
    return doc, hashlib.sha256(raw).hexdigest()


def _kind_name(kind) -> str:
    return {dict: "object", list: "array"}.get(kind, "number")


def _structure(doc: dict) -> list[str]:
    return [f"{l.get('kind')} {'x'.join(map(str, l.get('weight_shape', [])))}"
            + ("+bias" if l.get("bias") is not None else "") for l in doc.get("layers", [])]


def mismatches(doc: dict, baseline: dict) -> list[str]:
    """Why the two reports are not comparable: data file (by name: the directory may differ
    between runners), keys, sample count, loss kind, preprocessing, layer structure (kind,
    stored weight shape, bias). Empty when comparable."""
    notes = []
    d, b = doc["data"], baseline["data"]
    if Path(str(d.get("path"))).name != Path(str(b.get("path"))).name:
        notes.append(f"data file differs: baseline {Path(str(b.get('path'))).name}, now "
                     f"{Path(str(d.get('path'))).name}")
    keys = lambda x: f"[{x.get('x_key')}, {x.get('y_key')}]"  # noqa: E731
    if keys(d) != keys(b):
        notes.append(f"data keys differ: baseline {keys(b)}, now {keys(d)}")
    if d.get("samples") != b.get("samples"):
        notes.append(f"sample count differs: baseline {b.get('samples')}, now {d.get('samples')}")
    loss_kind = lambda x: x.get("loss_kind", "cross-entropy")  # noqa: E731  (older reports)
    if loss_kind(doc) != loss_kind(baseline):
        notes.append(f"loss differs: baseline {loss_kind(baseline)}, now {loss_kind(doc)}")
    if list(d.get("preprocessing", [])) != list(b.get("preprocessing", [])):
        notes.append(f"preprocessing differs: baseline {'; '.join(b.get('preprocessing', [])) or 'none'}, "
                     f"now {'; '.join(d.get('preprocessing', [])) or 'none'}")
    ours, theirs = _structure(doc), _structure(baseline)
    if ours != theirs:
        if len(ours) != len(theirs):
            notes.append(f"layer structure differs: baseline {len(theirs)} layers, now {len(ours)}")
        else:
            i = next(i for i, (a, c) in enumerate(zip(ours, theirs)) if a != c)
            notes.append(f"layer structure differs at layer {i + 1}: baseline {theirs[i]}, now {ours[i]}")
    return notes


def stderr_of(doc: dict, quantity: str) -> Optional[float]:
    """Standard error over samples: recorded for minimum sharpness, the naive trace and the
    loss (``*_stderr``; older reports have none for the loss); binomial √(p(1−p)/n) for
    accuracy. None when unknown."""
    if quantity == "accuracy":
        p, n = doc.get("accuracy"), doc["data"].get("samples")
        return None if p is None or not n else math.sqrt(p * (1 - p) / n)
    se = doc.get(f"{quantity}_stderr")
    return se if isinstance(se, (int, float)) and math.isfinite(se) else None


def changes(doc: dict, baseline: dict, sigma: Optional[float] = None) -> list[dict]:
    """Every quantity that both reports have, compared: change, relative change, standard
    error of the difference, the change in standard errors (z) and whether it is within
    noise (|z| ≤ K, K = --sigma or 2)."""
    out = []
    for quantity, (label, _) in QUANTITIES.items():
        value, base = doc.get(quantity), baseline.get(quantity)
        if value is None or base is None:
            continue
        se_now, se_base = stderr_of(doc, quantity), stderr_of(baseline, quantity)
        se = None if se_now is None or se_base is None else math.hypot(se_now, se_base)
        z = (value - base) / se if se else None
        k = NOISE_SIGMA if sigma is None else sigma
        missing = [name for name, s in (("baseline", se_base), ("this run", se_now)) if s is None]
        out.append({"quantity": quantity, "label": label, "value": value, "baseline": base,
                    "change": value - base,
                    "relative_change": (value - base) / abs(base) if base else None,
                    "stderr_difference": se, "z": z,
                    "within_noise": None if se is None else abs(value - base) <= k * se,
                    "stderr_missing": missing})
    return out


def evaluate(compared: list[dict], thresholds: dict[str, Threshold],
             sigma: Optional[float]) -> list[dict]:
    """One verdict per gated quantity (docs/json.md, ``gates``), from ``changes``."""
    by_quantity = {c["quantity"]: c for c in compared}
    verdicts = []
    for quantity, threshold in thresholds.items():
        label, direction = QUANTITIES[quantity]
        c = by_quantity.get(quantity)
        if c is None:
            raise MinsharpError(f"--gate {quantity}: this run or the baseline has no {label} "
                                "(data without labels?)")
        value, base, se, z = c["value"], c["baseline"], c["stderr_difference"], c["z"]
        limit = base + direction * threshold.allowance(base)
        exceeded = value > limit if direction > 0 else value < limit
        beyond_sigma = sigma is None or se is None or direction * (value - base) > sigma * se
        passed = not (exceeded and beyond_sigma)
        sign = "+" if direction > 0 else "-"
        rule = f"{'≤' if direction > 0 else '≥'} baseline {sign} {threshold.text}" \
            + ("" if sigma is None else f" and beyond {sigma:g} s.e.")
        note = None
        if sigma is not None and se is None:  # e.g. a baseline written before loss_stderr
            whose = " and ".join(c.get("stderr_missing") or ["a report"])
            note = (f"no standard error of the {label} in {whose}: --sigma {sigma:g} not "
                    "applied, plain comparison")
        message = None
        if not passed:
            message = (f"{label} {value:.6g} {'>' if direction > 0 else '<'} {limit:.6g} (baseline "
                       f"{base:.6g} {sign} {threshold.text})")
            if sigma is not None:
                message += (f", {z:+.1f} s.e. of the difference (--sigma {sigma:g})" if z is not None
                            else f"; {note}")
        verdicts.append({"quantity": quantity, "label": label, "value": value, "baseline": base,
                         "threshold": threshold.text, "limit": limit, "sigma": sigma, "rule": rule,
                         "exceeded": exceeded, "passed": passed, "message": message,
                         "note": note})
    return verdicts


def max_sharpness_gate(doc: dict, limit: float) -> dict:
    """``--max-sharpness X``: minimum sharpness ≤ X (a NaN X never fails)."""
    value = doc["minimum_sharpness"]
    passed = not value > limit
    return {"quantity": "minimum_sharpness", "label": "minimum sharpness", "value": value,
            "baseline": None, "threshold": f"{limit:g}", "limit": limit, "sigma": None,
            "rule": f"≤ {limit:g} (--max-sharpness)", "exceeded": not passed, "passed": passed,
            "message": None if passed else f"minimum sharpness {value:.6g} > --max-sharpness {limit:g}",
            "note": None}


def with_gates(doc: dict, path, baseline: Optional[dict], digest: Optional[str],
               thresholds: dict[str, Threshold], sigma: Optional[float],
               max_sharpness: Optional[float]) -> dict:
    """``doc`` with ``baseline`` (the comparison with the baseline report read from ``path``,
    whose bytes have SHA-256 ``digest``) and ``gates`` (every verdict) added where asked.
    Raises MinsharpError, naming every difference, when the baseline is not comparable."""
    doc = dict(doc)
    gates = []
    if baseline is not None:
        notes = mismatches(doc, baseline)
        if notes:
            raise MinsharpError(f"{path}: not comparable with this run: {'; '.join(notes)}")
        compared = changes(doc, baseline, sigma)
        doc["baseline"] = {"path": str(path), "sha256": digest,
                           "model_sha256": baseline.get("model", {}).get("sha256"),
                           "minsharp_ref_version": baseline.get("minsharp_ref_version"),
                           "changes": compared}
        gates = evaluate(compared, thresholds, sigma)
    if max_sharpness is not None:
        gates.append(max_sharpness_gate(doc, max_sharpness))
    if gates:
        doc["gates"] = gates
    return doc
