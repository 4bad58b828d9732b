"""How sure the new BN statistics are: standard errors from how they vary *between samples*.

Model: the samples are n independent draws from the target domain. The positions within one
sample are not independent (neighbouring activations are strongly correlated), so treating the
n·L values of a channel as independent would give standard errors ~√(L·ρ) too small; the unit of
replication is the sample (a cluster, in survey terms). Per sample i and channel c, with a fixed
per-channel shift K (below):

    a_i = mean over the sample's L positions of (x − K)        (per-sample mean)
    b_i = mean over the sample's L positions of (x − K)²       (per-sample mean of squares)

Every sample has the same L positions, so the statistics bnfold writes are exactly

    μ = K + ā,     v = b̄ − ā²            (ā, b̄: averages over the n samples)

Standard errors (between-sample variance; delta method for v, whose gradient in (ā, b̄) is (−2ā, 1)):

    se(μ)² = s_aa / n
    se(v)² = (s_bb − 4ā·s_ab + 4ā²·s_aa) / n  =  Var_between(b − 2ā·a) / n

s_aa, s_ab, s_bb: sample (co)variances across samples (divisor n − 1). Both are invariant to K
(b − 2ā·a equals the per-sample mean of (x − μ)² up to a constant). They are conditional on the
statistics upstream; in the fixed point those are estimated from the same samples, which the
calibration test on a held-out shift (tests/engine/test_uncertainty_calibration.py) includes.

Accumulation (mergeable, float64): count, K, means (ā, b̄) and co-moment sums C_aa = Σ(a−ā)²,
C_ab, C_bb per channel, merged with Chan et al.'s pairwise update C = C₁ + C₂ + δδᵀ·n₁n₂/n. K is
the first sample's channel mean, so no batching can change it; parts with another K are first
moved to ours (a → a + d, b → b + 2d·a + d², an affine map of means and co-moments). Any split
of the samples into batches therefore gives the same result up to float64 rounding. K keeps the
squares from cancelling when |μ| ≫ σ (see `moments`).

Cost: none beyond the pooled statistics. The recalibration runner reads each measured tensor once
(`moments.shifted_sample_sums`, per-sample shifted sums S1, S2 of shape (N, C)); the pooled
`moments.Moments` are their sums over samples, and `SampleStream.add_moments` takes a = S1/L,
b = S2/L around the same K (bench/RESULTS.md §5, "one pass for pooled and per-sample moments").

Split-half agreement: `SampleStream` also keeps the moments of ≤ 64 consecutive chunks of the
sample sequence, so the first and second half (split at the chunk boundary nearest n/2) can be
compared; see `split_half`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bnfold.engine.moments import first_sample_shift, per_sample_moments
from bnfold.errors import plural


@dataclasses.dataclass
class SampleMoments:
    """count: samples; shift: K (C,); mean: (ā, b̄) as (2, C); comoment: (C_aa, C_ab, C_bb) as (3, C). float64."""

    count: int
    shift: np.ndarray
    mean: np.ndarray
    comoment: np.ndarray

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, shift: np.ndarray) -> SampleMoments:
        """From per-sample moments a, b (N, C) taken around `shift` (C,)."""
        mean = np.stack([a.mean(axis=0), b.mean(axis=0)]) if len(a) else np.zeros((2, a.shape[1]))
        da, db = a - mean[0], b - mean[1]
        comoment = np.stack([(da * da).sum(axis=0), (da * db).sum(axis=0), (db * db).sum(axis=0)])
        return cls(len(a), shift, mean, comoment)

    def moved_to(self, shift: np.ndarray) -> SampleMoments:
        """The same moments around another shift K' (a' = a + d, b' = b + 2d·a + d², d = K − K')."""
        d = self.shift - shift
        if not d.any():
            return self
        a, b = self.mean
        caa, cab, cbb = self.comoment
        mean = np.stack([a + d, b + 2 * d * a + d * d])
        comoment = np.stack([caa, cab + 2 * d * caa, cbb + 4 * d * cab + 4 * d * d * caa])
        return SampleMoments(self.count, shift, mean, comoment)

    def merge(self, other: SampleMoments) -> SampleMoments:
        """Chan, Golub & LeVeque (1979) for means and co-moments of two disjoint sample sets."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other.moved_to(self.shift)
        other = other.moved_to(self.shift)
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        w = self.count * other.count / n
        outer = np.stack([delta[0] * delta[0], delta[0] * delta[1], delta[1] * delta[1]])
        return SampleMoments(n, self.shift, mean, self.comoment + other.comoment + outer * w)

    @property
    def mean_value(self) -> np.ndarray:
        """μ = K + ā, float64 (C,)."""
        return self.shift + self.mean[0]

    @property
    def var_value(self) -> np.ndarray:
        """v = b̄ − ā², float64 (C,) (the same biased variance `moments.Moments` computes)."""
        return np.maximum(self.mean[1] - self.mean[0] ** 2, 0.0)

    def stderr(self) -> tuple[np.ndarray, np.ndarray]:
        """(se(μ), se(v)), float64 (C,) each, in the units of mean and var; NaN below 2 samples."""
        n = self.count
        if n < 2:
            nan = np.full(self.shift.shape, np.nan)
            return nan, nan.copy()
        caa, cab, cbb = self.comoment / (n - 1)
        a = self.mean[0]
        var_of_var = np.maximum(cbb - 4 * a * cab + 4 * a * a * caa, 0.0)
        return np.sqrt(np.maximum(caa, 0.0) / n), np.sqrt(var_of_var / n)


