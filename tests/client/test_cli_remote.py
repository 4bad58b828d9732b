"""The CLI's remote mode: ``recalibrate --server`` writes what the local run writes, ``jobs`` manages
jobs, and every failure is one "error:" line with exit status 1, as locally."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from service_helpers import KEY_A, samples_array, tiny_model
from typer.testing import CliRunner

from bnfold.cli import app


def invoke(*args, env: dict[str, str] | None = None):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], env={"BNFOLD_API_KEY": KEY_A, **(env or {})})


def failed_line(result) -> str:
    """Exit 1, nothing on stdout, exactly one stderr line "error: …"."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and result.stdout == "" and len(lines) == 1, (result.stdout, result.stderr)
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tiny.onnx").write_bytes(tiny_model())
    np.save(tmp_path / "samples.npy", samples_array())
    return tmp_path


@pytest.mark.parametrize("fold", ["--fold", "--no-fold"])
def test_remote_recalibration_writes_what_the_local_one_writes(server, files, fold):
    here = invoke("recalibrate", files / "tiny.onnx", files / "samples.npy", "-o", files / "local.onnx",
                  "--report", files / "local.json", fold)
    there = invoke("recalibrate", files / "tiny.onnx", files / "samples.npy", "-o", files / "remote.onnx",
                   "--report", files / "remote.json", fold, "--server", server.url)
    assert here.exit_code == 0 and there.exit_code == 0, there.stderr
    local, remote = (json.loads((files / f"{name}.json").read_text()) for name in ("local", "remote"))
    assert local.pop("timings").keys() == remote.pop("timings").keys() and local == remote
    if fold == "--no-fold":
        assert (files / "remote.onnx").read_bytes() == (files / "local.onnx").read_bytes()
    for result in (here, there):  # the same summary: table, folding, the files written
        assert "BN statistics on 16 samples" in result.stdout and "wrote " in result.stdout
    assert list(files.glob(".*")) == []  # no temporary files left


def test_jobs_commands(server, files):
    env = {"BNFOLD_URL": server.url}
    ran = invoke("recalibrate", files / "tiny.onnx", files / "samples.npy", "-o", files / "a.onnx", "-q",
                 "--server", server.url)
    assert ran.exit_code == 0 and ran.stdout == ""
    listed = invoke("jobs", "list", "--json", "--state", "succeeded", "--limit", "100", env=env)
    job = next(j for j in json.loads(listed.stdout) if j["inputs"]["model"]["filename"] == "tiny.onnx")
    table = invoke("jobs", "list", env=env)
    assert job["id"] in table.stdout and "succeeded" in table.stdout
    shown = invoke("jobs", "show", job["id"], env=env)
    assert f"sha256 {job['result']['model_sha256']}" in shown.stdout and "attempts: 1" in shown.stdout

    downloaded = invoke("jobs", "download", job["id"], "-o", files / "b.onnx", "--report", files / "b.json", env=env)
    assert downloaded.exit_code == 0 and "wrote " in downloaded.stdout
    assert (files / "b.onnx").read_bytes() == (files / "a.onnx").read_bytes()
    assert json.loads((files / "b.json").read_text())["layers"][0]["name"] == "bn"

    assert invoke("jobs", "cancel", job["id"], env=env).stdout.startswith(f"deleted job {job['id']}")
    assert "no job" in failed_line(invoke("jobs", "show", job["id"], env=env))


def test_remote_failures_are_one_line_and_write_nothing(server, files):
    (files / "bad.onnx").write_bytes(b"not a model")
    line = failed_line(invoke("recalibrate", files / "bad.onnx", files / "samples.npy", "-o", files / "out.onnx",
                              "--server", server.url))
    assert "not an ONNX model" in line
    line = failed_line(invoke("recalibrate", files / "tiny.onnx", files / "samples.npy", "-o", files / "out.onnx",
                              "--server", server.url, env={"BNFOLD_API_KEY": ""}))
    assert "BNFOLD_API_KEY" in line
    line = failed_line(invoke("recalibrate", files / "tiny.onnx", files / "samples.npy", "-o", files / "out.onnx",
                              "--batch-size", "0", "--server", server.url))
    assert "batch_size" in line
    late_nan = samples_array()
    late_nan[12, 0, 0, 0] = np.inf  # past the first batch: the job fails, not the submission
    np.save(files / "late.npy", late_nan)
    line = failed_line(invoke("recalibrate", files / "tiny.onnx", files / "late.npy", "-o", files / "out.onnx",
                              "--server", server.url))
    job_id = re.fullmatch(r"error: job (\w+) failed: samples for input 'x' contain NaN or Inf.*", line).group(1)
    shown = invoke("jobs", "show", job_id, "--server", server.url)
    assert "state: failed" in shown.stdout and "error: Invalid samples: samples for input 'x'" in shown.stdout
    assert not (files / "out.onnx").exists()
    assert "BNFOLD_URL" in failed_line(invoke("jobs", "list", env={"BNFOLD_URL": ""}))
