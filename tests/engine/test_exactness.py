"""bnfold.recalibrate computes the exact eval-mode fixed point, whatever the batching.

The yardstick is tests/reference.py (float64 NumPy, all samples at once, no onnxruntime), which
tests/test_reference.py checks against onnxruntime.

* exactness — for every test model, the engine's statistics match the reference's to
  1e-4 of the channel's standard deviation (mean) / variance (var); the returned model is valid
  and differs from the input only in the BN mean/var initializer values; the input is untouched.
* merge invariance — batch sizes 1, 3, 7, all-at-once and an iterable of uneven batches give the
  same statistics up to float64 merge rounding (the per-sample float32 activations are the same,
  only the order of accumulation changes).
* spilling — memory_budget=0 (every stored activation goes to disk) changes nothing.
* fixed point — re-measuring the recalibrated model's BN inputs in eval mode, with its own stored
  statistics, reproduces those statistics.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from models import ALL_MODELS, make_samples
from onnx import numpy_helper
from reference import reference_recalibrate, run_reference

import bnfold

N_SAMPLES = 24
# Models where several BN levels, shared tensors or several inputs make batching/spilling matter.
MERGE_MODELS = [
    "residual_block",
    "multi_input",
    "two_bns_one_tensor",
    "producer_several_consumers",
    "bn_after_bn",
    "conv_transpose_bn_g2",
    "gemm_bn1d",
    "conv3d_bn",
]

REL = 1e-4  # engine (float32 activations) vs float64 reference, relative to std / var
MERGE_REL = 1e-10  # engine vs itself under a different batching


# -- cached inputs and results (tests only read them) --------------------------------------------

@functools.cache
def _samples(name: str) -> dict[str, np.ndarray]:
    return make_samples(ALL_MODELS[name](), N_SAMPLES, seed=7)


@functools.cache
def _reference(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return reference_recalibrate(ALL_MODELS[name](), _samples(name))


@functools.cache
def _engine(name: str, batch_size: int = 5, memory_budget: int | None = None) -> bnfold.RecalibrationResult:
    kwargs = {} if memory_budget is None else {"memory_budget": memory_budget}
    return bnfold.recalibrate(ALL_MODELS[name](), _samples(name), batch_size=batch_size, **kwargs)


def _bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _layer_stats(result: bnfold.RecalibrationResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {layer.name: (layer.new_mean, layer.new_var) for layer in result.report.layers}


def _stored_stats(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: (inits[n.input[3]], inits[n.input[4]]) for n in _bn_nodes(model)}


def _assert_close(got, want, rel: float, what: str) -> None:
    """got/want: BN name -> (mean, var). |Δmean| ≤ rel·std + floor, |Δvar| ≤ rel·var + floor,
    std and var taken from ``want``; the tiny floors only matter for dead (all-zero) channels."""
    assert set(got) == set(want), f"{what}: BN layers {sorted(got)} != {sorted(want)}"
    for name, (ref_mean, ref_var) in want.items():
        mean, var = (np.asarray(a, np.float64) for a in got[name])
        assert mean.shape == ref_mean.shape and var.shape == ref_var.shape, f"{what}: {name} shape"
        ref_mean, ref_var = np.asarray(ref_mean, np.float64), np.asarray(ref_var, np.float64)
        dm, dv = np.abs(mean - ref_mean), np.abs(var - ref_var)
        tol_m, tol_v = rel * np.sqrt(ref_var) + 1e-9, rel * ref_var + 1e-12
        assert np.all(dm <= tol_m), f"{what}: {name} mean off by {dm / (tol_m)} × tolerance"
        assert np.all(dv <= tol_v), f"{what}: {name} var off by {dv / (tol_v)} × tolerance"


# -- exactness ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_matches_float64_reference(name):
    result = _engine(name)
    _assert_close(_layer_stats(result), _reference(name), REL, name)
    for layer in result.report.layers:
        assert layer.new_mean.dtype == np.float64 and layer.new_var.dtype == np.float64


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_only_bn_statistics_change(name):
    original = ALL_MODELS[name]()
    before = original.SerializeToString()
    result = bnfold.recalibrate(original, _samples(name), batch_size=5)
    assert original.SerializeToString() == before, "the input model must not be modified"
    new = result.model
    onnx.checker.check_model(new, full_check=True)
    assert new.ir_version == original.ir_version
    assert list(new.opset_import) == list(original.opset_import)

    # everything but the initializers is byte-identical
    g_old, g_new = onnx.GraphProto(), onnx.GraphProto()
    g_old.CopyFrom(original.graph)
    g_new.CopyFrom(new.graph)
    del g_old.initializer[:], g_new.initializer[:]
    assert g_new.SerializeToString() == g_old.SerializeToString(), "graph structure changed"

    stat_names = {n.input[i] for n in _bn_nodes(original) for i in (3, 4)}
    old_inits = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    new_inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert set(new_inits) == set(old_inits)
    for key, old in old_inits.items():
        value = new_inits[key]
        assert value.dtype == old.dtype and value.shape == old.shape, key
        if key in stat_names:
            assert not np.array_equal(value, old), f"{key} was not recalibrated"
        else:
            assert np.array_equal(value, old), f"{key} is not a BN statistic but changed"

    # the stored statistics are the reported ones (rounded to the initializer's float32)
    reported = _layer_stats(result)
    for bn, (mean, var) in _stored_stats(new).items():
        np.testing.assert_allclose(mean, reported[bn][0], rtol=1e-6, atol=1e-12, err_msg=bn)
        np.testing.assert_allclose(var, reported[bn][1], rtol=1e-6, atol=1e-12, err_msg=bn)


# -- merge invariance, spilling, fixed point ----------------------------------------------------

def _uneven_batches(samples: dict[str, np.ndarray]):
    """A one-shot generator of batches of sizes 1, 6, 2, 11, 4 (sum 24)."""
    start = 0
    for size in (1, 6, 2, 11, 4):
        yield {k: v[start : start + size] for k, v in samples.items()}
        start += size
    assert start == N_SAMPLES


@pytest.mark.parametrize("name", MERGE_MODELS)
def test_merge_invariance(name):
    baseline = _layer_stats(_engine(name, N_SAMPLES))  # all samples in one batch
    for batch_size in (1, 3, 7):
        _assert_close(_layer_stats(_engine(name, batch_size)), baseline, MERGE_REL, f"{name} batch_size={batch_size}")
    uneven = bnfold.recalibrate(ALL_MODELS[name](), _uneven_batches(_samples(name)), batch_size=5)
    _assert_close(_layer_stats(uneven), baseline, MERGE_REL, f"{name} uneven iterable")


@pytest.mark.parametrize("name", MERGE_MODELS)
def test_spilling_changes_nothing(name):
    spilled = _engine(name, 5, memory_budget=0)
    _assert_close(_layer_stats(spilled), _layer_stats(_engine(name)), MERGE_REL, f"{name} spilled")


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_recalibrated_model_is_a_fixed_point(name):
    model = _engine(name).model
    stored = _stored_stats(model)
    bn_inputs = {n.name: n.input[0] for n in _bn_nodes(model)}
    # one eval-mode float64 pass of the recalibrated model itself (no overrides)
    acts = run_reference(model, _samples(name), outputs=list(dict.fromkeys(bn_inputs.values())))
    measured = {}
    for bn, tensor in bn_inputs.items():
        x = acts[tensor]
        axes = (0, *range(2, x.ndim))
        measured[bn] = (x.mean(axis=axes), x.var(axis=axes))
    _assert_close(measured, {k: (m.astype(np.float64), v.astype(np.float64)) for k, (m, v) in stored.items()}, REL, name)


def test_timings_account_for_the_whole_run():
    """The report's parts (reading, sessions, ORT, statistics, store, planning, report, other) add up to the
    total, and none is counted twice ("other", the untimed rest, would then be negative)."""
    timings = _engine("residual_block", 3).report.timings
    parts = ("reading", "sessions", "onnxruntime", "statistics", "store", "planning", "report", "other")
    assert set(parts) <= set(timings)
    assert abs(sum(timings[k] for k in parts) - timings["total"]) <= 1e-6 * (1 + timings["total"])
    assert all(timings[k] >= 0 for k in parts), timings
