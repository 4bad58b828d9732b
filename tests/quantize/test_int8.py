"""INT8 unit behaviour: the gate's figures against NumPy, the two passes over the samples, refusals,
and where temporary files go."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InvalidOptions, QuantizationRefused
from bnfold.inputs.arrays import model_inputs
from bnfold.pipeline import JobOptions
from bnfold.quantize import Int8Options, quantize_int8
from bnfold.quantize.gate import Agreement, failures
from bnfold.quantize.passes import SamplePasses


def _conv_model(dtype=TensorProto.FLOAT, op: str = "Conv", channels: int = 8) -> onnx.ModelProto:
    """x (N, 4, 8, 8) → op (4→channels, kernel 3 or 2) → Relu → y."""
    rng = np.random.default_rng(0)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    if op == "Conv":
        w = rng.normal(0, 0.3, (channels, 4, 3, 3)).astype(np_type)
        node = helper.make_node("Conv", ["x", "w"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    else:
        w = rng.normal(0, 0.3, (4, channels, 2, 2)).astype(np_type)
        node = helper.make_node("ConvTranspose", ["x", "w"], ["h"], kernel_shape=[2, 2], strides=[2, 2])
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", dtype, ["N", 4, 8, 8])], [helper.make_tensor_value_info("y", dtype, ["N", "C", "H", "W"])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _samples(n: int = 40) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 4, 8, 8)).astype(np.float32)


# -- the gate ---------------------------------------------------------------------------------------

def test_agreement_matches_numpy_and_any_batch_split():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(50, 5)).astype(np.float32)
    q = (f + rng.normal(scale=0.3, size=f.shape)).astype(np.float32)
    expected_top1 = np.mean(f.argmax(1) == q.argmax(1))
    f64, q64 = f.astype(np.float64), q.astype(np.float64)
    cosine = np.sum(f64 * q64) / np.sqrt(np.sum(f64**2) * np.sum(q64**2))
    for cuts in ([], [7], [1, 2, 30, 49]):
        agreement = Agreement(["y"])
        for fb, qb in zip(np.split(f, cuts), np.split(q, cuts)):
            agreement.add([fb], [qb])
        (o,) = agreement.result()
        assert o.kind == "classifier" and o.top1 == pytest.approx(expected_top1)
        assert o.cosine == pytest.approx(cosine, rel=1e-12)
        assert o.max_abs == pytest.approx(np.abs(q64 - f64).max())
        assert o.rel_mean == pytest.approx(np.abs(q64 - f64).mean() / np.abs(f64).mean())
        assert o.rel_max == pytest.approx(np.abs(q64 - f64).max() / np.abs(f64).max())
    assert 0 < expected_top1 < 1


def test_gate_thresholds_nan_and_discrete_outputs():
    agreement = Agreement(["maps", "label"])
    maps = np.ones((4, 3, 2, 2), np.float32)
    broken = maps.copy()
    broken[0, 0, 0, 0] = np.nan
    agreement.add([maps, np.array([1, 2, 3, 4])], [broken, np.array([1, 2, 3, 0])])
    maps_result, label = agreement.result()
    assert maps_result.kind == "float" and maps_result.top1 is None  # (N, C, H, W) is not "classifier-like"
    assert label.kind == "discrete" and label.top1 == 0.75
    found = failures([maps_result, label], min_agreement=0.7, min_cosine=0.5)
    assert found == [f"maps: cosine similarity {maps_result.cosine:.4f} < 0.5"]  # NaN fails; 0.75 ≥ 0.7 passes
    assert failures([label], min_agreement=0.8, min_cosine=0.0) == ["label: top-1 agreement 0.7500 < 0.8"]


# -- the passes -------------------------------------------------------------------------------------

def _inputs():
    return model_inputs(_conv_model())


def test_samples_that_fit_are_read_once():
    x = _samples(40)
    passes = SamplePasses(x, _inputs(), batch_size=16, keep_bytes=x.nbytes)
    first = list(passes.first())
    second = list(passes.second())
    assert passes.samples == 40 and not passes.rereads and not passes.subset
    assert all(a["x"] is b["x"] for a, b in zip(first, second))  # the kept batches, not a re-read


def test_samples_beyond_the_budget_are_read_again_in_full():
    x = _samples(40)
    passes = SamplePasses(x, _inputs(), batch_size=16, keep_bytes=x[:20].nbytes)
    list(passes.first())
    again = np.concatenate([b["x"] for b in passes.second()])
    assert passes.rereads and not passes.subset
    np.testing.assert_array_equal(again, x)


def test_a_one_shot_iterator_keeps_a_bounded_prefix_and_says_so():
    x = _samples(40)
    passes = SamplePasses((x[i : i + 10] for i in range(0, 40, 10)), _inputs(), batch_size=10, keep_bytes=x[:25].nbytes)
    assert sum(len(b["x"]) for b in passes.first()) == 40
    kept = np.concatenate([b["x"] for b in passes.second()])
    assert passes.subset and not passes.rereads and passes.kept_samples == 20
    np.testing.assert_array_equal(kept, x[:20])


def test_quantize_on_a_generator_reports_the_subset():
    x = _samples(40)
    result = quantize_int8(_conv_model(), (x[i : i + 8] for i in range(0, 40, 8)),
                           Int8Options(batch_size=8, keep_bytes=x[:16].nbytes, latency=False, min_cosine=0.9))
    gate = result.report["gate"]
    assert result.report["calibration"]["samples"] == 40
    assert gate["samples"] == 16 and gate["subset"] and not gate["samples_read_again"]


# -- refusals ---------------------------------------------------------------------------------------

def test_float16_model_is_refused_by_name():
    with pytest.raises(QuantizationRefused, match=r"float16 tensors .*'x'.*convert the model to float32"):
        quantize_int8(_conv_model(TensorProto.FLOAT16), _samples().astype(np.float16))


def test_model_without_compute_ops_is_refused_naming_its_ops():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(QuantizationRefused, match=r"nothing to quantize.*its ops: Relu"):
        quantize_int8(model, np.ones((4, 4), np.float32))


def test_ops_without_int8_kernels_are_refused_by_name():
    error = pytest.raises(QuantizationRefused, quantize_int8, _conv_model(op="ConvTranspose"), _samples(),
                          Int8Options(latency=False))
    assert "no op of this model runs in INT8" in error.value.message and "ConvTranspose ×1" in error.value.message
    assert error.value.report["ops"] == {"int8": [], "float": ["ConvTranspose ×1"]}
    assert error.value.field == "options.quantize"


def test_a_grouped_conv_transpose_with_bias_is_left_in_float_and_named():
    """ORT's per-channel quantizer fails on it (bias scales sized for all out-channels, weight scales for
    one group's); folding gives every BN-followed ConvTranspose a bias, so this is common after bnfold."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 2, 2)).astype(np.float32), "tw"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "tb")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[1, 1]),  # unnamed: bnfold names it
             helper.make_node("ConvTranspose", ["c", "tw", "tb"], ["y"], kernel_shape=[2, 2], strides=[2, 2], group=2)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = quantize_int8(model, rng.normal(size=(16, 8, 4, 4)).astype(np.float32), Int8Options(latency=False))
    assert result.report["excluded"] == [{"node": "ConvTranspose_1", "op": "ConvTranspose", "reason": (
        "grouped ConvTranspose with a bias: ONNX Runtime's per-channel quantizer cannot size its bias scales")}]
    assert result.report["ops"] == {"int8": ["QLinearConv ×1"], "float": ["ConvTranspose ×1"]}
    assert result.report["warnings"][0].startswith("left in float: ConvTranspose_1")
    transposed = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
    assert "tw" in transposed.input  # its float weight, not a DequantizeLinear output


