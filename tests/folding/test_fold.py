"""bnfold.folding.fold: one test per folding rule, then the bookkeeping around the rewrite.

Every fold is checked three ways by ``fold_and_check``: the decision list, ONNX Runtime
(``check_equivalent`` against the unfolded model) and the float64 NumPy interpreter of
tests/reference.py (itself checked against ONNX Runtime in tests/test_reference.py), where the
only difference left between the folded and unfolded models is one rounding of each folded
tensor to the model's dtype.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference import run_reference

from bnfold.folding.fold import fold_batchnorms
from bnfold.folding.verify import check_equivalent

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


# --------------------------------------------------------------------------- builders


def bn_node(name: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    params = [f"{name}_{p}" for p in ("s", "b", "m", "v")]
    return helper.make_node("BatchNormalization", [x, *params], [y], name=name, **attrs)


def bn_inits(rng, name: str, c: int, dtype=np.float32, shift: bool = True) -> list[onnx.TensorProto]:
    """Non-trivial BN parameters; with shift=False, b = B − mean·a is exactly 0."""
    scale = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    bias = rng.normal(size=c) if shift else np.zeros(c)
    mean = rng.normal(size=c) if shift else np.zeros(c)
    var = rng.uniform(0.2, 2.0, c)
    return [numpy_helper.from_array(v.astype(dtype), f"{name}_{p}") for p, v in zip("sbmv", (scale, bias, mean, var))]


def init(rng, name: str, shape, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(max(1, np.prod(shape[1:])))).astype(dtype), name)


def make_model(nodes, inputs, outputs, inits, *, opset: int = 17, elem: int = F32, ir: int | None = None):
    """inputs/outputs: [(name, shape or None: inferred)]; checker-valid by construction."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem, s) for n, s in outputs],
        inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir or helper.find_min_ir_version_for(opsets)
    # The checker wants a shape on every graph output: let inference fill in the None ones.
    shaped = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(shaped.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model: onnx.ModelProto, seed: int = 0, batches: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = []
    for _ in range(batches):
        feed = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            t = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else 2 for d in t.shape.dim]
            feed[vi.name] = rng.normal(size=shape).astype(helper.tensor_dtype_to_np_dtype(t.elem_type))
        out.append(feed)
    return out


def unit_roundoff(model: onnx.ModelProto) -> float:
    elem = model.graph.input[0].type.tensor_type.elem_type
    return float(np.finfo(helper.tensor_dtype_to_np_dtype(elem)).eps) / 2


def fold_and_check(model: onnx.ModelProto, fates: list[str] | None = None, *, numeric: bool = True,
                   unfoldable: str | None = None):
    """Fold, then check decisions, validity, signature and (numeric) ORT and float64 equivalence.

    unfoldable None: where `fates` expects an "affine" BN, fold with unfoldable="affine" — and also
    with the default "keep", where exactly those BNs must stay BatchNormalization (same names,
    same reasons up to the note on Mul + Add); else the default."""
    if unfoldable is None and fates is not None and "affine" in fates:
        kept = _fold_checked(model, [f if f != "affine" else "kept" for f in fates], numeric, "keep")
        result = _fold_checked(model, fates, numeric, "affine")
        stay = {d.bn for d in kept.decisions if d.fate == "kept"}
        assert stay == {d.bn for d in result.decisions if d.fate in ("affine", "kept")}
        bn_nodes = [n for n in kept.model.graph.node if n.op_type == "BatchNormalization"]
        assert {n.name or f"BatchNormalization({n.output[0]})" for n in bn_nodes} == stay
        assert all("unfoldable='affine'" in d.reason for d, a in zip(kept.decisions, result.decisions) if a.fate == "affine")
        return result
    return _fold_checked(model, fates, numeric, unfoldable or "keep")


