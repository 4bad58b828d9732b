"""Forward rules: a BN before a Conv (no padding, or b = 0) or a Gemm (transA = 0) is absorbed into
that layer's weights and bias (maths in `bnfold.folding.fold`); `fold_forward` raises `Skip` otherwise."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.errors import plural
from bnfold.folding.edit import EditableGraph
from bnfold.folding.weights import (
    Affine,
    Skip,
    attrs_of,
    drop_beta,
    label,
    pads_anything,
    require_const,
    rewrite,
    third_const,
)
from bnfold.onnx_graph import DEFAULT_DOMAINS


def fold_forward(g: EditableGraph, bn: onnx.NodeProto, aff: Affine) -> tuple[str, str]:
    y = bn.output[0]
    if y in g.graph_outputs:
        raise Skip("its output is a graph output")
    users = g.consumers(y)
    if len(users) != 1:
        raise Skip(f"its output has {len(users)} consumers")
    node = users[0]
    if list(node.input).count(y) != 1 or node.input[0] != y:
        raise Skip(f"its output is not only the data input of {node.op_type}")
    rule = _FORWARD.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
    if rule is None:
        raise Skip(f"its consumer {node.op_type} is not Conv or Gemm")
    how = rule(g, node, aff)
    node.input[0] = bn.input[0]
    g.remove(bn)
    return label(node), how


def _forward_conv(g: EditableGraph, conv, aff: Affine) -> str:
    attrs = attrs_of(conv)
    w = require_const(g, conv.input[1], "the Conv weight")
    group = int(attrs.get("group", 1))
    m, per_group = w.shape[0], w.shape[1]
    if group * per_group != aff.channels or m % group:
        raise Skip(f"Conv reads {plural(group * per_group, 'channel')}, the BN has {aff.channels}")
    if pads_anything(attrs) and np.any(aff.b):
        raise Skip("Conv zero-pads after the BN and b ≠ 0, so the padded border would change")
    wg = w.astype(np.float64).reshape(group, m // group, per_group, -1)
    ag, bg = aff.a.reshape(group, 1, per_group, 1), aff.b.reshape(group, per_group)
    shift = np.einsum("gmck,gc->gm", wg, bg).reshape(m)
    w64 = (wg * ag).reshape(w.shape)
    bias = third_const(g, conv, "the Conv bias")
    bias64 = np.zeros(m) if bias is None else bias.astype(np.float64).reshape(-1)
    rewrite(g, conv, w64, bias64 + shift)
    return f"input channels of W scaled by a per group (group={group}), bias += W·b"


def _forward_gemm(g: EditableGraph, gemm, aff: Affine) -> str:
    attrs = attrs_of(gemm)
    if attrs.get("transA", 0):
        raise Skip("Gemm has transA=1, so the BN channels are its output rows")
    w = require_const(g, gemm.input[1], "Gemm's B")
    trans_b = bool(attrs.get("transB", 0))
    k = w.shape[1] if trans_b else w.shape[0]
    if k != aff.channels:
        raise Skip(f"Gemm reads {plural(k, 'feature')}, the BN has {aff.channels}")
    w64 = w.astype(np.float64)
    b_prime = w64.T if trans_b else w64  # B' = (K, N)
    shift = float(attrs.get("alpha", 1.0)) * (aff.b @ b_prime)
    w64 = w64 * (aff.a[None, :] if trans_b else aff.a[:, None])
    beta = float(attrs.get("beta", 1.0))
    c = third_const(g, gemm, "Gemm's C")
    c64 = shift if c is None or beta == 0 else beta * c.astype(np.float64) + shift
    rewrite(g, gemm, w64, c64)
    drop_beta(gemm)
    return "rows of B' scaled by a, C = β·C + α·b·B', β = 1"


_FORWARD = {"Conv": _forward_conv, "Gemm": _forward_gemm}
