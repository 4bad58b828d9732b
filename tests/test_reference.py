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
