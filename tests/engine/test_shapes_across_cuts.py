"""Tensors computed from shapes reach later stages with their full type.

Decoders size things from the shapes of earlier tensors (``interpolate(size=skip.shape[-2:])``,
``x.reshape(n, c, h * w)``): ``Shape → Gather/Slice → Concat`` makes a small int64 tensor in the
stage of the tensor it measures, and a later stage reads it. ORT refuses to load a ``Resize`` whose
``sizes`` is a graph input of unknown length, so the stage input must say "1-D, length 4".

    x(N,3,H,W) -> [conv1] -> [bn1] -> [relu1] = r1 ---------------------------------+
                                         |                                           |
                                         +-> [conv2 s2] -> [bn2] -> [relu2] = r2     |
    sizes = Concat(Shape(r2)[0:2], Shape(r1)[2:4])            |                      |
    [Resize(r2, sizes)] --------------------------------------+--> [Add] <-----------+
    -> [bn3] -> Reshape(·, Concat(Shape(·)[0:2], [-1])) -> [bn4 (N,C,H·W)]
       -> Expand(·, Shape(·)) -> y

Each stage input gets the length that shape inference of the whole model proves; where inference
cannot (below, relu1 as ORT's contrib Gelu, unknown to ONNX inference), the length observed in the
first batch — a 1-D integer tensor's length does not change from batch to batch.

The reference runs the whole model in ORT BN by BN (each BN input exposed as an output, all samples
at once, float64 statistics), sharing nothing with the stage plan.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold

C = 4


def _model(opset: int, contrib_relu: bool = False) -> onnx.ModelProto:
    """contrib_relu: relu1 is ORT's com.microsoft Gelu, which ONNX shape inference does not know, so
    nothing downstream of it (``sizes`` included) gets a length from inference; ORT knows it."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((C, 3, 3, 3)) * 0.5).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.3).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array([0], np.int64), "i0"),
        numpy_helper.from_array(np.array([2], np.int64), "i2"),
        numpy_helper.from_array(np.array([4], np.int64), "i4"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
        numpy_helper.from_array(np.array([], np.float32), "no_roi"),
        numpy_helper.from_array(np.array([], np.float32), "no_scales"),
    ]
    for k in range(1, 5):
        for role, value in (("s", rng.uniform(0.5, 1.5, C)), ("b", rng.normal(0, 0.3, C)),
                            ("m", rng.normal(0, 0.5, C)), ("v", rng.uniform(0.5, 2, C))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{k}_{role}"))

    def bn(k, x, y):
        return helper.make_node("BatchNormalization", [x, *(f"bn{k}_{r}" for r in "sbmv")], [y], name=f"bn{k}")

    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1] * 4),
        bn(1, "c1", "b1"),
        helper.make_node("Gelu", ["b1"], ["r1"], name="relu1", domain="com.microsoft") if contrib_relu else
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1] * 4, strides=[2, 2]),
        bn(2, "c2", "b2"), helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("Shape", ["r1"], ["shape_r1"], name="shape_r1"),
        helper.make_node("Shape", ["r2"], ["shape_r2"], name="shape_r2"),
        helper.make_node("Slice", ["shape_r2", "i0", "i2"], ["nc"], name="nc"),
        helper.make_node("Slice", ["shape_r1", "i2", "i4"], ["hw"], name="hw"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], name="sizes", axis=0),
        helper.make_node("Resize", ["r2", "no_roi", "no_scales", "sizes"], ["up"], name="resize", mode="nearest"),
        helper.make_node("Add", ["up", "r1"], ["sum"], name="add"),
        bn(3, "sum", "b3"),
        helper.make_node("Shape", ["b3"], ["shape_b3"], name="shape_b3"),
        helper.make_node("Slice", ["shape_b3", "i0", "i2"], ["nc3"], name="nc3"),
        helper.make_node("Concat", ["nc3", "minus1"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Reshape", ["b3", "flat_shape"], ["flat"], name="flatten"),
        bn(4, "flat", "b4"),
        helper.make_node("Shape", ["b4"], ["shape_b4"], name="shape_b4"),
        helper.make_node("Expand", ["b4", "shape_b4"], ["y"], name="expand"),
    ]
    graph = helper.make_graph(
        nodes, "shapes_across_cuts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, None])], inits,
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib_relu else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(model, full_check=not contrib_relu)
    return model


def _ort_fixed_point(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN by BN in graph order, all samples in one ORT run, upstream BNs already updated."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    inits = {t.name: t for t in work.graph.initializer}
    stats = {}
    for node in [n for n in work.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto()
        probe.CopyFrom(work)
        probe.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        value = ort.InferenceSession(probe.SerializeToString(), options).run([node.input[0]], {"x": x})[0]
        value = value.astype(np.float64)
        axes = (0, *range(2, value.ndim))
        mean, var = value.mean(axis=axes), value.var(axis=axes)
        stats[node.name] = (mean, var)
        for slot, v in ((3, mean), (4, var)):
            inits[node.input[slot]].CopyFrom(numpy_helper.from_array(v.astype(np.float32), node.input[slot]))
    return stats


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("size", [(8, 8), (10, 6)])
@pytest.mark.parametrize("contrib_relu", [False, True], ids=["inferred_length", "observed_length"])
def test_shape_tensors_cross_stage_cuts(opset, size, contrib_relu):
    model = _model(opset, contrib_relu)
    if contrib_relu:
        from bnfold.onnx_graph import value_shapes

        assert value_shapes(model).get("sizes", (None, None))[1] in (None, [None])  # inference cannot tell
    x = (np.random.default_rng(1).standard_normal((12, 3, *size)) * 1.3 + 0.2).astype(np.float32)
    result = bnfold.recalibrate(model, x, batch_size=5)
    assert result.report.layers[-1].level == 3  # four BN levels: the shape tensors cross three cuts
    want = _ort_fixed_point(model, x)
    for layer in result.report.layers:
        mean, var = want[layer.name]
        np.testing.assert_array_less(np.abs(layer.new_mean - mean), 1e-4 * np.sqrt(var) + 1e-9)
        np.testing.assert_array_less(np.abs(layer.new_var - var), 1e-4 * var + 1e-12)
