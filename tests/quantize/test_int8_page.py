"""The INT8 section of the HTML report (bnfold.trust.page): from a real quantized demo job, and from a
hand-made report that exercises a failing figure, a discrete output and no latency."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from bnfold.demo.lab import N_CALIBRATION, make_new_lab
from bnfold.pipeline import JobOptions, recalibrate_files
from bnfold.trust.page import render


@pytest.fixture(scope="module")
def quantized_report(tmp_path_factory, demo_model):
    d = tmp_path_factory.mktemp("int8page")
    model, split = demo_model()
    onnx.save(model, d / "model.onnx")
    np.save(d / "samples.npy", make_new_lab(split["new_lab"], np.random.default_rng([0, 1]))[:N_CALIBRATION])
    job = recalibrate_files(d / "model.onnx", d / "samples.npy", JobOptions(quantize="int8"))
    return job.report.to_dict()


def _section(page: str) -> str:
    assert page.count("<h2>4. INT8</h2>") == 1
    return page.split("<h2>4. INT8</h2>", 1)[1]


def test_page_shows_the_int8_figures_of_a_quantized_job(quantized_report):
    q = quantized_report["extra"]["quantize"]
    section = _section(render(quantized_report))
    assert f"({q['size']['ratio']:.0%} of the float model)" in section
    assert f"{q['size']['float_bytes'] / 1024:.1f} KiB" in section and f"{q['size']['int8_bytes'] / 1024:.1f} KiB" in section
    gate = q["gate"]
    assert f"on {gate['samples']} samples" in section
    assert f"top-1 {gate['min_agreement']:g} or cosine {gate['min_cosine']:g}" in section
    for o in gate["outputs"]:  # one row per output, each figure as the report has it
        row = re.search(rf"<tr><td>{re.escape(o['name'])}</td>.*?</tr>", section).group(0)
        assert f"{o['cosine']:.5f}" in row and f"{o['rel_max']:.2e}" in row and f"{o['rel_mean']:.2e}" in row
        if o["top1"] is not None:
            assert f"<span class='ok'>{o['top1']:.4f}</span>" in row  # the job passed its gate
    assert "Runs in INT8: " + ", ".join(q["ops"]["int8"]) in section
    for batch in ("batch 1", "batch 32"):
        assert f"<th>{batch}</th>" in section
    assert f"{q['latency']['batch_32']['int8_ms']:.3g} ms" in section


def test_page_marks_a_figure_below_its_threshold_and_missing_latency(quantized_report):
    report = copy.deepcopy(quantized_report)
    q = report["extra"]["quantize"]
    del q["latency"]
    q["gate"]["min_cosine"] = 2.0  # every cosine is now below it
    q["gate"]["outputs"].append({"name": "label", "kind": "discrete", "max_abs": 0.0, "rel_max": None,
                                 "mean_abs": 0.0, "rel_mean": 0.0, "cosine": 1.0, "top1": 0.5})
    q["warnings"] = ["left in float: head (why)"]
    section = _section(render(report))
    label = re.search(r"<tr><td>label</td>.*?</tr>", section).group(0)
    assert "<span class='bad'>0.5000</span>" in label and "<td>—</td>" in label and "∞" in label
    assert section.count("<span class='bad'>") == 1 + sum(o["kind"] != "discrete" for o in q["gate"]["outputs"])
    assert "Latency was not measured" in section and "left in float: head (why)" in section


def test_page_without_quantize_has_no_int8_section(quantized_report):
    report = copy.deepcopy(quantized_report)
    del report["extra"]["quantize"]
    assert "INT8" not in render(report)
