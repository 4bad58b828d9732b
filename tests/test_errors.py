"""Bad input gets the right `BnfoldError` subclass and a message that names the culprit and the fix.

Library level only (`load_model`, `load_samples`, `recalibrate`); the CLI's one-line rendering of
the same errors is tested in test_cli.py. Also here: cases that *look* unusual but must work
(static batch dimension with a multiple of it, shared statistics initializers, `Constant`-node BN
parameters, an opset-7 per-channel BN).
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from models import bn_after_bn, conv_bn, make_samples, multi_input
from onnx import helper, numpy_helper
from reference import reference_recalibrate

import bnfold
from bnfold.errors import BnfoldError, InvalidModel, InvalidOptions, InvalidSamples, NoBatchNorm, UnsupportedModel
from bnfold.inputs.arrays import load_samples
from bnfold.inputs.model import check_model, load_model
from bnfold.onnx_graph import constant_values

REL = 1e-4  # engine (float32 activations) vs the float64 reference, relative to std / var


# -- helpers -------------------------------------------------------------------------------------

def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _bn(model: onnx.ModelProto, index: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"][index]


def _x(n: int = 8, seed: int = 0) -> np.ndarray:
    return make_samples(conv_bn(), n, seed=seed)["x"]


def _raises(exc_type, fn, *words: str) -> BnfoldError:
    """fn() raises exactly the expected subclass, and the message holds every word."""
    with pytest.raises(BnfoldError) as info:
        fn()
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert message == info.value.message
    for word in words:
        assert word in message, f"{word!r} not in message: {message}"
    return info.value


def _assert_stats_close(got: dict, want: dict) -> None:
    """got/want: BN name -> (mean, var); tolerance relative to the reference's std / var."""
    assert set(got) == set(want)
    for name, (mean, var) in got.items():
        ref_mean, ref_var = want[name]
        std = np.sqrt(ref_var)
        np.testing.assert_array_less(np.abs(mean - ref_mean), REL * std + 1e-7, err_msg=f"{name} mean")
        np.testing.assert_array_less(np.abs(var - ref_var), REL * ref_var + 1e-9, err_msg=f"{name} var")


def _layer_stats(result: bnfold.RecalibrationResult) -> dict:
    return {layer.name: (layer.new_mean, layer.new_var) for layer in result.report.layers}


def _stored_stats(model: onnx.ModelProto) -> dict:
    values = constant_values(model.graph)
    return {
        n.name: (values[n.input[3]].astype(np.float64), values[n.input[4]].astype(np.float64))
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
    }


