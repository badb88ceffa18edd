"""The run pipeline (docs/cli.md, "Workers and memory"): one validated ``RunOptions`` from
the CLI or the API, refused in one line before any work when wrong; byte-identical reports
for any number of workers, both engines; the shared CLI options; no import cycles."""

import ast
import json
import pickle
from pathlib import Path
import numpy as np

import pytest
from typer.testing import CliRunner

import minsharp_ref
from minsharp_ref.cli import app
from minsharp_ref.errors import MinsharpError
from minsharp_ref.onnx_import import import_model
from minsharp_ref.options import RunOptions, available_cores

from conftest import FIXTURES, MNIST, ROOT

runner = CliRunner()


def test_run_options_validate_and_round_trip_through_pickle():
    options = RunOptions(engine="onnxruntime", workers=3, batch_size=17, memory_budget=2 ** 28,
                         diagonal=True, loss="mse")
    assert options.precision == "float32"  # the engine's default, resolved once
    back = pickle.loads(pickle.dumps(options))
    assert back == options and type(back) is RunOptions
    assert RunOptions().workers == available_cores() >= 1
    assert RunOptions().precision == "float64" and RunOptions().provider == "auto"
    with pytest.raises(Exception):  # frozen
        options.workers = 1  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,message", [
    (dict(workers=0), "--workers must be at least 1, not 0"),
    (dict(workers=2.5), "--workers must be at least 1, not 2.5"),
    (dict(batch_size=0), "--batch-size must be at least 1, not 0"),
    (dict(memory_budget=-1), "--memory-budget must be a positive number of bytes, not -1"),
    (dict(engine="torch"), "unknown engine 'torch'; choose one of numpy, onnxruntime"),
    (dict(precision="float16"), "--precision must be float64 or float32, not 'float16'"),
    (dict(provider="tpu"), "unknown provider 'tpu'"),
    (dict(engine="onnxruntime", provider="numpy"), "--provider numpy runs no onnxruntime"),
    (dict(loss="hinge"), "--loss must be one of cross-entropy, binary, mse, not 'hinge'"),
    (dict(worker=2), "unknown run option 'worker'; did you mean 'workers'?"),
    (dict(batchsize=2), "unknown run option 'batchsize'; did you mean 'batch_size'?"),
])
def test_a_bad_or_misspelt_option_fails_at_once_in_one_line(kwargs, message):
    with pytest.raises(MinsharpError) as info:
        RunOptions.of(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_cli_refuses_a_bad_option_before_any_work(tmp_path):
    """--workers 0 on a model that does not exist: the option is named, not the file."""
    r = runner.invoke(app, ["score", str(tmp_path / "none.onnx"), "--data", str(MNIST),
                            "--workers", "0"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: --workers must be at least 1, not 0"
    for command in ("invariance", "verify"):
        extra = ["--expected", str(tmp_path / "x.json")] if command == "verify" else []
        r = runner.invoke(app, [command, str(tmp_path / "none.onnx"), "--data", str(MNIST),
                                *extra, "--engine", "tf"])
        assert r.exit_code == 2 and "unknown engine 'tf'" in r.output, (command, r.output)


def test_api_score_takes_options_or_keywords_not_both():
    with pytest.raises(MinsharpError, match="give either options= or workers, not both"):
        minsharp_ref.score(FIXTURES / "mlp_torchscript.onnx", MNIST, options=RunOptions(),
                           workers=2)


def _report(result) -> str:
    doc = result.to_dict()
    doc["timings"] = None
    return json.dumps(doc, indent=2)


# (model, samples, batch size): several batches each, and a last one shorter
CASES = [("mlp_torchscript.onnx", 200, 48), ("lenet_torchscript.onnx", 60, 16),
         ("resnet_bn_torchscript.onnx", 40, 12)]


@pytest.mark.parametrize("engine", ["numpy", "onnxruntime"])
@pytest.mark.parametrize("name,limit,batch", CASES)
def test_reports_are_byte_identical_for_any_number_of_workers(name, limit, batch, engine):
    """Batch boundaries come from the batch size alone and the batches are added in float64
    in batch order: 1, 2, 3 and 8 workers write the same bytes (timings aside)."""
    imported = import_model(FIXTURES / name)
    reports = {}
    for workers in (1, 2, 3, 8):
        result = minsharp_ref.score(imported, MNIST, mean=[0.5], std=[0.5], limit=limit,
                                    batch_size=batch, engine=engine, workers=workers)
        assert result.timings["workers"] == workers
        reports[workers] = _report(result)
    assert reports[1] == reports[2] == reports[3] == reports[8]
    doc = json.loads(reports[1])
    assert doc["data"]["samples"] == limit and doc["data"]["batch_size"] == batch
    assert doc["forward"] == ("numpy-float64" if engine == "numpy" else "trace-graph-cpu-float32")


def test_the_memory_budget_limits_the_workers_not_the_batches():
    """A budget that holds two batches of 40 runs two of them at once whatever --workers
    asks; the batch size is the same for any worker count (it does not depend on it)."""
    from minsharp_ref.backends import NumpyBackend
    from minsharp_ref.scoring import batch_size_for, workers_for

    network = import_model(FIXTURES / "lenet_torchscript.onnx").network
    one = NumpyBackend.bytes_per_sample(network, "float64")
    budget = one * 40 * 2 + one // 2
    assert batch_size_for(network, budget, 40) == 40
    assert batch_size_for(network, budget, None) == min(256, budget // one, 128 * 2 ** 20 // one)
    options = RunOptions(workers=8, memory_budget=budget)
    assert workers_for(network, options, 40) == 2
    assert workers_for(network, options.but(workers=1), 40) == 1
    assert workers_for(network, options, 80) == 1


def test_help_shows_the_extras_literally():
    """rich reads [dask] as markup: the help texts escape it."""
    r = runner.invoke(app, ["score", "--help"], env={"COLUMNS": "300", "TERM": "dumb"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "pip install 'minsharp-ref[dask]'" in text
    assert "pip install 'minsharp-ref[plot]'" in text


def test_commands_that_score_share_the_run_and_data_options():
    import typer.main

    command = typer.main.get_command(app)
    shared = {"--split", "--x-key", "--y-key", "--mean", "--std", "--input-shape", "--loss",
              "--engine", "--precision", "--provider", "--workers", "--batch-size",
              "--memory-budget"}
    helps = {}
    for name in ("score", "invariance", "verify"):
        options = {opt: p for p in command.commands[name].params for opt in p.opts}
        assert shared <= options.keys(), (name, shared - options.keys())
        for opt in shared:
            helps.setdefault(opt, set()).add(options[opt].help)
    assert all(len(h) == 1 for h in helps.values()), "one declaration per option"
    # the other commands that read data: the same declarations of the options they take
    data = {"--split", "--x-key", "--mean", "--std", "--input-shape", "--limit"}
    takes = {"rescale": data | {"--engine", "--precision", "--provider", "--workers",
                                "--batch-size", "--memory-budget"},
             "spectrum": data | {"--y-key", "--loss", "--batch-size", "--workers"}}
    for name, wanted in takes.items():
        options = {opt: p for p in command.commands[name].params for opt in p.opts}
        assert wanted <= options.keys(), (name, wanted - options.keys())
        for opt in wanted:
            if opt in helps:
                assert {options[opt].help} == helps[opt], (name, opt)


# ----------------------------------------------------------------------------- structure


def _imports(path: Path, package: str) -> set[str]:
    """The minsharp_ref modules that a module imports (at any depth of its code)."""
    tree = ast.parse(path.read_text())
    module = package + "." + ".".join(path.relative_to(ROOT / "minsharp_ref").with_suffix("").parts)
    module = module.removesuffix(".__init__")
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith(package):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(package))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the minsharp_ref modules it imports at module level or in functions."""
    files = {p for p in (ROOT / "minsharp_ref").rglob("*.py")}
    modules = {}
    for p in files:
        name = "minsharp_ref." + ".".join(p.relative_to(ROOT / "minsharp_ref").with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = p
    graph = {}
    for name, p in modules.items():
        graph[name] = {m for m in _imports(p, "minsharp_ref") if m in modules and m != name}
    return graph


def test_no_import_cycle_between_modules():
    """Among minsharp_ref's modules (a package counts as its __init__), no module imports,
    directly or through others, a module that imports it back; imports inside functions
    count too. A package's __init__ importing its own submodules is not a cycle."""
    graph = import_graph()

    def parent_edge(a: str, b: str) -> bool:  # a package and its own submodules
        return b.startswith(a + ".") or a.startswith(b + ".")

    edges = {a: {b for b in bs if not parent_edge(a, b)} for a, bs in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for p in (ROOT / "minsharp_ref").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("minsharp_ref")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{p.relative_to(ROOT)}: {a.name}")
    assert not offenders, offenders


# -------------------------------------------------------------------------------- docs


def test_documented_score_signature_is_the_real_one():
    """docs/python-api.md's `score` block lists every parameter, in order, with its default."""
    import inspect
    import re

    text = (ROOT / "docs" / "python-api.md").read_text()
    block = re.search(r"```python\nminsharp_ref\.score\((.*?)\) -> ScoreResult\n```", text, re.S)
    assert block, "docs/python-api.md has no `minsharp_ref.score(...)` block"
    documented = ast.parse(f"def score({block.group(1)}): pass").body[0].args
    real = inspect.signature(minsharp_ref.score).parameters
    names = [a.arg for a in documented.args + documented.kwonlyargs]
    assert names == list(real)
    defaults = dict(zip([a.arg for a in documented.kwonlyargs],
                        [ast.literal_eval(d) for d in documented.kw_defaults]))
    for name, value in defaults.items():
        assert real[name].default == value, name


def test_documented_hessian_operator_signature_is_the_real_one():
    """docs/python-api.md's `hessian_operator` block: every parameter, in order, with its
    default (2**30 evaluated)."""
    import inspect
    import re

    text = (ROOT / "docs" / "python-api.md").read_text()
    block = re.search(r"```python\nop = minsharp_ref\.hessian_operator\((.*?)\)\n```", text, re.S)
    assert block, "docs/python-api.md has no `minsharp_ref.hessian_operator(...)` block"
    documented = ast.parse(f"def f({block.group(1)}): pass").body[0].args
    real = inspect.signature(minsharp_ref.hessian_operator).parameters
    assert [a.arg for a in documented.args + documented.kwonlyargs] == list(real)
    for arg, default in zip(documented.kwonlyargs, documented.kw_defaults):
        assert real[arg.arg].default == eval(compile(ast.Expression(default), "doc", "eval")), arg.arg


def test_every_method_section_a_docstring_cites_exists():
    """`docs/method.md section N` (and `sections N, M and K`) has a `## N.` heading, a quoted
    title after it starts a heading, a bold paragraph or a bold list item; no docstring cites the spec."""
    import re

    method = (ROOT / "docs" / "method.md").read_text()
    numbers = set(re.findall(r"^## (\d+)\. ", method, re.M))
    titles = re.findall(r"^#+ (?:\d+\. )?(.+)$", method, re.M) + re.findall(r"^(?:- )?\*\*(.+?)\*\*", method, re.M)
    missing = []
    for p in (ROOT / "minsharp_ref").rglob("*.py"):
        text = p.read_text()
        for cited in re.findall(r"docs/method\.md,? §? ?sections? ([\d, and]+\d)", text):
            missing += [f"{p.name}: section {n}" for n in re.findall(r"\d+", cited) if n not in numbers]
        for title in re.findall(r'docs/method\.md[^"\n]{0,40}"([^"\n]+)"', text):
            if not any(t.strip("`*. ").startswith(title) for t in titles):
                missing.append(f'{p.name}: "{title}"')
        missing += [f"{p.name}: cites the spec" for _ in re.findall(r"[Ss]pec section", text)]
    assert not missing, missing


def test_every_layer_type_has_a_rule_in_every_dispatch_table():
    """Each IR layer class has its forward, its back-propagation rule in both engines (or
    is refused by name: ``plan.NO_BACKWARD_RULE``), the trace graph's forward, the
    Hessian-vector product's tangent rule (Add and Concat are summed and joined in its
    pass), and, when parameterised, the measure rules of both engines (traces and
    diagonal) and the product's weight gradient."""
    import importlib
    import typing

    from minsharp_ref import engine, hvp, ir
    from minsharp_ref.plan import NO_BACKWARD_RULE

    tg = {name: getattr(importlib.import_module(f"minsharp_ref.trace_graph.{name}"), name)
          for name in ("forward", "backward", "measure")}

    def subclasses(cls):
        return {cls} | {s for c in cls.__subclasses__() for s in subclasses(c)}

    classes = (subclasses(ir.LayerBase) - {ir.LayerBase}) | set(typing.get_args(ir.Layer))
    classes = {c for c in classes if c.__module__ == "minsharp_ref.ir"}  # not tests' odd layers
    params = set(typing.get_args(ir.ParamLayer))
    missing = []
    for cls in sorted(classes, key=lambda c: c.__name__):
        tables = {"ir forward": "forward" in vars(cls), "trace_graph forward": cls in tg["forward"].registry}
        if not issubclass(cls, NO_BACKWARD_RULE):
            tables["engine backprop"] = cls in engine.backprop.registry
            tables["trace_graph backward"] = cls in tg["backward"].registry
        if cls not in params and cls not in (ir.Add, ir.Concat):
            tables["hvp tangent"] = cls in hvp.tangent.registry
        if cls in params:
            tables["hvp weight_gradient"] = cls in hvp.weight_gradient.registry
            tables["engine measure"] = cls in engine.measure.registry
            tables["engine measure_diagonal"] = cls in engine.measure_diagonal.registry
            tables["trace_graph measure"] = cls in tg["measure"].registry
        assert (cls in params) == ir.is_parameterised(object.__new__(cls)), cls
        missing += [f"{cls.__name__}: {t}" for t, ok in tables.items() if not ok]
    assert not missing, missing
    assert set(typing.get_args(ir.Layer)) == classes


def test_a_layer_without_a_backward_rule_is_refused_by_name():
    """An input affine map after the first dense layer: the plan names it."""
    from dataclasses import replace

    from minsharp_ref.ir import Dense, InputAffine
    from minsharp_ref.plan import traversal_plan

    network = import_model(FIXTURES / "mlp_torchscript.onnx").network
    i = next(i for i, l in enumerate(network.layers) if isinstance(l, Dense))
    dense = network.layers[i]
    affine = InputAffine(dense.output_name, dense.output_name + "_scaled", ("odd_affine",))
    layers = list(network.layers)
    layers[i + 1] = replace(layers[i + 1], input_name=affine.output_name)
    layers.insert(i + 1, affine)
    with pytest.raises(MinsharpError, match=r"InputAffine \(node odd_affine\) after a parameterised"):
        traversal_plan(replace(network, layers=tuple(layers)))


@pytest.mark.parametrize("engine", ["numpy", "onnxruntime"])
def test_an_onnxruntime_that_cannot_load_the_model_is_a_warning_in_both_engines(monkeypatch, engine):
    """The import-fidelity check needs onnxruntime to run the model itself; when it cannot,
    both engines score and warn (the trace graph is built from the IR, not the model)."""
    from minsharp_ref import runtime
    from minsharp_ref.runtime import OrtUnavailable

    def refuse(*args, **kwargs):
        raise OrtUnavailable("onnxruntime cannot load the model: NOT_IMPLEMENTED odd op")

    monkeypatch.setattr(runtime.OrtForward, "__init__", refuse)
    result = minsharp_ref.score(FIXTURES / "mlp_torchscript.onnx", MNIST, mean=[0.5], std=[0.5],
                                limit=40, engine=engine)
    assert result.fidelity["max_scaled_difference"] is None
    assert result.warnings == ("import fidelity not checked: onnxruntime cannot load the model: "
                               "NOT_IMPLEMENTED odd op",)


def test_invariance_labels_the_parametrisation_of_each_number(tmp_path):
    """BatchNorm: the naive trace is the original parametrisation's, minimum sharpness the
    folded one's; the report and the JSON say so."""
    out = tmp_path / "inv.json"
    r = runner.invoke(app, ["invariance", str(FIXTURES / "resnet_bn_torchscript.onnx"), "--data",
                            str(MNIST), "--mean", "0.5", "--std", "0.5", "--limit", "8",
                            "--trials", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "(original parametrisation; folded: " in r.output
    assert "(over the folded parametrisation)" in r.output
    doc = json.loads(out.read_text())
    assert doc["parametrisation"] == {"trace": "original", "minimum_sharpness": "folded"}
    assert doc["forward"] == "numpy-float64" and doc["base"]["folded_trace"] > 0


def test_a_plan_serves_a_cast_network_in_its_own_precision():
    """The NumPy engine builds its plan once from the network and runs float32 signals on
    the cast copy: every signal must then be float32 (a plan's layers are structure; the
    parameters come from the network passed in)."""
    from minsharp_ref.engine import signals_at_parameters
    from minsharp_ref.plan import traversal_plan

    network = import_model(FIXTURES / "lenet_torchscript.onnx").network
    x = np.random.default_rng(0).standard_normal((3,) + network.input_shape)
    logits, inputs = network.forward(x, keep_inputs=True)
    cast = network.astype(np.float32)
    dtypes = {g.dtype for _, _, g, _ in signals_at_parameters(
        cast, inputs, logits, np.float32, plan=traversal_plan(network))}
    assert dtypes == {np.dtype(np.float32)}


def test_float32_numpy_engine_runs_its_forward_in_float32(tmp_path):
    """--precision float32 on the NumPy engine: the IR's forward in float32 too (reported as
    numpy-float32), per-tensor traces within 1e-4 of the float64 reference, the import still
    checked against the IR's float64 logits."""
    docs = {}
    for precision in ("float64", "float32"):
        out = tmp_path / f"{precision}.json"
        r = CliRunner().invoke(app, ["score", str(FIXTURES / "lenet_torchscript.onnx"), "--data",
                                     str(MNIST), "--mean", "0.5", "--std", "0.5", "--limit", "64",
                                     "--precision", precision, "--json", str(out), "-q"])
        assert r.exit_code == 0, r.output
        docs[precision] = json.loads(out.read_text())
    assert docs["float32"]["forward"] == "numpy-float32"
    assert docs["float32"]["fidelity"]["max_scaled_difference"] <= 1e-6
    for a, b in zip(docs["float64"]["layers"], docs["float32"]["layers"]):
        assert b["trace_weight"] == pytest.approx(a["trace_weight"], rel=1e-4)
        assert b["trace_weight"] != a["trace_weight"]  # really computed in float32
