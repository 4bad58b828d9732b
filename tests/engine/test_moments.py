"""`bnfold.engine.moments.Moments`: per-channel population mean / biased variance in float64, mergeable exactly.

Yardstick: NumPy float64 two-pass statistics of the same values (mean, then mean of squared
deviations) over every axis but 1.
"""

from __future__ import annotations

import os

import bnfold.engine.moments
import numpy as np
import pytest

import bnfold.engine.moments as stats
from bnfold.engine.moments import Moments


def _numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    axes = (0, *range(2, x.ndim))
    mean = x.mean(axis=axes)
    centred = x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))
    return mean, (centred * centred).mean(axis=axes)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def _chunked(x: np.ndarray, sizes) -> Moments:
    acc = Moments.empty(x.shape[1])
    start = 0
    for size in sizes:
        acc = acc.merge(Moments.of(x[start : start + size]))
        start += size
    assert start == x.shape[0]
    return acc


def _data(shape, mean=3.0, std=2.0, seed=0, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_channel = rng.normal(0, 1, shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    return (rng.standard_normal(shape) * std + mean + per_channel).astype(dtype)


@pytest.mark.parametrize(
    "shape", [(50, 4), (20, 3, 7), (10, 3, 5, 6), (6, 2, 3, 4, 5)], ids=["rank2", "rank3", "rank4", "rank5"]
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_matches_numpy_float64(shape, dtype):
    x = _data(shape, dtype=dtype)
    moments = Moments.of(x)
    mean, var = _numpy(x)  # of the same (rounded) values
    assert moments.count == x.size // x.shape[1]
    assert moments.mean.dtype == np.float64 and moments.m2.dtype == np.float64 and moments.var.dtype == np.float64
    assert moments.mean.shape == moments.var.shape == (shape[1],)
    assert _rel(moments.mean, mean) <= 1e-13
    assert _rel(moments.var, var) <= 1e-12


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_offset(dtype):
    """|mean| ≫ std (1e4 vs 1e-2): no catastrophic cancellation in the variance."""
    x = _data((40, 3, 5, 5), mean=1e4, std=1e-2, seed=1, dtype=dtype)
    mean, var = _numpy(x)
    assert var.max() < 1e-3  # really tiny next to mean² = 1e8
    whole = Moments.of(x)
    assert _rel(whole.mean, mean) <= 1e-12
    assert _rel(whole.var, var) <= 1e-6
    for sizes in ([7] * 5 + [5], [1] * 40, [39, 1]):
        merged = _chunked(x, sizes)
        assert _rel(merged.mean, mean) <= 1e-12
        assert _rel(merged.var, var) <= 1e-6


def test_large_offset_with_outlier_first_sample():
    """The per-batch shift is the first sample's mean: an outlying first sample must not hurt."""
    x = _data((30, 2, 4, 4), mean=1e4, std=1e-2, seed=2)
    x[0] -= 5.0  # 500 σ away from the rest
    mean, var = _numpy(x)
    assert _rel(Moments.of(x).var, var) <= 1e-9
    assert _rel(_chunked(x, [1, 29]).var, var) <= 1e-9


def test_population_variance_no_bessel():
    x = np.array([[1.0], [3.0]])  # (N=2, C=1)
    moments = Moments.of(x)
    assert moments.count == 2
    np.testing.assert_array_equal(moments.mean, [2.0])
    np.testing.assert_array_equal(moments.var, [1.0])  # not 2.0


def test_constant_channel_has_zero_variance():
    x = np.full((9, 2, 3, 3), 0.1, np.float32)
    x[:, 1] = np.linspace(0, 1, 9, dtype=np.float32)[:, None, None]
    moments = Moments.of(x)
    assert moments.var[0] == 0.0
    assert moments.var[1] > 0
    assert _chunked(x, [2, 3, 4]).var[0] == pytest.approx(0.0, abs=1e-18)


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_block_size_does_not_change_the_result(monkeypatch, block):
    x = _data((13, 3, 6, 5), mean=50.0, dtype=np.float32, seed=3)
    default = Moments.of(x)
    monkeypatch.setattr(bnfold.engine.moments, "_BLOCK_ELEMENTS", block)
    blocked = Moments.of(x)
    assert blocked.count == default.count
    assert _rel(blocked.mean, default.mean) <= 1e-14
    assert _rel(blocked.var, default.var) <= 1e-12
    mean, var = _numpy(x)
    assert _rel(blocked.var, var) <= 1e-12


def test_non_contiguous_input():
    x = _data((10, 6, 8, 8), seed=4)[:, ::2, :, ::3]
    assert not x.flags.c_contiguous
    mean, var = _numpy(x)
    moments = Moments.of(x)
    assert _rel(moments.mean, mean) <= 1e-13 and _rel(moments.var, var) <= 1e-12


def test_rank_below_two_is_refused():
    with pytest.raises(ValueError):
        Moments.of(np.zeros(5))


# -- empty ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (5, 3, 0), (4, 3, 2, 0)])
def test_moments_of_nothing_are_empty(shape):
    """No samples (N = 0) or no elements per sample: count 0, zero mean/var, merges as a no-op."""
    moments = Moments.of(np.zeros(shape, np.float32))
    assert moments.count == 0
    assert moments.mean.shape == (3,)
    assert np.all(moments.var == 0)
    x = _data((6, 3), seed=11)
    merged = Moments.of(x).merge(moments)
    assert merged.count == 6 and _rel(merged.var, _numpy(x)[1]) <= 1e-12


def test_merge_with_empty():
    x = _data((8, 3, 2, 2), seed=5)
    full = Moments.of(x)
    empty = Moments.empty(3)
    for merged in (full.merge(empty), empty.merge(full)):
        assert merged.count == full.count
        np.testing.assert_array_equal(merged.mean, full.mean)
        np.testing.assert_array_equal(merged.m2, full.m2)
    nothing = Moments.empty(3).merge(Moments.empty(3))
    assert nothing.count == 0 and np.all(nothing.var == 0) and np.all(nothing.mean == 0)
    # empty moments anywhere in a chain of merges change nothing
    chained = empty.merge(Moments.of(x[:3])).merge(empty).merge(Moments.of(x[3:])).merge(empty)
    assert chained.count == full.count
    assert _rel(chained.var, full.var) <= 1e-12


# -- merge invariance ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "offset,dtype", [(0.0, np.float64), (3.0, np.float64), (100.0, np.float64), (1000.0, np.float64), (3.0, np.float32)]
)
def test_every_batch_size_gives_the_same_result(offset, dtype):
    """fvcore-style: splitting N samples into batches of b (last one shorter), for every b in
    1..N, gives the all-at-once moments to 1e-12 relative."""
    n = 30
    x = _data((n, 3, 4, 4), mean=offset, std=1.0, seed=6, dtype=dtype)
    whole = Moments.of(x)
    for b in range(1, n + 1):
        sizes = [b] * (n // b) + ([n % b] if n % b else [])
        merged = _chunked(x, sizes)
        assert merged.count == whole.count
        assert _rel(merged.mean, whole.mean) <= 1e-12, b
        assert _rel(merged.var, whole.var) <= 1e-12, b


def test_random_uneven_splits_give_the_same_result():
    rng = np.random.default_rng(7)
    x = _data((41, 4, 3, 3), mean=-2.0, std=0.5, seed=8, dtype=np.float32)
    whole = Moments.of(x)
    for _ in range(25):
        cuts = np.sort(rng.choice(np.arange(1, 41), size=rng.integers(1, 12), replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [41]])).tolist()
        merged = _chunked(x, sizes)
        assert _rel(merged.mean, whole.mean) <= 1e-12
        assert _rel(merged.var, whole.var) <= 1e-12


def test_chan_merge_is_symmetric_and_associative():
    x = _data((25, 3, 3, 3), mean=10.0, seed=9)
    a, b, c = Moments.of(x[:4]), Moments.of(x[4:17]), Moments.of(x[17:])
    ab, ba = a.merge(b), b.merge(a)
    assert ab.count == ba.count == a.count + b.count
    assert _rel(ab.mean, ba.mean) <= 1e-14
    assert _rel(ab.m2, ba.m2) <= 1e-12
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    assert _rel(left.mean, right.mean) <= 1e-14 and _rel(left.var, right.var) <= 1e-12
    mean, var = _numpy(x)
    assert _rel(left.var, var) <= 1e-12


def test_merge_does_not_mutate_its_operands():
    x = _data((10, 2, 2, 2), seed=10)
    a, b = Moments.of(x[:6]), Moments.of(x[6:])
    before = [(m.count, m.mean.copy(), m.m2.copy()) for m in (a, b)]
    a.merge(b)
    b.merge(a)
    for m, (count, mean, m2) in zip((a, b), before):
        assert m.count == count
        np.testing.assert_array_equal(m.mean, mean)
        np.testing.assert_array_equal(m.m2, m2)


def test_merge_of_disjoint_channels_means():
    """Two batches with very different means: the merged variance includes the between-batch part."""
    lo = np.zeros((5, 1, 2, 2))
    hi = np.full((5, 1, 2, 2), 2.0)
    merged = Moments.of(lo).merge(Moments.of(hi))
    np.testing.assert_allclose(merged.mean, [1.0])
    np.testing.assert_allclose(merged.var, [1.0])


# -- the optional C kernel ------------------------------------------------------------------------

@pytest.mark.skipif(stats._kernel is None and not os.environ.get("CI"), reason="C kernel not built here")
@pytest.mark.parametrize("shape", [(64, 16, 1024), (7, 5, 13), (300, 16, 1), (3, 2, 0), (1, 1, 5)])
def test_c_kernel_matches_the_numpy_sums(shape):
    """The one-pass C kernel gives the NumPy path's float64 sums (CI requires it to be built)."""
    assert stats._kernel is not None, "bnfold._moments was not built; pip install -e . needs a C compiler"
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal(shape) * 3 + 100).astype(np.float32)
    shift = np.full((1, shape[1], 1), 99.5)
    got = stats._shifted_sums(rows, shift)
    want = stats._shifted_sums_numpy(rows, shift)
    for g_, w in zip(got, want):
        np.testing.assert_allclose(g_, w, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "numpy"])
