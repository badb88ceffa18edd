"""Human-readable reports: one place that turns a command's result (for ``score``, the JSON
document of ``ScoreResult.to_dict``) into blocks of lines and tables, and renders them as
plain aligned text (pipes, CI logs, ``NO_COLOR``), as ``rich`` tables on a terminal, or as
a compact markdown summary for a CI job page.

Renderers read the fields they know with ``dict.get`` and ignore any others, so documents
with extra fields (other engines, other losses, more report sections) render unchanged.
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from . import __version__
from .gates import QUANTITIES
from .progress import interactive

STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "UNKNOWN": "bold red",
                "MISSING": "yellow"}


@dataclass(frozen=True)
class Table:
    """Text cells, header first; columns in ``right`` are right-aligned (numbers)."""

    headers: list[str]
    rows: list[list[str]]
    right: frozenset = frozenset()


class Strong(str):
    """A line that a terminal shows in bold (the headline numbers)."""


Block = Union[str, Table]


def fmt(value: Optional[float], spec: str = ".6g") -> str:
    """A number with its significant digits, ``-`` for a missing one."""
    return "-" if value is None else format(value, spec)


def fmt_quantity(quantity: str, value: Optional[float]) -> str:
    """A report quantity as the report prints it (accuracy with 4 decimals)."""
    return fmt(value, ".4f" if quantity == "accuracy" else ".6g")


# ---------------------------------------------------------------- renderers


def _rich_table(table: Table, plain: bool):
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    t = RichTable(box=None if plain else box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1), header_style=None if plain else "bold", highlight=False)
    for i, header in enumerate(table.headers):
        right = i in table.right
        t.add_column(header, justify="right" if right else "left", no_wrap=right,
                     overflow="fold")
    for row in table.rows:
        t.add_row(*[Text(c, style="" if plain else STATUS_STYLE.get(c.split(" ")[0], ""))
                    for c in row])
    return t


def render_plain(blocks: Iterable[Block]) -> str:
    """Blocks as plain text: tables aligned in columns two spaces apart, no trailing
    spaces, no escape codes."""
    from rich.console import Console

    out = []
    for block in blocks:
        if isinstance(block, Table):
            buf = io.StringIO()
            Console(file=buf, width=100_000, force_terminal=False, no_color=True,
                    color_system=None, legacy_windows=False).print(_rich_table(block, plain=True))
            out.extend(line.rstrip() for line in buf.getvalue().splitlines())
        else:
            out.append(block)
    return "\n".join(out)


def render_rich(blocks: Iterable[Block], console) -> None:
    """Blocks on a terminal: ``rich`` tables with right-aligned numbers, bold headlines."""
    from rich.text import Text

    for block in blocks:
        if isinstance(block, Table):
            console.print(_rich_table(block, plain=False))
        else:
            console.print(Text(block, style="bold" if isinstance(block, Strong) else ""),
                          soft_wrap=True)


def markdown_table(table: Table) -> list[str]:
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, table.headers)) + " |",
             "|" + "|".join("---:" if i in table.right else "---"
                            for i in range(len(table.headers))) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.rows]
    return lines


class Output:
    """Where a command's human output goes. stdout: ``rich`` on an interactive terminal,
    plain text otherwise; stderr: warnings and gate failures, one line each (highlighted
    on a terminal). ``quiet`` keeps only gate failures (errors are printed by the CLI)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.terminal = interactive(sys.stdout)
        self._styled_err = interactive(sys.stderr)

    def report(self, blocks: list[Block]) -> None:
        if self.quiet:
            return
        if self.terminal:
            from rich.console import Console

            render_rich(blocks, Console(file=sys.stdout, force_terminal=True, highlight=False))
        else:
            self.text(render_plain(blocks))

    def text(self, text: str) -> None:
        """Text exactly as given (plain reports, markdown, JSON)."""
        if not self.quiet:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def _err(self, label: str, style: str, message: str) -> None:
        if self._styled_err:
            from rich.console import Console
            from rich.text import Text

            Console(file=sys.stderr, force_terminal=True, highlight=False).print(
                Text.assemble((label, style), message), soft_wrap=True)
        else:
            sys.stderr.write(f"{label}{message}\n")
            sys.stderr.flush()

    def warning(self, message: str) -> None:
        """One line ``warning: …`` on stderr, in the words of the JSON's ``warnings``."""
        if not self.quiet:
            self._err("warning: ", "bold yellow", message)

    def failure(self, message: str) -> None:
        """One line ``gate failed: …`` on stderr, also with ``quiet``."""
        self._err("gate failed: ", "bold red", message)


