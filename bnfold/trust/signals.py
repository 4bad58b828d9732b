"""Outputs before vs after adaptation, on the same samples: signals that need no labels.

They are *signals, not accuracy*: a model can become more confident and more wrong. They say
whether the outputs moved, and which way.

Classifier-like outputs — the first graph output has shape (N, K) or (N, K, spatial…) with K ≥ 2
classes on axis 1 — are turned into probabilities p (softmax over axis 1, unless they already are
probabilities: non-negative, summing to 1), and, per sample (and pixel):

* ``mean_entropy`` — mean of −Σ_k p_k·ln p_k, in nats (lower: more confident);
* ``mean_max_probability`` — mean of max_k p_k;
* ``changed_argmax`` — share of predictions (argmax over k) that differ before vs after.

Other outputs (regression, embeddings, K = 1): ``output_shift`` — mean over output channels
(axis 1; the flattened rest for rank 1) of |μ_after − μ_before| / σ_before, with μ, σ over samples and
positions, and ``output_std_ratio`` — geometric mean over channels of σ_after / σ_before.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import UnsupportedModel
from bnfold.inputs.arrays import iter_batches, model_inputs
from bnfold.runtime import session_options

#: The signals are computed on at most this many of the samples: two inference passes over them
#: (before, after). Measured on the real-size bench (bench/RESULTS.md §5), 256 added 42–79 % to the
#: recalibration's time; 64 add a quarter of one pass at 512 samples, and a share of changed
#: predictions then has a standard error of at most ~6 points — enough for a signal.
SIGNAL_SAMPLES = 64


def first_output(model: onnx.ModelProto, samples, batch_size: int, threads: int = 0, data: bytes | None = None) -> np.ndarray:
    """The model's first output on `samples` (array, dict, or iterable of batches), concatenated.
    data: `model` serialised, when the caller has the bytes (serialising a 47 MB model: 0.06 s)."""
    options = session_options(threads)
    try:
        session = ort.InferenceSession(data or model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- ORT raises several unrelated types; all mean "cannot run this"
        raise UnsupportedModel(f"ONNX Runtime cannot load the model: {str(exc).strip().splitlines()[0]}") from None
    name = session.get_outputs()[0].name
    parts = [session.run([name], feeds)[0] for feeds in iter_batches(samples, model_inputs(model), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,))


def is_classifier_like(output: np.ndarray) -> bool:
    return output.ndim >= 2 and output.shape[1] >= 2 and np.issubdtype(output.dtype, np.floating)


def probabilities(output: np.ndarray) -> np.ndarray:
    """Softmax over axis 1, float64 — or the values themselves when they already are probabilities."""
    x = np.asarray(output, np.float64)
    if x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-4):
        return x
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def compare_outputs(before: np.ndarray, after: np.ndarray) -> dict:
    """Label-free signals (see module doc) from the outputs of the same samples before and after."""
    out = {"samples": len(before), "note": "signals, not accuracy: they show how the outputs moved"}
    if is_classifier_like(before):
        p, q = probabilities(before), probabilities(after)
        out["kind"] = "classifier"
        for when, probs in (("before", p), ("after", q)):
            out[when] = {"mean_entropy": float(-(probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=1).mean()),
                         "mean_max_probability": float(probs.max(axis=1).mean())}
        out["changed_argmax"] = float((p.argmax(axis=1) != q.argmax(axis=1)).mean())
        return out
    b, a = (np.asarray(v, np.float64).reshape(len(v), -1 if v.ndim < 2 else v.shape[1], -1) for v in (before, after))
    axes = (0, 2)
    sigma_b, sigma_a = b.std(axis=axes) + 1e-12, a.std(axis=axes) + 1e-12
    out["kind"] = "other"
    out["output_shift"] = float((np.abs(a.mean(axis=axes) - b.mean(axis=axes)) / sigma_b).mean())
    out["output_std_ratio"] = float(np.exp(np.log(sigma_a / sigma_b).mean()))
    return out


def label_free(original: onnx.ModelProto, adapted: onnx.ModelProto, samples: Iterable, batch_size: int,
               threads: int = 0, after: np.ndarray | None = None, original_bytes: bytes | None = None) -> dict:
    """compare_outputs of `original` and `adapted` on `samples` (the caller bounds how many).
    after: `adapted`'s first output on these samples when the caller has it already (the
    recalibration computes it for its first samples): one model run instead of two.
    original_bytes: `original` serialised, when the caller has it (see `first_output`)."""
    before = first_output(original, samples, batch_size, threads, original_bytes)
    if after is None or len(after) < len(before):
        after = first_output(adapted, samples, batch_size, threads)
    return compare_outputs(before, after[: len(before)])
