"""Optional source prior for few samples (Schneider et al., NeurIPS 2020, "Improving robustness
against common corruptions by covariate shift adaptation").

With prior weight N (in samples) and n target samples, each BN gets

    μ = (N·μ_src + n·μ_tgt) / (N + n)        σ² = (N·σ²_src + n·σ²_tgt) / (N + n)

where μ_src, σ²_src are the model's own running statistics. The *variances* are mixed, as in the
paper (and as a momentum update of running statistics does), not the second moments: mixing
E[x²] would add N·n/(N+n)²·(μ_src − μ_tgt)², the spread *between* the two domains, which under a
large shift inflates σ and shrinks every activation further — the opposite of what adaptation is
for. The mixing happens inside the fixed point: a level's statistics are mixed before the levels
downstream are measured, so those see the activations the mixed model will produce.

When it helps and when it hurts: the prior trades variance for bias. It helps when the target
statistics are noisy (very few samples) *and* the shift is mild: the paper reports gains on
ImageNet-C at low severities with N ≈ 16 and n = 1–8. On bnfold's digits model under a mild shift
(80 % contrast, noise σ = 0.05), N = 16 at n = 1 raised the worst of 20 draws from 95.6 % to 96.6 %
(mean 96.5 → 96.6 %): a small gain in reliability. Under a severe shift it hurts, badly: on the
digits "new lab" (source statistics 20 %), N = 16 gave 42 % at n = 16 against 93 % with the target
statistics alone (10 draws each; the project notes measured 52 % vs 77 % in another split). It is
off by default; `samples_recommended` in the report says whether n is small enough for it to matter.
"""

from __future__ import annotations

import math

import numpy as np

from bnfold.errors import InvalidOptions


def check_prior(prior: float) -> None:
    """prior: a finite number of samples ≥ 0 (0: off)."""
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not math.isfinite(prior) or prior < 0:
        raise InvalidOptions(f"prior must be a finite number of samples ≥ 0 (0: off), got {prior!r}")


def mix(prior: float, samples: int, source_mean, source_var, target_mean: np.ndarray,
        target_var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ²) float64 (C,) mixed with weights prior : samples; the target ones when prior is 0."""
    if not prior:
        return target_mean, target_var
    w = prior / (prior + samples)
    source_mean, source_var = np.asarray(source_mean, np.float64), np.asarray(source_var, np.float64)
    return w * source_mean + (1 - w) * target_mean, w * source_var + (1 - w) * target_var


def summary(prior: float, samples: int) -> dict:
    """What the report says about which statistics were used."""
    if not prior:
        return {"statistics": "target", "prior": 0.0, "source_weight": 0.0}
    return {"statistics": "source prior mixed with target (Schneider et al. 2020)", "prior": prior,
            "source_weight": prior / (prior + samples)}
