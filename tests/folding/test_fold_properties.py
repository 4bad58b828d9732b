"""Property-based tests of bnfold.folding.fold over randomly generated small graphs.

Each strategy builds a checker-valid model for one folding rule with random sizes, groups,
strides, dilations, pads, transposes, α/β, bias/C shapes, opset (9..21), dtype (float32 or
float16), weight source (initializer or Constant node) and weight sharing. ``fold_and_check``
(tests/test_fold.py) then asserts the expected fate, validity, an unchanged signature, and
equivalence with the unfolded model both in ONNX Runtime (``check_equivalent`` with its default
tolerance) and in a float64 NumPy interpreter (within 64 units of roundoff of the dtype).
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from test_fold import F16, F32, fold_and_check, make_model

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Builder:
    """Nodes and constants of one random model; weights as initializers or Constant nodes."""

    def __init__(self, draw):
        self.draw = draw
        self.opset = draw(st.integers(9, 21))
        self.dtype = draw(st.sampled_from([np.float32, np.float16]))
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        self.as_constant_nodes = draw(st.booleans())
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []

    def const(self, name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.asarray(value).astype(self.dtype), name)
        if self.as_constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def weight(self, name: str, shape) -> str:
        fan_in = max(1, int(np.prod(shape)) // max(1, shape[0]))
        return self.const(name, self.rng.normal(size=shape) / np.sqrt(fan_in))

    def bn(self, x: str, y: str, channels: int, *, shift: bool = True) -> None:
        """BN with random parameters; shift=False makes b = B − mean·a exactly 0."""
        rng = self.rng
        scale = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
        bias = rng.normal(size=channels) if shift else np.zeros(channels)
        mean = rng.normal(size=channels) if shift else np.zeros(channels)
        var = rng.uniform(0.2, 2.0, channels)
        names = [self.const(f"{y}_{p}", v) for p, v in zip(("scale", "B", "mean", "var"), (scale, bias, mean, var))]
        attrs = {"epsilon": self.draw(st.sampled_from([1e-5, 1e-3, 0.1]))}
        if self.opset >= 14 and self.draw(st.booleans()):
            attrs["training_mode"] = 0
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=f"bn_{y}", **attrs))

    def finish_output(self, y: str) -> None:
        """The BN output is either a graph output itself or feeds a Relu."""
        if self.draw(st.booleans()):
            self.outputs.append(y)
        else:
            self.nodes.append(helper.make_node("Relu", [y], [f"{y}_relu"], name=f"relu_{y}"))
            self.outputs.append(f"{y}_relu")

    def model(self, inputs) -> onnx.ModelProto:
        elem = F16 if self.dtype == np.float16 else F32
        outputs = [(o, None) for o in self.outputs]
        return make_model(self.nodes, inputs, outputs, self.inits, opset=self.opset, elem=elem)


def spatial_geometry(draw, nd: int):
    """Kernel, strides, dilations, pads and an input size that leaves ≥ 1 output position."""
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 2)) for _ in range(nd)]
    dilations = [draw(st.integers(1, 2)) for _ in range(nd)]
    pads = [draw(st.integers(0, 1)) for _ in range(2 * nd)]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    size = [max(1, span - pads[i] - pads[i + nd]) + draw(st.integers(0, 3)) for i, span in enumerate(spans)]
    return kernel, strides, dilations, pads, size


# --------------------------------------------------------------------------- backward


@st.composite
def conv_bn(draw):
    b = Builder(draw)
    nd = draw(st.integers(1, 3))
    group, cg, mg = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel, strides, dilations, pads, size = spatial_geometry(draw, nd)
    w = b.weight("w", (group * mg, cg, *kernel))
    inputs = ["x", w] + ([b.weight("cb", (group * mg,))] if draw(st.booleans()) else [])
    attrs = dict(group=group, strides=strides, dilations=dilations, pads=pads, kernel_shape=kernel)
    b.nodes.append(helper.make_node("Conv", inputs, ["t"], name="conv", **attrs))
    if draw(st.booleans()):  # the same weight (and bias) also used by another Conv
        b.nodes.append(helper.make_node("Conv", inputs, ["other"], name="conv_other", **attrs))
        b.outputs.append("other")
    b.bn("t", "y", group * mg)
    b.finish_output("y")
    return b.model([("x", [2, group * cg, *size])]), ["folded_backward"]


@st.composite
def conv_transpose_bn(draw):
    b = Builder(draw)
    nd = draw(st.integers(1, 2))
    group, cg, mg = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 2)) for _ in range(nd)]
    extra = [draw(st.integers(0, s - 1)) for s in strides]  # output_padding < stride
    pads = [draw(st.integers(0, (k - 1) // 2)) for k in kernel * 2]  # keeps the output non-empty
    size = [draw(st.integers(1, 4)) for _ in range(nd)]
    w = b.weight("w", (group * cg, mg, *kernel))
    inputs = ["x", w] + ([b.weight("cb", (group * mg,))] if draw(st.booleans()) else [])
    attrs = dict(group=group, strides=strides, pads=pads, output_padding=extra)
    b.nodes.append(helper.make_node("ConvTranspose", inputs, ["t"], name="deconv", **attrs))
    b.bn("t", "y", group * mg)
    b.finish_output("y")
    return b.model([("x", [2, group * cg, *size])]), ["folded_backward"]


@st.composite
def gemm_bn(draw):
    b = Builder(draw)
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    shapes = [(n,), (1, n), (m, n), (m, 1), (), (1,)] + ([None] if b.opset >= 11 else [])  # C optional from 11
    c_shape = draw(st.sampled_from(shapes))
    inputs = ["a", b.weight("w", (n, k) if trans_b else (k, n))]
    if c_shape is not None:
        inputs.append(b.const("c", b.rng.normal(size=c_shape)))
    alpha = draw(st.sampled_from([1.0, 0.5, -1.5, 2.0]))
    beta = draw(st.sampled_from([1.0, 0.0, 0.5, -2.0]))
    attrs = dict(alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    b.nodes.append(helper.make_node("Gemm", inputs, ["t"], name="fc", **attrs))
    b.bn("t", "y", n)
    b.finish_output("y")
    return b.model([("a", [k, m] if trans_a else [m, k])]), ["folded_backward"]


@st.composite
def matmul_bn(draw):
    """Linear → BN1d; with a (B, T, K) input BN's axis 1 is T, and only Mul/Add is exact."""
    b = Builder(draw)
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    lead = draw(st.sampled_from([[], [], [2]]))  # a leading batch axis makes the output rank 3
    w = b.weight("w", (k, n))
    add = draw(st.sampled_from(["none", "left", "right"]))
    if add == "none":
        b.nodes.append(helper.make_node("MatMul", ["x", w], ["t"], name="mm"))
    else:
        c = b.const("c", b.rng.normal(size=draw(st.sampled_from([(n,), (1, n), (m, n), ()]))))
        b.nodes.append(helper.make_node("MatMul", ["x", w], ["u"], name="mm"))
        b.nodes.append(helper.make_node("Add", ["u", c] if add == "right" else [c, "u"], ["t"], name="add"))
    b.bn("t", "y", m if lead else n)
    b.finish_output("y")
    return b.model([("x", [*lead, m, k])]), ["affine" if lead else "folded_backward"]