def _no_bn_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _opset7_bn(spatial: int) -> onnx.ModelProto:
    """One opset-7 BN on x (N, 3, 4, 4); IR 3, so the initializers are also graph inputs."""
    shape = [3, 4, 4] if spatial == 0 else [3]
    rng = np.random.default_rng(0)
    names = ("scale", "bias", "mean", "var")
    values = [rng.uniform(0.5, 1.5, shape), rng.normal(0, 1, shape), rng.normal(0, 1, shape), rng.uniform(0.5, 2, shape)]
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(names, values)]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])]
    inputs += [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in names]
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])
    node = helper.make_node("BatchNormalization", ["x", *names], ["y"], name="bn0", spatial=spatial, epsilon=1e-5)
    graph = helper.make_graph([node], "opset7", inputs, [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)


def _static_batch(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    out = _copy(model)
    dim = out.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = size
    onnx.checker.check_model(out)
    return out


# -- the model file ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "data",
    [b"hello, this is a text file and not a model\n" * 4, b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b"\x93NUMPY\x01\x00"],
    ids=["text", "png", "npy-magic"],
)
def test_not_an_onnx_file(data):
    error = _raises(InvalidModel, lambda: load_model(data), "not an ONNX model")
    assert error.field == "model"


def test_npy_file_given_as_model(tmp_path):
    """Swapped arguments: the samples file where the model should be."""
    path = tmp_path / "samples.npy"
    np.save(path, _x(2))
    _raises(InvalidModel, lambda: load_model(path), "not an ONNX model")


def test_truncated_onnx_bytes():
    data = conv_bn().SerializeToString()
    for cut in (1, 10, len(data) // 3, len(data) // 2, len(data) - 2, len(data) - 1):
        with pytest.raises(InvalidModel):
            load_model(data[:cut])
    assert load_model(data).graph.name == "conv_bn"  # the whole file is fine


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _raises(InvalidModel, lambda: load_model(path), "not an ONNX model")
    _raises(InvalidModel, lambda: load_model(b""), "not an ONNX model")


def test_missing_model_file(tmp_path):
    path = tmp_path / "nope.onnx"
    _raises(InvalidModel, lambda: load_model(path), str(path), "No such file")
    _raises(InvalidModel, lambda: load_model(tmp_path), "cannot read model file")


def test_checker_failure_names_the_node():
    model = conv_bn()
    del _bn(model).input[1:]  # a BN with one input
    _raises(InvalidModel, lambda: load_model(model.SerializeToString()), "checker", "bn1")


def test_checker_failure_unknown_op():
    model = conv_bn()
    model.graph.node[0].op_type = "NoSuchOp"
    _raises(InvalidModel, lambda: load_model(model.SerializeToString()), "checker", "NoSuchOp")


def test_recalibrate_runs_the_checker_too():
    model = conv_bn()
    model.graph.node[0].op_type = "NoSuchOp"
    _raises(InvalidModel, lambda: bnfold.recalibrate(model, _x()), "NoSuchOp")


def test_external_data_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    how = "save_as_external_data=False"
    _raises(InvalidModel, lambda: load_model(path), "external data", how)
    _raises(InvalidModel, lambda: load_model(path.read_bytes()), "external data", how)
    in_memory = onnx.load(path, load_external_data=False)
    _raises(InvalidModel, lambda: bnfold.recalibrate(in_memory, _x()), "external data", how)


# -- models bnfold cannot recalibrate --------------------------------------------------------------

def test_no_batchnorm_says_it_was_folded_and_how_to_keep_it():
    model = _no_bn_model()
    assert load_model(model.SerializeToString())  # a valid model: only recalibration refuses it
    error = _raises(NoBatchNorm, lambda: bnfold.recalibrate(model, _x()), "no BatchNormalization", "folded", "torch.onnx.export")
    assert "TrainingMode.PRESERVE" in error.message
    assert isinstance(error, InvalidModel) and error.field == "model"


@pytest.mark.parametrize("outputs", [1, 3], ids=["one-output", "training-outputs"])
def test_bn_in_training_mode(outputs):
    model = conv_bn()
    bn = _bn(model)
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    if outputs == 3:  # as exported in training mode: running mean / var outputs too
        bn.output.extend(["running_mean", "running_var"])
        onnx.checker.check_model(model, full_check=True)
    assert load_model(model.SerializeToString())  # valid ONNX; only recalibration refuses it
    _raises(UnsupportedModel, lambda: bnfold.recalibrate(model, _x()), "'bn1'", "training_mode", "eval")


def test_bn_exposing_training_outputs():
    model = conv_bn()
    _bn(model).output.extend(["running_mean", "running_var"])
    model.graph.output.append(helper.make_tensor_value_info("running_mean", onnx.TensorProto.FLOAT, [4]))
    _raises(UnsupportedModel, lambda: bnfold.recalibrate(model, _x()), "'bn1'", "eval mode")


def test_bn_mean_computed_by_the_graph():
    # from the graph input, so not constant (an Identity of a constant is one: tests/engine/test_parameters.py)
    model = conv_bn()
    bn = _bn(model)
    at = list(model.graph.node).index(bn)
    model.graph.node.insert(at, helper.make_node("ReduceMean", [bn.input[0]], ["mean_computed"], name="mean_of_x",
                                                 axes=[0, 2, 3], keepdims=0))
    bn.input[3] = "mean_computed"
    onnx.checker.check_model(model, full_check=True)
    _raises(UnsupportedModel, lambda: bnfold.recalibrate(model, _x()), "'bn1'", "'mean_computed'", "computed by the graph")


def test_bn_spatial_0_old_opset():
    model = _opset7_bn(spatial=0)
    assert load_model(model.SerializeToString())
    x = np.random.default_rng(1).standard_normal((5, 3, 4, 4)).astype(np.float32)
    _raises(UnsupportedModel, lambda: bnfold.recalibrate(model, x), "'bn0'", "spatial=0")


def test_bn_spatial_1_old_opset_works():
    """The same opset-7 model with per-channel statistics is fine (IR 3: initializers are inputs)."""
    model = _opset7_bn(spatial=1)
    x = np.random.default_rng(1).standard_normal((5, 3, 4, 4)).astype(np.float32)
    layer = bnfold.recalibrate(model, x).report.layers[0]
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(layer.new_mean, x64.mean(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.new_var, x64.var(axis=(0, 2, 3)), rtol=1e-9)


# -- samples that do not fit the model --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_, np.complex64])
def test_non_float_samples(dtype):
    samples = (_x() * 10).astype(dtype)
    error = _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), samples), "'x'", np.dtype(dtype).name, "float32", "convert")
    assert error.field == "samples"


