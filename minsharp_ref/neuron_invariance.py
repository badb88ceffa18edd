"""Neuron-wise invariance, checked (``invariance --neurons``, docs/method.md section 13):
rescale every unit (channel) of the network by its own positive factor, drawn with
hypothesis, re-score, and compare the neuron-wise minimum sharpness (invariant: the group
moves s* by the drawn s) with the layer-wise minimum sharpness and the naive trace (which
move)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .api import summarise
from .invariance import INVARIANCE_SCHEMA, log10_alpha_strategy, run_draws, tolerance_of
from .neuron import unit_map, unit_parameters
from .neuron_measure import neuron_optimum, rescaled_model
from .onnx_import import ImportedModel
from .options import RunOptions
from .scoring import traces_over

SEED_BITS = 32


@dataclass(frozen=True)
class NeuronTrial:
    half_width: float  # log10 γ per unit uniform in [−half_width, half_width]
    draw_seed: int  # the generator seed of the per-unit draws
    trace: float
    minimum_sharpness: float  # layer-wise (moves)
    neuron_minimum_sharpness: float  # invariant
    deviation: float


@dataclass
class NeuronInvarianceResult:
    model: dict
    data: dict
    provider: str
    rtol: float
    seed: int
    spread: float
    units: int
    base_trace: float
    base_minimum_sharpness: float
    base_neuron_minimum_sharpness: float
    trials: list[NeuronTrial] = field(default_factory=list)
    falsifying: Optional[tuple[float, int]] = None
    warnings: list[str] = field(default_factory=list)

    @property
    def max_deviation(self) -> float:
        return max((t.deviation for t in self.trials), default=0.0)

    def ratio(self, what: str) -> float:
        values = [getattr(t, what) for t in self.trials] + [getattr(self, "base_" + what)]
        return max(values) / min(values)

    @property
    def passed(self) -> bool:
        return self.falsifying is None and self.max_deviation <= self.rtol

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: max neuron-wise minimum-sharpness deviation {self.max_deviation:.3g} "
                f"(rtol {self.rtol:g}) over {len(self.trials)} draws of {self.units} unit scales; "
                f"max/min ratio of the naive trace {self.ratio('trace'):.3g}, of the layer-wise "
                f"minimum sharpness {self.ratio('minimum_sharpness'):.3g}")

    def to_dict(self) -> dict:
        from . import __version__
        from .api import json_safe

        return json_safe({
            "schema": INVARIANCE_SCHEMA, "minsharp_ref_version": __version__, "group": "neurons",
            "model": self.model, "data": self.data, "provider": self.provider,
            "rtol": self.rtol, "seed": self.seed, "spread_decades": self.spread,
            "units": self.units,
            "base": {"trace": self.base_trace, "minimum_sharpness": self.base_minimum_sharpness,
                     "neuron_minimum_sharpness": self.base_neuron_minimum_sharpness},
            "trials": [dataclasses.asdict(t) for t in self.trials],
            "max_deviation": self.max_deviation, "trace_ratio": self.ratio("trace"),
            "minimum_sharpness_ratio": self.ratio("minimum_sharpness"),
            "falsifying": None if self.falsifying is None else
            {"half_width": self.falsifying[0], "draw_seed": self.falsifying[1]},
            "passed": self.passed, "warnings": self.warnings,
        })


def score_neurons(imported: ImportedModel, batches: list[np.ndarray], options: RunOptions,
                  check: bool):
    """(naive trace, layer-wise MS, neuron-wise MS, the run, warnings)."""
    run = traces_over(imported, iter(batches), None, options.but(diagonal=True), check=check)
    summary = summarise(imported, run.sums, False)
    value = neuron_optimum(imported.network, run.diagonal).result.value
    return (summary.trace, summary.minimum_sharpness, value, run,
            run.warnings + summary.warnings)


def unit_scales(units: int, half_width: float, draw_seed: int) -> np.ndarray:
    """s per unit: log10 e^s uniform in [−|half_width|, |half_width|]."""
    rng = np.random.default_rng(draw_seed)
    return np.log(10.0) * abs(half_width) * rng.uniform(-1.0, 1.0, size=units)


def check_neuron_invariance(imported: ImportedModel, batches: list[np.ndarray], *,
                            options: RunOptions, trials: int, seed: int, spread: float,
                            rtol: Optional[float], data_info: dict,
                            on_trial: Optional[Callable[[NeuronTrial], None]] = None
                            ) -> NeuronInvarianceResult:
    """Each hypothesis draw is a half-width h (``invariance.log10_alpha_strategy``: extremes,
    values next to 0 and uniform ones) and a 32-bit generator seed, built from booleans;
    every unit of the network gets log10 γ uniform in [−|h|, |h|] (``unit_scales``), applied
    with ``neuron.unit_parameters`` (BatchNorm exactly). Shrinking walks h towards 0."""
    from hypothesis import strategies as st

    base_trace, base_ms, base_nms, run, warnings = score_neurons(imported, batches, options, True)
    tol = tolerance_of(run, rtol)
    used = run.provider
    units = unit_map(imported.network)
    result = NeuronInvarianceResult(
        model={"path": str(imported.path), "sha256": imported.sha256}, data=data_info,
        provider=used, rtol=tol, seed=seed, spread=spread, units=units.size,
        base_trace=base_trace, base_minimum_sharpness=base_ms,
        base_neuron_minimum_sharpness=base_nms, warnings=warnings)
    bits = st.tuples(*[st.booleans()] * SEED_BITS).map(
        lambda b: int("".join("1" if x else "0" for x in b), 2))

    def score_draw(drawn, shrinking: bool) -> NeuronTrial:
        half_width, draw_seed = drawn
        s = unit_scales(units.size, half_width, draw_seed)
        moved = rescaled_model(imported, unit_parameters(imported.network, units, s))
        trace, ms, nms, _, _ = score_neurons(moved, batches, options, False)
        deviation = abs(nms - base_nms) / base_nms if base_nms > 0 else abs(nms)
        return NeuronTrial(abs(half_width), draw_seed, trace, ms, nms, deviation)

    failed = run_draws(st.tuples(log10_alpha_strategy(spread / 2), bits), seed, trials, tol,
                       score_draw, result.trials, on_trial)
    if failed is not None:
        result.falsifying = (failed.half_width, failed.draw_seed)
    return result
