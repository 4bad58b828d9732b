"""The test models are valid, and the float64 reference interpreter agrees with onnxruntime.

Everything else (tests/test_exactness.py) trusts tests/reference.py, so it is checked here
against an implementation written by someone else.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import ALL_MODELS, make_samples
from onnx import numpy_helper
from reference import reference_recalibrate, run_reference


def _ort_run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # shared 2-core machine
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def _bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_model_is_valid(name):
    model = ALL_MODELS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names), "node names must be unique and non-empty"
    assert _bn_nodes(model), "every test model has at least one BN"
    for vi in model.graph.input:
        assert vi.type.tensor_type.shape.dim[0].dim_param == "N"
    # factories are deterministic (seeded)
    assert ALL_MODELS[name]().SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_reference_matches_onnxruntime(name):
    model = ALL_MODELS[name]()
    inputs = make_samples(model, 6, seed=1)
    expected = _ort_run(model, inputs)
    got = run_reference(model, inputs)
    assert set(got) == set(expected)
    for out, want in expected.items():
        assert got[out].dtype == np.float64 and got[out].shape == want.shape, out
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=1e-5 * scale, err_msg=out)


@pytest.mark.parametrize("name", ["residual_block", "multi_input", "bn_not_after_foldable"])
def test_reference_intermediates_and_overrides(name):
    """Intermediate tensors and overridden BN statistics also match onnxruntime."""
    model = ALL_MODELS[name]()
    inputs = make_samples(model, 5, seed=2)
    rng = np.random.default_rng(0)
    overrides = {}
    for node in _bn_nodes(model):
        c = len(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[3])))
        overrides[node.input[3]] = rng.normal(0, 1, c).astype(np.float32)
        overrides[node.input[4]] = rng.uniform(0.2, 3, c).astype(np.float32)
    patched = onnx.ModelProto()
    patched.CopyFrom(model)
    for t in patched.graph.initializer:
        if t.name in overrides:
            t.CopyFrom(numpy_helper.from_array(overrides[t.name], t.name))
    # expose every BN input as an extra graph output so onnxruntime returns it
    bn_inputs = [n.input[0] for n in _bn_nodes(model)]
    graph_inputs = {vi.name for vi in model.graph.input}
    extra = [x for x in dict.fromkeys(bn_inputs) if x not in graph_inputs]
    patched.graph.output.extend(onnx.helper.make_empty_tensor_value_info(x) for x in extra)
    expected = _ort_run(patched, inputs)
    got = run_reference(model, inputs, outputs=list(expected), overrides=overrides)
    for out, want in expected.items():
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=1e-5 * scale, err_msg=out)


def test_recalibrate_bn_on_graph_input_by_hand():
    model = ALL_MODELS["bn_on_graph_input"]()
    x = make_samples(model, 7, seed=3)["x"]
    stats = reference_recalibrate(model, {"x": x})
    assert list(stats) == ["bn_in", "bn1"]
    mean, var = stats["bn_in"]
    x64 = x.astype(np.float64)
    assert mean.dtype == var.dtype == np.float64 and mean.shape == (3,)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-13)  # biased (ddof=0)

    # bn1 sees conv1 applied to x normalised with bn_in's NEW statistics.
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    xn = (x64 - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    xn = xn * init["bn_in_scale"][:, None, None] + init["bn_in_bias"][:, None, None]
    w, b = init["conv1_W"], init["conv1_B"]  # (4, 3, 3, 3), valid 3x3 conv
    h = np.zeros((7, 4, 5, 5))
    for i in range(5):
        for j in range(5):
            h[:, :, i, j] = np.einsum("nchw,mchw->nm", xn[:, :, i : i + 3, j : j + 3], w) + b
    np.testing.assert_allclose(stats["bn1"][0], h.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats["bn1"][1], h.var(axis=(0, 2, 3)), rtol=1e-12)


def test_recalibrate_fixed_point_bn_after_bn():
    """After BN1 is recalibrated its output has per-channel mean = bias1 and var ~ scale1^2,
    so BN2's new statistics follow in closed form."""
    model = ALL_MODELS["bn_after_bn"]()
    inputs = make_samples(model, 9, seed=4)
    stats = reference_recalibrate(model, inputs)
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    _, var1 = stats["bn1"]
    np.testing.assert_allclose(stats["bn2"][0], init["bn1_bias"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["bn2"][1], init["bn1_scale"] ** 2 * var1 / (var1 + 1e-5), rtol=1e-12)


# ------------------------------------------------------------- padding rules, one node at a time


def _one_node(op: str, x_shape, w_shape=None, **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x → op(x, w) → y, float32, opset 17; returns the model and a random input."""
    rng = np.random.default_rng(sum(x_shape) + len(attrs))
    inits = [numpy_helper.from_array(rng.normal(size=w_shape).astype(np.float32), "w")] if w_shape else []
    node = onnx.helper.make_node(op, ["x", "w"] if w_shape else ["x"], ["y"], name="n", **attrs)
    graph = onnx.helper.make_graph([node], "g", [_value("x", x_shape)], [_value("y", None)], inits)
    return _checked(graph), {"x": rng.normal(size=x_shape).astype(np.float32)}


def _value(name: str, shape) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _checked(graph: onnx.GraphProto) -> onnx.ModelProto:
    """Opset 17 / IR 8, output shape inferred, checker-valid."""
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    shaped = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.output[0].CopyFrom(shaped.graph.output[0])
    onnx.checker.check_model(model, full_check=True)
    return model


def _agrees_with_onnxruntime(model, inputs):
    want, got = _ort_run(model, inputs)["y"], run_reference(model, inputs)["y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("x_shape, w_shape, strides, dilations", [
    ([2, 3, 7], [4, 3, 4], [2], [1]),  # odd total padding: the two SAME modes differ
    ([2, 3, 6, 5], [4, 3, 3, 2], [1, 2], [1, 1]),  # (onnxruntime refuses dilation with SAME)
    ([1, 2, 5, 4, 3], [2, 2, 2, 3, 1], [3, 1, 2], [1, 1, 1]),
], ids=["1d", "2d", "3d"])
def test_conv_auto_pad_matches_onnxruntime(auto_pad, x_shape, w_shape, strides, dilations):
    _agrees_with_onnxruntime(*_one_node("Conv", x_shape, w_shape, auto_pad=auto_pad, strides=strides,
                                        dilations=dilations))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_max_pool_auto_pad_matches_onnxruntime(auto_pad):
    model, inputs = _one_node("MaxPool", [2, 3, 8, 6], kernel_shape=[3, 2], strides=[2, 1], auto_pad=auto_pad)
    _agrees_with_onnxruntime(model, inputs)


@pytest.mark.parametrize("attrs", [
    dict(strides=[2], output_shape=[8]),  # total padding 1: the odd unit at the beginning
    dict(strides=[2], output_shape=[6]),
    dict(strides=[2], output_shape=[8], auto_pad="SAME_UPPER"),  # … at the end
    dict(strides=[2], auto_pad="SAME_UPPER"),  # output_shape in·stride
    dict(strides=[2], auto_pad="SAME_LOWER"),
    dict(strides=[3], output_shape=[10], output_padding=[2], group=2),
], ids=["odd", "even", "upper-odd", "same-upper", "same-lower", "grouped-output-padding"])
def test_conv_transpose_output_shape_matches_onnxruntime(attrs):
    _agrees_with_onnxruntime(*_one_node("ConvTranspose", [2, 4, 4], [4, 3, 3], **attrs))


def test_conv_transpose_output_shape_2d_matches_onnxruntime():
    _agrees_with_onnxruntime(*_one_node("ConvTranspose", [1, 2, 3, 4], [2, 2, 3, 2], strides=[2, 3],
                                        output_shape=[6, 11], dilations=[1, 2]))


def test_conv_transpose_output_beyond_the_full_output_is_refused():
    model, inputs = _one_node("ConvTranspose", [2, 4, 4], [4, 3, 3], strides=[2], output_shape=[10])
    with pytest.raises(NotImplementedError, match="beyond the full output"):
        run_reference(model, inputs)


@pytest.mark.parametrize("perm", [[0, 2, 3, 1], [0, 3, 1, 2], None])
def test_transpose_matches_onnxruntime(perm):
    attrs = {} if perm is None else {"perm": perm}
    _agrees_with_onnxruntime(*_one_node("Transpose", [2, 3, 4, 5], **attrs))


def test_constant_node_matches_onnxruntime():
    rng = np.random.default_rng(0)
    value = numpy_helper.from_array(rng.normal(size=(3, 1)).astype(np.float32), "c")
    nodes = [onnx.helper.make_node("Constant", [], ["c"], name="c", value=value),
             onnx.helper.make_node("Mul", ["x", "c"], ["y"], name="mul")]
    graph = onnx.helper.make_graph(nodes, "g", [_value("x", [2, 3, 4])], [_value("y", None)])
    _agrees_with_onnxruntime(_checked(graph), {"x": rng.normal(size=(2, 3, 4)).astype(np.float32)})
