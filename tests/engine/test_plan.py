"""`graph`: BN discovery, BN levels, the stage plan (what runs when, what crosses each cut), and
the standalone stage models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import ALL_MODELS, _Builder, classifier, conv_bn, make_samples, multi_input, residual_block
from onnx import helper
from reference import reference_recalibrate, run_reference

import bnfold
import bnfold.engine.plan as g
from bnfold.errors import NoBatchNorm
from bnfold.onnx_graph import value_types


def _plan(model: onnx.ModelProto) -> g.StagePlan:
    return g.plan_stages(model, g.find_batchnorms(model))


def _node_names(model: onnx.ModelProto, indices) -> list[str]:
    return [model.graph.node[i].name for i in indices]


def _input_types(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(elem type, rank) of every graph input and intermediate tensor, via shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    return {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values}


def _late_input_model() -> onnx.ModelProto:
    """A second graph input read only after the first BN level (so it must be kept from stage 0).

        img(N,3,6,6) --> [conv1] --> [bn1] --> [relu1] --> [add_offset] --> [conv2] --> [bn2] --> y
        offset(N,4,1,1) ---------------------------------------^
    """
    b = _Builder("late_input", 40)
    img = b.input("img", ["N", 3, 6, 6])
    offset = b.input("offset", ["N", 4, 1, 1])
    h = b.relu(b.bn(b.conv(img, 3, 4, [3, 3], pads=[1] * 4, base="conv1"), 4, "bn1"), "relu1")
    h = b.node("Add", [h, offset], "add_offset")
    b.output(b.bn(b.conv(h, 4, 4, [3, 3], base="conv2"), 4, "bn2", out="y"))
    return b.build()


# -- BN discovery ---------------------------------------------------------------------------------

def test_find_batchnorms_reads_the_parameters():
    (bn,) = g.find_batchnorms(conv_bn())
    assert (bn.name, bn.x, bn.mean, bn.var, bn.channels) == ("bn1", "conv1_y", "bn1_mean", "bn1_var", 4)
    assert bn.epsilon == pytest.approx(1e-5)
    assert conv_bn().graph.node[bn.index].op_type == "BatchNormalization"


def test_unnamed_and_duplicate_bn_names_get_unique_names():
    model = residual_block()
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    bns[0].name = ""
    bns[1].name = bns[2].name = "same"
    names = [bn.name for bn in g.find_batchnorms(model)]
    assert len(set(names)) == 4
    assert "" not in names
    assert names[3] == "bn_c"
    result = bnfold.recalibrate(model, make_samples(model, 4))
    assert [layer.name for layer in result.report.layers] == names


def test_require_batchnorms_without_bn():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [helper.make_tensor_value_info("y", 1, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert g.find_batchnorms(model) == []
    with pytest.raises(NoBatchNorm):
        g.require_batchnorms(model)


def test_bn_in_a_custom_domain_is_not_a_bn():
    model = conv_bn()
    node = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    node.domain = "com.example"
    assert g.find_batchnorms(model) == []


# -- levels and stages ----------------------------------------------------------------------------

def test_residual_block_levels():
    model = residual_block()
    plan = _plan(model)
    assert plan.levels == {"bn_a": 0, "bn_ds": 0, "bn_b": 1, "bn_c": 2}
    assert plan.num_stages == 3
    assert plan.measure == [["conv_a_y", "conv_ds_y"], ["conv_b_y"], ["conv_c_y"]]
    # bn_ds (level 0) runs in stage 1 and its output waits for the add in stage 2
    assert "bn_ds" in _node_names(model, plan.nodes[1])
    assert plan.last_use["bn_ds_y"] == 2
    assert plan.late_inputs == []


def test_residual_block_identity_keeps_the_input_until_the_add():
    model = ALL_MODELS["residual_block_identity"]()
    plan = _plan(model)
    assert plan.levels == {"bn_a": 0, "bn_b": 1, "bn_c": 2}
    assert plan.late_inputs == ["x"]
    assert plan.last_use["x"] == 2
    assert "x" in plan.inputs[2]


def test_multi_input_plan():
    model = multi_input()
    plan = _plan(model)
    assert plan.levels == {"bn_img": 0, "bn_vec": 0, "bn_out": 1}
    assert sorted(plan.inputs[0]) == ["img", "vec"]
    assert plan.late_inputs == []  # both inputs are consumed in stage 0
    assert plan.last_use == {"conv_img_y": 1, "gemm_vec_y": 1}
    assert plan.measure == [["conv_img_y", "gemm_vec_y"], ["gemm_out_y"]]
    assert sorted(plan.outputs[0]) == ["conv_img_y", "gemm_vec_y"]


def test_late_graph_input():
    model = _late_input_model()
    plan = _plan(model)
    assert plan.levels == {"bn1": 0, "bn2": 1}
    assert plan.late_inputs == ["offset"]
    assert plan.last_use["offset"] == 1
    assert "offset" in plan.inputs[1] and "offset" not in plan.inputs[0]
    samples = make_samples(model, 9, seed=2)
    want = reference_recalibrate(model, samples)
    for budget in (2**30, 0):
        result = bnfold.recalibrate(model, samples, batch_size=4, memory_budget=budget)
        for layer in result.report.layers:
            mean, var = want[layer.name]
            np.testing.assert_array_less(np.abs(layer.new_mean - mean), 1e-4 * np.sqrt(var) + 1e-7)
            np.testing.assert_array_less(np.abs(layer.new_var - var), 1e-4 * var + 1e-9)


def test_classifier_head_is_not_planned():
    model = classifier()
    plan = _plan(model)
    planned = {name for stage in plan.nodes for name in _node_names(model, stage)}
    assert planned == {"sub_mean", "mul_std", "conv1", "bn1", "relu1", "conv2"}
    assert not planned & {"bn2", "relu2", "gap", "flatten", "fc", "identity"}


def test_bn_on_graph_input_has_an_empty_first_stage():
    model = ALL_MODELS["bn_on_graph_input"]()
    plan = _plan(model)
    assert plan.nodes[0] == [] and plan.measure[0] == ["x"]
    assert plan.late_inputs == ["x"]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_plan_invariants(name):
    """Every planned node runs once, in graph (topological) order within its stage; each BN's
    input is available in the stage of its level; each stage reads only what earlier stages
    or the graph inputs provide."""
    model = ALL_MODELS[name]()
    bns = g.find_batchnorms(model)
    plan = g.plan_stages(model, bns)
    flat = [i for stage in plan.nodes for i in stage]
    assert len(flat) == len(set(flat))
    assert all(stage == sorted(stage) for stage in plan.nodes)
    graph_inputs = {i.name for i in model.graph.input}
    available = set(graph_inputs)
    for s in range(plan.num_stages):
        made = {out for i in plan.nodes[s] for out in model.graph.node[i].output}
        assert set(plan.inputs[s]) <= available, (s, plan.inputs[s])
        fed = graph_inputs if s == 0 else set()  # stage 0 is fed every graph input
        assert set(plan.measure[s]) <= made | set(plan.inputs[s]) | fed
        assert set(plan.outputs[s]) <= made
        available |= set(plan.outputs[s])
    for bn in bns:
        assert bn.x in plan.measure[plan.levels[bn.name]]


# -- stage models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["residual_block", "multi_input", "classifier", "conv1d_bn", "bn_after_bn"])
def test_stage_models_pass_the_checker(name):
    model = ALL_MODELS[name]()
    plan = _plan(model)
    types = _input_types(model)
    for s in range(plan.num_stages):
        if not plan.nodes[s]:
            continue
        stage = g.stage_model(model, plan, s, types, {}, output_types=value_types(model))
        onnx.checker.check_model(stage, full_check=True)


def test_stage_model_runs_and_uses_overrides():
    """Stage 1 of residual_block with bn_a / bn_ds given new statistics computes the reference's
    conv_b_y (bn_a's output feeds conv_b) and bn_ds_y with those statistics."""
    model = residual_block()
    plan = _plan(model)
    types = _input_types(model)
    samples = make_samples(model, 5, seed=3)
    stage0 = g.stage_model(model, plan, 0, types, {})
    session = ort.InferenceSession(stage0.SerializeToString(), providers=["CPUExecutionProvider"])
    cut = dict(zip(plan.outputs[0], session.run(plan.outputs[0], {"x": samples["x"]})))
    ref = run_reference(model, samples, plan.outputs[0])
    for name, value in cut.items():
        np.testing.assert_allclose(value, ref[name], rtol=1e-4, atol=1e-5)

    rng = np.random.default_rng(0)
    new = {name: rng.uniform(0.5, 2.0, 6).astype(np.float32) for name in ("bn_a_mean", "bn_a_var", "bn_ds_mean", "bn_ds_var")}
    overrides = {name: onnx.numpy_helper.from_array(value, name) for name, value in new.items()}
    stage1 = g.stage_model(model, plan, 1, types, overrides)
    session = ort.InferenceSession(stage1.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip(plan.outputs[1], session.run(plan.outputs[1], {t: cut[t] for t in plan.inputs[1]})))
    want = run_reference(model, samples, plan.outputs[1], overrides=new)
    for name in plan.outputs[1]:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
    # the original model is not modified by building stages
    assert onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bn_a_mean")).tolist() != new["bn_a_mean"].tolist()
