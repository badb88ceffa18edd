"""The trace graph's set-up (docs/method.md section 11, "Set-up"): the builder's names and
the session settings of large graphs. Timings are in benchmarks/bench_graph_setup.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minsharp_ref import score
from minsharp_ref.trace_graph import runner as runner_module
from minsharp_ref.trace_graph.builder import GraphBuilder

from conftest import FIXTURES, MNIST
from test_trace_graph import NORM, assert_close, per_tensor, per_tensor_of


def names_from_zero(stems, reserved):
    """The names a search from suffix 0 gives (the builder before it resumed per stem)."""
    used, out = set(), []
    for stem in stems:
        name, i = stem, 0
        while name in used or name in reserved:
            i += 1
            name = f"{stem}#{i}"
        used.add(name)
        out.append(name)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "a#1", "a#2", "b#1#1", "b#1", "sig"]), max_size=40),
       st.sets(st.sampled_from(["a", "a#3", "b#1", "sig#2"]), max_size=3))
def test_fresh_names_are_those_of_a_search_from_zero(stems, reserved):
    """Resuming the suffix search per stem gives the same names as searching from 0 every
    time (names are never released), including stems that look like suffixed names."""
    b = GraphBuilder(np.float32)
    b.reserve(reserved)
    got = [b.fresh(stem) for stem in stems]
    assert got == names_from_zero(stems, reserved)
    assert len(set(got)) == len(got) and not set(got) & set(reserved)


def test_large_graph_settings_score_as_the_numpy_engine(monkeypatch):
    """A graph above OPTIMISE_NODES runs with the reuse plan off and only the kept
    optimisers: resnet_bn_torchscript (536 nodes) with the limit set to 0 scores within
    1e-5 of the float64 NumPy engine, both parametrisations, as with every optimiser."""
    model = FIXTURES / "resnet_bn_torchscript.onnx"
    common = dict(limit=40, **NORM)
    ref = score(model, MNIST, provider="numpy", **common)
    seen = []
    original = runner_module.session_settings

    def recorded(provider, graph):
        options, disabled = original(provider, graph)
        seen.append((options.enable_mem_reuse, disabled))
        return options, disabled

    monkeypatch.setattr(runner_module, "OPTIMISE_NODES", 0)
    monkeypatch.setattr(runner_module, "session_settings", recorded)
    fast = score(model, MNIST, provider="cpu", engine="onnxruntime", **common)
    assert seen and seen[0][0] is False
    assert "NchwcTransformer" not in seen[0][1] and "AttentionFusion" in seen[0][1]
    assert fast.engine_check["max_relative_deviation"] <= 1e-5
    assert_close(per_tensor(fast), per_tensor(ref), 1e-5)
    assert_close(per_tensor_of(fast.folded["layers"]), per_tensor_of(ref.folded["layers"]), 1e-5)
    assert fast.minimum_sharpness == pytest.approx(ref.minimum_sharpness, rel=1e-5)


def test_overlapping_quiet_stderr_restores_stderr():
    """The session is built (stderr silenced) while the first-batch checks build theirs on
    another thread: A silences, B silences, A restores, B restores. Without one redirection
    at a time B restored A's sink and stderr (the `error: …` line included) stayed lost."""
    import os
    import threading
    import time

    from minsharp_ref.runtime import quiet_stderr

    def silenced(delay, hold):
        time.sleep(delay)
        with quiet_stderr():
            time.sleep(hold)

    before = os.fstat(2)
    threads = [threading.Thread(target=silenced, args=(0.0, 0.2)),
               threading.Thread(target=silenced, args=(0.1, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
