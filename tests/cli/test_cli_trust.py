"""`bnfold recalibrate` with --prior, --check-samples/--check-labels, --allow-worse, --report-html.

The refusal case is real, not mocked: the demo's digits model recalibrated on the *new* lab and
checked on labelled *source*-lab digits scores worse after adaptation, so the command must exit 1
with one line naming both numbers and write nothing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_cli import _assert_failed_cleanly, invoke

pytest.importorskip("sklearn")
from bnfold.demo.lab import make_new_lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory, demo_model):
    root = tmp_path_factory.mktemp("lab")
    model, split = demo_model()
    onnx.save(model, root / "model.onnx")
    np.save(root / "samples.npy", make_new_lab(split["source_test"], np.random.default_rng(0)))
    np.save(root / "new_x.npy", make_new_lab(split["new_lab"][:80], np.random.default_rng(1)))
    np.save(root / "new_y.npy", split["new_lab_labels"][:80])
    np.save(root / "old_x.npy", split["source_train"][:80])
    np.save(root / "old_y.npy", split["source_train_labels"][:80])
    return root


def test_check_and_html(lab, tmp_path):
    pytest.importorskip("matplotlib")
    out, report, page = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "r.html"
    result = invoke("recalibrate", lab / "model.onnx", lab / "samples.npy", "-o", out, "--report", report,
                    "--report-html", page, "--check-samples", lab / "new_x.npy", "--check-labels", lab / "new_y.npy")
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["check"]["metric"] == "accuracy" and data["check"]["after"] > data["check"]["before"]
    assert f"accuracy {data['check']['before']:.4f} → {data['check']['after']:.4f}" in result.stdout
    assert "signals (not accuracy)" in result.stdout
    assert data["totals"]["samples_sufficient"] is True and data["layers"][0]["stderr_mean"]
    assert page.read_text().count("data:image/png;base64,") == 2


def test_worse_check_is_refused_and_nothing_written(lab, tmp_path):
    out, report, page = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "r.html"
    args = ["recalibrate", lab / "model.onnx", lab / "samples.npy", "-o", out, "--report", report, "--report-html", page,
            "--check-samples", lab / "old_x.npy", "--check-labels", lab / "old_y.npy"]
    line = _assert_failed_cleanly(invoke(*args))
    assert "made the labelled check worse" in line and "before" in line and "after" in line
    before, after = (float(x) for x in __import__("re").findall(r"accuracy (\d\.\d+) before, (\d\.\d+) after", line)[0])
    assert after < before
    assert not out.exists() and not report.exists() and not page.exists()
    allowed = invoke(*args, "--allow-worse", "-q")
    assert allowed.exit_code == 0 and out.exists()
    assert json.loads(report.read_text())["check"]["after"] == pytest.approx(after, abs=1e-4)


def test_prior_option(lab, tmp_path):
    report = tmp_path / "r.json"
    result = invoke("recalibrate", lab / "model.onnx", lab / "samples.npy", "-o", tmp_path / "m.onnx", "--report",
                    report, "--prior", "16", "-q")
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["extra"]["statistics"]["prior"] == 16 and data["layers"][0]["target_mean"] is not None
    line = _assert_failed_cleanly(invoke("recalibrate", lab / "model.onnx", lab / "samples.npy", "-o",
                                         tmp_path / "x.onnx", "--prior", "-1"))
    assert "prior must be" in line


def test_check_needs_both_parts(lab, tmp_path):
    line = _assert_failed_cleanly(invoke("recalibrate", lab / "model.onnx", lab / "samples.npy", "-o",
                                         tmp_path / "m.onnx", "--check-samples", lab / "new_x.npy"))
    assert "both check samples and check labels" in line