class SampleStream:
    """Per-sample moments of one BN input, fed batch by batch in sample order.

    Keeps ≤ MAX_CHUNKS chunks of `chunk_size` consecutive samples (the size doubles, merging
    neighbours, when they would be more): the boundaries depend only on the sample index, never on
    the batching."""

    MAX_CHUNKS = 64

    def __init__(self) -> None:
        self.shift: np.ndarray | None = None
        self.chunks: _Chunks | None = None
        self.chunk_size = 1
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        """x: a batch (N, C, ...) of the BN input, any float dtype."""
        shift = first_sample_shift(x) if self.shift is None else self.shift
        self.add_moments(*per_sample_moments(x, shift), shift)

    def add_moments(self, a: np.ndarray, b: np.ndarray, shift: np.ndarray) -> None:
        """The next samples' per-sample moments a, b (N, C), float64, taken around `shift` K (C,)
        (`moments.per_sample_moments`). The first call fixes the stream's K; later parts taken
        around another K are moved to it (a → a + d, b → b + 2d·a + d², d = K_part − K)."""
        if len(a) == 0:  # an empty batch must not fix K
            return
        if self.shift is None:
            self.shift = np.asarray(shift, np.float64)
        d = np.asarray(shift, np.float64) - self.shift
        if d.any():
            a, b = a + d, b + 2 * d * a + d * d
        if self.chunks is None:
            self.chunks = _Chunks(len(self.shift))
        start = 0
        while start < len(a):
            filled = self.count % self.chunk_size
            if filled:  # top up the last chunk
                taken = min(len(a) - start, self.chunk_size - filled)
                self.chunks.top_up(a[start : start + taken], b[start : start + taken])
            else:  # new chunks, up to the first one past MAX_CHUNKS, in one vectorised step
                taken = min(len(a) - start, (self.MAX_CHUNKS + 1 - len(self.chunks)) * self.chunk_size)
                self.chunks.append(a[start : start + taken], b[start : start + taken], self.chunk_size)
            self.count += taken
            start += taken
            if len(self.chunks) > self.MAX_CHUNKS:
                self.chunks.merge_pairs()
                self.chunk_size *= 2

    def total(self) -> SampleMoments:
        return self._pooled(slice(None))

    def halves(self) -> tuple[SampleMoments, SampleMoments]:
        """Moments of the first and the second half of the samples (split at a chunk boundary)."""
        cut = round(self.count / 2 / self.chunk_size)
        return self._pooled(slice(None, cut)), self._pooled(slice(cut, None))

    def _pooled(self, chunks: slice) -> SampleMoments:
        """The chunks in `chunks` as one SampleMoments: the count-weighted mean, and the co-moments
        Σ C_i + Σ n_i·(m_i − m)(m_i − m)ᵀ (the parallel-axis form of merging them pairwise, in one
        vectorised step: merging 64 chunks one `merge` at a time was most of the report's time on
        a small model, 52 BNs × 2 halves)."""
        if self.chunks is None or self.shift is None:
            return SampleMoments(0, self.shift, np.zeros((2, 0)), np.zeros((3, 0)))
        count, mean, comoment = self.chunks.count[chunks], self.chunks.mean[chunks], self.chunks.comoment[chunks]
        n = count.sum()
        if n == 0:
            return SampleMoments(0, self.shift, np.zeros(mean.shape[1:]), np.zeros(comoment.shape[1:]))
        pooled = (count[:, None, None] * mean).sum(axis=0) / n
        d, w = mean - pooled, count[:, None]
        outer = np.stack([(w * d[:, 0] * d[:, 0]).sum(axis=0), (w * d[:, 0] * d[:, 1]).sum(axis=0),
                          (w * d[:, 1] * d[:, 1]).sum(axis=0)])
        return SampleMoments(int(n), self.shift, pooled, comoment.sum(axis=0) + outer)