def test_sample_missing_the_batch_axis():
    one = _x(1)[0]  # (3, 8, 8): a single sample without its batch axis
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), one), "'x'", "(?, 3, 8, 8)", "axis 0")


def test_samples_with_wrong_channel_count():
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), _x()[:, :2]), "'x'", "(2, 8, 8)", "(?, 3, 8, 8)")


def test_samples_with_extra_axis():
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), _x()[:, None]), "'x'", "(?, 3, 8, 8)")


def test_multi_input_model_given_a_bare_array():
    model = multi_input()
    img = make_samples(model, 6)["img"]
    _raises(InvalidSamples, lambda: bnfold.recalibrate(model, img), "2 inputs", "'img'", "'vec'", ".npz")


def test_multi_input_arrays_disagree_on_sample_count():
    model = multi_input()
    samples = make_samples(model, 6)
    samples["vec"] = samples["vec"][:4]
    _raises(InvalidSamples, lambda: bnfold.recalibrate(model, samples), "'img': 6", "'vec': 4")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(value):
    samples = _x(12)
    samples[9, 1, 2, 3] = value  # in the third batch of 4, after two good ones
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), samples, batch_size=4), "'x'", "NaN or Inf", "batch 2")


def test_non_finite_in_second_input():
    model = multi_input()
    samples = make_samples(model, 6)
    samples["vec"][3, 0] = np.nan
    _raises(InvalidSamples, lambda: bnfold.recalibrate(model, samples), "'vec'", "NaN or Inf")


@pytest.mark.parametrize(
    "samples",
    [np.zeros((0, 3, 8, 8), np.float32), {"x": np.zeros((0, 3, 8, 8), np.float32)}, [], iter([np.zeros((0, 3, 8, 8), np.float32)])],
    ids=["array", "mapping", "list", "iterable-of-empty"],
)
def test_empty_sample_set(samples):
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), samples), "empty", "at least one sample")


def test_empty_npy_file(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 3, 8, 8), np.float32))
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), load_samples(path)), "empty")


@pytest.mark.parametrize("samples", [None, np.float32(1.0), "samples.npy"], ids=["None", "scalar", "path-string"])
def test_samples_of_the_wrong_kind(samples):
    """Not an array, mapping or iterable of batches: a clear InvalidSamples, not a TypeError or a
    claim that the set is 'empty' (a path string is iterated character by character)."""
    with pytest.raises(InvalidSamples) as info:
        bnfold.recalibrate(conv_bn(), samples)
    assert "empty" not in info.value.message, info.value.message


def test_npz_missing_an_input(tmp_path):
    model = multi_input()
    path = tmp_path / "samples.npz"
    np.savez(path, img=make_samples(model, 6)["img"])
    _raises(InvalidSamples, lambda: bnfold.recalibrate(model, load_samples(path)), "['vec']", "inputs are ['img', 'vec']")


def test_npz_with_wrongly_named_array(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=_x())  # np.savez(path, x) names it arr_0
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), load_samples(path)), "['x']", "inputs are ['x']")


def test_npz_with_an_extra_unknown_key(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, x=_x(), labels=np.arange(8))
    _raises(InvalidSamples, lambda: bnfold.recalibrate(conv_bn(), load_samples(path)), "['labels']", "not model inputs", "['x']")


