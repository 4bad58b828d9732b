"""The `bnfold` command line: success writes the model and the JSON report; every bad input ends
with exit status 1 and exactly one line "error: ..." on stderr, no traceback, nothing written.

Most runs go through `typer.testing.CliRunner` (in-process, fast); two run as real processes
(`python -m bnfold.cli` and the `bnfold` console script).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import make_samples, multi_input, residual_block
from onnx import helper, numpy_helper
from rich.console import Console
from typer.testing import CliRunner

import bnfold
import bnfold.cli.output
from bnfold.cli.main import app, parse_bytes
from bnfold.errors import InvalidOptions
from bnfold.inputs.model import load_model

REPO = Path(__file__).resolve().parent.parent
N = 12


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        return CliRunner()


def invoke(*args: str | os.PathLike):
    return _runner().invoke(app, [str(a) for a in args])


def _assert_failed_cleanly(result, *, code: int = 1) -> str:
    """Exit `code`, nothing on stdout, exactly one non-blank stderr line starting with "error:",
    no traceback and no exception other than the exit escaping. Returns that line."""
    context = f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}\nexception: {result.exception!r}"
    assert isinstance(result.exception, SystemExit), context
    assert result.exit_code == code, context
    assert "Traceback" not in result.stdout + result.stderr, context
    assert result.stdout == "", context
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, context
    assert lines[0].startswith("error:"), context
    return lines[0]


def _bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# -- input files (built once per module) ------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    model = residual_block()
    onnx.save(model, d / "model.onnx")
    x = make_samples(model, N, seed=1)["x"]
    np.save(d / "samples.npy", x)

    mi = multi_input()
    onnx.save(mi, d / "multi.onnx")
    mi_samples = make_samples(mi, N, seed=2)
    np.savez(d / "multi.npz", **mi_samples)
    np.savez(d / "multi_missing.npz", img=mi_samples["img"])
    np.savez(d / "extra_key.npz", x=x, labels=np.arange(N))

    (d / "junk.onnx").write_bytes(b"this is not an ONNX model\n" * 3)
    (d / "empty.onnx").write_bytes(b"")

    x_in = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    y_out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    no_bn = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "no_bn", [x_in], [y_out]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
    )
    onnx.save(no_bn, d / "no_bn.onnx")

    training = residual_block()
    _bn_nodes(training)[0].attribute.append(helper.make_attribute("training_mode", 1))
    onnx.save(training, d / "training.onnx")

    (d / "external").mkdir()
    onnx.save(residual_block(), d / "external" / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)

    broken = residual_block()
    del _bn_nodes(broken)[0].input[1:]  # checker: "... not in range [min=5, max=5]"
    onnx.save(broken, d / "checker.onnx")

    static = residual_block()
    dim = static.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 5  # 12 samples leave 2 over
    onnx.save(static, d / "static5.onnx")

    np.save(d / "int.npy", (x * 10).astype(np.int64))
    nan = x.copy()
    nan[7, 1, 2, 3] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "empty.npy", x[:0])
    np.save(d / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "rank.npy", x[0])  # one sample without its batch axis
    (d / "samples.txt").write_text("1 2 3\n")
    for name, shape in (("overflow.npy", (10, 2**32, 2**32)), ("negative.npy", (10, -1, 8, 8))):
        with open(d / name, "wb") as f:  # hostile headers: shapes np.prod wraps to 0 bytes, or cannot be
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
    (d / "odd[").mkdir()
    np.save(d / "odd[" / "b].npy", x)  # the path contains "[/b]"
    return d


BAD_INPUTS = {
    # id: (model, samples, extra args, words the error line must contain)
    "junk-model": ("junk.onnx", "samples.npy", [], ["not an ONNX model"]),
    "empty-model": ("empty.onnx", "samples.npy", [], ["not an ONNX model"]),
    "missing-model": ("nope.onnx", "samples.npy", [], ["nope.onnx"]),
    "swapped-arguments": ("samples.npy", "model.onnx", [], ["not an ONNX model"]),
    "no-batchnorm": ("no_bn.onnx", "samples.npy", [], ["no BatchNormalization", "folded", "TrainingMode.PRESERVE"]),
    "training-mode": ("training.onnx", "samples.npy", [], ["training_mode", "eval"]),
    "external-data": ("external/model.onnx", "samples.npy", [], ["external data", "save_as_external_data=False"]),
    "checker": ("checker.onnx", "samples.npy", [], ["checker", "bn_a"]),
    "int-samples": ("model.onnx", "int.npy", [], ["'x'", "int64", "float32"]),
    "nan-samples": ("model.onnx", "nan.npy", ["--batch-size", "4"], ["'x'", "NaN"]),
    "empty-samples": ("model.onnx", "empty.npy", [], ["empty"]),
    "pickled-npy": ("model.onnx", "pickled.npy", [], ["pickled"]),
    "npy-overflowing-shape": ("model.onnx", "overflow.npy", [], ["overflow.npy", "truncated"]),
    "npy-negative-dimension": ("model.onnx", "negative.npy", [], ["negative.npy", "negative dimension"]),
    "npz-missing-input": ("multi.onnx", "multi_missing.npz", [], ["['vec']"]),
    "npz-extra-key": ("model.onnx", "extra_key.npz", [], ["['labels']"]),
    "bare-array-multi-input": ("multi.onnx", "samples.npy", [], ["2 inputs", ".npz"]),
    "rank": ("model.onnx", "rank.npy", [], ["'x'", "(?, 4, 8, 8)"]),
    "txt-samples": ("model.onnx", "samples.txt", [], [".npy", ".npz"]),
    "missing-samples": ("model.onnx", "nope.npy", [], ["nope.npy"]),
    "static-batch-remainder": ("static5.onnx", "samples.npy", [], ["fixed at 5", "multiple of 5"]),
    "memory-budget-garbage": ("model.onnx", "samples.npy", ["--memory-budget", "lots"], ["memory budget", "lots"]),
    "memory-budget-negative": ("model.onnx", "samples.npy", ["--memory-budget", "-1"], ["memory budget"]),
    "memory-budget-5i": ("model.onnx", "samples.npy", ["--memory-budget", "5i"], ["memory budget"]),
    "batch-size-0": ("model.onnx", "samples.npy", ["--batch-size", "0"], ["batch"]),
    "bracket-path": ("model.onnx", "odd[/nope].npy", [], ["odd[/nope].npy"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_writes_nothing(files, tmp_path, case):
    model, samples, extra, words = BAD_INPUTS[case]
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    output.write_bytes(b"precious")  # a pre-existing output is left untouched
    result = invoke("recalibrate", files / model, files / samples, "-o", output, "--report", report, *extra)
    line = _assert_failed_cleanly(result)
    for word in words:
        assert word in line, line
    assert output.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no report, no temp files

    output.unlink()  # and without a pre-existing output, none is created
    again = invoke("recalibrate", files / model, files / samples, "-o", output, *extra)
    _assert_failed_cleanly(again)
    assert list(tmp_path.iterdir()) == []


def test_error_line_is_the_library_message_verbatim(files, tmp_path):
    """The checker says e.g. 'not in range [min=5, max=5]': rich must print '[...]' as text, not
    eat it as markup. The CLI line is exactly "error: " + the library's message."""
    with pytest.raises(bnfold.InvalidModel) as info:
        load_model(files / "checker.onnx")
    assert "[" in info.value.message  # the case this test is about
    line = _assert_failed_cleanly(invoke("recalibrate", files / "checker.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx"))
    assert line == f"error: {info.value.message}"


