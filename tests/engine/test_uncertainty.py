"""`engine.uncertainty`: between-sample standard errors of the BN statistics, mergeable exactly.

Yardstick: NumPy float64 on the per-sample values computed directly — a_i, b_i the per-sample
channel means of x and x², se(μ) = sd(a)/√n, se(v) = sd(b − 2μ·a)/√n (delta method, sd with
divisor n − 1) — and, for calibration, the spread of the estimates over repeated draws.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnfold
from bnfold.engine import moments
from bnfold.engine.moments import Moments, per_sample_moments
from bnfold.engine.uncertainty import (
    SampleStream,
    recommendation,
    samples_needed,
    split_half,
)


def _data(n, c=3, hw=(5, 4), seed=0, offset=0.0, scale=1.0):
    """Samples with a per-sample level (so pixels of one sample are correlated) plus pixel noise."""
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 1, (n, c, 1, 1))
    return (offset + scale * (level + 0.5 * rng.standard_normal((n, c, *hw)))).astype(np.float32)


def _numpy_stderr(x):
    x = np.asarray(x, np.float64).reshape(len(x), x.shape[1], -1)
    a, b = x.mean(axis=2), (x * x).mean(axis=2)
    mu = a.mean(axis=0)
    return a.std(axis=0, ddof=1) / np.sqrt(len(x)), (b - 2 * mu * a).std(axis=0, ddof=1) / np.sqrt(len(x))


def _stream(x, sizes):
    stream, start = SampleStream(), 0
    for size in sizes:
        stream.add(x[start : start + size])
        start += size
    assert start == len(x)
    return stream


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "numpy"])
@pytest.mark.parametrize("shape", [(7, 3), (5, 4, 6, 7), (3, 64, 40, 40)])
def test_per_sample_moments_match_numpy(shape, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(moments, "_kernel", None)
    elif moments._kernel is None:
        pytest.skip("C kernel not built")
    x = np.random.default_rng(1).normal(2.0, 3.0, shape).astype(np.float32)
    shift = np.linspace(-1, 1, shape[1])
    a, b = per_sample_moments(x, shift)
    rows = x.astype(np.float64).reshape(shape[0], shape[1], -1) - shift[None, :, None]
    assert a.shape == b.shape == shape[:2] and a.dtype == b.dtype == np.float64
    np.testing.assert_allclose(a, rows.mean(axis=2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b, (rows * rows).mean(axis=2), rtol=1e-12)


def test_stderr_matches_numpy_and_moments():
    x = _data(40, offset=3.0)
    total = _stream(x, [40]).total()
    se_mean, se_var = total.stderr()
    ref_mean, ref_var = _numpy_stderr(x)
    np.testing.assert_allclose(se_mean, ref_mean, rtol=1e-10)
    np.testing.assert_allclose(se_var, ref_var, rtol=1e-9)
    pooled = Moments.of(x)  # the statistics themselves are the pixel-pooled ones
    np.testing.assert_allclose(total.mean_value, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(total.var_value, pooled.var, rtol=1e-10)


@pytest.mark.parametrize("sizes", [[1] * 150, [7] * 21 + [3], [64, 64, 22], [150], [149, 1]],
                         ids=["ones", "sevens", "sixty-fours", "whole", "uneven"])
def test_any_batching_gives_the_same_result(sizes):
    """Merge invariance, including the chunk doubling past 64 chunks and the split-half halves."""
    x = _data(150, offset=1e3, seed=2)
    whole, split = _stream(x, [150]), _stream(x, sizes)
    assert split.count == 150 and split.chunk_size == whole.chunk_size == 4
    for got, want in [(split.total(), whole.total()), *zip(split.halves(), whole.halves())]:
        assert got.count == want.count
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got.comoment, want.comoment, rtol=1e-9)
        for g, w in zip(got.stderr(), want.stderr()):
            np.testing.assert_allclose(g, w, rtol=1e-9)
    first, second = whole.halves()
    assert (first.count, second.count) == (76, 74)  # the chunk boundary (size 4) nearest 75


def test_merging_parts_with_different_shifts():
    x = _data(30, offset=50.0, seed=3)
    parts = []
    for lo, hi in ((0, 10), (10, 30)):
        stream = SampleStream()
        stream.add(x[lo:hi])  # each part picks its own shift (its first sample)
        parts.append(stream.total())
    merged = parts[0].merge(parts[1])
    direct = _stream(x, [30]).total()
    np.testing.assert_allclose(merged.mean_value, direct.mean_value, rtol=1e-12)
    np.testing.assert_allclose(merged.var_value, direct.var_value, rtol=1e-9)
    for g, w in zip(merged.stderr(), direct.stderr()):
        np.testing.assert_allclose(g, w, rtol=1e-8)


def test_large_offset_does_not_cancel():
    """|μ| = 1e4 ≫ σ = 1e-2: the shifted sums keep the standard errors accurate."""
    x = _data(50, offset=1e4, scale=1e-2, seed=4).astype(np.float64)
    got = _stream(x, [13, 37]).total().stderr()
    centred = x - x.mean(axis=(0, 2, 3), keepdims=True)  # the same values, moved near 0 exactly
    want = _numpy_stderr(centred)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_correlated_pixels_are_not_counted_as_independent():
    """Per-sample level sd 1, pixel noise sd 0.5, 20 pixels: se(μ)·√n ≈ √(1 + 0.25/20), not σ/√20."""
    x = _data(2000, c=2, seed=5)
    se_mean, _ = _stream(x, [500] * 4).total().stderr()
    np.testing.assert_allclose(se_mean * np.sqrt(2000), np.sqrt(1 + 0.25 / 20), rtol=0.05)


def test_few_samples():
    one = _stream(_data(1), [1]).total()
    assert all(np.isnan(s).all() for s in one.stderr())
    assert recommendation([], 1) == (1000, False)
    n = 200
    x = _data(n, seed=6)
    total = _stream(x, [n]).total()
    needed = samples_needed(total, total.var_value, 1e-5, n)
    recommended, sufficient = recommendation([needed], n)
    # se ∝ 1/√n: at the recommended count, 90 % of channels' predicted se(μ)/σ ≤ 2 % (and var ≤ 4 %).
    se_mean, se_var = total.stderr()
    sigma2 = total.var_value + 1e-5
    scale = np.sqrt(n / recommended)
    assert (np.maximum(se_mean * scale / np.sqrt(sigma2) / 0.02, se_var * scale / sigma2 / 0.04) <= 1 + 1e-9).mean() >= 0.9
    assert sufficient == (n >= recommended)


def test_split_half_homogeneous_and_mixed():
    rng = np.random.default_rng(7)
    same = _data(200, c=8, seed=8)[rng.permutation(200)]
    assert split_half([("bn", _stream(same, [64] * 3 + [8]), 1e-5)])["agree"]
    drifting = np.concatenate([_data(100, c=8, seed=9), _data(100, c=8, seed=10, offset=1.0, scale=1.5)])
    result = split_half([("bn", _stream(drifting, [64] * 3 + [8]), 1e-5)])
    assert not result["agree"] and result["max_abs_z"] > result["threshold"] and result["channels_beyond"] > 0
    assert split_half([("bn", _stream(same[:20], [20]), 1e-5)]) is None  # halves of 10: not compared


def test_report_contract():
    from models import conv_bn, make_samples

    model = conv_bn()
    samples = make_samples(model, 8)
    report = bnfold.recalibrate(model, samples, batch_size=3).report
    for layer in report.layers:
        assert layer.stderr_mean.shape == layer.stderr_var.shape == (layer.channels,)
        assert (layer.stderr_mean > 0).all() and (layer.stderr_var > 0).all()
    totals = report.to_dict()["totals"]
    assert totals["samples_sufficient"] is False and isinstance(totals["samples_recommended"], int)
    assert totals["samples_recommended"] > 8
    assert any("too few for the precision target" in w for w in report.warnings)
    one = bnfold.recalibrate(model, {k: v[:1] for k, v in samples.items()}).report
    assert one.layers[0].stderr_mean is None and '"stderr_mean": null' in one.to_json()


def test_recalibrate_stderr_does_not_depend_on_batching():
    from models import make_samples, residual_block

    model = residual_block()
    samples = make_samples(model, 120)
    reports = [bnfold.recalibrate(model, samples, batch_size=b).report for b in (1, 7, 120)]
    for other in reports[1:]:
        for got, want in zip(other.layers, reports[0].layers):
            np.testing.assert_allclose(got.stderr_mean, want.stderr_mean, rtol=1e-9)
            np.testing.assert_allclose(got.stderr_var, want.stderr_var, rtol=1e-9)
        assert other.samples_recommended == reports[0].samples_recommended
        split, first = other.extra["uncertainty"]["split_half"], reports[0].extra["uncertainty"]["split_half"]
        assert split["samples"] == first["samples"] and split["max_abs_z"] == pytest.approx(first["max_abs_z"], rel=1e-9)


def test_stream_fed_per_sample_moments_equals_stream_fed_tensors():
    """`add_moments` (the runner's path: one read of the tensor, one shift for all batches) gives what
    `add` gives on the raw batches; parts taken around another shift are moved to the stream's."""
    x = _data(70, offset=20.0, seed=6)
    want = _stream(x, [70])
    shift = moments.first_sample_shift(x)
    fed = SampleStream()
    for lo, hi in ((0, 9), (9, 40), (40, 70)):
        part_shift = shift if lo < 40 else shift + 3.0  # the last part around another K
        fed.add_moments(*per_sample_moments(x[lo:hi], part_shift), part_shift)
    assert fed.count == 70 and np.array_equal(fed.shift, want.shift)
    for got, ref in [(fed.total(), want.total()), *zip(fed.halves(), want.halves())]:
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got.comoment, ref.comoment, rtol=1e-9)


@pytest.mark.parametrize("sizes", [[64, 64, 22], [1] * 150, [150]], ids=["sixty-fours", "ones", "whole"])
def test_halves_after_chunk_doubling_match_numpy(sizes):
    """Past 64 chunks the stream merges neighbours (vectorised); each half still has the NumPy
    standard errors and statistics of exactly its own samples."""
    x = _data(150, offset=5.0, seed=7)
    first, second = _stream(x, sizes).halves()
    for got, part in ((first, x[:76]), (second, x[76:])):
        assert got.count == len(part)
        for g, w in zip(got.stderr(), _numpy_stderr(part)):
            np.testing.assert_allclose(g, w, rtol=1e-9)
        np.testing.assert_allclose(got.mean_value, Moments.of(part).mean, rtol=1e-12)
        np.testing.assert_allclose(got.var_value, Moments.of(part).var, rtol=1e-9)


def test_an_empty_first_batch_does_not_fix_the_shift():
    x = _data(20, offset=1e3, seed=8)
    stream = _stream(x, [0, 20])
    np.testing.assert_allclose(stream.shift, moments.first_sample_shift(x))
    assert stream.count == 20
