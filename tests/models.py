"""Tiny ONNX test models (opset 17, IR 8, float32) that each exercise one BN situation.

Every factory returns a fresh, checker-valid ``onnx.ModelProto`` with seeded random weights.
Conventions shared by all of them:

* the batch dimension of every graph input is the symbolic ``"N"``;
* node names are unique, and differ from the tensor names they produce (node ``bn1`` writes
  tensor ``bn1_y``), so code that confuses the two namespaces fails loudly;
* every BatchNormalization has its own, non-trivial "old" statistics (random mean, var in
  [0.5, 2], scale in [0.5, 1.5], random bias, epsilon 1e-5), so recalibrating on the shifted
  samples of :func:`make_samples` visibly changes them;
* tensors are tiny (2-8 channels, at most 10x10 spatial), so a model runs in well under a ms.

``ALL_MODELS`` maps a short name to a zero-argument factory; tests parametrize over it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
EPS = 1e-5


class _Builder:
    """Accumulates nodes and initializers; hands out unique node names."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}{i}"
        self._used.add(name)
        return name

    # -- graph boundary ---------------------------------------------------------------------
    def input(self, name: str, shape: Sequence[int | str]) -> str:
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def output(self, tensor: str) -> None:
        self.outputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))

    # -- constants ---------------------------------------------------------------------------
    def const(self, base: str, value: np.ndarray) -> str:
        name = self._unique(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def weight(self, base: str, shape: Sequence[int], fan_in: int) -> str:
        # He-style scale keeps activations O(1) through a few layers.
        return self.const(base, self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in))

    def small(self, base: str, shape: Sequence[int]) -> str:
        return self.const(base, self.rng.normal(0.0, 0.3, shape))

    # -- nodes -------------------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], base: str, out: str | None = None, **attrs) -> str:
        name = self._unique(base)
        out = out or self._unique(f"{name}_y")
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def conv(self, x, cin, cout, kernel, *, bias=True, group=1, base="conv", **attrs) -> str:
        kernel = list(kernel)
        fan_in = (cin // group) * math.prod(kernel)
        ins = [x, self.weight(f"{base}_W", [cout, cin // group, *kernel], fan_in)]
        if bias:
            ins.append(self.small(f"{base}_B", [cout]))
        return self.node("Conv", ins, base, kernel_shape=kernel, group=group, **attrs)

    def conv_transpose(self, x, cin, cout, kernel, *, group=1, base="convT", **attrs) -> str:
        kernel = list(kernel)
        fan_in = (cin // group) * math.prod(kernel)
        w = self.weight(f"{base}_W", [cin, cout // group, *kernel], fan_in)
        ins = [x, w, self.small(f"{base}_B", [cout])]
        return self.node("ConvTranspose", ins, base, kernel_shape=kernel, group=group, **attrs)

    def bn(self, x, channels, base="bn", out=None) -> str:
        r = self.rng
        ins = [
            x,
            self.const(f"{base}_scale", r.uniform(0.5, 1.5, channels)),
            self.const(f"{base}_bias", r.normal(0.0, 0.3, channels)),
            self.const(f"{base}_mean", r.normal(0.0, 0.5, channels)),
            self.const(f"{base}_var", r.uniform(0.5, 2.0, channels)),
        ]
        return self.node("BatchNormalization", ins, base, out=out, epsilon=EPS, momentum=0.9)

    def relu(self, x, base="relu", out=None) -> str:
        return self.node("Relu", [x], base, out=out)

    def build(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
            producer_name="bnfold-tests",
        )
        # Graph outputs need a shape for the strict checker: take the inferred ones (only those;
        # intermediate value_info is left out so the model stays minimal).
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
        onnx.checker.check_model(model, full_check=True)
        return model


# ----------------------------------------------------------------------------------------------
# Single conv -> BN patterns
# ----------------------------------------------------------------------------------------------

def conv_bn(bias: bool = True, seed: int = 1) -> onnx.ModelProto:
    """x(N,3,8,8) -> Conv 3x3 pad 1 (bias optional) -> BN -> Relu -> y(N,4,8,8)

        x --> [conv1] --> [bn1] --> [relu1] --> y
    """
    b = _Builder("conv_bn", seed)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.conv(x, 3, 4, [3, 3], bias=bias, pads=[1, 1, 1, 1], base="conv1")
    b.output(b.relu(b.bn(h, 4, "bn1"), "relu1", out="y"))
    return b.build()


def grouped_conv_bn(seed: int = 2) -> onnx.ModelProto:
    """x(N,4,7,7) -> Conv group=2, 4->6, 3x3 valid -> BN -> Relu -> y(N,6,5,5)

        x --> [conv1 g=2] --> [bn1] --> [relu1] --> y
    """
    b = _Builder("grouped_conv_bn", seed)
    x = b.input("x", ["N", 4, 7, 7])
    h = b.conv(x, 4, 6, [3, 3], group=2, base="conv1")
    b.output(b.relu(b.bn(h, 6, "bn1"), "relu1", out="y"))
    return b.build()


def depthwise_conv_bn(seed: int = 3) -> onnx.ModelProto:
    """x(N,5,6,6) -> depthwise Conv group=5, 3x3 pad 1 -> BN -> Relu -> pointwise Conv -> BN

        x --> [dw g=5] --> [bn_dw] --> [relu1] --> [pw 1x1] --> [bn_pw] --> y
    """
    b = _Builder("depthwise_conv_bn", seed)
    x = b.input("x", ["N", 5, 6, 6])
    h = b.conv(x, 5, 5, [3, 3], group=5, pads=[1, 1, 1, 1], base="dw")
    h = b.relu(b.bn(h, 5, "bn_dw"), "relu1")
    h = b.conv(h, 5, 3, [1, 1], bias=False, base="pw")
    b.output(b.bn(h, 3, "bn_pw", out="y"))
    return b.build()


def strided_conv_bn(seed: int = 4) -> onnx.ModelProto:
    """x(N,3,9,10) -> Conv 3x3 stride 2, asymmetric pads [1,0,2,1], dilations [1,2] -> BN -> Relu

        x --> [conv1 s=2 d=(1,2)] --> [bn1] --> [relu1] --> y(N,5,5,4)
    """
    b = _Builder("strided_conv_bn", seed)
    x = b.input("x", ["N", 3, 9, 10])
    h = b.conv(x, 3, 5, [3, 3], strides=[2, 2], pads=[1, 0, 2, 1], dilations=[1, 2], base="conv1")
    b.output(b.relu(b.bn(h, 5, "bn1"), "relu1", out="y"))
    return b.build()


def conv_transpose_bn(group: int = 1, seed: int = 5) -> onnx.ModelProto:
    """x(N,4,5,5) -> ConvTranspose 3x3 stride 2, pads [1,1,0,1], output_padding 1 -> BN -> Relu

        x --> [convT1 s=2 g=group] --> [bn1] --> [relu1] --> y(N,6,11,10)
    """
    b = _Builder(f"conv_transpose_bn_g{group}", seed)
    x = b.input("x", ["N", 4, 5, 5])
    h = b.conv_transpose(
        x, 4, 6, [3, 3], group=group, strides=[2, 2], pads=[1, 1, 0, 1], output_padding=[1, 1],
        base="convT1",
    )
    b.output(b.relu(b.bn(h, 6, "bn1"), "relu1", out="y"))
    return b.build()


def conv1d_bn(seed: int = 6) -> onnx.ModelProto:
    """x(N,3,10) -> Conv1d k=3 pad 1 -> BN -> Relu -> Conv1d k=3 stride 2 -> BN -> y

        x --> [conv1] --> [bn1] --> [relu1] --> [conv2 s=2] --> [bn2] --> y
    """
    b = _Builder("conv1d_bn", seed)
    x = b.input("x", ["N", 3, 10])
    h = b.relu(b.bn(b.conv(x, 3, 4, [3], pads=[1, 1], base="conv1"), 4, "bn1"), "relu1")
    h = b.conv(h, 4, 4, [3], strides=[2], base="conv2")
    b.output(b.bn(h, 4, "bn2", out="y"))
    return b.build()


def conv3d_bn(seed: int = 7) -> onnx.ModelProto:
    """x(N,2,4,5,6) -> Conv3d 3x3x3 pad 1 -> BN -> Relu -> y(N,3,4,5,6)

        x --> [conv1 3d] --> [bn1] --> [relu1] --> y
    """
    b = _Builder("conv3d_bn", seed)
    x = b.input("x", ["N", 2, 4, 5, 6])
    h = b.conv(x, 2, 3, [3, 3, 3], pads=[1] * 6, base="conv1")
    b.output(b.relu(b.bn(h, 3, "bn1"), "relu1", out="y"))
    return b.build()


# ----------------------------------------------------------------------------------------------
# BN over (N, C): Gemm / MatMul
# ----------------------------------------------------------------------------------------------

def gemm_bn1d(trans_b: bool = True, with_c: bool = True, seed: int = 8) -> onnx.ModelProto:
    """x(N,6) -> Gemm(alpha=0.7, beta=1.3, transB, optional C) -> BN over (N,5) -> Relu

        x --> [gemm1] --> [bn1] --> [relu1] --> y(N,5)
    """
    b = _Builder("gemm_bn1d", seed)
    x = b.input("x", ["N", 6])
    ins = [x, b.weight("gemm1_B", [5, 6] if trans_b else [6, 5], 6)]
    if with_c:
        ins.append(b.small("gemm1_C", [5]))
    h = b.node("Gemm", ins, "gemm1", alpha=0.7, beta=1.3, transB=int(trans_b))
    b.output(b.relu(b.bn(h, 5, "bn1"), "relu1", out="y"))
    return b.build()


def matmul_add_bn1d(seed: int = 9) -> onnx.ModelProto:
    """x(N,6) -> MatMul W(6,5) -> Add b(5) -> BN over (N,5) -> Relu

        x --> [matmul1] --> [add1] --> [bn1] --> [relu1] --> y
    """
    b = _Builder("matmul_add_bn1d", seed)
    x = b.input("x", ["N", 6])
    h = b.node("MatMul", [x, b.weight("matmul1_W", [6, 5], 6)], "matmul1")
    h = b.node("Add", [h, b.small("add1_b", [5])], "add1")
    b.output(b.relu(b.bn(h, 5, "bn1"), "relu1", out="y"))
    return b.build()


# ----------------------------------------------------------------------------------------------
# Several BN levels / shared tensors
# ----------------------------------------------------------------------------------------------

def residual_block(downsample: bool = True, seed: int = 10) -> onnx.ModelProto:
    """A ResNet basic block followed by one more conv -> BN; BN levels 0, 1, 2.

        x(N,4,8,8) --+--> [conv_a] -> [bn_a] -> [relu_a] -> [conv_b] -> [bn_b] --+
                     |                                                          [add] -> [relu_add] -> h
                     +--> [conv_ds 1x1 s2] -> [bn_ds] ---------------------------+       |
                          (identity instead when downsample=False)                      |
        h --> [conv_c] --> [bn_c] --> [relu_c] --> y                                     +--> graph output h

    bn_a and bn_ds are level 0, bn_b level 1, bn_c level 2; bn_ds's output crosses to the
    add consumed below level 1, and h is both a graph output and bn_c's ancestor.
    """
    b = _Builder("residual_block", seed)
    x = b.input("x", ["N", 4, 8, 8])
    cout, stride = (6, 2) if downsample else (4, 1)
    h = b.conv(x, 4, cout, [3, 3], bias=False, strides=[stride] * 2, pads=[1] * 4, base="conv_a")
    h = b.relu(b.bn(h, cout, "bn_a"), "relu_a")
    h = b.conv(h, cout, cout, [3, 3], bias=False, pads=[1] * 4, base="conv_b")
    h = b.bn(h, cout, "bn_b")
    if downsample:
        skip = b.conv(x, 4, cout, [1, 1], bias=False, strides=[2, 2], base="conv_ds")
        skip = b.bn(skip, cout, "bn_ds")
    else:
        skip = x
    h = b.relu(b.node("Add", [h, skip], "add"), "relu_add", out="h")
    y = b.conv(h, cout, 5, [3, 3], pads=[1] * 4, base="conv_c")
    b.output(b.relu(b.bn(y, 5, "bn_c"), "relu_c", out="y"))
    b.output(h)
    return b.build()


def bn_after_bn(seed: int = 11) -> onnx.ModelProto:
    """Conv -> BN -> BN directly (the second BN sees the first one's new output).

        x(N,3,6,6) --> [conv1] --> [bn1] --> [bn2] --> [relu1] --> y
    """
    b = _Builder("bn_after_bn", seed)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.conv(x, 3, 4, [3, 3], pads=[1] * 4, base="conv1")
    b.output(b.relu(b.bn(b.bn(h, 4, "bn1"), 4, "bn2"), "relu1", out="y"))
    return b.build()


def two_bns_one_tensor(seed: int = 12) -> onnx.ModelProto:
    """One tensor normalised by two BNs with different parameters, then summed.

        x(N,3,6,6) --> [conv1] --+--> [bn_a] --> [relu_a] --+
                                 |                          [add] --> y
                                 +--> [bn_b] ---------------+
    """
    b = _Builder("two_bns_one_tensor", seed)
    x = b.input("x", ["N", 3, 6, 6])
    t = b.conv(x, 3, 4, [3, 3], base="conv1")
    a = b.relu(b.bn(t, 4, "bn_a"), "relu_a")
    b.output(b.node("Add", [a, b.bn(t, 4, "bn_b")], "add", out="y"))
    return b.build()


def producer_several_consumers(seed: int = 13) -> onnx.ModelProto:
    """A conv output that feeds a BN and also, un-normalised, a later Add (and a graph output).

        x(N,3,7,7) --> [conv1] --> t --+--> [bn1] --> [relu1] --> [conv2] --> [bn2] --+
                                       |                                            [add] --> [relu2] --> y
                                       +--------------------------------------------+
                                       +--> graph output t
    """
    b = _Builder("producer_several_consumers", seed)
    x = b.input("x", ["N", 3, 7, 7])
    t = b.conv(x, 3, 4, [3, 3], pads=[1] * 4, base="conv1", out="t")
    h = b.relu(b.bn(t, 4, "bn1"), "relu1")
    h = b.bn(b.conv(h, 4, 4, [3, 3], pads=[1] * 4, base="conv2"), 4, "bn2")
    b.output(b.relu(b.node("Add", [h, t], "add"), "relu2", out="y"))
    b.output(t)
    return b.build()


def bn_on_graph_input(seed: int = 14) -> onnx.ModelProto:
    """The first node is a BN on the graph input (nothing before it to fold into).

        x(N,3,7,7) --> [bn_in] --> [conv1] --> [bn1] --> [relu1] --> y
    """
    b = _Builder("bn_on_graph_input", seed)
    x = b.input("x", ["N", 3, 7, 7])
    h = b.conv(b.bn(x, 3, "bn_in"), 3, 4, [3, 3], base="conv1")
    b.output(b.relu(b.bn(h, 4, "bn1"), "relu1", out="y"))
    return b.build()


def bn_not_after_foldable(seed: int = 15) -> onnx.ModelProto:
    """BNs whose producers (Relu, MaxPool) cannot absorb them.

        x(N,3,8,8) --> [conv1] --> [relu1] --> [bn1] --> [pool1 2x2 s2] --> [bn2] --> y(N,4,4,4)
    """
    b = _Builder("bn_not_after_foldable", seed)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.bn(b.relu(b.conv(x, 3, 4, [3, 3], pads=[1] * 4, base="conv1"), "relu1"), 4, "bn1")
    h = b.node("MaxPool", [h], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    b.output(b.bn(h, 4, "bn2", out="y"))
    return b.build()


def multi_input(seed: int = 16) -> onnx.ModelProto:
    """Two graph inputs, each with its own BN path, concatenated, then one more BN.

        img(N,3,6,6) --> [conv_img] --> [bn_img] --> [relu_img] --> [gap] --> [flatten] --+
                                                                                        [concat] --> [gemm_out] --> [bn_out] --> y(N,3)
        vec(N,5) ------> [gemm_vec] --> [bn_vec] --> [relu_vec] ---------------------------+
    """
    b = _Builder("multi_input", seed)
    img = b.input("img", ["N", 3, 6, 6])
    vec = b.input("vec", ["N", 5])
    h = b.relu(b.bn(b.conv(img, 3, 4, [3, 3], base="conv_img"), 4, "bn_img"), "relu_img")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    v = b.node("Gemm", [vec, b.weight("gemm_vec_B", [5, 4], 5), b.small("gemm_vec_C", [4])], "gemm_vec")
    v = b.relu(b.bn(v, 4, "bn_vec"), "relu_vec")
    c = b.node("Concat", [h, v], "concat", axis=1)
    c = b.node("Gemm", [c, b.weight("gemm_out_B", [3, 8], 8)], "gemm_out", transB=1)
    b.output(b.bn(c, 3, "bn_out", out="y"))
    return b.build()


def classifier(seed: int = 17) -> onnx.ModelProto:
    """Input normalisation, two conv -> BN stages, then a head with no BN below it.

        x(N,3,8,8) --> [sub_mean] --> [mul_std] --> [conv1] --> [bn1] --> [relu1]
            --> [conv2 s2] --> [bn2] --> [relu2] --> [gap] --> [flatten] --> [fc] --> [identity] --> logits(N,3)
    """
    b = _Builder("classifier", seed)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.node("Sub", [x, b.const("pix_mean", np.full([3, 1, 1], 0.2))], "sub_mean")
    h = b.node("Mul", [h, b.const("pix_invstd", np.full([3, 1, 1], 1.5))], "mul_std")
    h = b.relu(b.bn(b.conv(h, 3, 4, [3, 3], pads=[1] * 4, base="conv1"), 4, "bn1"), "relu1")
    h = b.conv(h, 4, 6, [3, 3], strides=[2, 2], pads=[1] * 4, base="conv2")
    h = b.relu(b.bn(h, 6, "bn2"), "relu2")
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h], "gap")], "flatten")
    h = b.node("Gemm", [h, b.weight("fc_W", [6, 3], 6), b.small("fc_b", [3])], "fc")
    b.output(b.node("Identity", [h], "identity", out="logits"))
    return b.build()


def inverted_residuals(seed: int = 18) -> onnx.ModelProto:
    """Two MobileNetV2-style blocks, whose 1×1 expansions make the largest cut tensors (what
    `engine.recompute` recomputes instead of keeping them):

        x(N,4,8,8) -> [expand_a 1x1 4->32] -> [bn_a] -> relu -> [dw_a 3x3 s2] -> [bn_b] -> relu
          -> [project_a 1x1 32->8] -> [bn_c] = u(N,8,4,4)
        u -> [expand_b 1x1 8->48] -> [bn_d] -> relu -> [grouped_b 3x3 48->24, 24 groups] -> [bn_e]
          -> relu -> [project_b 1x1 24->8] -> [bn_f] -> [add u] -> y

    Kept per sample across the cuts: 2048 floats after bn_a's level, then 512, 128, 768, 384: the
    two expansions set the peak in turn, and each is recomputable from a tensor 6–8× smaller.
    """
    b = _Builder("inverted_residuals", seed)
    x = b.input("x", ["N", 4, 8, 8])
    h = b.relu(b.bn(b.conv(x, 4, 32, [1, 1], base="expand_a"), 32, "bn_a"))
    h = b.relu(b.bn(b.conv(h, 32, 32, [3, 3], group=32, strides=[2, 2], pads=[1] * 4, base="dw_a"), 32, "bn_b"))
    u = b.bn(b.conv(h, 32, 8, [1, 1], base="project_a"), 8, "bn_c")
    h = b.relu(b.bn(b.conv(u, 8, 48, [1, 1], base="expand_b"), 48, "bn_d"))
    h = b.relu(b.bn(b.conv(h, 48, 24, [3, 3], group=24, pads=[1] * 4, base="grouped_b"), 24, "bn_e"))
    h = b.bn(b.conv(h, 24, 8, [1, 1], base="project_b"), 8, "bn_f")
    b.output(b.node("Add", [h, u], "add", out="y"))
    return b.build()


ALL_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn": functools.partial(conv_bn, bias=True),
    "conv_bn_nobias": functools.partial(conv_bn, bias=False),
    "grouped_conv_bn": grouped_conv_bn,
    "depthwise_conv_bn": depthwise_conv_bn,
    "strided_conv_bn": strided_conv_bn,
    "conv_transpose_bn": functools.partial(conv_transpose_bn, group=1),
    "conv_transpose_bn_g2": functools.partial(conv_transpose_bn, group=2),
    "conv1d_bn": conv1d_bn,
    "conv3d_bn": conv3d_bn,
    "gemm_bn1d": functools.partial(gemm_bn1d, trans_b=True, with_c=True),
    "gemm_bn1d_noT_noC": functools.partial(gemm_bn1d, trans_b=False, with_c=False),
    "gemm_bn1d_T_noC": functools.partial(gemm_bn1d, trans_b=True, with_c=False),
    "gemm_bn1d_noT_C": functools.partial(gemm_bn1d, trans_b=False, with_c=True),
    "matmul_add_bn1d": matmul_add_bn1d,
    "residual_block": functools.partial(residual_block, downsample=True),
    "residual_block_identity": functools.partial(residual_block, downsample=False),
    "bn_after_bn": bn_after_bn,
    "two_bns_one_tensor": two_bns_one_tensor,
    "producer_several_consumers": producer_several_consumers,
    "bn_on_graph_input": bn_on_graph_input,
    "bn_not_after_foldable": bn_not_after_foldable,
    "multi_input": multi_input,
    "classifier": classifier,
    "inverted_residuals": inverted_residuals,
}


def input_shapes(model: onnx.ModelProto, n: int) -> dict[str, tuple[int, ...]]:
    """Graph inputs that are not initializers, symbolic dims (the batch) replaced by ``n``."""
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else n for d in dims)
    return shapes


def make_samples(
    model: onnx.ModelProto, n: int, seed: int = 0, shift: float = 0.5, scale: float = 1.5
) -> dict[str, np.ndarray]:
    """``n`` samples per graph input, float32, from a shifted domain: ``scale * N(0,1) + shift``,
    with an extra per-channel (axis 1) offset so channels move differently. Shapes follow the
    graph inputs with the batch dimension set to ``n``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in input_shapes(model, n).items():
        x = rng.standard_normal(shape) * scale + shift
        if len(shape) >= 2:
            per_channel = np.linspace(-0.5, 0.5, shape[1]).reshape([1, -1] + [1] * (len(shape) - 2))
            x = x + per_channel
        out[name] = x.astype(np.float32)
    return out