# --------------------------------------------------------------------------- forward and affine


@st.composite
def bn_conv(draw):
    """BN on the graph input, then a Conv: forward only without padding, or when b = 0."""
    b = Builder(draw)
    nd = draw(st.integers(1, 3))
    group, cg, mg = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel, strides, dilations, pads, size = spatial_geometry(draw, nd)
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    if auto_pad == "NOTSET" and draw(st.booleans()):  # the exact case half the time
        pads, size = [0] * 2 * nd, [s + p + q for s, p, q in zip(size, pads[:nd], pads[nd:])]
    shift = draw(st.booleans())
    b.bn("x", "t", group * cg, shift=shift)
    inputs = ["t", b.weight("w", (group * mg, cg, *kernel))]
    inputs += [b.weight("cb", (group * mg,))] if draw(st.booleans()) else []
    attrs = dict(group=group, strides=strides, dilations=dilations, auto_pad=auto_pad)
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    if auto_pad.startswith("SAME"):
        attrs["dilations"] = [1] * nd  # SAME with dilation is ill-defined in older opsets
    if auto_pad == "VALID":  # no pads to lean on: the input must cover one kernel window
        size = [max(s, (k - 1) * d + 1) for s, k, d in zip(size, kernel, dilations)]
    b.nodes.append(helper.make_node("Conv", inputs, ["y"], name="conv", **attrs))
    b.outputs.append("y")
    pads_input = auto_pad.startswith("SAME") or (auto_pad == "NOTSET" and any(pads))
    fate = "affine" if pads_input and shift else "folded_forward"
    return b.model([("x", [2, group * cg, *size])]), [fate]


