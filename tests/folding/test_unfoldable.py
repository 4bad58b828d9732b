"""BNs with no exact linear neighbour (kept by default, Mul + Add on request) and shared tensors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_fold import bn_inits, bn_node, fold_and_check, init, make_model

from bnfold.errors import InvalidOptions
from bnfold.folding.fold import fold_batchnorms


def dense_block(seed: int = 0) -> onnx.ModelProto:
    """DenseNet's pattern: the BN after a Concat is followed by Relu, then a padded 3×3 Conv.

        x ─ conv_a ─┐
                    concat ─ bn_cat ─ relu ─ conv_b (pads 1) ─ bn_b ─ y
        x ──────────┘
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Concat", ["x", "a"], ["cat"], name="concat", axis=1),
        bn_node("bn_cat", "cat", "n"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb"], ["t"], name="conv_b", pads=[1, 1, 1, 1]),
        bn_node("bn_b", "t", "y"),
    ]
    inits = [init(rng, "wa", (2, 3, 1, 1)), init(rng, "wb", (4, 5, 3, 3)), *bn_inits(rng, "bn_cat", 5), *bn_inits(rng, "bn_b", 4)]
    return make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", None)], inits)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_bn_after_concat_is_kept_by_default_with_its_statistics():
    model = dense_block()
    result = fold_and_check(model, ["kept", "folded_backward"])
    assert _ops(result.model) == ["Conv", "Concat", "BatchNormalization", "Relu", "Conv"]
    kept = result.decisions[0]
    assert kept.bn == "bn_cat" and "no exact linear neighbour" in kept.reason and "unfoldable='affine'" in kept.reason
    assert "Concat" in kept.reason and "Relu" in kept.reason  # backward and forward reasons, for the report
    bn = result.model.graph.node[2]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name in bn.input[1:]:
        np.testing.assert_array_equal(after[name], before[name])  # the same (new) statistics, untouched
    assert result.counts == {"folded_backward": 1, "folded_forward": 0, "affine": 0, "kept": 1}


def test_affine_on_request_writes_mul_add():
    model = dense_block()
    result = fold_and_check(model, ["affine", "folded_backward"])
    assert _ops(result.model) == ["Conv", "Concat", "Mul", "Add", "Relu", "Conv"]
    assert fold_batchnorms(model, "affine").counts["affine"] == 1


def test_bn_that_is_not_an_affine_map_is_kept_either_way():
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Concat", ["x", "x"], ["c"], name="cat", axis=1),
             helper.make_node("BatchNormalization", ["c", *[f"bn_{p}" for p in "sbmv"]], ["y", "rm", "rv"], name="bn",
                              training_mode=1)]
    model = make_model(nodes, [("x", [2, 2, 3, 3])], [("y", None)], bn_inits(rng, "bn", 4))
    for unfoldable in ("keep", "affine"):
        result = fold_batchnorms(model, unfoldable)
        assert [d.fate for d in result.decisions] == ["kept"] and "training_mode=1" in result.decisions[0].reason


@pytest.mark.parametrize("value", ["Keep", "mul_add", "", None])
def test_unknown_unfoldable_is_refused(value):
    with pytest.raises(InvalidOptions, match="unfoldable must be one of keep, affine"):
        fold_batchnorms(dense_block(), value)


# --------------------------------------------------------------------------- shared tensors


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_weight_shared_by_two_convs_each_with_its_own_bn():
    """x ─ conv1(w) ─ bn1 ─ y1,  x ─ conv2(w) ─ bn2 ─ y2: each conv gets its own folded weight."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t1"], name="conv1"), bn_node("bn1", "t1", "y1"),
        helper.make_node("Conv", ["x", "w"], ["t2"], name="conv2"), bn_node("bn2", "t2", "y2"),
    ]
    inits = [init(rng, "w", (3, 2, 3, 3)), *bn_inits(rng, "bn1", 3), *bn_inits(rng, "bn2", 3)]
    model = make_model(nodes, [("x", ["N", 2, 5, 5])], [("y1", None), ("y2", None)], inits)
    result = fold_and_check(model, ["folded_backward", "folded_backward"])
    w1, w2 = (n.input[1] for n in result.model.graph.node)
    assert len({w1, w2, "w"}) == 3 and not np.allclose(_values(result.model)[w1], _values(result.model)[w2])


def test_weight_shared_with_a_layer_without_bn_is_not_written():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t1"], name="conv1"), bn_node("bn1", "t1", "y1"),
        helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2"),
    ]
    model = make_model(nodes, [("x", ["N", 2, 5, 5])], [("y1", None), ("y2", None)],
                       [init(rng, "w", (3, 2, 3, 3)), *bn_inits(rng, "bn1", 3)])
    result = fold_and_check(model, ["folded_backward"])
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert conv2.input[1] == "w"
    np.testing.assert_array_equal(_values(result.model)["w"], _values(model)["w"])


def test_bn_parameters_shared_by_a_folded_and_a_kept_bn():
    """The exporter's deduplication: two BNs read the same four tensors; one folds, one is kept."""
    rng = np.random.default_rng(4)
    shared = [f"p_{p}" for p in "sbmv"]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        helper.make_node("BatchNormalization", ["t", *shared], ["u"], name="bn_conv"),
        helper.make_node("Concat", ["u", "x"], ["c"], name="cat", axis=1),
        helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["s"], name="slice"),
        helper.make_node("BatchNormalization", ["s", *shared], ["n"], name="bn_cat"),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    ints = [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("starts", 1), ("ends", 4), ("axes", 1))]
    params = [numpy_helper.from_array(t, n) for t, n in zip((numpy_helper.to_array(t) for t in bn_inits(rng, "p", 3)), shared)]
    model = make_model(nodes, [("x", ["N", 3, 4, 4])], [("y", None)], [init(rng, "w", (3, 3, 1, 1)), *params, *ints])
    result = fold_and_check(model, ["folded_backward", "kept"])
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    assert list(bn.input[1:]) == shared
    for name in shared:
        np.testing.assert_array_equal(_values(result.model)[name], _values(model)[name])


def test_weight_behind_identity_shared_with_another_conv_is_never_written():
    """PyTorch's deduplication: conv2 reads w through Identity. Whatever the fold decides for bn2,
    the shared tensor keeps its value and both outputs match the unfolded model."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Identity", ["w"], ["w_dup"], name="dup"),
        helper.make_node("Conv", ["x", "w"], ["t1"], name="conv1"), bn_node("bn1", "t1", "y1"),
        helper.make_node("Conv", ["x", "w_dup"], ["t2"], name="conv2"), bn_node("bn2", "t2", "y2"),
    ]
    inits = [init(rng, "w", (3, 2, 1, 1)), *bn_inits(rng, "bn1", 3), *bn_inits(rng, "bn2", 3)]
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], [("y1", None), ("y2", None)], inits)
    result = fold_and_check(model)  # numeric equivalence in ORT and float64
    values = _values(result.model)
    readers = [n for n in result.model.graph.node if "w" in n.input]
    assert all(n.name == "dup" for n in readers)  # conv1 got a private folded copy
    if readers:
        np.testing.assert_array_equal(values["w"], _values(model)["w"])