def _fold_checked(model: onnx.ModelProto, fates: list[str] | None, numeric: bool, unfoldable: str):
    before = model.SerializeToString()
    result = fold_batchnorms(model, unfoldable)
    assert model.SerializeToString() == before, "the input model was mutated"
    folded = result.model
    if fates is not None:
        assert [d.fate for d in result.decisions] == fates, result.decisions
    kept = sum(d.fate == "kept" for d in result.decisions)
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == kept
    onnx.checker.check_model(folded, full_check=True)
    onnx.shape_inference.infer_shapes(folded, strict_mode=True)
    assert [(v.name, v.type) for v in folded.graph.input if v.name not in _inits(folded)] == [
        (v.name, v.type) for v in model.graph.input if v.name not in _inits(model)
    ]
    assert list(folded.graph.output) == list(model.graph.output)
    assert list(folded.opset_import) == list(model.opset_import) and folded.ir_version == model.ir_version
    allowed = {t.data_type for t in model.graph.initializer} | {model.graph.input[0].type.tensor_type.elem_type}
    assert {t.data_type for t in folded.graph.initializer} <= allowed  # no new dtypes: float16 stays float16
    if not numeric:
        return result
    feeds = feeds_for(model)
    check_equivalent(model, folded, feeds, threads=1)
    u = unit_roundoff(model)
    for feed in feeds:
        want, got = run_reference(model, feed), run_reference(folded, feed)
        for name in want:
            err = np.max(np.abs(want[name] - got[name]), initial=0.0)
            assert err <= 64 * u * max(1.0, np.max(np.abs(want[name]), initial=0.0)), (name, err)
    return result


def _inits(model):
    return {t.name for t in model.graph.initializer}


def _init_array(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


# --------------------------------------------------------------------------- backward rules


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize(
    "group,cg,mg", [(1, 3, 4), (2, 2, 3), (4, 1, 1), (3, 1, 2)], ids=["dense", "grouped", "depthwise", "depthwise_x2"]
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_backward(nd, group, cg, mg, bias):
    rng = np.random.default_rng(nd * 100 + group)
    c_in, m, k = group * cg, group * mg, [3, 2, 1][:nd]
    conv_inputs = ["x", "w", "cb"] if bias else ["x", "w"]
    attrs = dict(group=group, pads=[1] * nd + [0] * nd, strides=[2] + [1] * (nd - 1))
    nodes = [
        helper.make_node("Conv", conv_inputs, ["t"], name="conv", **attrs),
        bn_node("bn", "t", "y"),
    ]
    inits = [init(rng, "w", (m, cg, *k))] + ([init(rng, "cb", (m,))] if bias else []) + bn_inits(rng, "bn", m)
    model = make_model(nodes, [("x", [2, c_in, 5, 4, 3][: 2 + nd])], [("y", None)], inits)
    result = fold_and_check(model, ["folded_backward"])
    assert result.decisions[0].into == "conv"
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert _inits(result.model).isdisjoint({"w", "cb", "bn_s", "bn_b", "bn_m", "bn_v"})  # dead ones dropped


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("group,cg,mg", [(1, 3, 2), (2, 3, 2), (3, 1, 2), (2, 2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_backward(nd, group, cg, mg, bias):
    """Grouped ConvTranspose: output channel g·(M/group)+j lives on axis 1 of group g's rows of W."""
    rng = np.random.default_rng(nd * 10 + group)
    c_in, m = group * cg, group * mg
    attrs = dict(group=group, strides=[2] * nd, pads=[1] * nd + [0] * nd, output_padding=[1] * nd)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w", "cb"] if bias else ["x", "w"], ["t"], name="deconv", **attrs),
        bn_node("bn", "t", "y"),
    ]
    inits = [init(rng, "w", (c_in, mg, *[3, 2][:nd]))] + bn_inits(rng, "bn", m)
    inits += [init(rng, "cb", (m,))] if bias else []
    model = make_model(nodes, [("x", [2, c_in, 4, 3][: 2 + nd])], [("y", None)], inits)
    fold_and_check(model, ["folded_backward"])


C_SHAPES = {"none": None, "vec": (5,), "row": (1, 5), "full": (3, 5), "col": (3, 1), "scalar": ()}


@pytest.mark.parametrize("c_shape", list(C_SHAPES))
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 1), (0, 1)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, 1.3), (-2.0, 0.0)])
def test_gemm_backward(c_shape, trans_a, trans_b, alpha, beta):
    rng = np.random.default_rng(len(c_shape) + 3 * trans_a + 7 * trans_b)
    m, k, n = 3, 4, 5
    shape = C_SHAPES[c_shape]
    inputs = ["a", "w"] + ([] if shape is None else ["c"])
    nodes = [
        helper.make_node("Gemm", inputs, ["t"], name="fc", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b),
        bn_node("bn", "t", "y"),
    ]
    inits = [init(rng, "w", (n, k) if trans_b else (k, n))] + bn_inits(rng, "bn", n)
    if shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), "c"))
    model = make_model(nodes, [("a", [k, m] if trans_a else [m, k])], [("y", [m, n])], inits, opset=13)
    result = fold_and_check(model, ["folded_backward"])
    gemm = result.model.graph.node[0]
    assert len(gemm.input) == 3 and "beta" not in {a.name for a in gemm.attribute}  # C created when absent, β' = 1