@st.composite
def bn_gemm(draw):
    b = Builder(draw)
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    x_shape = [k, m] if trans_a else [m, k]
    b.bn("x", "t", x_shape[1])
    inputs = ["t", b.weight("w", (n, k) if trans_b else (k, n))]
    if b.opset < 11 or draw(st.booleans()):
        inputs.append(b.const("c", b.rng.normal(size=draw(st.sampled_from([(n,), (1, n), (m, n), ()])))))
    alpha, beta = draw(st.sampled_from([1.0, -0.5])), draw(st.sampled_from([1.0, 0.0, 2.0]))
    attrs = dict(alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    b.nodes.append(helper.make_node("Gemm", inputs, ["y"], name="fc", **attrs))
    b.outputs.append("y")
    return b.model([("x", x_shape)]), ["affine" if trans_a else "folded_forward"]


@st.composite
def bn_affine(draw):
    """BN with nothing to fold into: on a graph input, or after a Conv whose output is shared."""
    b = Builder(draw)
    rank, c = draw(st.integers(2, 5)), draw(st.integers(1, 4))
    shape = [2, c] + [draw(st.integers(1, 3)) for _ in range(rank - 2)]
    x = "x"
    if rank >= 3 and draw(st.booleans()):
        b.nodes.append(helper.make_node("Conv", ["x", b.weight("w", (c, c, *[1] * (rank - 2)))], ["h"], name="conv"))
        b.nodes.append(helper.make_node("Relu", ["h"], ["h_relu"], name="relu_h"))
        b.outputs.append("h_relu")  # the Conv output is used elsewhere
        x = "h"
    b.bn(x, "y", c)
    b.finish_output("y")
    return b.model([("x", shape)]), ["affine"]


@st.composite
def cnn_stack(draw):
    """A random stack of Conv/ConvTranspose/BN/Relu: whatever the fates, no BN is left."""
    b = Builder(draw)
    c = c_in = draw(st.integers(1, 3))
    x, layers = "x", draw(st.lists(st.sampled_from(["conv", "deconv", "bn", "relu"]), min_size=1, max_size=6))
    if "bn" not in layers:
        layers.append("bn")
    for i, layer in enumerate(layers):
        y, c_out = f"l{i}", draw(st.integers(1, 3))
        if layer == "conv":  # 3×3 pad 1 or 1×1 pad 0: the spatial size never shrinks
            k = draw(st.sampled_from([1, 3]))
            inputs = [x, b.weight(f"w{i}", (c_out, c, k, k))]
            inputs += [b.weight(f"b{i}", (c_out,))] if draw(st.booleans()) else []
            b.nodes.append(helper.make_node("Conv", inputs, [y], name=f"conv{i}", pads=[k // 2] * 4))
            c = c_out
        elif layer == "deconv":
            w = b.weight(f"w{i}", (c, c_out, 2, 2))
            b.nodes.append(helper.make_node("ConvTranspose", [x, w], [y], name=f"deconv{i}", pads=[0, 0, 1, 1]))
            c = c_out
        elif layer == "bn":
            b.bn(x, y, c, shift=draw(st.booleans()))
        else:
            b.nodes.append(helper.make_node("Relu", [x], [y], name=f"relu{i}"))
        x = y
    b.outputs.append(x)
    return b.model([("x", [2, c_in, 6, 5])]), None


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(conv_bn())
def test_conv_bn_folds_backward(case):
    fold_and_check(*case)


@SETTINGS
@given(conv_transpose_bn())
def test_conv_transpose_bn_folds_backward(case):
    fold_and_check(*case)


@SETTINGS
@given(gemm_bn())
def test_gemm_bn_folds_backward(case):
    fold_and_check(*case)


@SETTINGS
@given(matmul_bn())
def test_matmul_bn_folds_backward(case):
    fold_and_check(*case)


@settings(SETTINGS, max_examples=60)  # the exact-forward cases are a fraction of the draws
@given(bn_conv())
def test_bn_conv_folds_forward_only_where_exact(case):
    fold_and_check(*case)


@SETTINGS
@given(bn_gemm())
def test_bn_gemm_folds_forward(case):
    fold_and_check(*case)


@SETTINGS
@given(bn_affine())
def test_unfoldable_bn_becomes_mul_add(case):
    fold_and_check(*case)


@SETTINGS
@given(cnn_stack())
def test_random_stacks_lose_every_bn(case):
    model, _ = case
    result = fold_and_check(model, unfoldable="affine")
    assert all(d.fate != "kept" for d in result.decisions)
    kept = fold_and_check(model)  # the default keeps exactly the BNs that became Mul + Add
    assert [d.fate for d in kept.decisions] == [d.fate.replace("affine", "kept") for d in result.decisions]
