"""A labelled check: score the model before and after adaptation; refuse an adaptation that hurts.

Labels are integer class indices: shape (N,) for a classifier whose first output is (N, K)
(metric: top-1 ``accuracy``), or (N, spatial…) per pixel for segmentation with output
(N, K, spatial…) (metric: ``mean_iou`` — per class, |pred ∩ label| / |pred ∪ label| over all
pixels of all check samples, averaged over the classes present in labels or predictions). Negative
labels (e.g. −1) mark pixels or samples to ignore.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from bnfold.errors import AdaptationWorse, InvalidSamples
from bnfold.inputs.arrays import load_samples
from bnfold.trust.signals import first_output


class _CheckError(InvalidSamples):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def load_check(samples_path: str | os.PathLike, labels_path: str | os.PathLike):
    """(samples, labels): samples as `load_samples` reads them, labels an int64 array (N, …)."""
    samples = load_samples(samples_path)
    try:
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _CheckError(f"cannot read the check labels {os.fspath(labels_path)} as a .npy array: {exc}",
                          "check_labels") from None
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu" or labels.ndim < 1:
        raise _CheckError(f"check labels must be integer class indices of shape (N,) or (N, H, W), got "
                          f"{labels.dtype} {labels.shape}", "check_labels")
    count = len(next(iter(samples.values()))) if isinstance(samples, dict) else len(samples)
    if count != len(labels):
        raise _CheckError(f"{count} check samples but {len(labels)} check labels: give one label (or mask) per "
                          "sample", "check_labels")
    return samples, labels.astype(np.int64)


def score(output: np.ndarray, labels: np.ndarray) -> tuple[str, float]:
    """(metric, value) of the first output against labels (see module doc)."""
    if output.ndim < 2 or output.shape[1] < 2 or output.shape[2:] != labels.shape[1:]:
        raise _CheckError(f"check labels of shape {labels.shape} do not fit the model output {output.shape}: expected "
                          "(N,) class indices for an (N, K) output, or (N, H, W) masks for an (N, K, H, W) one",
                          "check_labels")
    predicted = output.argmax(axis=1)
    valid = labels >= 0
    if labels.ndim == 1:
        return "accuracy", float((predicted[valid] == labels[valid]).mean()) if valid.any() else 0.0
    p, y = predicted[valid], labels[valid]
    ious = [np.logical_and(p == k, y == k).sum() / union
            for k in np.union1d(np.unique(p), np.unique(y)) if (union := np.logical_or(p == k, y == k).sum())]
    return "mean_iou", float(np.mean(ious)) if ious else 0.0


def labelled_check(original: onnx.ModelProto, adapted: onnx.ModelProto, samples, labels: np.ndarray,
                   batch_size: int, allow_worse: bool = False, threads: int = 0) -> dict:
    """{metric, before, after, samples}; raises `AdaptationWorse` when after < before (unless allowed)."""
    metric, before = score(first_output(original, samples, batch_size, threads), labels)
    _, after = score(first_output(adapted, samples, batch_size, threads), labels)
    check = {"metric": metric, "before": before, "after": after, "samples": len(labels)}
    if after < before and not allow_worse:
        raise AdaptationWorse(
            f"the adaptation made the labelled check worse: {metric} {before:.4f} before, {after:.4f} after, on "
            f"{len(labels)} check samples; nothing was written (allow it with --allow-worse / option allow_worse)")
    return check
