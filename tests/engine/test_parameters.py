"""BN parameters that the graph computes from constants are constants (`engine.parameters`).

Each model below is one small network whose BN parameters reach the BNs in one exporter's way:

    x(N,3,6,6) --> [conv1] --> [bn1] --> [relu] --> [conv2 (bias: zeros)] --> [bn2] --> y

* ``shared``: PyTorch's deduplication: one ``ones`` and one ``zeros`` initializer, each BN reading
  them through an ``Identity`` of its own; conv2's bias reads ``zeros`` too;
* ``shared_direct``: both BNs read the very same mean/var tensors, no Identity;
* ``constant``: parameters are ``Constant`` nodes;  ``cast``: ``Cast`` of float16 constants;
  ``reshape``: ``Reshape`` of (1, C) constants.

The yardstick is the float64 NumPy reference run on the same network with plain private
initializers; nothing the engine writes may change another reader's tensor.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference import reference_recalibrate

import bnfold
from bnfold.engine.parameters import with_private_parameters
from bnfold.folding.fold import fold_batchnorms
from bnfold.onnx_graph import constant_values

C = 4
RNG = np.random.default_rng(3)
W1 = RNG.standard_normal((C, 3, 3, 3)).astype(np.float32) * 0.5
W2 = RNG.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.3
ONES, ZEROS = np.ones(C, np.float32), np.zeros(C, np.float32)


def _model(style: str) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"),
             numpy_helper.from_array(ZEROS, "zeros")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1] * 4)]
    params = {}
    for bn in ("bn1", "bn2"):
        params[bn] = [f"{bn}.{role}" for role in ("weight", "bias", "running_mean", "running_var")]
        for tensor, value in zip(params[bn], (ONES, ZEROS, ZEROS, ONES)):
            if style in ("plain",):
                inits.append(numpy_helper.from_array(value, tensor))
            elif style == "shared":
                source = "ones" if value is ONES else "zeros"
                nodes.append(helper.make_node("Identity", [source], [tensor], name=f"id_{tensor}"))
            elif style == "constant":
                nodes.append(helper.make_node("Constant", [], [tensor], name=f"k_{tensor}",
                                              value=numpy_helper.from_array(value)))
            elif style == "cast":
                inits.append(numpy_helper.from_array(value.astype(np.float16), f"{tensor}_h"))
                nodes.append(helper.make_node("Cast", [f"{tensor}_h"], [tensor], name=f"cast_{tensor}", to=TensorProto.FLOAT))
            elif style == "reshape":
                inits.append(numpy_helper.from_array(value.reshape(1, C), f"{tensor}_2d"))
                nodes.append(helper.make_node("Reshape", [f"{tensor}_2d", "flat"], [tensor], name=f"reshape_{tensor}"))
    if style == "shared":
        inits.append(numpy_helper.from_array(ONES, "ones"))
    if style == "reshape":
        inits.append(numpy_helper.from_array(np.array([C], np.int64), "flat"))
    if style == "shared_direct":
        inits += [numpy_helper.from_array(v, n) for v, n in ((ONES, "ones"),)]
        params = {bn: ["ones", "zeros", "zeros", "ones"] for bn in ("bn1", "bn2")}
    nodes += [
        helper.make_node("BatchNormalization", ["c1", *params["bn1"]], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "W2", "zeros"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c2", *params["bn2"]], ["y"], name="bn2"),
    ]
    graph = helper.make_graph(
        nodes, style, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 6, 6])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


SAMPLES = (np.random.default_rng(5).standard_normal((20, 3, 6, 6)) * 1.5 + 0.7).astype(np.float32)
STYLES = ["shared", "shared_direct", "constant", "cast", "reshape"]


@pytest.mark.parametrize("style", STYLES)
def test_constant_foldable_parameters_recalibrate_to_the_reference(style):
    want = reference_recalibrate(_model("plain"), {"x": SAMPLES})
    result = bnfold.recalibrate(_model(style), SAMPLES, batch_size=6)
    onnx.checker.check_model(result.model, full_check=True)
    got = {layer.name: (layer.new_mean, layer.new_var) for layer in result.report.layers}
    inits = constant_values(result.model.graph)  # initializers and Constant nodes (kept as such)
    bns = {n.name: n for n in result.model.graph.node if n.op_type == "BatchNormalization"}
    for name, (mean, var) in want.items():
        np.testing.assert_allclose(got[name][0], mean, atol=1e-4 * np.sqrt(var).min())
        np.testing.assert_allclose(got[name][1], var, rtol=1e-4)
        # the model stores them in initializers read by this BN alone
        for slot, value in ((3, mean), (4, var)):
            tensor = bns[name].input[slot]
            readers = [n.name for n in result.model.graph.node if tensor in n.input]
            assert readers == [name], f"{tensor} is read by {readers}"
            np.testing.assert_allclose(inits[tensor], value, rtol=1e-4, atol=1e-6)
    # the shared zeros still feed conv2's bias, untouched; nothing dead is left behind
    np.testing.assert_array_equal(inits["zeros"], ZEROS)
    assert all(n.op_type in ("Conv", "BatchNormalization", "Relu", "Constant") for n in result.model.graph.node)


def test_private_copies_are_named_after_their_bn_and_noted():
    work, notes = with_private_parameters(_model("shared"))
    assert [n.input[3] for n in work.graph.node if n.op_type == "BatchNormalization"] == [
        "bn1.running_mean__bn1", "bn2.running_mean__bn2"]
    assert len(notes) == 1 and notes[0].startswith("8 BN parameter(s) were computed from constants")
    assert "bn1: input_mean 'bn1.running_mean'" in notes[0]


def test_parameter_from_a_graph_input_is_refused_naming_bn_and_tensor():
    model = _model("plain")
    graph = model.graph
    graph.node.insert(0, helper.make_node("ReduceMean", ["x"], ["x_mean"], name="mean_of_x", axes=[0, 2, 3], keepdims=0))
    bn1 = next(n for n in graph.node if n.name == "bn1")
    bn1.input[1] = "x_mean"
    with pytest.raises(bnfold.UnsupportedModel, match=r"'bn1'.*scale 'x_mean' is computed by the graph"):
        bnfold.recalibrate(model, SAMPLES)


@pytest.mark.parametrize("style", STYLES)
def test_fold_reads_constant_foldable_parameters_and_leaves_no_dead_nodes(style):
    model = _model(style)
    folded = fold_batchnorms(model)
    assert folded.counts["folded_backward"] == 2, folded.decisions
    assert [n.op_type for n in folded.model.graph.node] == ["Conv", "Relu", "Conv"]
    onnx.checker.check_model(folded.model, full_check=True)
    ref = _run(model)
    np.testing.assert_allclose(_run(folded.model), ref, atol=1e-5 * np.abs(ref).max())


def _run(model: onnx.ModelProto) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": SAMPLES})[0]


@pytest.mark.parametrize("style", STYLES)
def test_the_up_front_check_accepts_what_the_job_accepts(style, tmp_path):
    """The service and CLI check a model before queueing it (`pipeline.precheck`): it must see the BN
    parameters as the job will, after constant-folding, not refuse an Identity-deduplicated export."""
    from bnfold.pipeline import precheck

    onnx.save(_model(style), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", SAMPLES)
    precheck(tmp_path / "m.onnx", tmp_path / "x.npy")
    refused = _model("plain")
    bn1 = next(n for n in refused.graph.node if n.name == "bn1")
    refused.graph.node.insert(0, helper.make_node("ReduceMean", ["x"], ["x_mean"], axes=[0, 2, 3], keepdims=0))
    bn1.input[1] = "x_mean"
    onnx.save(refused, tmp_path / "bad.onnx")
    with pytest.raises(bnfold.UnsupportedModel, match="'bn1'"):
        precheck(tmp_path / "bad.onnx", tmp_path / "x.npy")
