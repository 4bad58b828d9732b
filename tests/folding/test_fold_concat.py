"""Backward folds through a Concat of layers (MixNet's split convolutions) and through layout
Transposes (tf2onnx's NHWC↔NCHW pairs), checked in ORT and against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from test_fold import bn_inits, bn_node, fold_and_check, init, make_model


def mixed_conv(bias: bool = True, shared: bool = False, seed: int = 0):
    """MixNet's MixedConv2d: three convolutions of x, concatenated on channels, then BN.

        x ─ conv_1 (1×1, 2 ch)          ─┐
        x ─ conv_3 (3×3 pads 1, 3 ch)   ─ concat(axis 1, 6 ch) ─ bn ─ y
        x ─ deconv (ConvTranspose 1×1, 1 ch) ─┘
    shared: conv_1 and a fourth input conv_1b read the same weight tensor (2 more channels).
    """
    rng = np.random.default_rng(seed)
    b = lambda name: [name] if bias else []
    nodes = [
        helper.make_node("Conv", ["x", "w1", *b("b1")], ["c1"], name="conv_1"),
        helper.make_node("Conv", ["x", "w3", *b("b3")], ["c3"], name="conv_3", pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["x", "wt", *b("bt")], ["ct"], name="deconv"),
    ]
    inits = [init(rng, "w1", (2, 4, 1, 1)), init(rng, "w3", (3, 4, 3, 3)), init(rng, "wt", (4, 1, 1, 1))]
    if bias:
        inits += [init(rng, "b1", (2,)), init(rng, "b3", (3,)), init(rng, "bt", (1,))]
    cat = ["c1", "c3", "ct"]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "w1"], ["c1b"], name="conv_1b", strides=[1, 1]))
        cat.append("c1b")
    c = 8 if shared else 6
    nodes += [helper.make_node("Concat", cat, ["cat"], name="concat", axis=1), bn_node("bn", "cat", "y")]
    return make_model(nodes, [("x", ["N", 4, 5, 5])], [("y", None)], [*inits, *bn_inits(rng, "bn", c)])


@pytest.mark.parametrize("bias", [True, False])
def test_bn_after_concat_of_layers_folds_into_each(bias):
    result = fold_and_check(mixed_conv(bias), ["folded_backward"])
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv", "ConvTranspose", "Concat"]
    assert result.decisions[0].into == "conv_1, conv_3, deconv"
    assert result.model.graph.node[3].output[0] == "y"


def test_concat_inputs_sharing_a_weight_get_their_own_tensors():
    model = mixed_conv(shared=True)
    result = fold_and_check(model, ["folded_backward"])
    weights = [n.input[1] for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(set(weights)) == 3 and "w1" not in weights  # conv_1 and conv_1b: two new tensors


@pytest.mark.parametrize("axis", [1, -1])
def test_bn_after_concat_of_gemms(axis):
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["x", "g1", "c1"], ["a"], name="gemm_1", transB=1, beta=0.5),
        helper.make_node("Gemm", ["x", "g2"], ["b"], name="gemm_2"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=axis),
        bn_node("bn", "cat", "y"),
    ]
    inits = [init(rng, "g1", (3, 5)), init(rng, "c1", (3,)), init(rng, "g2", (5, 2)), *bn_inits(rng, "bn", 5)]
    fold_and_check(make_model(nodes, [("x", ["N", 5])], [("y", None)], inits), ["folded_backward"])


def _concat_case(kind: str):
    """conv_a and conv_b concatenated, then BN, except that one thing makes the fold inexact."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b")]
    inits = [init(rng, "wa", (2, 3, 1, 1)), init(rng, "wb", (2, 3, 1, 1))]
    outputs, cat, axis, c = [("y", None)], ["a", "b"], 1, 4
    if kind == "read_elsewhere":  # conv_b's output also leaves the graph (DenseNet: read by later blocks)
        outputs.append(("b", None))
    elif kind == "axis_2":  # concatenated along H: the BN channel c mixes rows of both convolutions
        axis, c = 2, 2
    elif kind == "nonlinear":  # the second input passes a Relu: a·relu(z) + b is no layer's output
        nodes.append(helper.make_node("Relu", ["b"], ["rb"], name="relu"))
        cat = ["a", "rb"]
    elif kind == "graph_input":
        cat = ["a", "x"]
        c = 5
    nodes += [helper.make_node("Concat", cat, ["cat"], name="concat", axis=axis), bn_node("bn", "cat", "y")]
    return make_model(nodes, [("x", ["N", 3, 4, 4])], outputs, [*inits, *bn_inits(rng, "bn", c)])


@pytest.mark.parametrize("kind, words", [
    ("read_elsewhere", "also a graph output"),
    ("axis_2", "axis 2, not the channel axis 1"),
    ("nonlinear", "'rb' comes from Relu, not Conv"),
    ("graph_input", "'x' is a graph input"),
])
def test_concat_without_an_exact_fold_keeps_the_bn(kind, words):
    result = fold_and_check(_concat_case(kind), ["kept"])  # numeric: no producer changed on refusal
    assert words in result.decisions[0].reason, result.decisions[0].reason
    assert [n.op_type for n in result.model.graph.node][-1] == "BatchNormalization"


def _transposed(perms, c: int = 3, seed: int = 3, also_out: str | None = None):
    """tf2onnx's pattern: Conv (NCHW) → Transpose… → BN → y (also_out: a tensor that is a graph output too)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="conv", pads=[1, 1, 1, 1])]
    for i, perm in enumerate(perms):
        nodes.append(helper.make_node("Transpose", [f"t{i}"], [f"t{i + 1}"], name=f"tr{i}", perm=perm))
    nodes.append(bn_node("bn", f"t{len(perms)}", "y"))
    inits = [init(rng, "w", (3, 2, 3, 3)), *bn_inits(rng, "bn", c)]
    outputs = [("y", None)] + ([(also_out, None)] if also_out else [])
    return make_model(nodes, [("x", ["N", 2, 4, 5])], outputs, inits)


def test_bn_between_cancelling_transposes_folds_into_the_conv():
    result = fold_and_check(_transposed([[0, 2, 3, 1], [0, 3, 1, 2]]), ["folded_backward"])
    assert result.decisions[0].into == "conv"
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Transpose", "Transpose"]


def test_bn_on_a_transposed_conv_output_whose_channel_axis_moved_is_kept():
    # NCHW → NHWC: the BN's axis 1 is the conv's H (4 rows), not its channels
    result = fold_and_check(_transposed([[0, 2, 3, 1]], c=4), ["kept"])
    assert "axis 2 of conv" in result.decisions[0].reason


def test_bn_after_transposes_whose_middle_tensor_is_read_elsewhere_is_kept():
    result = fold_and_check(_transposed([[0, 2, 3, 1], [0, 3, 1, 2]], also_out="t1"), ["kept"])
    assert "'t1' is also a graph output" in result.decisions[0].reason