def test_disagreement_is_refused_with_the_figures_and_the_way_to_the_float_model():
    error = pytest.raises(QuantizationRefused, quantize_int8, _conv_model(), _samples(),
                          Int8Options(min_cosine=1.0, latency=False))
    assert "cosine similarity" in error.value.message and "< 1.0" in error.value.message
    assert "Nothing was written" in error.value.message and "without the quantize option" in error.value.message
    assert error.value.report["gate"]["failures"] and "latency" not in error.value.report


def test_old_opset_is_converted():
    model = _conv_model()
    model.opset_import[0].version = 11
    result = quantize_int8(model, _samples(), Int8Options(latency=False, min_cosine=0.9))
    assert result.report["ops"]["int8"] == ["QLinearConv ×1"]


@pytest.mark.parametrize("options, field", [
    ({"quantize": "int4"}, "options.quantize"),
    ({"quantize": "int8", "fold": False}, "options.quantize"),
    ({"quantize": "int8", "quantize_method": "kl"}, "options.quantize_method"),
    ({"quantize": "int8", "min_agreement": 1.5}, "options.min_agreement"),
    ({"quantize": "int8", "min_cosine": -0.1}, "options.min_cosine"),
])
def test_bad_int8_options_name_their_field(options, field):
    with pytest.raises(InvalidOptions) as error:
        JobOptions(**options)
    assert error.value.field == field


