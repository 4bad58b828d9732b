"""What recalibration changed, per BN layer, as plain dataclasses that serialise to JSON.

Shift scores compare the old (source-domain) and new (target-domain) per-channel Gaussians
N(μ_old, σ²_old) and N(μ_new, σ²_new), σ² = var + eps:

* ``mean_shift`` — mean over channels of |μ_new − μ_old| / σ_old (how many source standard
  deviations the activations moved), and ``max_mean_shift`` its maximum.
* ``kl`` — mean over channels of KL(new ‖ old) in nats,
  ½·(σ²_new/σ²_old + (μ_new − μ_old)²/σ²_old − 1 + ln(σ²_old/σ²_new)).
* ``var_ratio`` — geometric mean over channels of var_new / var_old.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np


@dataclasses.dataclass
class ShiftScore:
    mean_shift: float
    max_mean_shift: float
    kl: float
    var_ratio: float


@dataclasses.dataclass
class LayerReport:
    """One BatchNormalization node. Arrays are per channel, float64, shape (channels,)."""

    name: str
    input: str
    level: int  # number of BN nodes on the longest path above this one
    channels: int
    count: int  # elements per channel that the statistics were measured over
    epsilon: float
    old_mean: np.ndarray
    old_var: np.ndarray
    new_mean: np.ndarray
    new_var: np.ndarray
    shift: ShiftScore
    warnings: list[str] = dataclasses.field(default_factory=list)
    # Standard errors of new_mean / new_var from the between-sample spread (`engine.uncertainty`),
    # in their units; None below 2 samples. With a source prior they are those of the target-only
    # statistics target_mean / target_var, which the prior then mixes into new_mean / new_var.
    stderr_mean: np.ndarray | None = None
    stderr_var: np.ndarray | None = None
    target_mean: np.ndarray | None = None
    target_var: np.ndarray | None = None


@dataclasses.dataclass
class Report:
    """Result of one recalibration: per-layer changes, totals, timings (seconds) and warnings."""

    samples: int
    batches: int
    layers: list[LayerReport]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    samples_recommended: int | None = None  # for the precision target in `engine.uncertainty`
    samples_sufficient: bool | None = None
    # Did it help (`bnfold.trust`): label-free signals on the samples, and the labelled check
    # {metric, before, after, samples} when check samples and labels were given.
    signals: dict[str, Any] | None = None
    check: dict[str, Any] | None = None

    @property
    def totals(self) -> dict[str, Any]:
        shifts = [layer.shift for layer in self.layers]
        return {
            "bn_layers": len(self.layers),
            "levels": 1 + max((layer.level for layer in self.layers), default=-1),
            "samples": self.samples,
            "mean_shift": float(np.mean([s.mean_shift for s in shifts])) if shifts else 0.0,
            "max_mean_shift": max((s.max_mean_shift for s in shifts), default=0.0),
            "kl": float(np.mean([s.kl for s in shifts])) if shifts else 0.0,
            "samples_recommended": self.samples_recommended,
            "samples_sufficient": self.samples_sufficient,
        }

    def to_dict(self) -> dict[str, Any]:
        def convert(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                return value.tolist()
            if isinstance(value, (np.floating, np.integer)):
                return value.item()
            if dataclasses.is_dataclass(value):
                return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, dict):
                return {k: convert(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [convert(v) for v in value]
            return value

        out = convert(self)
        out["totals"] = self.totals
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def shift_score(old_mean, old_var, new_mean, new_var, eps: float) -> ShiftScore:
    """Scores of how far the new per-channel Gaussians moved from the old ones (see module doc)."""
    old_s2 = np.asarray(old_var, np.float64) + eps
    new_s2 = np.asarray(new_var, np.float64) + eps
    delta = np.asarray(new_mean, np.float64) - np.asarray(old_mean, np.float64)
    z = np.abs(delta) / np.sqrt(old_s2)
    kl = 0.5 * (new_s2 / old_s2 + delta**2 / old_s2 - 1.0 + np.log(old_s2 / new_s2))
    return ShiftScore(
        mean_shift=float(z.mean()),
        max_mean_shift=float(z.max()),
        kl=float(kl.mean()),
        var_ratio=float(np.exp(np.mean(np.log(new_s2 / old_s2)))),
    )