class _Booby:
    """Unpickling this creates a marker file: proof that pickles are never loaded."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_npy_is_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "samples.npy"
    np.save(path, np.array([_Booby(marker), None], dtype=object), allow_pickle=True)
    _raises(InvalidSamples, lambda: load_samples(path), str(path), "pickled")
    assert not marker.exists()


def test_pickled_npz_is_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "samples.npz"
    np.savez(path, x=np.array([_Booby(marker)], dtype=object))
    _raises(InvalidSamples, lambda: load_samples(path), "pickled")
    assert not marker.exists()


def test_unreadable_samples_files(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    _raises(InvalidSamples, lambda: load_samples(tmp_path / "junk.npy"), "junk.npy", "not a readable NumPy file")
    full = tmp_path / "full.npy"
    np.save(full, _x())
    (tmp_path / "cut.npy").write_bytes(full.read_bytes()[:-100])
    _raises(InvalidSamples, lambda: load_samples(tmp_path / "cut.npy"), "cut.npy", "truncated")
    _raises(InvalidSamples, lambda: load_samples(tmp_path / "missing.npz"), "no such samples file", "missing.npz")
    _raises(InvalidSamples, lambda: load_samples(tmp_path / "samples.csv"), ".npy", ".npz")


def test_garbage_npz_is_not_called_a_pickle(tmp_path):
    """A corrupt .npz (not a zip) should read as 'not a readable NumPy file', not as 'pickled
    Python objects' (numpy falls back to unpickling files it does not recognise)."""
    path = tmp_path / "junk.npz"
    path.write_bytes(b"garbage, not a zip archive")
    error = _raises(InvalidSamples, lambda: load_samples(path), "junk.npz")
    assert "pickled" not in error.message, error.message


# -- static batch dimension ----------------------------------------------------------------------

def test_static_batch_dim_rejects_a_remainder():
    model = _static_batch(conv_bn(), 4)
    _raises(InvalidSamples, lambda: bnfold.recalibrate(model, _x(10)), "fixed at 4", "2 over", "multiple of 4", "dynamic batch axis")


def test_static_batch_dim_with_a_multiple_works():
    x = _x(8)
    static = bnfold.recalibrate(_static_batch(conv_bn(), 4), x, batch_size=3)  # batch_size gives way to the static 4
    assert (static.report.samples, static.report.batches) == (8, 2)
    dynamic = bnfold.recalibrate(conv_bn(), x, batch_size=8)
    for a, b in zip(static.report.layers, dynamic.report.layers):
        np.testing.assert_allclose(a.new_mean, b.new_mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a.new_var, b.new_var, rtol=1e-10)
    # and uneven batches from an iterable are re-cut to 4
    lazy = bnfold.recalibrate(_static_batch(conv_bn(), 4), iter([x[:3], x[3:5], x[5:]]))
    assert (lazy.report.samples, lazy.report.batches) == (8, 2)
    np.testing.assert_allclose(lazy.report.layers[0].new_var, dynamic.report.layers[0].new_var, rtol=1e-10)


# -- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [-1, -(2**31)])
def test_negative_memory_budget(budget):
    error = _raises(InvalidOptions, lambda: bnfold.recalibrate(conv_bn(), _x(), memory_budget=budget), "memory_budget", str(budget))
    assert error.field == "options"


@pytest.mark.parametrize("batch_size", [0, -3])
def test_batch_size_below_one(batch_size):
    _raises(InvalidOptions, lambda: bnfold.recalibrate(conv_bn(), _x(), batch_size=batch_size), "batch_size", str(batch_size))


def test_memory_budget_zero_is_allowed():
    result = bnfold.recalibrate(bn_after_bn(), make_samples(bn_after_bn(), 6), memory_budget=0, batch_size=2)
    assert result.report.samples == 6


# -- shared and Constant-node statistics -------------------------------------------------------------

def _shared_bn_after_bn() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """bn_after_bn with bn2 reading bn1's mean/var initializers, and the same model with bn2 given
    private copies of those values (what the reference can recalibrate)."""
    shared = bn_after_bn()
    bn1, bn2 = _bn(shared, 0), _bn(shared, 1)
    own = {bn2.input[3], bn2.input[4]}
    bn2.input[3], bn2.input[4] = bn1.input[3], bn1.input[4]
    kept = [t for t in shared.graph.initializer if t.name not in own]
    del shared.graph.initializer[:]
    shared.graph.initializer.extend(kept)
    onnx.checker.check_model(shared, full_check=True)

    unshared = bn_after_bn()
    inits = {t.name: t for t in unshared.graph.initializer}
    u1, u2 = _bn(unshared, 0), _bn(unshared, 1)
    for slot in (3, 4):
        value = numpy_helper.to_array(inits[u1.input[slot]])
        inits[u2.input[slot]].CopyFrom(numpy_helper.from_array(value, u2.input[slot]))
    return shared, unshared


