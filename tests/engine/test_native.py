"""Cutting ONNX Runtime's optimized graph (engine.native) gives the statistics the source-graph cut
gives, both match the float64 reference, and whatever native cannot place falls back to the source.

Why both: the native cut is the default on the CPU provider; BNFOLD_STAGE_GRAPH=source forces the
cut of the source graph, which every other provider uses and which is the fallback.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import ALL_MODELS, _Builder, make_samples
from reference import reference_recalibrate

import bnfold
from bnfold.engine import native
from bnfold.engine import plan as g
from bnfold.engine.moments import first_sample_shift, shifted_sample_sums
from bnfold.onnx_graph import value_shapes

REL = 1e-4  # float32 activations vs float64 reference, relative to std / var
SAME = 1e-5  # native vs source cut: the same float32 maps, only ORT's kernels differ in rounding

def _run(model, samples, monkeypatch, stage_graph: str) -> bnfold.RecalibrationResult:
    monkeypatch.setenv("BNFOLD_STAGE_GRAPH", stage_graph)
    return bnfold.recalibrate(model, samples, batch_size=5)


def _close(got, want, rel):
    for name, (mean, var) in want.items():
        g_mean, g_var = got[name]
        assert np.all(np.abs(g_mean - mean) <= rel * np.sqrt(var) + 1e-9), name
        assert np.all(np.abs(g_var - var) <= rel * var + 1e-9), name


def _stats(result):
    return {layer.name: (layer.new_mean, layer.new_var) for layer in result.report.layers}


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_both_cuts_match_the_reference_and_each_other(name, monkeypatch):
    model = ALL_MODELS[name]()
    samples = make_samples(model, 23, seed=3)
    want = reference_recalibrate(model, samples)
    fast, plain = (_run(model, samples, monkeypatch, mode) for mode in ("native", "source"))
    assert plain.report.extra["stage_graph"] == "source"
    _close(_stats(fast), want, REL)
    _close(_stats(plain), want, REL)
    _close(_stats(fast), _stats(plain), SAME)
    # every test model (BN1d on (N, C) included, as an (N, C, 1) view) takes the native cut
    assert fast.report.extra["stage_graph"] == "onnxruntime-optimized"


def test_native_measures_blocked_tensors_with_padding():
    """4 channels in ORT's NCHWc layout are padded to a block (8 or 16): the cut tensors are blocked
    and the marker Conv's initializers padded, which `affine` fills with zeros."""
    model = ALL_MODELS["two_bns_one_tensor"]()
    bns = g.require_batchnorms(model)
    graph = native.native_graph(model, bns, value_shapes(model), 0)
    assert graph is not None
    assert set(graph.block.values()) == {native._block_size()} and native._block_size() in (4, 8, 16)
    a, b = np.arange(1.0, 5.0), -np.arange(4.0)
    weight, bias = (onnx.numpy_helper.to_array(t).ravel() for t in graph.affine(graph.batchnorms[0], a, b))
    assert len(weight) == len(bias) == max(4, native._block_size())
    assert weight[:4].tolist() == a.tolist() and bias[:4].tolist() == b.tolist() and not weight[4:].any()


def test_ort_folding_into_the_marker_falls_back_to_the_source_cut(monkeypatch):
    """BN → Mul by a per-channel constant: ORT folds the Mul into the Conv standing for the BN, so
    the marker is gone and writing a, b there would drop the Mul. The source cut is used instead."""
    b = _Builder("bn_mul", 5)
    x = b.input("x", ["N", 3, 6, 6])
    y = b.bn(b.conv(x, 3, 4, [3, 3], base="conv1"), 4, "bn1")
    scale = b.const("scale", np.linspace(0.5, 2.0, 4, dtype=np.float32).reshape(4, 1, 1))
    b.output(b.node("Mul", [y, scale], "mul", out="y"))
    model = b.build()
    assert native.native_graph(model, g.require_batchnorms(model), value_shapes(model), 0) is None
    samples = make_samples(model, 9, seed=1)
    result = _run(model, samples, monkeypatch, "native")
    assert result.report.extra["stage_graph"] == "source"
    _close(_stats(result), reference_recalibrate(model, samples), REL)


@pytest.mark.parametrize("block", [8, 16])
def test_blocked_sums_equal_plain_sums(block):
    rng = np.random.default_rng(block)
    plain = (rng.standard_normal((3, 2 * block, 5, 7)) * 3 + 1).astype(np.float32)
    blocked = np.ascontiguousarray(plain.reshape(3, 2, block, 35).transpose(0, 1, 3, 2)).reshape(plain.shape)
    shift = first_sample_shift(plain)
    assert np.allclose(first_sample_shift(blocked, block), shift, rtol=1e-12)
    want = shifted_sample_sums(plain, shift)
    got = shifted_sample_sums(blocked, shift, block)
    assert got[2] == want[2] == 35
    assert np.allclose(got[0], want[0], rtol=1e-12, atol=1e-9) and np.allclose(got[1], want[1], rtol=1e-12)
    with pytest.raises(ValueError, match="multiple"):
        shifted_sample_sums(blocked[:, :block + 1], shift[:block + 1], block)


@pytest.mark.parametrize("stage_graph", ["native", "source"])
@pytest.mark.parametrize("name", ["classifier", "residual_block", "two_bns_one_tensor", "gemm_bn1d", "multi_input",
                                  "bn_on_graph_input", "producer_several_consumers", "conv3d_bn"])
def test_head_outputs_are_the_new_models_outputs(name, stage_graph, monkeypatch):
    """`head_samples`: the rest of the graph after the stages, run on the kept first batches, gives
    what a session over the whole new model gives on those samples."""
    import onnxruntime as ort

    model = ALL_MODELS[name]()
    samples = make_samples(model, 23, seed=4)
    monkeypatch.setenv("BNFOLD_STAGE_GRAPH", stage_graph)
    result = bnfold.recalibrate(model, samples, batch_size=5, head_samples=7)
    assert result.outputs is not None and len(result.outputs) == 10  # two whole batches of 5 cover 7
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run([session.get_outputs()[0].name], {k: v[:10] for k, v in samples.items()})[0]
    scale = np.abs(want).max() + 1e-6
    assert np.abs(result.outputs - want).max() <= 1e-5 * scale
    assert "head" in result.report.timings


def test_no_head_unless_asked():
    model = ALL_MODELS["classifier"]()
    result = bnfold.recalibrate(model, make_samples(model, 6, seed=1), batch_size=4)
    assert result.outputs is None and "head" not in result.report.timings
