"""The agreement gate: how closely the INT8 model follows the float model on the samples.

For every output, over all compared samples, with f the float model's output and q the INT8 one's
(both as float64, flattened over all samples):

    max_abs  = max |q − f|,       rel_max  = max_abs / max |f|
    mean_abs = mean |q − f|,      rel_mean = mean_abs / mean |f|
    cosine   = Σ q·f / (‖q‖ ‖f‖)  (1 when both are zero)

Classifier-like outputs — float outputs of shape (N, K) with K ≥ 2 — also get ``top1``, the
fraction of samples whose arg-max class is the same. Integer and bool outputs (e.g. an ArgMax in
the graph) get ``top1`` as the fraction of equal elements. The gate passes when every ``top1`` is
≥ ``min_agreement`` and every float output's ``cosine`` is ≥ ``min_cosine``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

#: top-1 agreement below which the INT8 model is refused (classifier-like and discrete outputs)
DEFAULT_MIN_AGREEMENT = 0.98
#: cosine similarity below which the INT8 model is refused (every float output)
DEFAULT_MIN_COSINE = 0.99


@dataclasses.dataclass
class OutputAgreement:
    """kind: 'classifier' (float (N, K), K ≥ 2), 'float' (other float outputs) or 'discrete' (integer, bool)."""

    name: str
    kind: str
    max_abs: float = 0.0
    rel_max: float = 0.0
    mean_abs: float = 0.0
    rel_mean: float = 0.0
    cosine: float = 1.0
    top1: float | None = None


class Agreement:
    """Streams batches of (float, int8) outputs; `result` gives one `OutputAgreement` per output."""

    def __init__(self, names: list[str]):
        self._names = names
        self._sums = {n: dict.fromkeys(("count", "abs", "ref_abs", "dot", "qq", "ff", "rows", "same"), 0.0) for n in names}
        self._max = {n: [0.0, 0.0] for n in names}  # max |q − f|, max |f|
        self._classifier = dict.fromkeys(names, False)
        self._discrete = dict.fromkeys(names, False)

    def add(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> None:
        for name, f, q in zip(self._names, reference, candidate):
            s = self._sums[name]
            if f.dtype.kind not in "fc":
                self._discrete[name] = True
                s["rows"] += f.size
                s["same"] += float(np.count_nonzero(f == q))
                continue
            if f.ndim == 2 and f.shape[1] >= 2:
                self._classifier[name] = True
                s["rows"] += f.shape[0]
                s["same"] += float(np.count_nonzero(f.argmax(axis=1) == q.argmax(axis=1)))
            f64, q64 = f.astype(np.float64).ravel(), q.astype(np.float64).ravel()
            diff = np.abs(q64 - f64)
            s["count"] += f64.size
            s["abs"] += float(diff.sum())
            s["ref_abs"] += float(np.abs(f64).sum())
            s["dot"] += float(q64 @ f64)
            s["qq"] += float(q64 @ q64)
            s["ff"] += float(f64 @ f64)
            if f64.size:
                self._max[name][0] = max(self._max[name][0], float(diff.max()))
                self._max[name][1] = max(self._max[name][1], float(np.abs(f64).max()))

    def result(self) -> list[OutputAgreement]:
        out = []
        for name in self._names:
            s, (max_abs, max_ref) = self._sums[name], self._max[name]
            top1 = s["same"] / s["rows"] if s["rows"] else None
            if self._discrete[name]:
                out.append(OutputAgreement(name, "discrete", top1=top1))
                continue
            mean_abs = s["abs"] / s["count"] if s["count"] else 0.0
            mean_ref = s["ref_abs"] / s["count"] if s["count"] else 0.0
            norm = math.sqrt(s["qq"] * s["ff"])
            cosine = s["dot"] / norm if norm else float(s["qq"] == s["ff"])
            kind = "classifier" if self._classifier[name] else "float"
            out.append(OutputAgreement(name, kind, max_abs=max_abs, rel_max=_ratio(max_abs, max_ref), mean_abs=mean_abs,
                                       rel_mean=_ratio(mean_abs, mean_ref), cosine=cosine,
                                       top1=top1 if self._classifier[name] else None))
        return out


def _ratio(value: float, scale: float) -> float:
    return value / scale if scale else (0.0 if value == 0 else math.inf)


def failures(outputs: list[OutputAgreement], min_agreement: float, min_cosine: float) -> list[str]:
    """One phrase per output below a threshold, e.g. "logits: top-1 agreement 0.951 < 0.98"."""
    found = []
    for o in outputs:
        if o.top1 is not None and o.top1 < min_agreement:
            found.append(f"{o.name}: top-1 agreement {o.top1:.4f} < {min_agreement}")
        if o.kind != "discrete" and not o.cosine >= min_cosine:  # NaN fails too
            found.append(f"{o.name}: cosine similarity {o.cosine:.4f} < {min_cosine}")
    return found


def to_dict(outputs: list[OutputAgreement]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in dataclasses.asdict(o).items()} for o in outputs]