# -- files ------------------------------------------------------------------------------------------

def test_temporary_files_go_to_the_callers_folder_only(tmp_path, monkeypatch):
    """ORT's quantize_static makes its temporary folders with tempfile in the system's temp folder;
    every temporary folder or file made during quantization must lie in the caller's folder."""
    work, made = tmp_path / "job", []

    def recording(real):
        def call(suffix=None, prefix=None, dir=None, *args, **kwargs):
            path = real(suffix, prefix, dir, *args, **kwargs)
            made.append(path if isinstance(path, str) else path[1])
            return path
        return call

    monkeypatch.setattr(tempfile, "mkdtemp", recording(tempfile.mkdtemp))
    monkeypatch.setattr(tempfile, "mkstemp", recording(tempfile.mkstemp))
    result = quantize_int8(_conv_model(), _samples(), Int8Options(latency=False, min_cosine=0.9), work_dir=work)
    assert result.report["ops"]["int8"] and made
    assert all(os.path.commonpath([p, work]) == str(work) for p in made), made
    assert list(work.iterdir()) == []  # and nothing is left behind


def _with_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv → BN → Relu: the Conv's output goes through a BatchNormalization of the same float type."""
    graph, dtype = model.graph, model.graph.input[0].type.tensor_type.elem_type
    np_type, channels = onnx.helper.tensor_dtype_to_np_dtype(dtype), graph.initializer[0].dims[0]
    for name, value in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)):
        graph.initializer.append(numpy_helper.from_array(np.full(channels, value, np_type), name))
    graph.node.insert(1, helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["hb"]))
    graph.node[2].input[0] = "hb"
    onnx.checker.check_model(model, full_check=True)
    return model


def test_precheck_refuses_a_float16_model_before_any_work(tmp_path):
    from bnfold.pipeline import precheck

    onnx.save(_with_bn(_conv_model(TensorProto.FLOAT16)), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", _samples(8).astype(np.float16))
    precheck(tmp_path / "m.onnx", tmp_path / "x.npy", options=JobOptions())  # fine without quantize
    with pytest.raises(QuantizationRefused, match="float16"):
        precheck(tmp_path / "m.onnx", tmp_path / "x.npy", options=JobOptions(quantize="int8"))


def test_job_default_memory_budget_gives_the_int8_default_keep_bytes():
    """JobOptions().memory_budget is None (sized at run time); the INT8 step must still get a number."""
    from bnfold.quantize.int8 import DEFAULT_KEEP_BYTES

    assert JobOptions(quantize="int8").int8_options().keep_bytes == DEFAULT_KEEP_BYTES
    assert JobOptions(quantize="int8", memory_budget=1234).int8_options().keep_bytes == 1234
