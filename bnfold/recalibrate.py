"""Exact eval-mode BatchNorm recalibration (engine lands next; this fixes the public signature)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from .report import Report

Batch = np.ndarray | Mapping[str, np.ndarray]
Samples = np.ndarray | Mapping[str, np.ndarray] | Iterable[Batch]


@dataclasses.dataclass
class RecalibrationResult:
    model: onnx.ModelProto
    report: Report


def recalibrate(
    model: onnx.ModelProto,
    samples: Samples,
    *,
    batch_size: int = 64,
    memory_budget: int = 2 * 2**30,
    spill_dir: str | None = None,
    providers: Sequence[str] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> RecalibrationResult:
    raise NotImplementedError