def test_gemm_backward_opset9_requires_c():
    """Before opset 11 Gemm's C is required; the folded C replaces it."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Gemm", ["a", "w", "c"], ["t"], name="fc", beta=0.5, transB=1), bn_node("bn", "t", "y")]
    inits = [init(rng, "w", (4, 6)), numpy_helper.from_array(np.float32(2.0), "c")] + bn_inits(rng, "bn", 4)
    model = make_model(nodes, [("a", [3, 6])], [("y", [3, 4])], inits, opset=9)
    result = fold_and_check(model, ["folded_backward"])
    assert _init_array(result.model, result.model.graph.node[0].input[2]).shape == (4,)


@pytest.mark.parametrize("add", ["none", "left", "right"])
@pytest.mark.parametrize("c_shape", [(5,), (1, 5), (3, 5)])
def test_matmul_backward(add, c_shape):
    rng = np.random.default_rng(5)
    if add == "none":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm")]
        inits = []
    else:
        operands = ["u", "c"] if add == "right" else ["c", "u"]
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["u"], name="mm"),
            helper.make_node("Add", operands, ["t"], name="add"),
        ]
        inits = [numpy_helper.from_array(rng.normal(size=c_shape).astype(np.float32), "c")]
    nodes.append(bn_node("bn", "t", "y"))
    inits += [init(rng, "w", (6, 5))] + bn_inits(rng, "bn", 5)
    model = make_model(nodes, [("x", [3, 6])], [("y", [3, 5])], inits)
    result = fold_and_check(model, ["folded_backward"])
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]


def test_matmul_with_rank3_output_is_not_folded_backward():
    """BN's axis 1 of a (B, T, F) MatMul output is T, not the weight's output features."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="mm"), bn_node("bn", "t", "y")]
    model = make_model(nodes, [("x", [2, 4, 6])], [("y", None)], [init(rng, "w", (6, 4))] + bn_inits(rng, "bn", 4))
    result = fold_and_check(model, ["affine"])
    assert "rank 2" in result.decisions[0].reason


def test_chain_conv_bn_bn_folds_twice():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        bn_node("bn1", "t", "u"),
        bn_node("bn2", "u", "y"),
    ]
    inits = [init(rng, "w", (3, 2, 3, 3))] + bn_inits(rng, "bn1", 3) + bn_inits(rng, "bn2", 3)
    model = make_model(nodes, [("x", [2, 2, 6, 6])], [("y", None)], inits)
    fold_and_check(model, ["folded_backward", "folded_backward"])


# --------------------------------------------------------------------------- forward rules


