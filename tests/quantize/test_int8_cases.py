"""Done-when cases for INT8 (issue 16), through the job pipeline on files, scored on held-out labels.

* lab shift: the demo's digits CNN moved to the "new lab"; INT8 accuracy within 1.5 points of the
  float recalibrated model, no BatchNormalization node, at most 40 % of the float model's size;
* segmentation: a U-Net-like model (Conv, ConvTranspose, Concat, BN) on synthetic shapes, moved to
  another lab; mean IoU of INT8 within 0.02 of the float recalibrated model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnfold.demo.lab import N_CALIBRATION, accuracy, make_new_lab
from bnfold.demo.shapes import build_segmentation_model, mean_iou
from bnfold.pipeline import JobOptions, recalibrate_files

pytest.importorskip("sklearn")


def _both(tmp_path, model: onnx.ModelProto, calibration: np.ndarray, **int8):
    onnx.save(model, tmp_path / "model.onnx")
    np.save(tmp_path / "samples.npy", calibration)
    float_job = recalibrate_files(tmp_path / "model.onnx", tmp_path / "samples.npy", JobOptions())
    int8_job = recalibrate_files(tmp_path / "model.onnx", tmp_path / "samples.npy", JobOptions(quantize="int8", **int8))
    return float_job, int8_job


@pytest.fixture(scope="module")
def digits(demo_model):
    model, split = demo_model()
    new_lab = make_new_lab(split["new_lab"], np.random.default_rng([0, 1]))
    return model, new_lab[:N_CALIBRATION], new_lab[N_CALIBRATION:], split["new_lab_labels"][N_CALIBRATION:]


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_lab_shift_int8_keeps_accuracy_without_bn_at_under_40_percent(tmp_path, digits, method):
    model, calibration, test_images, test_labels = digits
    float_job, int8_job = _both(tmp_path, model, calibration, quantize_method=method)
    source = accuracy(model, test_images, test_labels)
    float_acc = accuracy(float_job.model, test_images, test_labels)
    int8_acc = accuracy(int8_job.model, test_images, test_labels)
    assert float_acc > source + 0.3  # the case is a real shift that recalibration repairs
    assert abs(int8_acc - float_acc) <= 0.015, (float_acc, int8_acc)
    assert not [n for n in int8_job.model.graph.node if n.op_type == "BatchNormalization"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8_job.model.graph.node}
    size = len(int8_job.model.SerializeToString()) / len(float_job.model.SerializeToString())
    assert size <= 0.40, size
    q = int8_job.report.extra["quantize"]
    assert q["method"] == method and q["calibration"]["samples"] == len(calibration)
    assert q["gate"]["samples"] == len(calibration) and q["gate"]["outputs"][0]["kind"] == "classifier"
    assert q["gate"]["outputs"][0]["top1"] >= 0.98 and not q["gate"]["failures"]
    assert q["ops"]["int8"] and not q["ops"]["float"]
    assert set(q["latency"]) == {"batch_1", "batch_32"} and q["latency"]["batch_32"]["int8_ms"] > 0
    assert q["size"]["ratio"] == pytest.approx(len(int8_job.model.SerializeToString()) / q["size"]["float_bytes"], rel=0.05)
    props = {p.key: p.value for p in int8_job.model.metadata_props}
    assert '"quantize":"int8"' in props["bnfold.options"]  # provenance says the model is INT8


def test_segmentation_int8_keeps_mean_iou(tmp_path):
    model, data = build_segmentation_model(0)
    float_job, int8_job = _both(tmp_path, model, data["new_lab_calibration"])
    images, masks = data["new_lab_test"], data["new_lab_test_masks"]
    before, float_iou = mean_iou(model, images, masks), mean_iou(float_job.model, images, masks)
    int8_iou = mean_iou(int8_job.model, images, masks)
    assert float_iou > before + 0.2 and float_iou > 0.85  # meaningful, and recalibration matters
    assert abs(int8_iou - float_iou) <= 0.02, (float_iou, int8_iou)
    q = int8_job.report.extra["quantize"]
    # ONNX Runtime has no CPU INT8 ConvTranspose: it stays float between DQ/Q, and the report says so
    assert q["ops"]["float"] == ["ConvTranspose ×1"] and "ConvTranspose" in q["warnings"][0]
    assert q["gate"]["outputs"][0]["kind"] == "float" and q["gate"]["outputs"][0]["cosine"] > 0.99


@pytest.mark.parametrize("budget", [0, 2**30], ids=["read-again", "kept"])
def test_image_folder_and_npz_samples(tmp_path, digits, budget):
    """Images are decoded again only when they do not fit the budget; the samples' digest in the
    provenance is the one of the images (the second pass must not lose it); .npz works alike."""
    pytest.importorskip("PIL")
    from bnfold.demo.images import write_images
    from bnfold.demo.run import IMAGE_SPEC
    from bnfold.inputs.preprocess import write_spec

    model, calibration, _, _ = digits
    model = onnx.ModelProto.FromString(model.SerializeToString())
    write_spec(model, IMAGE_SPEC)
    onnx.save(model, tmp_path / "model.onnx")
    write_images(calibration[:100], tmp_path / "images", fmt="png")
    options = JobOptions(quantize="int8", memory_budget=budget, batch_size=32)
    job = recalibrate_files(tmp_path / "model.onnx", tmp_path / "images", options)
    plain = recalibrate_files(tmp_path / "model.onnx", tmp_path / "images", JobOptions(batch_size=32))
    gate = job.report.extra["quantize"]["gate"]
    assert gate["samples"] == 100 and gate["samples_read_again"] == (budget == 0) and not gate["subset"]
    props = {p.key: p.value for p in job.model.metadata_props}
    plain_props = {p.key: p.value for p in plain.model.metadata_props}
    assert props["bnfold.samples_sha256"] == plain_props["bnfold.samples_sha256"] and props["bnfold.preprocess"]

    np.savez(tmp_path / "samples.npz", image=calibration[:100])
    npz = recalibrate_files(tmp_path / "model.onnx", tmp_path / "samples.npz", JobOptions(quantize="int8", memory_budget=budget))
    assert npz.report.extra["quantize"]["gate"]["samples_read_again"] == (budget == 0)
