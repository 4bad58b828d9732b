"""Per-channel population statistics as a small mergeable value, accumulated in float64.

For a tensor x of shape (N, C, d1, …) the statistics of channel c are taken over every element
x[n, c, …] (batch and all spatial axes; just the batch for BN1d on (N, C)). ``Moments`` holds
(count, mean, M2) per channel, M2 = Σ(x − mean)², so the *population* (biased) variance is M2/count
— the eval-mode BN variance. Bessel's correction is deliberately not applied: with count = N·H·W it
would change nothing that matters, and the exact fixed point is defined by the biased moment.

Within a batch, sums are taken in float64 around a per-channel shift K (a sample's channel mean:
the batch's first sample in `Moments.of`; the recalibration runner picks it once per BN input, from
the first batch), so the float64 cancellation error of M2 = Σ(x−K)² − (Σ(x−K))²/n is
~1e-16·((μ−K)/σ)², i.e. negligible even when |μ| ≫ σ. Batches are combined with Chan et al.'s
pairwise update, so any split of the samples into batches gives the same result up to float64
rounding.

The sums are taken per (sample, channel) in one read of the tensor (`shifted_sample_sums`): their
sum over samples gives `Moments`, and the per-sample values feed the between-sample standard
errors of `engine.uncertainty` — one memory pass for both.
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

try:  # the optional C kernel (engine/_moments.c): same sums in one pass, ~5x faster
    from bnfold.engine import _moments as _kernel
except ImportError:  # not built (no C compiler at install): the NumPy path gives the same result
    _kernel = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(_THREADS, thread_name_prefix="bnfold-stats")
    return _executor


def shifted_sample_sums(x: np.ndarray, shift: np.ndarray, block: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-sample, per-channel Σ(x−K) and Σ(x−K)² over the L positions of each sample, in float64.

    x: (N, C, ...) any float dtype; shift K: float64 (C,). Returns (S1, S2, L) with S1, S2 float64
    (N, C). One read of x serves both the pooled `Moments` (sums of S1, S2 over the samples) and
    the between-sample standard errors (`engine.uncertainty`, from S1/L, S2/L).
    block: B > 1 when x is in ONNX Runtime's blocked NCHWc layout (`engine.native`): shape
    (N, C, ...) but memory (N, C/B, L, B), C a multiple of B."""
    if x.ndim < 2:
        raise ValueError(f"expected a tensor of shape (N, C, ...), got shape {x.shape}")
    n, channels = x.shape[:2]
    length = int(np.prod(x.shape[2:], dtype=np.int64))
    if block > 1:
        if channels % block:
            raise ValueError(f"blocked tensor of shape {x.shape}: {channels} channels are not a multiple of {block}")
        rows = np.ascontiguousarray(x).reshape(n, channels // block, length, block)  # (N, C/B, L, B)
    else:
        rows = np.ascontiguousarray(x).reshape(n, channels, length)  # (N, C, L)
    k = np.ascontiguousarray(np.asarray(shift, np.float64).reshape(channels))
    s1, s2 = np.empty((n, channels)), np.empty((n, channels))
    # Large tensors are split by samples over a few threads (the C kernel and NumPy's loops release
    # the GIL); each thread writes its own rows of S1, S2, so thread timing cannot change the result.
    parts = min(_THREADS, max(1, rows.size // _PARALLEL_ELEMENTS), max(n, 1))
    bounds = np.linspace(0, n, parts + 1).astype(int)
    if parts > 1:
        list(_pool().map(_sums_into, [rows] * parts, [k] * parts, [s1] * parts, [s2] * parts, bounds[:-1], bounds[1:]))
    else:
        _sums_into(rows, k, s1, s2, 0, n)
    return s1, s2, length


def _sums_into(rows: np.ndarray, k: np.ndarray, s1: np.ndarray, s2: np.ndarray, lo: int, hi: int) -> None:
    """S1[lo:hi], S2[lo:hi] of `shifted_sample_sums` for samples lo..hi−1 of rows (N, C, L) or,
    blocked, (N, C/B, L, B)."""
    part = rows[lo:hi]
    if _kernel is not None and part.dtype == np.float32 and hi > lo:
        block = part.shape[3] if part.ndim == 4 else 1
        _kernel.sample_sums_f32(part, k, s1[lo:hi], s2[lo:hi], part.shape[0], len(k), part.shape[2], block)
    else:
        if part.ndim == 4:  # to (n, C, L): a copy, only on this fallback path
            part = part.transpose(0, 1, 3, 2).reshape(part.shape[0], -1, part.shape[2])
        s1[lo:hi], s2[lo:hi] = _sample_sums_numpy(part, k)


def _sample_sums_numpy(rows: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy version of the kernel (any dtype; the reference the C kernel is tested against):
    float64 (n, C) sums, converted a block of samples at a time to bound the float64 temporary."""
    n, channels, length = rows.shape
    s1, s2 = np.empty((n, channels)), np.empty((n, channels))
    step = max(1, _BLOCK_ELEMENTS // max(1, channels * length))
    block = np.empty((min(step, n), channels, length))
    for start in range(0, n, step):
        part = block[: min(step, n - start)]
        np.subtract(rows[start : start + step], k[None, :, None], out=part)  # cast + centre in one pass
        s1[start : start + step] = np.einsum("ncl->nc", part)
        s2[start : start + step] = np.einsum("ncl,ncl->nc", part, part)
    return s1, s2


def _shifted_sums(rows: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel Σ(x−K) and Σ(x−K)² in float64 over rows (n, C, L); K = shift (1, C, 1)."""
    s1, s2, _ = shifted_sample_sums(rows, shift)
    return s1.sum(axis=0), s2.sum(axis=0)


def _shifted_sums_numpy(rows: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy version of `_shifted_sums` (the reference the C kernel is tested against)."""
    s1, s2 = _sample_sums_numpy(rows, np.asarray(shift, np.float64).reshape(rows.shape[1]))
    return s1.sum(axis=0), s2.sum(axis=0)


def first_sample_shift(x: np.ndarray, block: int = 1) -> np.ndarray:
    """K: the first sample's per-channel mean of x (N, C, ...), float64 (C,) (zeros if x is empty).
    block: as in `shifted_sample_sums`."""
    n, channels = x.shape[:2]
    length = int(np.prod(x.shape[2:], dtype=np.int64))
    if n == 0 or length == 0:
        return np.zeros(channels)
    if block > 1:  # memory (C/B, L, B) → means (C/B, B), channel-ordered
        return np.asarray(x[0]).reshape(channels // block, length, block).mean(axis=1, dtype=np.float64).ravel()
    return np.asarray(x[0]).reshape(channels, length).mean(axis=1, dtype=np.float64)


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
    def from_sums(cls, count: int, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> Moments:
        """From count elements per channel and their float64 (C,) sums Σ(x−K), Σ(x−K)² around K = shift."""
        if count == 0:
            return cls.empty(len(shift))
        mean_shifted = s1 / count
        m2 = np.maximum(s2 - s1 * mean_shifted, 0.0)
        return cls(count, shift + mean_shifted, m2)

    @classmethod
    def of(cls, x: np.ndarray, shift: np.ndarray | None = None) -> Moments:
        """Moments of x (N, C, ...) over every axis but 1, in float64 whatever x's dtype.

        shift: K (C,), float64; default: the first sample's channel means (`first_sample_shift`)."""
        if x.ndim < 2:
            raise ValueError(f"expected a tensor of shape (N, C, ...), got shape {x.shape}")
        if x.size == 0:
            return cls.empty(x.shape[1])
        shift = first_sample_shift(x) if shift is None else np.asarray(shift, np.float64)
        s1, s2, length = shifted_sample_sums(x, shift)
        return cls.from_sums(x.shape[0] * length, shift, s1.sum(axis=0), s2.sum(axis=0))


def per_sample_moments(x: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel mean of (x − K) and of (x − K)², float64 arrays of shape (N, C).

    x: (N, C, ...) any float dtype; shift K: float64 (C,). The between-sample spread of these is
    what `engine.uncertainty` turns into standard errors; the shift keeps the squares from
    cancelling when |mean| ≫ std."""
    s1, s2, length = shifted_sample_sums(x, shift)
    return s1 / max(length, 1), s2 / max(length, 1)
