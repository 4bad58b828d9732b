"""Per-channel population statistics as a small mergeable value, accumulated in float64.

For a tensor x of shape (N, C, d1, …) the statistics of channel c are taken over every element
x[n, c, …] (batch and all spatial axes; just the batch for BN1d on (N, C)). ``Moments`` holds
(count, mean, M2) per channel, M2 = Σ(x − mean)², so the *population* (biased) variance is M2/count
— the eval-mode BN variance. Bessel's correction is deliberately not applied: with count = N·H·W it
would change nothing that matters, and the exact fixed point is defined by the biased moment.

Within a batch, sums are taken in float64 around a per-channel shift K (the first sample's channel
mean), so the float64 cancellation error of M2 = Σ(x−K)² − (Σ(x−K))²/n is ~1e-16·((μ−K)/σ)², i.e.
negligible even when |μ| ≫ σ. Batches are combined with Chan et al.'s pairwise update, so any split
of the samples into batches gives the same result up to float64 rounding.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Elements converted to float64 at a time: small enough to stay in cache, large enough to amortise
# the Python loop. 256 K elements = 2 MiB of float64.
_BLOCK_ELEMENTS = 1 << 18
# Tensors above this many elements per thread are reduced on several threads.
_PARALLEL_ELEMENTS = 1 << 20
_THREADS = min(4, os.cpu_count() or 1)
_executor: ThreadPoolExecutor | None = None

try:  # the optional C kernel (bnfold/_moments.c): same sums in one pass, ~5x faster
    from bnfold.engine import _moments as _kernel
except ImportError:  # not built (no C compiler at install): the NumPy path gives the same result
    _kernel = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_THREADS, thread_name_prefix="bnfold-stats")
    return _executor


def _shifted_sums(rows: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel Σ(x−K) and Σ(x−K)² in float64 over rows (n, C, L); K = shift (1, C, 1)."""
    if _kernel is not None and rows.dtype == np.float32 and rows.flags.c_contiguous:
        n, channels, length = rows.shape
        s1, s2 = np.zeros(channels), np.zeros(channels)
        _kernel.shifted_sums_f32(rows, np.ascontiguousarray(shift.ravel()), s1, s2, n, channels, length)
        return s1, s2
    return _shifted_sums_numpy(rows, shift)


def _shifted_sums_numpy(rows: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy version of `_shifted_sums` (any dtype; the reference the C kernel is tested against)."""
    n, channels, length = rows.shape
    s1 = np.zeros(channels)
    s2 = np.zeros(channels)
    step = max(1, _BLOCK_ELEMENTS // max(1, channels * length))
    block = np.empty((min(step, n), channels, length))
    for start in range(0, n, step):
        part = block[: min(step, n - start)]
        np.subtract(rows[start : start + step], shift, out=part)  # cast + centre in one pass
        s1 += np.einsum("ncl->c", part)
        s2 += np.einsum("ncl,ncl->c", part, part)
    return s1, s2


@dataclasses.dataclass
class Moments:
    """count: elements per channel; mean, m2: float64 arrays of shape (C,)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> Moments:
        return cls(0, np.zeros(channels), np.zeros(channels))

    @property
    def var(self) -> np.ndarray:
        """Population (biased) variance, float64 (C,)."""
        return self.m2 / max(self.count, 1)

    def merge(self, other: Moments) -> Moments:
        """Chan, Golub & LeVeque (1979): exact combination of two disjoint sets' moments."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """Moments of x (N, C, ...) over every axis but 1, in float64 whatever x's dtype."""
        if x.ndim < 2:
            raise ValueError(f"expected a tensor of shape (N, C, ...), got shape {x.shape}")
        n, channels = x.shape[:2]
        rows = np.ascontiguousarray(x).reshape(n, channels, int(np.prod(x.shape[2:], dtype=np.int64)))  # (N, C, L)
        per_channel = n * rows.shape[2]
        if per_channel == 0:
            return cls.empty(channels)
        shift = rows[0].mean(axis=1, dtype=np.float64)[None, :, None]
        # Large tensors are split by samples over a few threads (NumPy releases the GIL in these
        # loops); the partial sums are added in a fixed order, so the result does not depend on
        # thread timing.
        parts = min(_THREADS, max(1, rows.size // _PARALLEL_ELEMENTS), n)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        pieces = [rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        sums = list(_pool().map(_shifted_sums, pieces, [shift] * parts)) if parts > 1 else [_shifted_sums(rows, shift)]
        s1 = sum(p[0] for p in sums)
        s2 = sum(p[1] for p in sums)
        mean_shifted = s1 / per_channel
        m2 = np.maximum(s2 - s1 * mean_shifted, 0.0)
        return cls(per_channel, shift[0, :, 0] + mean_shifted, m2)


def per_sample_moments(x: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel mean of (x − K) and of (x − K)², float64 arrays of shape (N, C).

    x: (N, C, ...) any float dtype; shift K: float64 (C,). The between-sample spread of these is
    what `engine.uncertainty` turns into standard errors; the shift keeps the squares from
    cancelling when |mean| ≫ std. Reuses the C kernel one sample at a time when it is built."""
    if x.ndim < 2:
        raise ValueError(f"expected a tensor of shape (N, C, ...), got shape {x.shape}")
    n, channels = x.shape[:2]
    rows = np.ascontiguousarray(x).reshape(n, channels, -1)  # (N, C, L)
    length = max(rows.shape[2], 1)
    k = np.asarray(shift, np.float64).reshape(1, channels, 1)
    s1, s2 = np.empty((n, channels)), np.empty((n, channels))
    per_sample = channels * rows.shape[2]
    if _kernel is not None and per_sample >= _BLOCK_ELEMENTS // 16:  # big samples: one fast kernel call each

        def sample_range(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                s1[i], s2[i] = _shifted_sums(rows[i : i + 1], k)

        # like Moments.of: large batches are split by samples over a few threads (the kernel releases the GIL)
        parts = min(_THREADS, max(1, rows.size // _PARALLEL_ELEMENTS), n)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        list(_pool().map(sample_range, bounds[:-1], bounds[1:]))
        return s1 / length, s2 / length
    step = max(1, _BLOCK_ELEMENTS // max(1, per_sample))  # small samples: vectorised over a block of them
    for start in range(0, n, step):
        part = np.subtract(rows[start : start + step], k, dtype=np.float64)
        s1[start : start + step] = part.sum(axis=2)
        s2[start : start + step] = np.einsum("ncl,ncl->nc", part, part)
    return s1 / length, s2 / length
