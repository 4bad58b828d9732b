"""BatchNormalization in each form the ONNX spec has had, built to the spec rather than to one exporter.

    x(N,3,6,6) -> [conv1] -> [bn1] -> [relu] -> [conv2] -> [bn2] -> y

bn1 runs inside the stage that measures bn2, so each form is both measured and executed by ORT.

* opsets 7-8: ``spatial`` attribute (1 = per channel, the ordinary BN); outputs 2-5 optional;
* opset 9: no ``spatial``; optional outputs mean/var/saved_mean/saved_var, unused in inference;
* opsets 14-15: ``training_mode``; inference-mode BN may have ONE output only — ORT refuses a node
  that lists the running_mean/var outputs with training_mode=0. bnfold drops them (they are unused)
  and says so; the returned model then loads in ORT;
* training mode (``training_mode=1``, or an opset 15 export of a model in train mode), spatial=0 and
  read training outputs are refused with one line naming the BN and what to do.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference import reference_recalibrate

import bnfold
from bnfold.folding.fold import fold_batchnorms

C = 4
X = (np.random.default_rng(2).standard_normal((14, 3, 6, 6)) * 1.4 + 0.3).astype(np.float32)


def _model(opset: int, outputs: int = 1, used_output: bool = False, ir_version: int = 7, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((C, 3, 3, 3)) * 0.5).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.3).astype(np.float32), "W2")]
    for k in (1, 2):
        for role, value in (("s", rng.uniform(0.5, 1.5, C)), ("b", rng.normal(0, 0.3, C)),
                            ("m", rng.normal(0, 0.5, C)), ("v", rng.uniform(0.5, 2, C))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{k}_{role}"))
    extra = [f"bn1_out{i}" for i in range(1, outputs)]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["b1", *extra],
                         name="bn1", **attrs),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c2", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["y"], name="bn2",
                         **{k: v for k, v in attrs.items() if k == "spatial"}),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 6, 6])]
    if used_output:
        outs.append(helper.make_tensor_value_info(extra[0], TensorProto.FLOAT, [C]))
    graph = helper.make_graph(nodes, f"bn_opset{opset}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _plain() -> onnx.ModelProto:
    return _model(17, ir_version=8)


def _run(model: onnx.ModelProto) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": X})[0]


FORMS = {
    "opset7_spatial1": dict(opset=7, spatial=1),
    "opset7_five_outputs": dict(opset=7, outputs=5, spatial=1),
    "opset8_spatial1": dict(opset=8, spatial=1),
    "opset9_five_outputs": dict(opset=9, outputs=5),
    "opset14_eval": dict(opset=14, training_mode=0),
    "opset15_plain": dict(opset=15),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_spec_form_recalibrates_to_the_reference_and_folds(form):
    model = _model(**FORMS[form])
    onnx.checker.check_model(model, full_check=True)
    result = bnfold.recalibrate(model, X, batch_size=4)
    want = reference_recalibrate(_plain(), {"x": X})  # the same network in its modern form
    for layer in result.report.layers:
        mean, var = want[layer.name]
        np.testing.assert_array_less(np.abs(layer.new_mean - mean), 1e-4 * np.sqrt(var))
        np.testing.assert_array_less(np.abs(layer.new_var - var), 1e-4 * var)
    onnx.checker.check_model(result.model, full_check=True)
    folded = fold_batchnorms(result.model)
    assert folded.counts["folded_backward"] == 2
    ref = _run(result.model)
    np.testing.assert_allclose(_run(folded.model), ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("opset", [14, 15])
def test_inference_bn_listing_training_outputs_is_repaired_and_noted(opset):
    model = _model(opset, outputs=3, training_mode=0)
    with pytest.raises(Exception, match="outputs should be 1"):
        _run(model)  # as exported, ORT cannot load it
    result = bnfold.recalibrate(model, X, batch_size=4)
    bn1 = next(n for n in result.model.graph.node if n.name == "bn1")
    assert list(bn1.output) == ["b1"]
    assert any("bn1" in w and "running_mean/var outputs" in w for w in result.report.warnings)
    want = reference_recalibrate(_plain(), {"x": X})
    np.testing.assert_allclose(result.report.layers[1].new_var, want["bn2"][1], rtol=1e-4)
    assert np.isfinite(_run(result.model)).all()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(opset=15, outputs=3, training_mode=1), ["'bn1'", "training mode", "model.eval()"]),
        (dict(opset=7, spatial=0), ["'bn1'", "spatial=0", "spatial=1"]),
        (dict(opset=9, outputs=5, used_output=True), ["'bn1'", "training outputs", "eval mode"]),
    ],
    ids=["training_mode", "spatial0", "used_training_output"],
)
def test_forms_without_stored_statistics_are_refused_in_one_line(kwargs, words):
    with pytest.raises(bnfold.UnsupportedModel) as caught:
        bnfold.recalibrate(_model(**kwargs), X)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message