# ---------------------------------------------------------------- score


LAYER_HEADERS = ["#", "layer", "kind", "weight", "shape", "Tr H_W", "Tr H_b", "alpha*"]


def layer_table(doc: dict) -> Table:
    rows = [[str(l.get("index", i + 1)), l.get("name", ""), l.get("kind", ""),
             l.get("weight", ""), "x".join(map(str, l.get("weight_shape", []))),
             fmt(l.get("trace_weight")), fmt(l.get("trace_bias")), fmt(l.get("alpha"))]
            for i, l in enumerate(doc.get("layers", []))]
    return Table(LAYER_HEADERS, rows, frozenset({0, 5, 6, 7}))


def class_table(classes: list[dict]) -> Table:
    """α* per free class of the rescaling group (docs/method.md section 9)."""
    rows = [[str(i + 1), c["tensor"], str(c["tensors"]), fmt(c["alpha"])]
            for i, c in enumerate(classes)]
    return Table(["class", "tensor", "tensors", "alpha*"], rows, frozenset({0, 2, 3}))


def _solver(solver: dict) -> str:
    method = solver.get("method")
    if method == "newton":
        return (f"Newton, {solver.get('iterations')} steps, gradient "
                f"{solver.get('gradient_norm', math.nan):.1e}")
    return {"closed-form": "closed form (no biases)", "dead-layer": "dead layer"}.get(method, str(method))


def _stderr(value: Optional[float]) -> str:
    return "nan" if value is None else f"{value:.2g}"


def engine_line(doc: dict) -> str:
    """The onnxruntime engine and its certification against the float64 NumPy engine."""
    check = doc["engine_check"]
    floored = check.get("floored_tensors") or 0
    below = (f"; {floored} tensor{'s' * (floored > 1)} below {check['floor']:.2g} of the total "
             f"trace judged against that floor" if floored else "")
    return (f"engine: {doc['engine']} ({doc['provider']}, {doc['precision']}); engine check "
            f"{check['max_relative_deviation']:.2g} against the float64 NumPy engine on "
            f"{check['samples']} samples (tolerance {check['tolerance']:g}{below})")


