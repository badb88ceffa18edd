"""α-invariance, checked: rescale the network by α drawn with hypothesis, re-score it, and
compare minimum sharpness (invariant by construction) with the naive trace (which follows
Proposition 2 and can be made arbitrarily large or small)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .api import summarise
from .options import RunOptions
from .scoring import traces_over
from .onnx_import import ImportedModel
from .rescale import alpha_parameters, apply_to_proto, group_parameters, uses_group

INVARIANCE_SCHEMA = "minsharp-ref/invariance/v1"
#: Default tolerance on |MS_α − MS| / MS per forward path.
DEFAULT_RTOL = {"numpy": 1e-9, "cpu": 1e-4, "cuda": 1e-4, "auto": 1e-4}


@dataclass(frozen=True)
class Trial:
    alpha: tuple[float, ...]
    trace: float
    minimum_sharpness: float
    deviation: float


@dataclass
class InvarianceResult:
    model: dict
    data: dict
    provider: str
    rtol: float
    seed: int
    spread: float
    base_trace: float
    base_minimum_sharpness: float
    trials: list[Trial] = field(default_factory=list)
    falsifying_alpha: Optional[tuple[float, ...]] = None
    #: the loss whose Hessian is traced: "cross-entropy", "binary" or "mse"
    loss_kind: str = "cross-entropy"
    #: the unscaled model's scoring warnings, in ``score``'s words
    warnings: list[str] = field(default_factory=list)
    #: which forward produced the activations (as in the score report)
    forward: str = "numpy-float64"
    #: networks with BatchNorm: the folded parametrisation's naive trace (minimum sharpness
    #: is minimised over it; ``base_trace`` and the trials' traces are the original's)
    base_folded_trace: Optional[float] = None

    @property
    def parametrisation(self) -> dict:
        """Which parametrisation each number is of (docs/method.md section 10)."""
        folded = self.base_folded_trace is not None
        return {"trace": "original", "minimum_sharpness": "folded" if folded else "original"}

    @property
    def max_deviation(self) -> float:
        return max((t.deviation for t in self.trials), default=0.0)

    @property
    def trace_ratio(self) -> float:
        traces = [t.trace for t in self.trials] + [self.base_trace]
        return max(traces) / min(traces)

    @property
    def passed(self) -> bool:
        return self.falsifying_alpha is None and self.max_deviation <= self.rtol

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: max minimum-sharpness deviation {self.max_deviation:.3g} "
                f"(rtol {self.rtol:g}) over {len(self.trials)} draws; naive trace max/min "
                f"ratio {self.trace_ratio:.3g}")

    def to_dict(self) -> dict:
        from . import __version__
        from .api import json_safe

        return json_safe({
            "schema": INVARIANCE_SCHEMA, "minsharp_ref_version": __version__,
            "model": self.model, "data": self.data, "provider": self.provider,
            "loss_kind": self.loss_kind,
            "rtol": self.rtol, "seed": self.seed, "spread_decades": self.spread,
            "forward": self.forward, "parametrisation": self.parametrisation,
            "base": {"trace": self.base_trace, "minimum_sharpness": self.base_minimum_sharpness,
                     "folded_trace": self.base_folded_trace},
            "trials": [dataclasses.asdict(t) for t in self.trials],
            "max_deviation": self.max_deviation, "trace_ratio": self.trace_ratio,
            "falsifying_alpha": self.falsifying_alpha, "passed": self.passed,
            "warnings": self.warnings,
        })


def _score(imported: ImportedModel, batches: list[np.ndarray], options: RunOptions, check: bool):
    run = traces_over(imported, iter(batches), None, options, check=check)
    summary = summarise(imported, run.sums, False)
    return summary, run


def proto_provider(options: RunOptions) -> str:
    """The provider argument of the transforms: the rescaled ONNX proto is needed only where
    onnxruntime runs the model itself (the NumPy engine's --provider cpu or cuda)."""
    return options.provider if options.engine == "numpy" and options.provider in ("cpu", "cuda") \
        else "numpy"


def rescaled_model(imported: ImportedModel, alpha: np.ndarray, provider: str) -> ImportedModel:
    """The model with the α-scale transformation (docs/method.md section 5) applied (in memory; the proto only where onnxruntime
    needs it)."""
    params = alpha_parameters(imported.network, alpha)
    proto = imported.proto if provider == "numpy" else apply_to_proto(imported.proto, params)
    return ImportedModel(imported.path, "", proto, imported.network.with_parameters(params))


def group_rescaled_model(imported: ImportedModel, scales: np.ndarray,
                         provider: str) -> ImportedModel:
    """The model with the group of docs/method.md section 9 applied, e^ℓ = ``scales`` per
    free class (BatchNorm rescaled exactly, see ``rescale.group_parameters``)."""
    params = group_parameters(imported.network, np.log(scales))
    proto = imported.proto if provider == "numpy" else apply_to_proto(imported.proto, params)
    return ImportedModel(imported.path, "", proto, imported.network.with_parameters(params))


#: Bits of a drawn log10 α's magnitude.
MAGNITUDE_BITS = 32


def log10_alpha_strategy(half: float):
    """One log10 α (or log10 e^ℓ) in [−half, half], drawn from booleans only.

    A sign bit and a 32-bit magnitude u ∈ [0, 1], mapped monotonically: u < 0.1 gives
    ±1e-9 (α next to 1), u ≥ 0.9 gives ±half (the extremes), in between ±half·(u − 0.1)/0.8
    (uniform). Built from booleans, not ``st.floats``/``st.integers``: Hypothesis mixes
    constants mined from the source of every module imported from outside site-packages
    (an editable install, the caller's script) into number draws, so ``--seed`` would give
    different α depending on what the process had imported; boolean draws depend on the
    seed alone. The map is monotone in u, so shrinking (bits towards False) walks a failing
    draw towards α = 1 continuously.
    """
    from hypothesis import strategies as st

    top = 2.0 ** MAGNITUDE_BITS - 1

    def value(bits: tuple[bool, ...]) -> float:
        u = int("".join("1" if b else "0" for b in bits[1:]), 2) / top
        magnitude = 1e-9 if u < 0.1 else half if u >= 0.9 else half * (u - 0.1) / 0.8
        return -magnitude if bits[0] else magnitude

    return st.tuples(*[st.booleans()] * (1 + MAGNITUDE_BITS)).map(value)


def tolerance_of(run, rtol: Optional[float]) -> float:
    """``rtol``, or by default DEFAULT_RTOL["numpy"] for a run that is float64 end to end
    (the IR's float64 forward and float64 signals), 1e-4 for any other."""
    if rtol is not None:
        return rtol
    reference = run.forward == "numpy-float64" and run.precision == "float64"
    return DEFAULT_RTOL["numpy"] if reference else 1e-4


def run_draws(strategy, seed: int, trials: int, tol: float,
              score_draw: Callable, recorded: list, on_trial: Optional[Callable] = None):
    """Draw ``trials`` values of ``strategy`` with hypothesis (seeded, no example
    database), score each (``score_draw(value, shrinking)`` returns a trial with a
    ``deviation``), record the trials up to the first failing one in ``recorded`` (and
    ``on_trial``), and let hypothesis shrink a failure (deviation above ``tol``) to a
    minimal one. Returns that shrunk failing trial, or None when every draw passed."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed

    failing: list = []

    @hypothesis_seed(seed)
    @settings(max_examples=trials, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink],
              report_multiple_bugs=False, verbosity=Verbosity.quiet)
    @given(strategy)
    def draw(value):
        trial = score_draw(value, bool(failing))
        if not failing:
            recorded.append(trial)
            if on_trial:
                on_trial(trial)
        if not trial.deviation <= tol:
            failing.append(trial)
            raise AssertionError("the invariant moved")

    try:
        draw()
    except AssertionError:
        return failing[-1]  # hypothesis ends on the shrunk example
    return None


def check_invariance(imported: ImportedModel, batches: list[np.ndarray], *,
                     provider: Optional[str] = None, trials: int, seed: int, spread: float,
                     rtol: Optional[float], data_info: dict,
                     on_trial: Optional[Callable[[Trial], None]] = None,
                     transform: Callable = rescaled_model,
                     options: Optional[RunOptions] = None) -> InvarianceResult:
    """Draw α with hypothesis (log-uniform over ``spread`` decades, plus the extremes and
    values next to 1: ``log10_alpha_strategy``), re-score, and let hypothesis shrink any α whose minimum sharpness
    deviates by more than rtol to a minimal failing one. DAG and BatchNorm networks draw
    e^ℓ per free class of the rescaling group instead (``Trial.alpha`` holds them).
    ``options`` (a ``RunOptions``; or just a ``provider``) says how each draw is scored.
    With BatchNorm the naive trace is the original parametrisation's and minimum sharpness
    the folded one's (docs/method.md section 10): ``parametrisation`` names both, and
    ``base_folded_trace`` gives the folded network's naive trace beside it."""
    from hypothesis import strategies as st

    if options is None:
        options = RunOptions(provider=provider or "auto")
    provider = proto_provider(options)
    summary, run = _score(imported, batches, options, check=True)
    base_trace, base_ms = summary.trace, summary.minimum_sharpness
    tol = tolerance_of(run, rtol)
    result = InvarianceResult(
        model={"path": str(imported.path), "sha256": imported.sha256}, data=data_info,
        provider=run.provider, rtol=tol, seed=seed, spread=spread, base_trace=base_trace,
        base_minimum_sharpness=base_ms, loss_kind=imported.network.loss,
        warnings=run.warnings + summary.warnings, forward=run.forward,
        base_folded_trace=None if summary.folded is None else summary.folded["trace"])
    grouped = uses_group(imported.network)
    if grouped:
        from .group import rescaling_group

        d = rescaling_group(imported.network).size
        if transform is rescaled_model:
            transform = group_rescaled_model
    else:
        d = len(imported.network.param_layers)
    exponent = log10_alpha_strategy(spread / 2)
    seen: set = set()

    def score_draw(log10_alpha, shrinking: bool) -> Trial:
        from hypothesis import assume

        log10 = np.asarray(log10_alpha, dtype=np.float64)
        if not grouped:  # Π α = 1
            log10 = log10 - np.mean(log10)
        alpha = 10.0 ** log10
        key = tuple(np.round(log10, 12))
        assume(shrinking or key not in seen)  # distinct draws only (the shrink phase may repeat)
        seen.add(key)
        drawn, _ = _score(transform(imported, alpha, provider), batches, options, check=False)
        trace, ms = drawn.trace, drawn.minimum_sharpness
        deviation = abs(ms - base_ms) / base_ms if base_ms > 0 else abs(ms)
        return Trial(tuple(alpha.tolist()), trace, ms, deviation)

    falsifying = run_draws(st.tuples(*[exponent] * d), seed, trials, tol, score_draw,
                           result.trials, on_trial)
    if falsifying is not None:
        result.falsifying_alpha = falsifying.alpha  # hypothesis ends on the shrunk example
    return result