@pytest.mark.parametrize("shape", [(40, 64, 32, 32), (7, 5, 13), (300, 16), (3, 2, 0), (1, 1, 5)])
def test_per_sample_sums_match_numpy(shape, kernel, monkeypatch):
    """S1[n, c] = Σ(x−K), S2[n, c] = Σ(x−K)² per sample and channel, in float64 — on one thread and,
    for the first shape (2.6 M elements), split over threads by samples."""
    if not kernel:
        monkeypatch.setattr(stats, "_kernel", None)
    elif stats._kernel is None:
        pytest.skip("C kernel not built")
    x = (np.random.default_rng(4).standard_normal(shape) * 3 + 100).astype(np.float32)
    shift = np.linspace(99.0, 101.0, shape[1])
    s1, s2, length = stats.shifted_sample_sums(x, shift)
    rows = x.astype(np.float64).reshape(shape[0], shape[1], -1) - shift[None, :, None]
    assert length == rows.shape[2] and s1.shape == s2.shape == shape[:2] and s1.dtype == np.float64
    np.testing.assert_allclose(s1, rows.sum(axis=2), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(s2, (rows * rows).sum(axis=2), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_pooled_moments_from_per_sample_sums_with_a_fixed_shift(offset):
    """One shift for every batch (the runner's: the first batch's first sample), the pooled moments
    derived from the per-sample sums, merged batch by batch: the two-pass NumPy statistics."""
    x = (np.random.default_rng(5).standard_normal((37, 4, 6, 5)) * 0.5 + offset).astype(np.float32)
    shift = stats.first_sample_shift(x[:8])
    acc = Moments.empty(4)
    for start in range(0, 37, 8):
        s1, s2, length = stats.shifted_sample_sums(x[start : start + 8], shift)
        acc = acc.merge(Moments.from_sums(len(s1) * length, shift, s1.sum(axis=0), s2.sum(axis=0)))
    mean, var = _numpy(x)
    assert acc.count == 37 * 30
    np.testing.assert_allclose(acc.mean, mean, rtol=1e-12, atol=1e-12)
    assert _rel(acc.var, var) <= 1e-9
    assert _rel(Moments.of(x, shift=shift).var, var) <= 1e-9


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (2, 0, 5), (4, 3)])
def test_first_sample_shift_of_empty_and_flat_tensors(shape):
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    want = x[0].reshape(shape[1], -1).mean(axis=1) if x.size else np.zeros(shape[1])
    np.testing.assert_array_equal(stats.first_sample_shift(x), want)