def test_samples_path_with_brackets_works(files, tmp_path):
    """A path with '[' and ']' in it is an ordinary path (the failing case is "bracket-path" above)."""
    result = invoke("recalibrate", files / "model.onnx", files / "odd[" / "b].npy", "-o", tmp_path / "o[1].onnx", "--no-fold")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (tmp_path / "o[1].onnx").exists()


def test_output_directory_missing(files, tmp_path):
    output = tmp_path / "no" / "such" / "dir" / "out.onnx"
    line = _assert_failed_cleanly(invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", output, "-q"))
    assert "does not exist" in line
    assert str(output.parent) in line
    assert not (tmp_path / "no").exists()


def test_report_write_failure_writes_no_model(files, tmp_path):
    """If the report cannot be written the run fails, and then the model must not be there either."""
    output = tmp_path / "out.onnx"
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", output, "--report", tmp_path / "nodir" / "r.json", "-q")
    _assert_failed_cleanly(result)
    assert not output.exists(), "the model was written although the command failed"


def test_fold_command_bad_model(files, tmp_path):
    output = tmp_path / "out.onnx"
    line = _assert_failed_cleanly(invoke("fold", files / "junk.onnx", "-o", output))
    assert "not an ONNX model" in line
    assert not output.exists()


# -- success -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def library_result(files):
    """What the library computes on the same files (the CLI must agree)."""
    model = load_model(files / "model.onnx")
    return bnfold.recalibrate(model, np.load(files / "samples.npy"))


def test_success_writes_model_and_report(files, tmp_path, library_result):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", output, "--report", report, "--batch-size", "5")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    assert "wrote" in result.stdout and str(output) in result.stdout

    data = json.loads(report.read_text())
    assert {"samples", "batches", "layers", "totals", "timings", "warnings"} <= set(data)
    assert data["samples"] == N and data["batches"] == 3
    assert [layer["name"] for layer in data["layers"]] == ["bn_a", "bn_b", "bn_ds", "bn_c"]
    for layer, expected in zip(data["layers"], library_result.report.layers):
        assert {"name", "channels", "old_mean", "old_var", "new_mean", "new_var", "shift", "warnings", "level"} <= set(layer)
        assert layer["channels"] == expected.channels == len(layer["new_mean"]) == len(layer["new_var"])
        assert layer["level"] == expected.level
        np.testing.assert_allclose(layer["new_mean"], expected.new_mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer["new_var"], expected.new_var, rtol=1e-10)
        np.testing.assert_allclose(layer["old_mean"], expected.old_mean)
        assert {"mean_shift", "max_mean_shift", "kl", "var_ratio"} <= set(layer["shift"])
        assert isinstance(layer["warnings"], list)
    assert data["totals"]["bn_layers"] == 4 and data["totals"]["levels"] == 3 and data["totals"]["samples"] == N
    assert data["timings"]["total"] > 0 and "onnxruntime" in data["timings"]

    written = load_model(output)  # parses and passes the checker
    # folded by default: no BN left here (all four follow a Conv), same function as the
    # recalibrated unfolded model
    assert _bn_nodes(written) == [], [n.name for n in _bn_nodes(written)]
    assert "fold" in data.get("extra", {})
    feeds = {"x": np.load(files / "samples.npy")[:4]}
    for got, want in zip(_run(written, feeds), _run(library_result.model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_no_fold_changes_only_bn_statistics(files, tmp_path, library_result):
    output = tmp_path / "out.onnx"
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", output, "--no-fold", "-q")
    assert result.exit_code == 0, result.stderr
    before, after = onnx.load(files / "model.onnx"), onnx.load(output)
    assert list(after.graph.node) == list(before.graph.node)
    assert list(after.graph.input) == list(before.graph.input)
    assert list(after.graph.output) == list(before.graph.output)
    assert list(after.opset_import) == list(before.opset_import) and after.ir_version == before.ir_version
    assert list(after.metadata_props) == list(before.metadata_props)
    stats = {name for n in _bn_nodes(before) for name in n.input[3:5]}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert list(new) == list(old)
    for name in old:
        assert new[name].dtype == old[name].dtype and new[name].shape == old[name].shape
        if name in stats:
            assert not np.allclose(new[name], old[name]), f"{name} did not change"
        else:
            np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    expected = {t.name: numpy_helper.to_array(t) for t in library_result.model.graph.initializer}
    for name in stats:
        np.testing.assert_allclose(new[name], expected[name], rtol=1e-6)


def test_multi_input_npz(files, tmp_path):
    result = invoke("recalibrate", files / "multi.onnx", files / "multi.npz", "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert sorted(layer["name"] for layer in data["layers"]) == ["bn_img", "bn_out", "bn_vec"]


def test_quiet_prints_nothing(files, tmp_path):
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip() == ""
    assert (tmp_path / "o.onnx").exists()


def test_progress_goes_to_stderr(files, tmp_path, monkeypatch):
    """On a terminal the progress bar shows "BN level k/3" on stderr; stdout has only the summary."""
    terminal = io.StringIO()
    monkeypatch.setattr(bnfold.cli.output, "err", Console(file=terminal, force_terminal=True, width=100))
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx", "--batch-size", "4")
    assert result.exit_code == 0, result.stderr
    assert "BN level 3/3" in terminal.getvalue()
    assert "BN level 3/3" not in result.stdout
    assert "bn_c" in result.stdout  # the summary table

    terminal.seek(0)
    terminal.truncate()
    quiet = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx", "-q")
    assert quiet.exit_code == 0
    assert terminal.getvalue() == ""


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("bnfold ")


# -- --memory-budget ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text,expected",
    [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("0", 0), ("100MB", 10**8), ("1.5KiB", 1536),
     ("64", 64), ("3 gib", 3 * 2**30), ("1TiB", 2**40), ("7B", 7), ("2K", 2000)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1e9", "GiB", "5 parsecs", "5i", "5iB", "1,000"])
def test_parse_bytes_garbage(text):
    with pytest.raises(InvalidOptions):
        parse_bytes(text)


@pytest.mark.parametrize("budget,spills", [("0", True), ("2GiB", False), ("512MiB", False)])
def test_memory_budget_reaches_the_store(files, tmp_path, budget, spills):
    report = tmp_path / "r.json"
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx",
                    "--report", report, "--memory-budget", budget, "--batch-size", "5", "--no-fold", "-q")
    assert result.exit_code == 0, result.stderr
    store = json.loads(report.read_text())["extra"]["store"]
    assert (store["bytes_spilled"] > 0) == spills
    assert store["peak_bytes_in_memory"] <= parse_bytes(budget)


# -- real processes --------------------------------------------------------------------------------

def _console_script() -> list[str]:
    local = Path(sys.executable).with_name("bnfold")
    if local.exists():
        return [str(local)]
    found = shutil.which("bnfold")
    return [found] if found else [sys.executable, "-m", "bnfold.cli"]


@pytest.fixture(scope="module")
def processes(files, tmp_path_factory):
    """Two real runs, started together: a success through the console script and a failure
    through `python -m bnfold.cli`."""
    out = tmp_path_factory.mktemp("processes")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("BNFOLD_DEBUG", None)
    ok_cmd = [*_console_script(), "recalibrate", str(files / "model.onnx"), str(files / "samples.npy"),
              "-o", str(out / "ok.onnx"), "--report", str(out / "ok.json"), "-q"]
    bad_cmd = [sys.executable, "-m", "bnfold.cli", "recalibrate", str(files / "junk.onnx"), str(files / "samples.npy"),
               "-o", str(out / "bad.onnx")]
    started = [subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for cmd in (ok_cmd, bad_cmd)]
    results = []
    for proc in started:
        stdout, stderr = proc.communicate(timeout=120)
        results.append((proc.returncode, stdout, stderr))
    return out, results[0], results[1]


def test_process_success(processes):
    out, (code, stdout, stderr), _ = processes
    assert code == 0, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    assert load_model(out / "ok.onnx")
    assert json.loads((out / "ok.json").read_text())["samples"] == N


def test_process_failure_is_one_line(processes):
    out, _, (code, stdout, stderr) = processes
    assert code == 1, stderr
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: not an ONNX model"), stderr
    assert not (out / "bad.onnx").exists()


# -- outputs: all or nothing, checked before the work ----------------------------------------------

@pytest.mark.parametrize("case", ["report-is-a-directory", "output-is-a-directory", "same-path-twice", "same-file-via-link"])
def test_unwritable_outputs_fail_before_anything_is_written(files, tmp_path, case):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    output.write_bytes(b"precious")
    if case == "report-is-a-directory":
        report.mkdir()
    elif case == "output-is-a-directory":
        output.unlink()
        output.mkdir()
    elif case == "same-path-twice":
        report = output
    else:
        report = tmp_path / "link.onnx"
        report.symlink_to(output)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _assert_failed_cleanly(invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", output,
                                         "--report", report, "-q"))
    assert "directory" in line if "directory" in case else "same file" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp files
    if output.is_file():
        assert output.read_bytes() == b"precious"


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root writes anywhere")
def test_output_in_a_read_only_directory_fails_before_the_work(files, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        line = _assert_failed_cleanly(invoke("recalibrate", files / "model.onnx", files / "samples.npy",
                                             "-o", tmp_path / "out.onnx", "--report", tmp_path / "ro" / "r.json"))
        assert "not writable" in line
        assert not (tmp_path / "out.onnx").exists()
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_a_failed_rename_puts_the_previous_outputs_back(files, tmp_path, monkeypatch):
    """The report's rename fails after the model's succeeded: the model file gets its old bytes back."""
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    output.write_bytes(b"old model")
    report.write_bytes(b"old report")
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == report:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    line = _assert_failed_cleanly(invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", output,
                                         "--report", report, "-q"))
    assert "No space left on device" in line and str(report) in line
    assert output.read_bytes() == b"old model" and report.read_bytes() == b"old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "report.json"]  # no temp files or links left

    output.unlink()  # without a previous model, none is left behind
    _assert_failed_cleanly(invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", output,
                                  "--report", report, "-q"))
    assert not output.exists()


def test_one_sample_is_singular(files, tmp_path):
    np.save(tmp_path / "one.npy", np.load(files / "samples.npy")[:1])
    result = invoke("recalibrate", files / "model.onnx", tmp_path / "one.npy", "-o", tmp_path / "o.onnx", "--no-fold")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())  # the table title may wrap
    assert "1 sample is too few" in text and "on 1 sample:" in text and "BN statistics on 1 sample (3 BN levels)" in text, text
    assert "1 samples" not in text


def test_memory_budget_auto_is_sized_from_available_ram(files, tmp_path):
    assert parse_bytes("auto") is None and parse_bytes(" AUTO ") is None
    report = tmp_path / "r.json"
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx",
                    "--report", report, "--batch-size", "5", "--no-fold", "-q")
    assert result.exit_code == 0, result.stderr
    store = json.loads(report.read_text())["extra"]["store"]
    assert store["bytes_spilled"] == 0 and store["peak_bytes_in_memory"] > 0  # the old 2 GiB default also kept it


