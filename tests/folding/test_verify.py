"""bnfold.folding.verify (ONNX Runtime equivalence) and bnfold.provenance (metadata stamp)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_fold import F16, F32, bn_inits, bn_node, init, make_model

from bnfold import __version__, provenance
from bnfold.errors import InvalidOptions, InvalidSamples, UnsupportedModel, VerificationFailed
from bnfold.folding.fold import fold_batchnorms
from bnfold.folding.verify import check_equivalent, default_tolerance, verify_equivalent


def conv_bn_model(elem=F32, batch="N", spatial=(5, 5), seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "t", "y"),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    inits = [init(rng, "w", (4, 3, 3, 3), dtype)] + bn_inits(rng, "bn", 4, dtype)
    return make_model(nodes, [("x", [batch, 3, *spatial])], [("z", None)], inits, elem=elem)


def perturbed(model: onnx.ModelProto, name: str, delta: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            values = numpy_helper.to_array(t).copy()
            values.flat[0] += delta
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, name))
    return out


# --------------------------------------------------------------------------- tolerances


def test_default_tolerances_follow_the_unit_roundoff():
    rtol32, atol32 = default_tolerance(np.float32)
    rtol16, _ = default_tolerance(np.float16)
    assert rtol32 == pytest.approx(2**11 * 2**-24) and atol32 == pytest.approx(rtol32 * 2**-10)
    assert rtol16 == pytest.approx(2**5 * 2**-11)
    assert default_tolerance(np.int64) == (0.0, 0.0)


def test_identical_models_pass_with_zero_difference():
    model = conv_bn_model()
    report = verify_equivalent(model, model, random_batches=3, threads=1)
    assert report.passed and report.random == 3 and report.feeds == 0
    (out,) = report.outputs
    assert (out.name, out.dtype, out.max_abs, out.max_rel) == ("z", "float32", 0.0, 0.0)
    assert out.elements == 3 * 2 * 4 * 5 * 5  # symbolic batch → 2


def test_folded_model_passes_and_numbers_are_small():
    model = conv_bn_model()
    folded = fold_batchnorms(model).model
    report = check_equivalent(model, folded, threads=1)
    assert 0 < report.outputs[0].max_rel < 1e-5  # a few float32 roundings, far inside 1.2e-4


def test_a_wrong_weight_fails_with_a_message_naming_the_output():
    model = conv_bn_model()
    bad = perturbed(fold_batchnorms(model).model, "w_bnfold", 0.05)
    report = verify_equivalent(model, bad, threads=1)
    assert not report.passed and report.failures[0].name == "z"
    with pytest.raises(VerificationFailed, match=r"output 'z': max \|Δ\| = [0-9.e-]+ vs tolerance") as err:
        check_equivalent(model, bad, threads=1)
    assert "Nothing was written" in err.value.message
    assert check_equivalent(model, bad, rtol=1.0, threads=1).passed  # configurable


def test_float16_model_uses_a_looser_tolerance():
    model = conv_bn_model(F16)
    folded = fold_batchnorms(model).model
    report = check_equivalent(model, folded, threads=1)
    (out,) = report.outputs
    assert out.dtype == "float16" and out.rtol == pytest.approx(2**-6)
    assert out.max_rel > default_tolerance(np.float32)[0]  # float32's bound would have refused it
    assert not verify_equivalent(model, perturbed(folded, "w_bnfold", 0.5), threads=1).passed
    float32_samples = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    assert check_equivalent(model, folded, [float32_samples], random_batches=0, threads=1).feeds == 1


def test_given_feeds_set_the_shapes_of_random_batches():
    model = conv_bn_model(spatial=("H", "W"))
    x = np.random.default_rng(1).normal(size=(3, 3, 7, 6)).astype(np.float32)
    report = verify_equivalent(model, model, [{"x": x}, x], random_batches=1, threads=1)
    assert report.feeds == 2 and report.outputs[0].elements == 3 * (3 * 4 * 7 * 6)


def test_symbolic_dims_default_and_override():
    model = conv_bn_model(spatial=("H", "W"))
    assert verify_equivalent(model, model, random_batches=1, threads=1).outputs[0].elements == 2 * 4 * 8 * 8
    report = verify_equivalent(model, model, random_batches=1, dims={"N": 1, "H": 3, "W": 4}, threads=1)
    assert report.outputs[0].elements == 1 * 4 * 3 * 4


def test_bad_feeds_and_options():
    model = conv_bn_model()
    with pytest.raises(InvalidSamples, match="lacks inputs"):
        verify_equivalent(model, model, [{"other": np.zeros(1)}])
    with pytest.raises(InvalidOptions):
        verify_equivalent(model, model, random_batches=0)
    with pytest.raises(InvalidOptions):
        verify_equivalent(model, model, rtol=-1.0)


def test_signature_mismatch_is_a_verification_failure():
    model = conv_bn_model()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.output[0].name = "renamed"
    other.graph.node[-1].output[0] = "renamed"
    with pytest.raises(VerificationFailed, match="outputs"):
        verify_equivalent(model, other)


def test_reference_that_onnxruntime_cannot_run_is_unsupported():
    model = conv_bn_model()
    custom = onnx.ModelProto()
    custom.CopyFrom(model)
    custom.graph.node[-1].domain = "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedModel, match="unfolded"):
        verify_equivalent(custom, model)


def _unary(op: str, elem: int = F32, out_elem: int = F32, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name="n", **attrs)
    x, y = helper.make_tensor_value_info("x", elem, [4, 5]), helper.make_tensor_value_info("y", out_elem, None)
    graph = helper.make_graph([node], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_nonfinite_values_must_sit_in_the_same_places():
    log, sqrt = _unary("Log"), _unary("Sqrt")  # NaN for x < 0 in both; -inf only in Log at 0
    x = np.array([[-1.0, 0.0, 4.0, 1.0, 2.0]] * 4, np.float32)
    report = verify_equivalent(log, log, [x], random_batches=1)
    assert report.passed
    report = verify_equivalent(log, sqrt, [x], random_batches=0)
    assert not report.passed and report.outputs[0].mismatches == 4  # 0 → -inf vs 0
    assert json.loads(json.dumps(report.to_dict()))["outputs"][0]["passed"] is False


def test_integer_outputs_compare_exactly():
    argmax = _unary("ArgMax", out_elem=TensorProto.INT64, axis=1)
    argmin = _unary("ArgMin", out_elem=TensorProto.INT64, axis=1)
    assert verify_equivalent(argmax, argmax).passed
    report = verify_equivalent(argmax, argmin)
    assert not report.passed and report.outputs[0].rtol == 0 and report.outputs[0].mismatches > 0


# --------------------------------------------------------------------------- provenance


SHA = "ab" * 32


def test_stamp_writes_every_key_and_keeps_other_metadata():
    model = conv_bn_model()
    helper.set_model_props(model, {"author": "me", "bnfold.stale": "old"})
    now = dt.datetime(2024, 5, 1, 14, 0, 0, 123, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    options = {"b": 1, "a": [1, 2]}
    provenance.stamp(model, source_sha256=SHA.upper(), samples=128, samples_sha256="cd" * 32, options=options, now=now)
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {
        "author": "me",
        "bnfold.version": __version__,
        "bnfold.source_sha256": SHA,
        "bnfold.options": '{"a":[1,2],"b":1}',
        "bnfold.created_utc": "2024-05-01T12:00:00Z",
        "bnfold.samples": "128",
        "bnfold.samples_sha256": "cd" * 32,
    }
    onnx.checker.check_model(model)


def test_restamping_replaces_bnfold_keys():
    model = conv_bn_model()
    provenance.stamp(model, source_sha256=SHA, samples=10, samples_sha256=SHA, options={})
    provenance.stamp(model, source_sha256="ef" * 32, samples=None, samples_sha256=None, options={"fold": True})
    got = provenance.read(model)
    assert got["source_sha256"] == "ef" * 32 and "samples" not in got and json.loads(got["options"]) == {"fold": True}
    assert dt.datetime.fromisoformat(got["created_utc"].replace("Z", "+00:00")).tzinfo is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"source_sha256": "xyz"},
        {"samples_sha256": "12"},
        {"samples": -1},
        {"options": {"x": float("nan")}},
        {"options": {"x": object()}},
    ],
)
def test_stamp_rejects_bad_values(kwargs):
    args = {"source_sha256": SHA, "samples": 1, "samples_sha256": SHA, "options": {}} | kwargs
    with pytest.raises(InvalidOptions):
        provenance.stamp(conv_bn_model(), **args)


def test_sample_digest_is_stable_and_sensitive():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    digest = provenance.sha256_arrays([{"x": a}])
    assert digest == provenance.sha256_arrays([{"x": a.copy()}])
    assert digest != provenance.sha256_arrays([{"x": a.reshape(3, 2)}])
    assert digest != provenance.sha256_arrays([{"x": a.astype(np.float64)}])
    assert provenance.sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
