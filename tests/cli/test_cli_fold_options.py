"""`bnfold fold` / `bnfold recalibrate`: verification samples, tolerances and what becomes of unfoldable BNs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import make_samples, residual_block
from test_cli import _assert_failed_cleanly, _bn_nodes, invoke

from bnfold.errors import InvalidOptions
from bnfold.pipeline import JobOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "folding"))
from test_unfoldable import dense_block  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fold-options")
    model = residual_block()
    onnx.save(model, d / "model.onnx")
    np.save(d / "samples.npy", make_samples(model, 12, seed=1)["x"])
    dense = dense_block()
    onnx.save(dense, d / "dense.onnx")
    np.save(d / "dense.npy", np.random.default_rng(0).normal(size=(8, 3, 6, 6)).astype(np.float32))
    return d


def _report(path: Path) -> dict:
    return json.loads(path.read_text())["extra"]


def test_fold_verifies_on_samples_when_given(files, tmp_path):
    result = invoke("fold", files / "model.onnx", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json",
                    "--samples", files / "samples.npy", "--verify-samples", "5")
    assert result.exit_code == 0, result.stderr
    check = _report(tmp_path / "r.json")["verification"]
    assert (check["feeds"], check["random"], check["passed"]) == (1, 0, True) and "random_inputs" not in check
    assert "1 batch(es) of samples" in " ".join(result.stdout.split())  # rich wraps long lines


def test_fold_without_samples_uses_inputs_at_the_implied_scale(files, tmp_path):
    result = invoke("fold", files / "model.onnx", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    check = _report(tmp_path / "r.json")["verification"]
    assert check["random"] == 2 and check["random_inputs"]["bn"] and "fitted to the running" in " ".join(result.stdout.split())


def test_unfoldable_bn_is_kept_by_default_and_mul_add_on_request(files, tmp_path):
    for extra, bns, affine in (([], 1, 0), (["--unfoldable", "affine"], 0, 1)):
        out = tmp_path / f"out{bns}.onnx"
        result = invoke("fold", files / "dense.onnx", "-o", out, "--report", tmp_path / "r.json", *extra)
        assert result.exit_code == 0, result.stderr
        assert len(_bn_nodes(onnx.load(out))) == bns
        assert _report(tmp_path / "r.json")["fold"]["counts"]["affine"] == affine


def test_recalibrate_takes_the_verification_options(files, tmp_path):
    result = invoke("recalibrate", files / "dense.onnx", files / "dense.npy", "-o", tmp_path / "out.onnx", "--report",
                    tmp_path / "r.json", "--verify-samples", "0", "--rtol", "1e-3", "--atol", "1e-6",
                    "--unfoldable", "affine", "-q")
    assert result.exit_code == 0, result.stderr
    extra = _report(tmp_path / "r.json")
    check = extra["verification"]
    assert (check["feeds"], check["random"]) == (0, 2)
    assert (check["outputs"][0]["rtol"], check["outputs"][0]["atol"]) == (1e-3, 1e-6)
    assert extra["fold"]["counts"]["affine"] == 1 and not _bn_nodes(onnx.load(tmp_path / "out.onnx"))


@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_a_refusal_names_only_options_that_exist(files, tmp_path, command):
    args = ["--samples", files / "samples.npy"] if command == "fold" else [files / "samples.npy"]
    result = invoke(command, files / "model.onnx", *args, "-o", tmp_path / "out.onnx", "--rtol", "0", "--atol", "0")
    line = _assert_failed_cleanly(result)
    assert "differs from the unfolded one" in line and not (tmp_path / "out.onnx").exists()
    named = set(re.findall(r"--[a-z][a-z-]+", line))
    assert {"--rtol", "--atol"} <= named
    for cmd in ("fold", "recalibrate"):
        text = invoke(cmd, "--help").stdout
        assert all(option in text for option in named - {"--samples"}), (cmd, named)
    assert "--samples" in invoke("fold", "--help").stdout


@pytest.mark.parametrize("args,words", [
    (["--unfoldable", "mul"], ["unfoldable", "keep", "affine"]),
    (["--rtol", "-1"], ["rtol"]),
    (["--verify-samples", "-2"], ["verify_samples"]),
])
def test_bad_fold_options_are_one_line(files, tmp_path, args, words):
    line = _assert_failed_cleanly(invoke("fold", files / "model.onnx", "-o", tmp_path / "out.onnx", *args))
    assert all(w in line for w in words), line


def test_job_options_and_service_options_refuse_unknown_unfoldable():
    with pytest.raises(InvalidOptions, match="unfoldable") as err:
        JobOptions(unfoldable="mul")
    assert err.value.field == "options.unfoldable"
    schemas = pytest.importorskip("service.schemas")
    from pydantic import ValidationError

    assert schemas.JobOptionsIn(unfoldable="affine").unfoldable == "affine"
    with pytest.raises(ValidationError):
        schemas.JobOptionsIn(unfoldable="mul")


def test_fold_verifies_on_image_samples(files, tmp_path):
    image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"mean": [0.5] * 3, "std": [0.25] * 3}))
    args = ("fold", files / "dense.onnx", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json", "--samples", folder)
    result = invoke(*args, "--preprocess", spec)
    assert result.exit_code == 0, result.stderr
    check = _report(tmp_path / "r.json")["verification"]
    assert (check["feeds"], check["random"], check["passed"]) == (1, 0, True)
    (tmp_path / "out.onnx").unlink()
    line = _assert_failed_cleanly(invoke(*args))  # the model carries no preprocessing spec
    assert "preprocess" in line and not (tmp_path / "out.onnx").exists()
    named = set(re.findall(r"--[a-z][a-z-]+", line))
    assert named and all(option in invoke("fold", "--help").stdout for option in named), named
    result = invoke(*args, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")  # the flags it names work
    assert result.exit_code == 0, result.stderr