def test_providers_option(files, tmp_path):
    ok = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx",
                "--providers", "CPUExecutionProvider", "--batch-size", "5", "-q")
    assert ok.exit_code == 0, ok.stderr
    bad = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "p.onnx",
                 "--providers", "NoSuchExecutionProvider", "-q")
    assert bad.exit_code != 0 and not (tmp_path / "p.onnx").exists()
    assert "NoSuchExecutionProvider" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_outputs_get_the_permissions_of_a_plain_new_file(files, tmp_path):
    """Not mkstemp's private 0600: a model written for a team or a container must be readable by them."""
    old = os.umask(0o022)
    try:
        result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx",
                        "--report", tmp_path / "r.json", "-q")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    assert [oct((tmp_path / n).stat().st_mode & 0o777) for n in ("o.onnx", "r.json")] == ["0o644", "0o644"]


def test_the_summary_times_the_whole_job(files, tmp_path):
    report = tmp_path / "r.json"
    result = invoke("recalibrate", files / "model.onnx", files / "samples.npy", "-o", tmp_path / "o.onnx", "--report", report)
    assert result.exit_code == 0, result.stderr
    timings = json.loads(report.read_text())["timings"]
    assert timings["job"] >= timings["total"] + timings["fold_and_verify"] + timings["signals"] > timings["total"]
    assert f"in {timings['job']:.2f} s" in " ".join(result.stdout.split())