@pytest.mark.parametrize(
    "pads,auto_pad,shift,fate",
    [
        ([0, 0, 0, 0], None, True, "folded_forward"),
        (None, "VALID", True, "folded_forward"),
        ([1, 0, 1, 1], None, True, "affine"),  # zero padding after b ≠ 0 is not exact
        (None, "SAME_UPPER", True, "affine"),
        ([1, 0, 1, 1], None, False, "folded_forward"),  # b = 0: padding commutes
    ],
)
@pytest.mark.parametrize("group", [1, 2])
def test_conv_forward(pads, auto_pad, shift, fate, group):
    rng = np.random.default_rng(group)
    attrs = {"group": group, **({"pads": pads} if pads else {}), **({"auto_pad": auto_pad} if auto_pad else {})}
    nodes = [bn_node("bn", "x", "t"), helper.make_node("Conv", ["t", "w", "cb"], ["y"], name="conv", **attrs)]
    inits = bn_inits(rng, "bn", 4, shift=shift) + [init(rng, "w", (6, 4 // group, 3, 2)), init(rng, "cb", (6,))]
    model = make_model(nodes, [("x", [2, 4, 6, 5])], [("y", None)], inits)
    result = fold_and_check(model, [fate])
    assert result.decisions[0].into == ("conv" if fate == "folded_forward" else None)
    if fate == "affine":
        assert "pad" in result.decisions[0].reason


@pytest.mark.parametrize("trans_a,fate", [(0, "folded_forward"), (1, "affine")])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_forward(trans_a, fate, trans_b, with_c):
    rng = np.random.default_rng(trans_b)
    m, k, n = 3, 4, 5
    x_shape = [k, m] if trans_a else [m, k]
    channels = x_shape[1]
    attrs = dict(alpha=0.5, beta=2.0, transA=trans_a, transB=trans_b)
    nodes = [
        bn_node("bn", "x", "t"),
        helper.make_node("Gemm", ["t", "w", "c"] if with_c else ["t", "w"], ["y"], name="fc", **attrs),
    ]
    inits = bn_inits(rng, "bn", channels) + [init(rng, "w", (n, k) if trans_b else (k, n))]
    if with_c:
        inits.append(numpy_helper.from_array(rng.normal(size=(1, n)).astype(np.float32), "c"))
    model = make_model(nodes, [("x", x_shape)], [("y", [m, n])], inits)
    fold_and_check(model, [fate])


# --------------------------------------------------------------------------- affine fallback


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_bn_on_graph_input_becomes_mul_add(rank):
    rng = np.random.default_rng(rank)
    nodes = [bn_node("bn", "x", "t"), helper.make_node("Relu", ["t"], ["y"], name="relu")]
    model = make_model(nodes, [("x", [2, 3, 4, 3, 2][:rank])], [("y", None)], bn_inits(rng, "bn", 3))
    result = fold_and_check(model, ["affine"])
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Mul", "Add", "Relu"]
    a = _init_array(result.model, result.model.graph.node[0].input[1])
    assert a.shape == (3,) + (1,) * (rank - 2)


def test_producer_used_elsewhere_and_bn_output_is_graph_output():
    """Conv output also a graph output: no backward fold; the BN output keeps its name."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), bn_node("bn", "t", "y")]
    inits = [init(rng, "w", (3, 2, 1, 1))] + bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", [2, 2, 4, 4])], [("y", None), ("t", None)], inits)
    result = fold_and_check(model, ["affine"])
    assert "also a graph output" in result.decisions[0].reason
    assert result.model.graph.node[-1].output[0] == "y"


def test_bn_output_graph_output_folds_backward_under_its_name():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        bn_node("bn", "t", "y"),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    inits = [init(rng, "w", (3, 2, 1, 1))] + bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", [2, 2, 4, 4])], [("y", [2, 3, 4, 4]), ("z", None)], inits)
    result = fold_and_check(model, ["folded_backward"])
    assert result.model.graph.node[0].output[0] == "y"


# --------------------------------------------------------------------------- sharing, constants, dtypes


def test_shared_weights_are_not_modified_in_place():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"], ["t"], name="conv1"),
        bn_node("bn", "t", "y1"),
        helper.make_node("Conv", ["x", "w", "cb"], ["y2"], name="conv2"),
    ]
    inits = [init(rng, "w", (3, 2, 3, 3)), init(rng, "cb", (3,))] + bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", [2, 2, 5, 5])], [("y1", None), ("y2", None)], inits)
    result = fold_and_check(model, ["folded_backward"])
    conv1, conv2 = result.model.graph.node
    assert list(conv2.input) == ["x", "w", "cb"] and conv1.input[1] != "w" and conv1.input[2] != "cb"
    np.testing.assert_array_equal(_init_array(result.model, "w"), _init_array(model, "w"))


def test_constant_node_weights():
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "wv")
    nodes = [
        helper.make_node("Constant", [], ["w"], name="wconst", value=w),
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "t", "y"),
    ]
    model = make_model(nodes, [("x", [2, 2, 5, 5])], [("y", None)], bn_inits(rng, "bn", 3))
    result = fold_and_check(model, ["folded_backward"])
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]  # the dead Constant is gone
    assert "w" in result.removed_initializers


def test_bn_params_from_constant_nodes():
    rng = np.random.default_rng(6)
    params = bn_inits(rng, "bn", 3)
    nodes = [helper.make_node("Constant", [], [p.name], value=p) for p in params]
    nodes += [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), bn_node("bn", "t", "y")]
    model = make_model(nodes, [("x", [2, 2, 4, 4])], [("y", None)], [init(rng, "w", (3, 2, 1, 1))])
    result = fold_and_check(model, ["folded_backward"])
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]


@pytest.mark.parametrize("kind", ["conv", "conv_transpose", "gemm", "affine"])
def test_float16_model_stays_float16(kind):
    rng = np.random.default_rng(7)
    op, attrs, w, x = {
        "conv": ("Conv", {"group": 2}, (4, 1, 3, 3), [2, 2, 5, 5]),
        "conv_transpose": ("ConvTranspose", {"group": 2}, (2, 2, 3, 3), [2, 2, 5, 5]),
        "gemm": ("Gemm", {"transB": 1}, (4, 6), [3, 6]),
        "affine": ("Relu", {}, None, [2, 4, 3]),
    }[kind]
    nodes = [helper.make_node(op, ["x", "w"] if w else ["x"], ["t"], name="p", **attrs), bn_node("bn", "t", "y")]
    inits = ([init(rng, "w", w, np.float16)] if w else []) + bn_inits(rng, "bn", 4, np.float16)
    model = make_model(nodes, [("x", x)], [("y", None)], inits, elem=F16)
    result = fold_and_check(model, ["affine" if kind == "affine" else "folded_backward"])
    assert {t.data_type for t in result.model.graph.initializer} == {F16}


def test_float16_overflow_falls_back():
    """a·W beyond float16's 65504 must not become inf: the fold moves to a Mul/Add."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), bn_node("bn", "t", "y")]
    values = {"s": [1000.0] * 2, "b": [0.0] * 2, "m": [0.0] * 2, "v": [1e-4] * 2}
    params = [numpy_helper.from_array(np.array(v, np.float16), f"bn_{p}") for p, v in values.items()]
    w = numpy_helper.from_array(np.full((2, 2, 1, 1), 60.0, np.float16), "w")
    model = make_model(nodes, [("x", [1, 2, 2, 2])], [("y", None)], [w] + params, elem=F16)
    result = fold_and_check(model, numeric=False)
    assert result.decisions[0].fate in ("affine", "kept") and "overflow" in result.decisions[0].reason


def test_bn_15_mixed_parameter_types():
    """Opset 15 lets scale/B and mean/var differ in type from X; the fold uses X's type."""
    rng = np.random.default_rng(9)
    params = bn_inits(rng, "bn", 3, np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu"), bn_node("bn", "t", "y")]
    model = make_model(nodes, [("x", [2, 3, 4])], [("y", None)], params, elem=F16, opset=15)
    result = fold_and_check(model, ["affine"])
    assert {t.data_type for t in result.model.graph.initializer} == {F16}


# --------------------------------------------------------------------------- left alone


def test_training_mode_is_kept():
    rng = np.random.default_rng(1)
    node = helper.make_node(
        "BatchNormalization", ["x", "bn_s", "bn_b", "bn_m", "bn_v"], ["y", "rm", "rv"], name="bn", training_mode=1
    )
    model = make_model([node], [("x", [2, 3, 4])], [("y", None), ("rm", None), ("rv", None)], bn_inits(rng, "bn", 3))
    result = fold_and_check(model, ["kept"], numeric=False)
    assert "training_mode" in result.decisions[0].reason
    assert result.model.SerializeToString() == model.SerializeToString()


def test_spatial_zero_is_kept():
    rng = np.random.default_rng(2)
    node = helper.make_node("BatchNormalization", ["x", "bn_s", "bn_b", "bn_m", "bn_v"], ["y"], name="bn", spatial=0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1, (3, 4)).astype(np.float32), f"bn_{p}") for p in "sbmv"]
    model = make_model([node], [("x", [2, 3, 4])], [("y", None)], inits, opset=8, ir=4)
    result = fold_and_check(model, ["kept"], numeric=False)
    assert "spatial=0" in result.decisions[0].reason


def test_non_constant_parameters_are_kept():
    rng = np.random.default_rng(3)
    node = bn_node("bn", "x", "y")
    inputs = [("x", [2, 3, 4]), ("bn_s", [3])]
    model = make_model([node], inputs, [("y", None)], bn_inits(rng, "bn", 3)[1:])
    result = fold_and_check(model, ["kept"])
    assert "not all constant" in result.decisions[0].reason


def test_bn_inside_subgraph_is_reported_and_kept():
    rng = np.random.default_rng(4)
    z, z2 = helper.make_tensor_value_info("z", F32, [2, 3]), helper.make_tensor_value_info("z2", F32, [2, 3])
    body = helper.make_graph([bn_node("inner", "x", "z")], "then", [], [z])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z2"])], "else", [], [z2])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=other)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F32, [2, 3])],
        bn_inits(rng, "inner", 3),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = fold_batchnorms(model)
    assert [(d.bn, d.fate) for d in result.decisions] == [("inner", "kept")]
    onnx.checker.check_model(result.model, full_check=True)
    assert _inits(result.model) == _inits(model)  # initializers read by the body are not dead


# --------------------------------------------------------------------------- bookkeeping


def test_unrelated_initializers_metadata_and_names_are_kept():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["t"], name="conv"),
        bn_node("bn", "t", "u"),
        helper.make_node("Add", ["u", "other"], ["y"], name="add"),
    ]
    inits = [init(rng, "w", (3, 2, 1, 1)), init(rng, "other", (3, 1, 1)), init(rng, "unused", (2,))]
    inits += bn_inits(rng, "bn", 3)
    model = make_model(nodes, [("x", ["N", 2, 4, 4])], [("y", ["N", 3, 4, 4])], inits, opset=13)
    model.graph.value_info.extend([helper.make_tensor_value_info("t", F32, ["N", 3, 4, 4])])
    helper.set_model_props(model, {"author": "me"})
    model.producer_name, model.doc_string = "pytorch", "doc"
    result = fold_and_check(model, ["folded_backward"])
    folded = result.model
    assert {"other", "unused"} <= _inits(folded) and "w" not in _inits(folded)
    assert sorted(result.removed_initializers) == sorted(["w", "bn_s", "bn_b", "bn_m", "bn_v"])
    assert "t" not in {v.name for v in folded.graph.value_info}  # the folded-away tensor
    assert (folded.producer_name, folded.doc_string) == ("pytorch", "doc")
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "me"}


