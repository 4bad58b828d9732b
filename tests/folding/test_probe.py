"""Verification inputs: the user's samples when given, else random inputs at the scale the model implies."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_fold import F32, bn_inits, bn_node, init, make_model

from bnfold.errors import InvalidOptions, VerificationFailed
from bnfold.folding.fold import fold_batchnorms
from bnfold.folding.probe import SPECTRA, batchnorm_statistics, image_noise, probe_model
from bnfold.folding.verify import check_equivalent, verify_equivalent


def stem_model(scale: float, shift: float, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x (N, 1, 8, 8) → Conv 1×1 (1 → 4, bias) → BN → Relu → Conv 3×3 → BN → y.

    The first BN's running statistics are those of its input when x = scale·z + shift with z of
    unit variance: mean_c = w_c·shift + b_c, var_c = (w_c·scale)² — exactly, as the stem is 1×1
    with one input channel.
    """
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 2.0, (4, 1, 1, 1)) * rng.choice([-1, 1], (4, 1, 1, 1))
    b = rng.normal(size=4)
    mean, var = w.reshape(4) * shift + b, (w.reshape(4) * scale) ** 2
    stats = [numpy_helper.from_array(v.astype(np.float32), f"bn1_{p}")
             for p, v in zip("sbmv", (rng.uniform(0.5, 2, 4), rng.normal(size=4), mean, var))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["t"], name="stem"),
        bn_node("bn1", "t", "u"),
        helper.make_node("Relu", ["u"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["v"], name="conv2"),
        bn_node("bn2", "v", "y"),
    ]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w1"), numpy_helper.from_array(b.astype(np.float32), "b1"),
             init(rng, "w2", (3, 4, 3, 3)), *stats, *bn_inits(rng, "bn2", 3)]
    return make_model(nodes, [("x", ["N", 1, 8, 8])], [("y", None)], inits, opset=opset)


@pytest.mark.parametrize("scale,shift,opset", [(5.0, 2.0, 17), (0.01, -3.0, 18), (1.0, 0.0, 9)])
def test_random_inputs_take_the_scale_and_shift_the_first_bn_implies(scale, shift, opset):
    model = stem_model(scale, shift, opset=opset)
    report = verify_equivalent(model, fold_batchnorms(model).model, threads=1)
    drawn = report.random_inputs
    assert report.passed and report.random == 2 and report.feeds == 0
    assert drawn.bn == "bn1" and drawn.spectrum in SPECTRA
    assert drawn.scale == pytest.approx(scale, rel=1e-4) and drawn.shift == pytest.approx(shift, rel=1e-4, abs=1e-6)
    assert "bn1" in drawn.note and report.to_dict()["random_inputs"]["scale"] == drawn.scale


def test_image_noise_is_standardised_and_smoother_for_larger_alpha():
    rng = np.random.default_rng(0)
    rough = [image_noise((4, 3, 32, 32), rng, alpha) for alpha in SPECTRA]
    for z in rough:
        assert np.allclose(z.mean(axis=(2, 3)), 0, atol=1e-9) and np.allclose(z.std(axis=(1, 2, 3)), 1, rtol=1e-6)
    steps = [np.mean(np.abs(np.diff(z, axis=-1))) for z in rough]  # neighbour differences shrink
    assert steps == sorted(steps, reverse=True)
    assert image_noise((4, 5), rng).shape == (4, 5)  # not image-shaped: white


def test_normal_random_inputs_on_request_and_bad_choice():
    model = stem_model(5.0, 2.0)
    folded = fold_batchnorms(model).model
    report = verify_equivalent(model, folded, random_inputs="normal", threads=1)
    assert report.random_inputs.scale == 1.0 and report.random_inputs.spectrum is None
    with pytest.raises(InvalidOptions, match="random_inputs"):
        verify_equivalent(model, folded, random_inputs="uniform")