def score_blocks(doc: dict) -> list[Block]:
    """The ``score`` report (docs/cli.md, Output), with the comparison with ``baseline`` and
    the ``gates`` when the document has them. Warnings are not part of it: they go to
    stderr (``Output.warning``)."""
    d = doc["data"]
    blocks: list[Block] = [f"minsharp-ref {__version__}: {doc['model']['path']}"]
    prep = "; ".join(d.get("preprocessing", [])) or "no preprocessing"
    labels = f", {d['y_key']}" if d.get("y_key") else ", no labels"
    blocks.append(f"data: {d['path']} [{d.get('x_key')}{labels}], {d['samples']} samples; {prep}")
    fidelity = doc.get("fidelity", {})
    fid = fidelity.get("max_scaled_difference")
    checked = "not checked" if fid is None else f"{fid:.2g}"
    forward = doc.get("forward") or doc.get("provider")
    blocks.append(f"forward: {forward}, signals {doc.get('precision')}; import fidelity {checked} "
                  f"(tolerance {fidelity.get('tolerance', math.nan):g})")
    blocks.append(f"loss: {doc.get('loss_kind', 'cross-entropy')}")
    if doc.get("engine_check"):
        blocks.append(engine_line(doc))
    if doc.get("distributed"):
        dist = doc["distributed"]
        blocks.append(f"dask: {dist['workers']} workers at {dist['scheduler']}, {dist['shards']} "
                      f"shards of {dist['shard_size']} samples, {dist['seconds']:.3f} s")
    if doc.get("postprocessing"):
        blocks.append(f"scored the logits before the head (stripped): {', '.join(doc['postprocessing'])}")
    folded = doc.get("folded")
    blocks.append("")
    if folded:  # BatchNorm: both parametrisations, labelled (docs/method.md section 10)
        blocks.append("original parametrisation (BatchNorm: Tr H_W is the trace of gamma, "
                      "Tr H_b of beta):")
    blocks += [layer_table(doc), ""]
    blocks.append(Strong(f"naive trace Tr H     {doc['trace']:.8g}  "
                         f"(± {_stderr(doc.get('trace_stderr'))} s.e. over samples)"))
    if folded:
        blocks += ["", "folded parametrisation (each BatchNorm folded into the layer before it; "
                       "minimum sharpness is defined on it):", layer_table(folded), ""]
        blocks.append(Strong(f"folded naive trace   {folded['trace']:.8g}  "
                             f"(± {_stderr(folded.get('trace_stderr'))} s.e.)"))
    se = doc.get("minimum_sharpness_stderr")
    blocks.append(Strong(f"minimum sharpness    {doc['minimum_sharpness']:.8g}"
                         + (f"  (± {se:.2g} s.e.)" if se is not None else "")
                         + f"  [{_solver(doc.get('solver', {}))}]"))
    if doc.get("solver", {}).get("problem") == "dag" and doc.get("classes"):
        blocks += [f"alpha* per free class ({len(doc['classes'])} classes of tied tensors, each "
                   "named by its first tensor):", class_table(doc["classes"])]
    if doc.get("loss") is not None:
        se = doc.get("loss_stderr")
        blocks.append(f"loss {doc['loss']:.6g}" + ("" if se is None else f" (± {se:.2g} s.e.)")
                      + f"   accuracy {fmt_quantity('accuracy', doc['accuracy'])}")
    t = doc.get("timings") or {}
    if "total_s" in t:
        blocks.append(f"samples {d['samples']}   seconds {t['total_s']:.3f} (summed over the "
                      f"engine workers: forward {t.get('forward_s', 0):.3f}, traces "
                      f"{t.get('engine_s', 0):.3f})")
    m = doc.get("measures")
    if m:
        ns = m["normalised_sharpness"]
        blocks.append(f"normalised sharpness {ns['value']:.8g}  (per layer: "
                      + ", ".join(f"{l['value']:.4g}" for l in ns["layers"]) + ")")
        blocks.append("traces at alpha*" + (" (folded)" if doc.get("folded") else "") + "     " + ", ".join(
            f"{l['weight']:.6g}" + ("" if l["bias"] is None else f"+{l['bias']:.3g}")
            for l in m["traces_at_alpha"] if l["weight"] is not None))
        if m.get("neuron_minimum_sharpness"):
            blocks.append(Strong(neuron_line(m["neuron_minimum_sharpness"])))
    base = doc.get("baseline")
    if base:
        blocks += ["", f"baseline {base['path']} (sha256 {base['sha256'][:12]}, model sha256 "
                       f"{str(base.get('model_sha256'))[:12]})", comparison_table(base["changes"])]
    if doc.get("gates"):
        blocks += ["", gate_table(doc["gates"])]
        blocks += [f"note: {g['note']}" for g in doc["gates"] if g.get("note")]
    return blocks


def neuron_line(n: dict) -> str:
    """The neuron-wise minimum sharpness (docs/method.md section 13) in one line."""
    se = n.get("stderr")
    solver = n.get("solver", {})
    how = (f"{solver.get('iterations')} Newton steps, {solver.get('seconds', 0):.3g} s"
           if n.get("attained") else
           f"infimum, not attained: {solver.get('dropped_terms')} terms vanish only in the limit")
    return (f"neuron-wise min. sharpness {n['value']:.8g}" + (f"  (± {se:.2g} s.e.)" if se is not None else "")
            + f"  [{n['units']} units, {n['free_units']} free; {how}]")


