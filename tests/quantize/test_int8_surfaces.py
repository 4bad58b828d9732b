"""INT8 through the CLI and the service's job process: the option reaches the core, figures reach
the report, a refusal writes nothing and says how to get the float model."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bnfold.cli.main import app
from bnfold.demo.lab import N_CALIBRATION, make_new_lab

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, demo_model):
    d = tmp_path_factory.mktemp("int8")
    model, split = demo_model()
    onnx.save(model, d / "model.onnx")
    np.save(d / "samples.npy", make_new_lab(split["new_lab"], np.random.default_rng([0, 1]))[:N_CALIBRATION])
    return d


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def test_cli_quantize_writes_int8_and_prints_the_figures(demo_files, tmp_path):
    result = _runner().invoke(app, ["recalibrate", str(demo_files / "model.onnx"), str(demo_files / "samples.npy"),
                                    "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "q.json"),
                                    "--quantize", "int8", "--quantize-method", "percentile"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "INT8 (percentile)" in result.stdout and "top-1 agreement" in result.stdout
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["extra"]["quantize"]["method"] == "percentile"
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "DequantizeLinear" in ops and "BatchNormalization" not in ops


def test_cli_refusal_writes_nothing_and_points_to_the_float_model(demo_files, tmp_path):
    result = _runner().invoke(app, ["recalibrate", str(demo_files / "model.onnx"), str(demo_files / "samples.npy"),
                                    "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--min-agreement", "1"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[0].startswith("error: the INT8 model disagrees") and "Traceback" not in result.stderr
    assert "drop --quantize" in result.stderr.replace("\n", " ")
    assert list(tmp_path.iterdir()) == []


def _run_job(job_dir, options: dict) -> list:
    from service.core.config import Settings
    from service.job import job_runtime, run_job
    from service.schemas import JobOptionsIn

    reader, writer = mp.Pipe(duplex=False)
    run_job(str(job_dir), "samples.npy", JobOptionsIn(**options).model_dump(), job_runtime(Settings(job_threads=1)), writer)
    messages = []
    while True:
        try:
            messages.append(reader.recv())
        except EOFError:
            return messages


def test_service_job_quantizes_in_its_own_folder(demo_files, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # run_job redirects it for its own process
    for name in ("model.onnx", "samples.npy"):
        (tmp_path / name).write_bytes((demo_files / name).read_bytes())
    messages = _run_job(tmp_path, {"quantize": "int8", "quantize_method": "entropy"})
    assert messages[-1][0] == "succeeded", messages[-1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extra"]["quantize"]["method"] == "entropy" and report["extra"]["quantize"]["gate"]["samples"] == N_CALIBRATION
    assert list((tmp_path / "spill").iterdir()) == []


def test_service_job_refusal_is_a_problem_on_the_quantize_option(demo_files, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    for name in ("model.onnx", "samples.npy"):
        (tmp_path / name).write_bytes((demo_files / name).read_bytes())
    state, problem = _run_job(tmp_path, {"quantize": "int8", "min_agreement": 1.0})[-1]
    assert state == "failed" and problem["status"] == 422
    assert problem["type"] == "urn:bnfold:problem:quantization-refused" and problem["field"] == "options.quantize"
    assert not (tmp_path / "result.onnx").exists()


def test_service_schema_refuses_unknown_quantization():
    pydantic = pytest.importorskip("pydantic")
    from service.schemas import JobOptionsIn

    with pytest.raises(pydantic.ValidationError, match="quantize"):
        JobOptionsIn(quantize="int4")


def test_cli_float_output_is_written_on_success_and_on_refusal(demo_files, tmp_path):
    base = ["recalibrate", str(demo_files / "model.onnx"), str(demo_files / "samples.npy"), "--quantize", "int8", "-q"]
    ok = _runner().invoke(app, base + ["-o", str(tmp_path / "q.onnx"), "--float-output", str(tmp_path / "f.onnx")])
    assert ok.exit_code == 0, ok.stderr
    float_ops = {n.op_type for n in onnx.load(tmp_path / "f.onnx").graph.node}
    assert "DequantizeLinear" not in float_ops and "BatchNormalization" not in float_ops
    options = json.loads({p.key: p.value for p in onnx.load(tmp_path / "f.onnx").metadata_props}["bnfold.options"])
    assert "quantize" not in options  # provenance of the float model: the plain job's

    refused = _runner().invoke(app, base + ["-o", str(tmp_path / "r.onnx"), "--float-output", str(tmp_path / "rf.onnx"),
                                            "--min-cosine", "1"])
    assert refused.exit_code == 1 and "the float model was written to" in refused.stderr.replace("\n", " ")
    assert not (tmp_path / "r.onnx").exists()
    assert {n.op_type for n in onnx.load(tmp_path / "rf.onnx").graph.node} == float_ops


def test_cli_float_output_needs_quantize(demo_files, tmp_path):
    result = _runner().invoke(app, ["recalibrate", str(demo_files / "model.onnx"), str(demo_files / "samples.npy"),
                                    "-o", str(tmp_path / "q.onnx"), "--float-output", str(tmp_path / "f.onnx")])
    assert result.exit_code == 1 and "--float-output goes with --quantize int8" in result.stderr


def test_summary_prints_discrete_outputs_and_non_finite_figures(monkeypatch):
    import io

    from rich.console import Console

    from bnfold.cli import output
    from bnfold.report import Report

    buffer = io.StringIO()
    monkeypatch.setattr(output, "out", Console(file=buffer, width=200))
    report = Report(samples=3, batches=1, layers=[])
    report.extra["quantize"] = {
        "method": "minmax", "size": {"int8_bytes": 10, "float_bytes": 30, "ratio": 1 / 3},
        "ops": {"int8": ["QLinearConv ×1"], "float": []},
        "gate": {"samples": 3, "outputs": [{"name": "y", "kind": "float", "cosine": None, "rel_max": None, "top1": None},
                                           {"name": "k", "kind": "discrete", "top1": 0.5}]},
        "latency": {"batch_1": {"float_ms": 1.0, "int8_ms": 0.5, "speedup": 2.0},
                    "batch_32": {"float_ms": None, "int8_ms": None, "speedup": None}}}
    output.print_quantize(report)
    text = buffer.getvalue()
    assert "y: cosine n/a, rel. max |Δ| n/a" in text and "k: top-1 agreement 0.5000\n" in text
    assert "speed-up 2.00×" in text and "batch 32" not in text  # a fixed batch axis: no batch-32 figure