def test_standard_normal_with_a_reason_when_nothing_to_fit_to():
    """BN statistics that are graph inputs, not constants: nothing implies a scale."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), bn_node("bn", "t", "y")]
    params = bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", ["N", 2, 4, 4]), ("bn_m", [3]), ("bn_v", [3])], [("y", None)],
                       [init(rng, "w", (3, 2, 1, 1)), *params[:2]])
    assert batchnorm_statistics(model) == []
    feeds = {"x": rng.normal(size=(2, 2, 4, 4)).astype(np.float32), "bn_m": np.zeros(3, np.float32),
             "bn_v": np.ones(3, np.float32)}
    report = verify_equivalent(model, model, [feeds], threads=1)
    assert report.random_inputs.spectrum is None and "no BatchNormalization with constant statistics" in report.random_inputs.note


def test_no_float_input_keeps_integer_random_inputs():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Cast", ["x"], ["f"], name="cast", to=F32),
             helper.make_node("Conv", ["f", "w"], ["t"], name="conv"), bn_node("bn", "t", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", F32, None)], [init(rng, "w", (3, 2, 1, 1)), *bn_inits(rng, "bn", 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    report = verify_equivalent(model, fold_batchnorms(model).model, threads=1)
    assert report.passed and "no float input" in report.random_inputs.note


def test_given_feeds_only_means_no_random_inputs():
    model = stem_model(5.0, 2.0)
    x = (5 * np.random.default_rng(3).normal(size=(4, 1, 8, 8)) + 2).astype(np.float32)
    report = verify_equivalent(model, fold_batchnorms(model).model, [x], random_batches=0, threads=1)
    assert (report.feeds, report.random, report.random_inputs) == (1, 0, None)
    assert "random_inputs" not in report.to_dict()


def test_a_wrong_fold_still_fails_on_implied_inputs_and_the_message_names_real_options():
    model = stem_model(5.0, 2.0)
    bad = fold_batchnorms(model)
    w2 = next(t for t in bad.model.graph.initializer if t.name.startswith("w2"))
    values = numpy_helper.to_array(w2).copy()
    values[0, 0, 0, 0] *= 1.5
    w2.CopyFrom(numpy_helper.from_array(values, w2.name))
    with pytest.raises(VerificationFailed) as err:
        check_equivalent(model, bad.model, threads=1)
    message = err.value.message
    assert "--rtol/--atol" in message and "bnfold fold --samples FILE" in message and "fitted to the running" in message
    with pytest.raises(VerificationFailed) as err:  # samples only: no hint about random inputs
        x = (5 * np.random.default_rng(4).normal(size=(4, 1, 8, 8)) + 2).astype(np.float32)
        check_equivalent(model, bad.model, [x], random_batches=0, threads=1)
    assert "--rtol/--atol" in err.value.message and "--samples" not in err.value.message


def test_the_probe_reduces_inside_the_graph():
    """Two outputs of shape (C,) per BN input — E[X] and E[X²] — never the activations themselves."""
    import onnxruntime as ort

    model = stem_model(5.0, 2.0)
    probe, outputs = probe_model(model, [bn for bn, _, _ in batchnorm_statistics(model)])
    assert sorted(outputs) == ["t", "v"] and len(probe.graph.output) == 4
    x = np.random.default_rng(6).normal(size=(2, 1, 8, 8)).astype(np.float32)
    values = dict(zip([o.name for o in probe.graph.output], ort.InferenceSession(probe.SerializeToString()).run(None, {"x": x})))
    mean, square = values[outputs["t"][0]], values[outputs["t"][1]]
    t = np.einsum("oc,nchw->nohw", numpy_helper.to_array(model.graph.initializer[0]).reshape(4, 1), x.astype(np.float64))
    t += numpy_helper.to_array(model.graph.initializer[1]).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(mean, t.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(square, (t**2).mean(axis=(0, 2, 3)), rtol=1e-5)