def _noise(c: dict) -> str:
    """The change in standard errors of the difference, and whether it is within noise."""
    if c.get("z") is None:
        return "no s.e."
    return f"{c['z']:+.1f} s.e." + (", within noise" if c.get("within_noise") else "")


def _change(c: dict) -> str:
    rel = c.get("relative_change")
    return f"{c['change']:+.4g}" + ("" if rel is None else f" ({rel:+.2%})")


def comparison_table(changes: list[dict]) -> Table:
    rows = [[c["label"], fmt_quantity(c["quantity"], c["value"]),
             fmt_quantity(c["quantity"], c["baseline"]), _change(c), _noise(c)]
            for c in changes]
    return Table(["quantity", "now", "baseline", "change", "noise"], rows, frozenset({1, 2, 3}))


def _verdict(g: dict) -> str:
    """PASS, FAIL or PASS (within noise); "(no s.e.)" where --sigma could not apply."""
    verdict = "FAIL" if not g["passed"] else "PASS (within noise)" if g.get("exceeded") else "PASS"
    return verdict + (" (no s.e.)" if g.get("note") else "")


def gate_table(gates: list[dict]) -> Table:
    rows = [[g["label"], g["rule"], fmt_quantity(g["quantity"], g["value"]),
             fmt_quantity(g["quantity"], g["limit"]), _verdict(g)] for g in gates]
    return Table(["gate", "rule", "now", "limit", "verdict"], rows, frozenset({2, 3}))


