"""Recomputing the producers of the largest cut tensors (engine.recompute) lowers the bytes kept
between stages and leaves the statistics as they were, on both cuts."""

from __future__ import annotations

import numpy as np
import pytest
from models import inverted_residuals, make_samples
from reference import reference_recalibrate

import bnfold
from bnfold.engine import plan as g
from bnfold.engine import recompute
from bnfold.onnx_graph import value_shapes

REL = 1e-4  # float32 activations vs the float64 reference, relative to std / var


def _stats(result):
    return {layer.name: (layer.new_mean, layer.new_var) for layer in result.report.layers}


def _plan(model):
    bns = g.require_batchnorms(model)
    return g.plan_stages(model, bns), recompute.sizes_per_sample(value_shapes(model))


def _peak(plan, model, sizes):
    producer, _, _ = g.dataflow(model.graph)
    first = plan.first_stages()
    return max(recompute._loads(plan, sizes, lambda t: first[producer[t]] if t in producer else 0))


def test_the_expansions_setting_the_peak_are_recomputed_in_turn():
    model = inverted_residuals()
    plan, sizes = _plan(model)
    assert _peak(plan, model, sizes) == 2048 * 4  # bytes per sample: bn_a's input, 32 × 8 × 8 floats
    chosen = recompute.lighten(plan, model, sizes, samples=None)
    producers = {out: n.name for n in model.graph.node for out in n.output}
    assert [producers[t] for t in chosen] == ["expand_a", "expand_b"]
    assert _peak(plan, model, sizes) == 512 * 4  # dw_a's output: nothing cheaper makes it
    assert "x" in plan.late_inputs  # expand_a runs again from the samples themselves
    index = {n.name: i for i, n in enumerate(model.graph.node)}
    assert sum(index["expand_b"] in nodes for nodes in plan.nodes) == 2


def test_nothing_is_recomputed_for_small_data_or_unknown_sizes():
    model = inverted_residuals()
    plan, sizes = _plan(model)
    assert recompute.lighten(plan, model, sizes, samples=16) == []  # 16 × 8 KiB: far below MIN_BYTES
    bn_x = g.require_batchnorms(model)[0].x
    assert recompute.lighten(plan, model, {t: b for t, b in sizes.items() if t != bn_x}, samples=None) == []


@pytest.mark.parametrize("budget", [None, 0], ids=["in-memory", "all-spilled"])
@pytest.mark.parametrize("stage_graph", ["native", "source"])
def test_recomputing_leaves_the_statistics_exact(stage_graph, budget, monkeypatch, tmp_path):
    model = inverted_residuals()
    samples = make_samples(model, 21, seed=4)
    monkeypatch.setenv("BNFOLD_STAGE_GRAPH", stage_graph)
    options = dict(batch_size=4, head_samples=8, memory_budget=budget, spill_dir=str(tmp_path))
    monkeypatch.setattr(recompute, "MIN_BYTES", 1 << 40)
    kept = bnfold.recalibrate(model, samples, **options)
    monkeypatch.setattr(recompute, "MIN_BYTES", 0)
    lighter = bnfold.recalibrate(model, samples, **options)
    assert lighter.report.extra["stage_graph"] == {"native": "onnxruntime-optimized", "source": "source"}[stage_graph]
    assert kept.report.extra["recomputed"] == [] and lighter.report.extra["recomputed"] == ["bn_a", "bn_d"]
    store, kept_store = lighter.report.extra["store"], kept.report.extra["store"]
    if budget is None:
        assert store["peak_bytes_in_memory"] < kept_store["peak_bytes_in_memory"]
    else:  # the samples kept for expand_a are spilled and read back like any cut tensor
        assert 0 < store["bytes_spilled"] < kept_store["bytes_spilled"] and store["peak_bytes_in_memory"] == 0
    for name, (mean, var) in reference_recalibrate(model, samples).items():
        got_mean, got_var = _stats(lighter)[name]
        assert np.all(np.abs(got_mean - mean) <= REL * np.sqrt(var)), name
        assert np.all(np.abs(got_var - var) <= REL * var), name
        same_mean, same_var = _stats(kept)[name]  # the same kernels on the same values
        np.testing.assert_allclose(got_mean, same_mean, rtol=0, atol=1e-6 * np.sqrt(var).max())
        np.testing.assert_allclose(got_var, same_var, rtol=1e-6)
    # the head (the graph after the last BN) reads u, now also kept to recompute expand_b: same outputs
    assert lighter.outputs is not None and lighter.outputs.shape == (8, 8, 4, 4)
    np.testing.assert_allclose(lighter.outputs, kept.outputs, rtol=1e-5, atol=1e-6)
