"""Backward rules: a BN after a Conv / ConvTranspose / Gemm / MatMul(+Add), or after a channel
Concat or a Transpose chain of such layers, is absorbed into the layer's weights (maths in
`bnfold.folding.fold`). `fold_backward` raises `Skip` with the reason when none applies."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold.folding.edit import EditableGraph
from bnfold.folding.weights import (
    Affine,
    Skip,
    along,
    attrs_of,
    cast_pair,
    cast_to,
    drop_beta,
    install,
    label,
    require_broadcasting,
    require_const,
    require_sole_use,
    third_const,
)
from bnfold.onnx_graph import DEFAULT_DOMAINS


def fold_backward(g: EditableGraph, bn: onnx.NodeProto, aff: Affine) -> tuple[str, str]:
    x = bn.input[0]
    producer = g.producer(x)
    if producer is None:
        raise Skip("its input is a graph input or a constant")
    require_sole_use(g, x, bn, "its input")
    rule = _BACKWARD.get(producer.op_type) if producer.domain in DEFAULT_DOMAINS else None
    if rule is None:
        raise Skip(f"its producer {producer.op_type} is not Conv, ConvTranspose, Gemm, MatMul, Concat or Transpose")
    into, how = rule(g, bn, producer, aff)
    g.remove(bn)
    return into, how


def _backward_into_layer(g: EditableGraph, bn, layer, aff: Affine) -> tuple[str, str]:
    """Conv / ConvTranspose / Gemm → BN: the layer absorbs the BN and writes its output."""
    how = _apply_plan(g, layer, _layer_plan(g, layer, aff))
    layer.output[0] = bn.output[0]
    return label(layer), how


def _layer_plan(g: EditableGraph, layer, aff: Affine) -> tuple[np.ndarray, np.ndarray, str]:
    """The folded (weight, bias) of a Conv/ConvTranspose/Gemm, cast to their dtypes, and how.

    Nothing is written, so several layers can be checked before any is changed.
    """
    rule = _LAYERS.get(layer.op_type) if layer.domain in DEFAULT_DOMAINS else None
    if rule is None:
        raise Skip(f"{label(layer)} is {layer.op_type}, not Conv, ConvTranspose or Gemm")
    w64, bias64, how = rule(g, layer, aff)
    w, bias = cast_pair(g, layer, w64, bias64)
    return w, bias, how


def _apply_plan(g: EditableGraph, layer, plan: tuple[np.ndarray, np.ndarray, str]) -> str:
    w, bias, how = plan
    install(g, layer, w, bias)
    if layer.op_type == "Gemm":
        drop_beta(layer)
    return how


def _out_channels(g: EditableGraph, layer) -> int:
    """Output channels (axis 1) of a Conv/ConvTranspose/Gemm, read from its constant weight."""
    if layer.op_type not in _LAYERS or layer.domain not in DEFAULT_DOMAINS:
        raise Skip(f"{label(layer)} is {layer.op_type}, not Conv, ConvTranspose or Gemm")
    w = require_const(g, layer.input[1], f"the {layer.op_type} weight")
    attrs = attrs_of(layer)
    if layer.op_type == "ConvTranspose":
        return int(attrs.get("group", 1)) * int(w.shape[1])
    if layer.op_type == "Gemm":
        return int(w.shape[0] if attrs.get("transB", 0) else w.shape[1])
    return int(w.shape[0])


def _backward_concat(g: EditableGraph, bn, concat, aff: Affine) -> tuple[str, str]:
    """Concat(axis=1) of layer outputs → BN: each layer absorbs its slice of a and b.

    Input i covers channels [o_i, o_i + C_i) of the BN; its producer gets a[o_i:o_i+C_i],
    b[o_i:o_i+C_i]. Every input must be a Conv/ConvTranspose/Gemm output read only by the Concat.
    """
    axis, rank = int(attrs_of(concat).get("axis", 1)), g.rank(bn.input[0])
    if axis < 0 and rank is not None:
        axis += rank
    if axis != 1:
        raise Skip(f"its producer Concat joins axis {axis}, not the channel axis 1")
    layers = []
    for name in concat.input:
        layer = g.producer(name)
        if layer is None:
            raise Skip(f"Concat input {name!r} is a graph input or a constant")
        require_sole_use(g, name, concat, f"Concat input {name!r}")
        if layer.op_type not in _LAYERS or layer.domain not in DEFAULT_DOMAINS:
            raise Skip(f"Concat input {name!r} comes from {layer.op_type}, not Conv, ConvTranspose or Gemm")
        layers.append(layer)
    sizes = [_out_channels(g, layer) for layer in layers]
    if sum(sizes) != aff.channels:
        raise Skip(f"the Concat inputs have {sum(sizes)} channels, the BN {aff.channels}")
    edges = np.cumsum([0, *sizes])
    plans = [_layer_plan(g, layer, Affine(aff.a[lo:hi], aff.b[lo:hi]))
             for layer, lo, hi in zip(layers, edges[:-1], edges[1:])]
    for layer, plan in zip(layers, plans):  # all planned first: a refusal leaves the graph as it was
        _apply_plan(g, layer, plan)
    concat.output[0] = bn.output[0]
    return ", ".join(label(layer) for layer in layers), f"split along the Concat into {len(layers)} layers: " + plans[0][2]


def _backward_transpose(g: EditableGraph, bn, transpose, aff: Affine) -> tuple[str, str]:
    """Layer → Transpose… → BN where the chain maps the BN's axis 1 back to the layer's axis 1.

    y = T(z) and BN scales y's axis 1, which is z's axis perm[1]; through a chain the perms
    compose. When that is the layer's channel axis, a·T(z) + b = T(a·z + b) along it.
    """
    node, axis = transpose, 1
    while node is not None and node.op_type == "Transpose" and node.domain in DEFAULT_DOMAINS:
        perm = attrs_of(node).get("perm")
        if perm is None:
            rank = g.rank(node.input[0])
            if rank is None:
                raise Skip("a Transpose without perm on a tensor of unknown rank")
            perm = list(range(rank))[::-1]
        axis = int(perm[axis])
        require_sole_use(g, node.input[0], node, "the Transpose input")
        node = g.producer(node.input[0])
    if node is None:
        raise Skip("the Transposes before it read a graph input or a constant")
    if axis != 1:
        raise Skip(f"the Transposes before it map its channel axis to axis {axis} of {label(node)}")
    if _out_channels(g, node) != aff.channels:
        raise Skip(f"{label(node)} has {_out_channels(g, node)} output channels, the BN {aff.channels}")
    how = _apply_plan(g, node, _layer_plan(g, node, aff))
    transpose.output[0] = bn.output[0]  # the layer keeps its output name; the Transposes stay
    return label(node), how + ", through the Transpose(s) before the BN"


def _backward_conv(g: EditableGraph, conv, aff: Affine) -> tuple[np.ndarray, np.ndarray, str]:
    w = require_const(g, conv.input[1], "the Conv weight")
    if w.shape[0] != aff.channels:
        raise Skip(f"Conv has {w.shape[0]} output channels, the BN {aff.channels}")
    w64 = w.astype(np.float64) * along(aff.a, 0, w.ndim)
    return w64, _backward_bias(g, conv, aff), "output channels of W scaled by a, bias = a·bias + b"


def _backward_conv_transpose(g: EditableGraph, conv, aff: Affine) -> tuple[np.ndarray, np.ndarray, str]:
    w = require_const(g, conv.input[1], "the ConvTranspose weight")
    group = int(attrs_of(conv).get("group", 1))
    c_in, per_group, kernel = w.shape[0], w.shape[1], w.shape[2:]
    if group * per_group != aff.channels or c_in % group:
        raise Skip(f"ConvTranspose has {group * per_group} output channels, the BN {aff.channels}")
    # W is (C_in, M/group, k…); output channel g·(M/group)+j reads W[group g's rows, j].
    w64 = w.astype(np.float64).reshape(group, c_in // group, per_group, *kernel)
    w64 = (w64 * aff.a.reshape(group, 1, per_group, *[1] * len(kernel))).reshape(w.shape)
    how = f"W (C_in, M/group, k…) scaled along axis 1 per group (group={group}), bias = a·bias + b"
    return w64, _backward_bias(g, conv, aff), how


def _backward_bias(g: EditableGraph, conv, aff: Affine) -> np.ndarray:
    bias = third_const(g, conv, f"the {conv.op_type} bias")
    return aff.b.copy() if bias is None else bias.astype(np.float64).reshape(-1) * aff.a + aff.b


def _backward_gemm(g: EditableGraph, gemm, aff: Affine) -> tuple[np.ndarray, np.ndarray, str]:
    attrs = attrs_of(gemm)
    w = require_const(g, gemm.input[1], "Gemm's B")
    trans_b = bool(attrs.get("transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if n != aff.channels:
        raise Skip(f"Gemm has {n} output columns, the BN {aff.channels}")
    w64 = w.astype(np.float64) * (aff.a[:, None] if trans_b else aff.a[None, :])
    beta = float(attrs.get("beta", 1.0))
    c = third_const(g, gemm, "Gemm's C")
    # C' = a·(β·C) + b: expanding a broadcast C (scalar, (N,), (1,N), (M,1)) by the product.
    c64 = aff.b if c is None or beta == 0 else beta * c.astype(np.float64) * aff.a + aff.b
    return w64, c64, "columns of B' scaled by a, C = a·β·C + b, β = 1"


def _backward_matmul(g: EditableGraph, bn, matmul, aff: Affine) -> tuple[str, str]:
    w = _matmul_weight(g, bn, matmul, aff)
    require_broadcasting(g)
    w_new, b_new = cast_to(w.astype(np.float64) * aff.a, w.dtype), cast_to(aff.b, w.dtype)
    matmul.input[1] = g.add_initializer(w_new, matmul.input[1])
    new_b = g.add_initializer(b_new, bn.input[2] or "bias")
    add = helper.make_node("Add", [matmul.output[0], new_b], [bn.output[0]], name=g.fresh(label(bn) + "/bias"))
    g.insert_before(bn, add)
    return label(matmul), "columns of W scaled by a; the shift b became an Add"


def _backward_add(g: EditableGraph, bn, add, aff: Affine) -> tuple[str, str]:
    """MatMul(X, W) → Add(·, c) → BN, the ONNX export of Linear → BatchNorm1d."""
    k = next((i for i in (0, 1) if g.const(add.input[1 - i]) is not None), None)
    if k is None:
        raise Skip("its producer Add has no constant operand")
    matmul = g.producer(add.input[k])
    if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in DEFAULT_DOMAINS:
        raise Skip("its producer Add does not add a constant to a MatMul")
    require_sole_use(g, add.input[k], add, "the MatMul output")
    w = _matmul_weight(g, bn, matmul, aff)
    c = g.const(add.input[1 - k])
    if c.ndim > 2 or c.dtype != w.dtype:
        raise Skip("the Add constant is not a bias of rank ≤ 2 and the weight's dtype")
    w_new, c_new = cast_to(w.astype(np.float64) * aff.a, w.dtype), cast_to(c.astype(np.float64) * aff.a + aff.b, c.dtype)
    matmul.input[1] = g.add_initializer(w_new, matmul.input[1])
    add.input[1 - k] = g.add_initializer(c_new, add.input[1 - k])
    add.output[0] = bn.output[0]
    return label(add), f"columns of W scaled by a in {label(matmul)}, Add constant = a·c + b"


def _matmul_weight(g: EditableGraph, bn, matmul, aff: Affine) -> np.ndarray:
    w = require_const(g, matmul.input[1], "the MatMul weight")
    if w.ndim != 2 or w.shape[1] != aff.channels:
        raise Skip(f"the MatMul weight has shape {list(w.shape)}, not (K, {aff.channels})")
    # BN normalises axis 1; that is MatMul's feature axis only for a rank-2 product. An X of
    # rank 2 gives one (an Add constant is checked to be rank ≤ 2), whatever inference knows.
    if 2 not in (g.rank(bn.input[0]), g.rank(matmul.input[0])):
        raise Skip("the MatMul output is not known to be rank 2 (BN's axis 1 is not its feature axis)")
    return w


#: layers that absorb a BN after them: (g, layer, aff) → (folded weight, folded bias, how), float64
_LAYERS = {"Conv": _backward_conv, "ConvTranspose": _backward_conv_transpose, "Gemm": _backward_gemm}
_BACKWARD = {
    **dict.fromkeys(_LAYERS, _backward_into_layer),
    "MatMul": _backward_matmul,
    "Add": _backward_add,
    "Concat": _backward_concat,
    "Transpose": _backward_transpose,
}