def test_statistics_shared_by_two_bns_each_get_their_own():
    shared, unshared = _shared_bn_after_bn()
    samples = make_samples(shared, 16, seed=3)
    want = reference_recalibrate(unshared, samples)
    assert not np.allclose(want["bn1"][1], want["bn2"][1])  # the two BNs really need different stats
    result = bnfold.recalibrate(shared, samples, batch_size=5)
    _assert_stats_close(_layer_stats(result), want)
    _assert_stats_close(_stored_stats(result.model), want)  # in the returned model, per BN
    check_model(result.model)
    assert any("shared" in w for w in result.report.warnings)
    # the input model is untouched
    assert [t.name for t in shared.graph.initializer] == [t.name for t in _shared_bn_after_bn()[0].graph.initializer]


def test_statistics_also_read_by_another_node_keep_their_old_value_there():
    """bn1's mean also feeds an Identity to a graph output: that reader must keep the old values."""
    model = conv_bn()
    bn = _bn(model)
    old_mean = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == bn.input[3]))
    model.graph.node.append(helper.make_node("Identity", [bn.input[3]], ["mean_out"], name="mean_reader"))
    model.graph.output.append(helper.make_tensor_value_info("mean_out", onnx.TensorProto.FLOAT, [4]))
    onnx.checker.check_model(model, full_check=True)
    samples = make_samples(model, 12, seed=4)
    result = bnfold.recalibrate(model, samples)
    _assert_stats_close(_stored_stats(result.model), reference_recalibrate(conv_bn(), samples))
    reader = next(n for n in result.model.graph.node if n.name == "mean_reader")
    np.testing.assert_array_equal(constant_values(result.model.graph)[reader.input[0]], old_mean)


@pytest.mark.parametrize("style", ["value", "value_floats"])
def test_constant_node_bn_parameters(style):
    """scale/B/mean/var given by Constant nodes instead of initializers."""
    reference_model = conv_bn()
    samples = make_samples(reference_model, 16, seed=5)
    model = conv_bn()
    bn = _bn(model)
    inits = {t.name: t for t in model.graph.initializer}
    constants = []
    for name in bn.input[1:]:
        tensor = inits[name]
        value = {"value": tensor} if style == "value" else {"value_floats": numpy_helper.to_array(tensor).tolist()}
        constants.append(helper.make_node("Constant", [], [name], name=f"const_{name}", **value))
    kept = [t for t in model.graph.initializer if t.name not in bn.input[1:]]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for i, node in enumerate(constants):
        model.graph.node.insert(i, node)
    onnx.checker.check_model(model, full_check=True)

    result = bnfold.recalibrate(model, samples, batch_size=5)
    want = reference_recalibrate(reference_model, samples)
    _assert_stats_close(_layer_stats(result), want)
    _assert_stats_close(_stored_stats(result.model), want)  # written back into the Constant nodes
    layer = result.report.layers[0]
    np.testing.assert_array_equal(layer.old_mean, numpy_helper.to_array(inits[bn.input[3]]))
    check_model(result.model)
    assert sum(n.op_type == "Constant" for n in result.model.graph.node) == 4

    # the recalibrated Constant-node model computes what the recalibrated initializer model does
    import onnxruntime as ort

    plain = bnfold.recalibrate(reference_model, samples, batch_size=5).model
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": samples["x"][:3]})[0]
    np.testing.assert_allclose(run(result.model), run(plain), rtol=1e-6, atol=1e-6)


def test_plural():
    from bnfold.errors import plural

    assert [plural(n, "sample") for n in (0, 1, 2)] == ["0 samples", "1 sample", "2 samples"]
    assert plural(1, "BN level") == "1 BN level" and plural(3, "index", "indices") == "3 indices"


def test_unavailable_provider():
    _raises(InvalidOptions, lambda: bnfold.recalibrate(conv_bn(), _x(), providers=["NoSuchExecutionProvider"]),
            "NoSuchExecutionProvider", "available")
    result = bnfold.recalibrate(conv_bn(), _x(), providers=("CPUExecutionProvider",))
    assert result.report.layers