class _Chunks:
    """The chunks of a `SampleStream` as arrays — count (m,), mean (m, 2, C), comoment (m, 3, C),
    all around the stream's K. Why arrays, not a list of `SampleMoments`: one Python object per
    chunk (~30 µs each) was several times the memory pass itself on a small model (mobilenet_v2 at
    64×64, 52 BNs); here a batch costs a few vectorised operations."""

    def __init__(self, channels: int) -> None:
        self.count = np.zeros(0)
        self.mean = np.zeros((0, 2, channels))
        self.comoment = np.zeros((0, 3, channels))

    def __len__(self) -> int:
        return len(self.count)

    def append(self, a: np.ndarray, b: np.ndarray, size: int) -> None:
        """New chunks of `size` consecutive samples of a, b (N, C) (the last may be shorter)."""
        full = len(a) // size
        counts, means, comoments = [self.count], [self.mean], [self.comoment]
        if full:
            n, m, c = _group(np.stack([a[: full * size], b[: full * size]], axis=1).reshape(full, size, 2, a.shape[1]))
            counts.append(n), means.append(m), comoments.append(c)
        if full * size < len(a):
            n, m, c = _group(np.stack([a[full * size :], b[full * size :]], axis=1)[None])
            counts.append(n), means.append(m), comoments.append(c)
        self.count, self.mean, self.comoment = np.concatenate(counts), np.concatenate(means), np.concatenate(comoments)

    def top_up(self, a: np.ndarray, b: np.ndarray) -> None:
        """Add the samples a, b (N, C) to the last chunk."""
        n, m, c = _group(np.stack([a, b], axis=1)[None])
        last = slice(len(self) - 1, None)
        self.count[last], self.mean[last], self.comoment[last] = _chan(
            self.count[last], self.mean[last], self.comoment[last], n, m, c
        )

    def merge_pairs(self) -> None:
        """Chunks 0+1, 2+3, … (a last odd one stays as it is)."""
        even = 2 * (len(self) // 2)
        merged = _chan(*(v[0:even:2] for v in (self.count, self.mean, self.comoment)),
                       *(v[1:even:2] for v in (self.count, self.mean, self.comoment)))  # fmt: skip
        rest = (self.count[even:], self.mean[even:], self.comoment[even:])
        self.count, self.mean, self.comoment = (np.concatenate([m, r]) for m, r in zip(merged, rest))


def _group(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count (k,), mean (k, 2, C) and co-moments (k, 3, C) of k groups of per-sample (a, b), ab (k, n, 2, C)."""
    mean = ab.mean(axis=1)
    d = ab - mean[:, None]
    da, db = d[:, :, 0], d[:, :, 1]
    comoment = np.stack([(da * da).sum(axis=1), (da * db).sum(axis=1), (db * db).sum(axis=1)], axis=1)
    return np.full(len(ab), float(ab.shape[1])), mean, comoment


def _chan(n1, mean1, com1, n2, mean2, com2):
    """`SampleMoments.merge` on stacks of chunk pairs (counts (k,), means (k, 2, C), co-moments (k, 3, C))."""
    n = n1 + n2
    w1, w2 = n1[:, None, None], n2[:, None, None]
    delta = mean2 - mean1
    mean = mean1 + delta * (w2 / (w1 + w2))
    outer = np.stack([delta[:, 0] * delta[:, 0], delta[:, 0] * delta[:, 1], delta[:, 1] * delta[:, 1]], axis=1)
    return n, mean, com1 + com2 + outer * (w1 * w2 / (w1 + w2))


# --- what the standard errors mean for the user --------------------------------------------------

#: Precision target for `samples_recommended`: se(μ) ≤ 2 % of σ and se(v) ≤ 4 % of σ² (σ² = var + ε;
#: a 2 % error in σ is a 4 % error in σ²), met by 90 % of all BN channels of the model.
TARGET_MEAN = 0.02
TARGET_VAR = 0.04
COVERAGE = 0.90
#: Below this the standard errors are themselves too rough (a variance from < 30 values) to call
#: any sample count sufficient; with fewer than 2 samples there is no estimate at all.
MIN_SAMPLES = 30
#: PreciseBN (Wu & Johnson, 2021) recommends 10^3–10^4 samples: the fallback without an estimate.
FALLBACK_SAMPLES = 1000
#: Split-half: family-wise false-alarm rate over all channels and both statistics; halves smaller
#: than this are not compared.
SPLIT_ALPHA = 1e-3
SPLIT_MIN_HALF = 16


def samples_needed(moments: SampleMoments, var: np.ndarray, eps: float, samples: int) -> np.ndarray:
    """Per channel, the sample count at which both targets are met (se ∝ 1/√n), float64 (C,)."""
    se_mean, se_var = moments.stderr()
    sigma2 = np.asarray(var, np.float64) + eps
    ratio = np.maximum((se_mean / (TARGET_MEAN * np.sqrt(sigma2))) ** 2, (se_var / (TARGET_VAR * sigma2)) ** 2)
    return samples * ratio


def recommendation(needed: list[np.ndarray], samples: int) -> tuple[int, bool]:
    """(samples_recommended, samples_sufficient) from every layer's per-channel `samples_needed`."""
    if samples < 2 or not needed:
        return max(FALLBACK_SAMPLES, MIN_SAMPLES), False
    everything = np.concatenate(needed)
    recommended = max(MIN_SAMPLES, int(np.ceil(np.quantile(everything, COVERAGE, method="inverted_cdf"))))
    return recommended, samples >= recommended


def split_half(streams: list[tuple[str, SampleStream, float]]) -> dict | None:
    """Do the first and second half of the samples agree within their uncertainty?

    Per channel, z = (θ_A − θ_B) / √(se_A² + se_B²) for θ = mean and var. Under a homogeneous,
    shuffled sample set the z are roughly Student-t with n_half − 1 degrees of freedom; the
    threshold is Bonferroni over all 2·channels tests at `SPLIT_ALPHA` (t quantile by a
    Cornish–Fisher expansion, to keep SciPy out of the core). A larger |z| means the samples
    change along the sequence: a mixture of domains in order, or drift. None when a half has
    fewer than `SPLIT_MIN_HALF` samples."""
    halves = [(name, *stream.halves(), eps) for name, stream, eps in streams]
    if not halves or min(min(a.count, b.count) for _, a, b, _ in halves) < SPLIT_MIN_HALF:
        return None
    worst, tests, beyond = (0.0, "", ""), 0, 0
    per_layer = []
    for name, first, second, eps in halves:
        (se_ma, se_va), (se_mb, se_vb) = first.stderr(), second.stderr()
        scale = first.var_value + second.var_value + eps
        z_mean = (first.mean_value - second.mean_value) / np.sqrt(se_ma**2 + se_mb**2 + 1e-24 * scale)
        z_var = (first.var_value - second.var_value) / np.sqrt(se_va**2 + se_vb**2 + 1e-24 * scale**2)
        per_layer.append((name, z_mean, z_var))
        tests += 2 * len(z_mean)
    df = min(min(a.count, b.count) for _, a, b, _ in halves) - 1
    threshold = _t_quantile(1 - SPLIT_ALPHA / (2 * tests), df)
    for name, z_mean, z_var in per_layer:
        for statistic, z in (("mean", z_mean), ("var", z_var)):
            beyond += int((np.abs(z) > threshold).sum())
            if np.abs(z).max() > worst[0]:
                worst = (float(np.abs(z).max()), name, statistic)
    first, second = halves[0][1], halves[0][2]
    return {
        "samples": [first.count, second.count], "max_abs_z": worst[0], "layer": worst[1], "statistic": worst[2],
        "threshold": threshold, "channels_beyond": beyond, "tests": tests, "agree": worst[0] <= threshold,
    }


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile from the normal one (Cornish–Fisher, 3 terms; within ~1 % for df ≥ 15)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(p)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2) + (
        3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)


@dataclasses.dataclass
class Assessment:
    """Per-layer standard errors (None below 2 samples) and what they mean for the whole set."""

    stderr: list[tuple[np.ndarray | None, np.ndarray | None]]
    samples_recommended: int
    samples_sufficient: bool
    split: dict | None
    warnings: list[str]

    def summary(self) -> dict:
        return {
            "target": {"stderr_mean_over_sigma": TARGET_MEAN, "stderr_var_over_sigma2": TARGET_VAR,
                       "channel_coverage": COVERAGE, "min_samples": MIN_SAMPLES},
            "split_half": self.split,
        }


def assess(layers: list[tuple[str, SampleStream, np.ndarray, float]], samples: int) -> Assessment:
    """layers: (BN name, its input's stream, new var (C,), epsilon) in report order; samples: n."""
    totals = [stream.total() for _, stream, _, _ in layers]
    stderr = [m.stderr() if samples >= 2 else (None, None) for m in totals]
    needed = [samples_needed(m, var, eps, samples) for m, (_, _, var, eps) in zip(totals, layers)] if samples >= 2 else []
    recommended, sufficient = recommendation(needed, samples)
    warnings = []
    if not sufficient:
        warnings.append(
            f"{plural(samples, 'sample')} {'is' if samples == 1 else 'are'} too few for the precision target (standard error ≤ {TARGET_MEAN:.0%} of σ for "
            f"the mean and ≤ {TARGET_VAR:.0%} of σ² for the variance, in {COVERAGE:.0%} of channels): about "
            f"{recommended} samples recommended")
    split = split_half([(name, stream, eps) for name, stream, _, eps in layers])
    if split is not None and not split["agree"]:
        warnings.append(
            f"the first and second half of the samples disagree beyond their uncertainty (|z| = {split['max_abs_z']:.1f} "
            f"> {split['threshold']:.1f} for the {split['statistic']} of '{split['layer']}', {split['channels_beyond']} "
            "channel statistics beyond): a mixture of domains in order, or drift. Adapting to a mixture can be worse "
            "than not adapting; recalibrate on one domain at a time")
    return Assessment(stderr, recommended, sufficient, split, warnings)