def score_markdown(doc: dict) -> str:
    """A compact markdown summary for a CI job page (``$GITHUB_STEP_SUMMARY``): model, data,
    MS ± s.e., naive trace, the comparison with the baseline, per-layer table, gates with
    ✅/❌, warnings."""
    d = doc["data"]
    lines = [f"### minsharp-ref: `{doc['model']['path']}`", ""]
    prep = "; ".join(d.get("preprocessing", [])) or "no preprocessing"
    keys = ", ".join(k for k in (d.get("x_key"), d.get("y_key")) if k)
    lines.append(f"Data `{d['path']}` [{keys}], {d['samples']} samples; {prep}. Forward: "
                 f"{doc.get('provider')}. Loss: {doc.get('loss_kind', 'cross-entropy')}. "
                 f"Model sha256 `{doc['model'].get('sha256', '')[:12]}`."
                 + (f" E{engine_line(doc)[1:]}." if doc.get("engine_check") else ""))
    lines.append("")
    ms_se, trace_se = doc.get("minimum_sharpness_stderr"), doc.get("trace_stderr")
    values = {"minimum_sharpness": f"{doc['minimum_sharpness']:.6g} ± {_stderr(ms_se)}",
              "trace": f"{doc['trace']:.6g} ± {_stderr(trace_se)}"}
    if doc.get("loss") is not None:
        values.update(loss=f"{doc['loss']:.6g} ± {_stderr(doc.get('loss_stderr'))}",
                      accuracy=fmt_quantity("accuracy", doc["accuracy"]))
    labels = {q: label for q, (label, _) in QUANTITIES.items()}
    base = doc.get("baseline")
    if base:
        changes = {c["quantity"]: c for c in base["changes"]}
        rows = [[labels[q], v] + ([fmt_quantity(q, changes[q]["baseline"]), _change(changes[q]),
                                   _noise(changes[q])]
                                  if q in changes else ["-", "-", ""]) for q, v in values.items()]
        lines += markdown_table(Table(["", "now", "baseline", "change", "noise"], rows,
                                      frozenset({1, 2, 3})))
        lines += ["", f"Baseline `{base['path']}` (sha256 `{base['sha256'][:12]}`, model sha256 "
                      f"`{str(base.get('model_sha256'))[:12]}`)."]
    else:
        lines += markdown_table(Table(["", "value"], [[labels[q], v] for q, v in values.items()],
                                      frozenset({1})))
    neuron = (doc.get("measures") or {}).get("neuron_minimum_sharpness")
    if neuron:
        lines += ["", neuron_line(neuron).replace("neuron-wise", "Neuron-wise", 1) + "."]
    lines.append("")
    lines += markdown_table(layer_table(doc))
    if doc.get("gates"):
        rows = [["✅" if g["passed"] else "❌", g["label"], g["rule"],
                 fmt_quantity(g["quantity"], g["value"]), fmt_quantity(g["quantity"], g["limit"]),
                 _verdict(g)] for g in doc["gates"]]
        lines += ["", "**Gates**", ""]
        lines += markdown_table(Table(["", "gate", "rule", "now", "limit", "verdict"], rows,
                                      frozenset({3, 4})))
        for g in doc["gates"]:
            lines += ["", f"Note: {g['note']}."] if g.get("note") else []
    for w in doc.get("warnings", []):
        lines += ["", f"> ⚠️ warning: {w}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- verify, invariance


def verify_blocks(notes: list[str], cells: list[list[str]], summary: str) -> list[Block]:
    """``verify``: data mismatches, the comparison table (header first), the summary."""
    return [f"data mismatch: {n}" for n in notes] + \
        [Table(cells[0], cells[1:], frozenset({2, 3, 4, 5})), Strong(summary)]


def invariance_blocks(result, samples: int) -> list[Block]:
    rows = [[str(i + 1), f"{t.trace:.6g}", f"{t.minimum_sharpness:.15g}", f"{t.deviation:.2g}",
             ",".join(f"{a:.3g}" for a in t.alpha)] for i, t in enumerate(result.trials)]
    folded = getattr(result, "base_folded_trace", None)
    if folded is None:
        trace_head = "naive Tr H"
        unscaled = (f"unscaled: naive trace {result.base_trace:.6g}, minimum sharpness "
                    f"{result.base_minimum_sharpness:.15g}")
    else:  # BatchNorm: the naive traces are the original's, MS is the folded network's
        trace_head = "naive Tr H (original)"
        unscaled = (f"unscaled: naive trace {result.base_trace:.6g} (original parametrisation; "
                    f"folded: {folded:.6g}), minimum sharpness "
                    f"{result.base_minimum_sharpness:.15g} (over the folded parametrisation)")
    blocks: list[Block] = [
        Table(["trial", trace_head, "min. sharpness", "rel. dev.", "alpha"], rows,
              frozenset({0, 1, 2, 3})),
        f"{unscaled} ({result.provider}, {samples} samples, {result.loss_kind} loss)"]
    if result.falsifying_alpha is not None:
        blocks.append("minimal failing alpha (shrunk by hypothesis): "
                      + ",".join(f"{a:.6g}" for a in result.falsifying_alpha))
    blocks.append(Strong(result.summary()))
    return blocks


def neuron_invariance_blocks(result, samples: int) -> list[Block]:
    """``invariance --neurons``: per draw the naive trace and the layer-wise minimum
    sharpness (which move) and the neuron-wise one (which must not)."""
    rows = [[str(i + 1), f"{t.trace:.6g}", f"{t.minimum_sharpness:.6g}",
             f"{t.neuron_minimum_sharpness:.15g}", f"{t.deviation:.2g}", f"{t.half_width:.3g}",
             str(t.draw_seed)] for i, t in enumerate(result.trials)]
    blocks: list[Block] = [
        Table(["trial", "naive Tr H", "min. sharpness", "neuron-wise MS", "rel. dev.",
               "log10 spread", "draw seed"], rows, frozenset({0, 1, 2, 3, 4, 5})),
        f"unscaled: naive trace {result.base_trace:.6g}, minimum sharpness "
        f"{result.base_minimum_sharpness:.6g}, neuron-wise {result.base_neuron_minimum_sharpness:.15g} "
        f"({result.provider}, {samples} samples, {result.units} units)"]
    if result.falsifying is not None:
        blocks.append(f"minimal failing draw (shrunk by hypothesis): log10 spread "
                      f"{result.falsifying[0]:.6g}, draw seed {result.falsifying[1]}")
    blocks.append(Strong(result.summary()))
    return blocks