def test_ir3_initializers_stay_graph_inputs():
    """Before IR 4 every initializer is listed as a graph input; new ones must be too."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), bn_node("bn", "t", "y")]
    inits = [init(rng, "w", (3, 2, 1, 1))] + bn_inits(rng, "bn", 3)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, [2, 2, 3, 3])]
        + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits],
        [helper.make_tensor_value_info("y", F32, [2, 3, 3, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    result = fold_and_check(model, ["folded_backward"])
    assert {v.name for v in result.model.graph.input} == {"x"} | _inits(result.model)


def test_to_dict_is_json():
    rng = np.random.default_rng(7)
    nodes = [bn_node("bn", "x", "y")]
    model = make_model(nodes, [("x", [2, 3])], [("y", None)], bn_inits(rng, "bn", 3))
    out = fold_batchnorms(model, "affine").to_dict()
    assert json.loads(json.dumps(out))["counts"] == {"folded_backward": 0, "folded_forward": 0, "affine": 1, "kept": 0}
    out = fold_batchnorms(model).to_dict()
    assert json.loads(json.dumps(out))["counts"] == {"folded_backward": 0, "folded_forward": 0, "affine": 0, "kept": 1}
    assert out["decisions"][0]["bn"] == "bn" and out["decisions"][0]["into"] is None


# --------------------------------------------------------------------------- the shared test models


def _all_models():
    try:
        from models import ALL_MODELS
    except ImportError:  # written by another developer; absent in early checkouts
        return {}
    return ALL_MODELS


@pytest.mark.parametrize("name", sorted(_all_models()))
def test_fold_every_shared_model(name):
    from models import make_samples

    model = _all_models()[name]()
    result = fold_batchnorms(model, "affine")
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node), result.decisions
    onnx.checker.check_model(result.model, full_check=True)
    samples = make_samples(model, 16, seed=1)
    report = check_equivalent(model, result.model, [samples], threads=1)
    assert report.feeds == 1
    want, got = run_reference(model, samples), run_reference(result.model, samples)
    for key in want:
        scale = max(1.0, float(np.max(np.abs(want[key]))))
        assert np.max(np.abs(want[key] - got[key])) <= 64 * 2**-24 * scale, key
