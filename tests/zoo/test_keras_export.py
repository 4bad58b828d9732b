"""A non-PyTorch exporter: a Keras 2 model through tf2onnx (NHWC, BN between Transposes).

The model and the reference are committed (``tests/zoo/data/keras_bn.*``, made by
``tests/zoo/make_keras_export.py``, which needs TensorFlow): the reference is the BN-by-BN fixed point
computed in Keras itself, and Keras's own output with those statistics. Nothing here needs TensorFlow.

    x(N,16,16,3) -> Transpose -> Conv -> Transpose -> Transpose -> [BN] -> Transpose -> Relu -> ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import zoo_models as zoo

import bnfold
from bnfold.pipeline import JobOptions, recalibrate_files

DATA = Path(__file__).parent / "data"


def _load():
    return onnx.load(DATA / "keras_bn.onnx"), np.load(DATA / "keras_bn.npz")


def test_keras_tf2onnx_export_recalibrates_to_the_keras_fixed_point():
    model, data = _load()
    x = data["x"]
    assert zoo.count_op(model, "BatchNormalization") == 3
    result = bnfold.recalibrate(model, x, batch_size=5)
    assert len(result.report.layers) == 3
    for i, layer in enumerate(result.report.layers):  # graph order = Keras layer order here
        mean, var = data[f"mean{i}"], data[f"var{i}"]
        scale = var + layer.epsilon
        assert np.max(np.abs(layer.new_mean - mean) / np.sqrt(scale)) < 1e-4
        assert np.max(np.abs(layer.new_var - var) / scale) < 1e-4
    # the recalibrated model computes what Keras computes with the new statistics
    got = ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, data["y"], atol=1e-4 * np.abs(data["y"]).max())


def test_keras_tf2onnx_export_folds_and_matches_on_real_samples(tmp_path):
    model, data = _load()
    x = data["x"]
    np.save(tmp_path / "x.npy", x)
    out = recalibrate_files(model.SerializeToString(), tmp_path / "x.npy", JobOptions(batch_size=5))
    unfolded = bnfold.recalibrate(model, x, batch_size=5).model
    assert zoo.fold_difference(unfolded, out.model, x) < 1e-3
    decisions = out.report.extra["fold"]["decisions"]
    assert not [d["bn"] for d in decisions if d["fate"] == "affine"], "BN without an exact neighbour must stay BN"
    # Conv → Transpose(NCHW→NHWC) → Transpose(NHWC→NCHW) → BN: the BN's channel axis is the Conv's
    assert [d["fate"] for d in decisions] == ["folded_backward"] * 3, decisions
    assert zoo.count_op(out.model, "BatchNormalization") == 0
