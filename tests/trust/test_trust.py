"""`bnfold.trust`: label-free signals, the labelled check (accuracy / mean IoU) and its refusal,
and the HTML page.

Yardsticks: signals and metrics recomputed here by hand from known outputs (softmax by its
definition, IoU by counting), and the demo's digits model whose before/after accuracy is known.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from bnfold.errors import AdaptationWorse, InvalidSamples
from bnfold.trust.check import labelled_check, load_check, score
from bnfold.trust.signals import SIGNAL_SAMPLES, compare_outputs, first_output, probabilities


def test_classifier_signals_by_hand():
    before = np.array([[0.0, 0.0], [0.0, 0.0]])  # 50/50: entropy ln 2
    after = np.array([[np.log(9.0), 0.0], [0.0, np.log(3.0)]])  # p = 0.9 / 0.75 on class 0 / 1
    s = compare_outputs(before, after)
    assert s["kind"] == "classifier" and "not accuracy" in s["note"]
    assert s["before"]["mean_entropy"] == pytest.approx(np.log(2))
    assert s["before"]["mean_max_probability"] == pytest.approx(0.5)
    h = lambda p: -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert s["after"]["mean_entropy"] == pytest.approx((h(0.9) + h(0.75)) / 2)
    assert s["after"]["mean_max_probability"] == pytest.approx((0.9 + 0.75) / 2)
    assert s["changed_argmax"] == pytest.approx(0.5)  # argmax of a tie is 0; the second sample moved to 1


def test_probabilities_are_kept_and_logits_softmaxed():
    p = np.array([[0.2, 0.8], [1.0, 0.0]])
    assert probabilities(p) is not None and np.allclose(probabilities(p), p)
    logits = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(probabilities(logits), np.exp(logits) / np.exp(logits).sum())


def test_other_outputs_get_a_shift():
    rng = np.random.default_rng(0)
    before = rng.normal(0, 2, (500, 1))
    s = compare_outputs(before, before * 0.5 + 1.0)
    assert s["kind"] == "other"
    assert s["output_shift"] == pytest.approx(abs(before.mean() * -0.5 + 1.0) / before.std(), rel=1e-6)
    assert s["output_std_ratio"] == pytest.approx(0.5, rel=1e-6)


def test_accuracy_and_mean_iou_by_hand():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert score(logits, np.array([0, 1, 1])) == ("accuracy", pytest.approx(2 / 3))
    assert score(logits, np.array([0, 1, -1])) == ("accuracy", 1.0)  # negative: ignored
    # masks: 1 sample, 2×2 pixels; predicted [[0,1],[1,1]], labels [[0,0],[1,1]]
    seg = np.zeros((1, 2, 2, 2))
    seg[0, 0] = [[1, 0], [0, 0]]
    seg[0, 1] = [[0, 1], [1, 1]]
    metric, value = score(seg, np.array([[[0, 0], [1, 1]]]))
    assert metric == "mean_iou" and value == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 0: 1/2, class 1: 2/3
    with pytest.raises(InvalidSamples, match="do not fit") as info:
        score(logits, np.zeros((3, 4), np.int64))
    assert info.value.field == "check_labels"


def _identity_classifier():
    """y = x·W with W = ±I on 2 classes: the 'adapted' model flips the predictions."""
    def model(sign):
        w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], (sign * np.eye(2)).ravel().tolist())
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model(1.0), model(-1.0)


def test_worse_is_refused_with_both_numbers_and_allowed_on_request():
    good, flipped = _identity_classifier()
    x = np.array([[1, 0], [0, 1], [1, 0], [2, 0]], np.float32)
    labels = np.array([0, 1, 0, 1])
    assert first_output(good, x, 3).shape == (4, 2)
    with pytest.raises(AdaptationWorse) as info:
        labelled_check(good, flipped, x, labels, batch_size=3)
    assert "0.7500 before, 0.2500 after" in info.value.message and info.value.field == "check_labels"
    allowed = labelled_check(good, flipped, x, labels, batch_size=3, allow_worse=True)
    assert allowed == {"metric": "accuracy", "before": 0.75, "after": 0.25, "samples": 4}
    assert labelled_check(flipped, good, x, labels, batch_size=3)["after"] == 0.75  # better: fine


def test_load_check_validates(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2), np.float32))
    for name, labels, message in [("short", np.zeros(2, np.int64), "3 check samples but 2"),
                                  ("float", np.array([0.5, 1, 2]), "integer class indices"),
                                  ("text", np.array(["a", "b", "c"]), "integer class indices")]:
        np.save(tmp_path / f"{name}.npy", labels)
        with pytest.raises(InvalidSamples, match=message):
            load_check(tmp_path / "x.npy", tmp_path / f"{name}.npy")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InvalidSamples, match="cannot read the check labels"):
        load_check(tmp_path / "x.npy", tmp_path / "bad.npy")
    np.save(tmp_path / "ok.npy", np.array([0.0, 1.0, 1.0]))  # integral floats are accepted
    assert load_check(tmp_path / "x.npy", tmp_path / "ok.npy")[1].dtype == np.int64


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory, demo_model):
    from bnfold.demo.lab import make_new_lab
    from bnfold.pipeline import recalibrate_files

    root = tmp_path_factory.mktemp("trust")
    model, split = demo_model()
    onnx.save(model, root / "model.onnx")
    np.save(root / "samples.npy", make_new_lab(split["source_test"], np.random.default_rng(0)))
    np.save(root / "cx.npy", make_new_lab(split["new_lab"][:60], np.random.default_rng(1)))
    np.save(root / "cy.npy", split["new_lab_labels"][:60])
    job = recalibrate_files(root / "model.onnx", root / "samples.npy", check_samples=root / "cx.npy",
                            check_labels=root / "cy.npy")
    return root, job


def test_pipeline_reports_signals_and_check(demo_job):
    _, job = demo_job
    check, signals = job.report.check, job.report.signals
    assert check["metric"] == "accuracy" and check["samples"] == 60 and check["after"] > check["before"] + 0.4
    assert signals["samples"] == SIGNAL_SAMPLES < job.report.samples and signals["kind"] == "classifier"
    assert signals["after"]["mean_max_probability"] > signals["before"]["mean_max_probability"]
    as_dict = job.report.to_dict()
    assert as_dict["check"] == check and as_dict["signals"]["changed_argmax"] == signals["changed_argmax"]


def test_pipeline_signals_use_the_recalibrations_outputs_and_match_two_sessions(demo_job, monkeypatch):
    """The job takes the new model's outputs from the recalibration (`head_samples`) instead of a
    second whole-model session; the signals are those the two sessions give."""
    from bnfold.trust import signals as signals_module

    root, job = demo_job
    samples = np.load(root / "samples.npy")[:SIGNAL_SAMPLES]
    model = onnx.load(root / "model.onnx")
    adapted = bnfold.recalibrate(model, np.load(root / "samples.npy")).model
    two_sessions = signals_module.label_free(model, adapted, samples, 64)
    for key in ("changed_argmax", "samples", "kind"):
        assert job.report.signals[key] == two_sessions[key]
    for when in ("before", "after"):
        for key, value in two_sessions[when].items():
            assert job.report.signals[when][key] == pytest.approx(value, rel=1e-5)
    runs = []
    monkeypatch.setattr(signals_module, "first_output", lambda m, *a, **k: runs.append(m) or first_output(m, *a, **k))
    from bnfold.pipeline import recalibrate_files

    recalibrate_files(root / "model.onnx", root / "samples.npy")
    assert len(runs) == 1  # the model before; the model after came from the recalibration


def test_page_is_self_contained_with_plots(demo_job):
    pytest.importorskip("matplotlib")
    from bnfold.trust.page import render

    _, job = demo_job
    page = render(job.report.to_dict())
    assert page.startswith("<!doctype html>") and "http://" not in page and "https://" not in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 2  # the per-layer plot and the before/after plot
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    for text in ("bn1", "bn2", "signals, not accuracy", "Labelled check", "folded into the layer before",
                 f"{job.report.check['after']:.1%}"):
        assert text in page


def test_page_without_check_fold_or_standard_errors():
    """One sample (no standard errors), --no-fold, a regression-like output: the page still renders."""
    pytest.importorskip("matplotlib")
    from models import conv_bn, make_samples

    import bnfold
    from bnfold.trust.page import render

    model = conv_bn()
    report = bnfold.recalibrate(model, {k: v[:1] for k, v in make_samples(model, 1).items()}).report
    report.signals = compare_outputs(np.arange(6.0).reshape(6, 1), np.arange(6.0).reshape(6, 1) * 2)
    page = render(report.to_dict())
    assert "Output shift" in page and "Not folded" in page and "No labelled check" in page
    assert "too few" in page and page.count("data:image/png;base64,") == 1
