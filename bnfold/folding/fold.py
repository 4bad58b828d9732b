"""Fold eval-mode BatchNormalization into neighbouring linear layers, exactly.

In inference mode a BatchNormalization node is a per-channel affine map along axis 1,

    y = a·x + b,   a = scale / sqrt(var + eps),   b = B − mean·a        (shapes (C,)),

so it can be absorbed into a linear layer next to it. All folded weights are computed in
float64 from the stored tensors and cast back once to the tensor's own dtype (float16 models
stay float16); nothing is approximated beyond that single rounding.

Backward (BN after the layer; the layer's output must feed only the BN):

* ``Conv`` W (M, C/group, k…): W'[m] = a[m]·W[m], bias' = a·bias + b (bias created if absent).
  Any ``group`` (depthwise included), 1D/2D/3D.
* ``ConvTranspose`` W (C_in, M/group, k…): output channel m = g·(M/group) + j is fed by
  W[g·C_in/group : (g+1)·C_in/group, j], so W' = W scaled by a reshaped to (group, 1, M/group).
* ``Gemm`` Y = α·A'·B' + β·C (A' = Aᵀ if transA, B' = Bᵀ if transB), B constant: scale the
  columns of B' by a and set C' = a·β·C + b with β' = 1. C broadcast as (N,), (1, N), (M, 1) or
  a scalar is expanded by that product; C is created when absent (optional from opset 11).
* ``MatMul`` X (M, K) @ W (K, N), W constant, output rank 2, optionally followed by ``Add`` of a
  constant c: W' = W·a (columns), c' = a·c + b; without the Add one ``Add(·, b)`` is appended.
* ``Concat`` (axis 1) of Conv/ConvTranspose/Gemm outputs, each read only by the Concat (MixNet's
  split convolutions): input i holds BN channels [o_i, o_i + C_i), so its layer absorbs
  a[o_i : o_i + C_i] and b[o_i : o_i + C_i] as above. All layers are checked before any is changed.
* ``Transpose`` chains after a Conv/ConvTranspose/Gemm (tf2onnx's NHWC↔NCHW pairs): the BN's axis 1
  is the layer's axis perm₁[…permₖ[1]]; when that is 1 the layer absorbs the BN and the Transposes
  stay (a·T(z) + b = T(a·z + b) when a, b run along z's channel axis).

Forward (BN before the layer; the BN output must feed only that layer's data input):

* ``Conv``: W'[m, ci] = W[m, ci]·a[g(m)·C/group + ci], bias' = bias + Σ_{ci,k} W[m, ci, k]·b[…].
  Exact only when the convolution does not pad, or b = 0: padding inserts zeros *after* the
  affine map, where the unfolded model would have had a·0 + b = b.
* ``Gemm`` with transA = 0: B' = diag(a)·B', C' = β·C + α·b·B', β' = 1.

Rules are tried in that order (backward, forward). A BN that no rule folds exactly (e.g.
DenseNet's BNs after a Concat whose inputs later blocks read too, followed by Relu) is by default kept as BatchNormalization
(``unfoldable="keep"``): one op in every runtime, and its statistics are already the model's. With
``unfoldable="affine"`` (for runtimes without BatchNormalization) it becomes
``Mul(x, a) → Add(·, b)`` with constants of shape (C, 1, …, 1), which broadcast over axis 1. A
rule whose folded tensor would overflow its dtype (float16) does not apply. BNs that are not an
affine map (``training_mode=1``, ``spatial=0`` of opset < 9, non-constant parameters,
var + eps ≤ 0) are kept, with a reason. Only the main graph is rewritten; BNs inside
If/Loop/Scan bodies are kept and reported.

The tensor a BN wrote keeps its name (the absorbing layer or the Add writes it), so a BN output
that is a graph output stays one. Constants are initializers that no graph input overrides
(before IR 4 all of them, and new ones are listed as inputs too) and ``Constant`` nodes. Shared
weights are never modified in place: every folded tensor is a new initializer, and initializers
(and ``Constant`` nodes) that folding leaves unused are dropped. Graph input and output names,
shapes, opset imports, IR version and metadata are kept; only Mul and Add are ever added.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Literal

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import helper, shape_inference

from bnfold.errors import InvalidOptions, VerificationFailed, plural
from bnfold.folding.edit import EditableGraph
from bnfold.onnx_graph import DEFAULT_DOMAINS, subgraph_batchnorms

Fate = Literal["folded_backward", "folded_forward", "affine", "kept"]
FATES: tuple[str, ...] = ("folded_backward", "folded_forward", "affine", "kept")
#: what becomes of a BN no rule folds exactly: kept as BatchNormalization, or Mul + Add
UNFOLDABLE: tuple[str, ...] = ("keep", "affine")


@dataclasses.dataclass
class FoldDecision:
    """What happened to one BatchNormalization node.

    ``bn`` is the node name (``BatchNormalization(<output>)`` when unnamed), ``into`` the node
    that absorbed it (None for ``affine`` and ``kept``), ``reason`` a sentence a user can act on.
    """

    bn: str
    fate: Fate
    into: str | None
    reason: str


@dataclasses.dataclass
class FoldResult:
    """A new model (the input is not mutated) and one decision per BN, in graph order.

    ``removed_initializers``: initializers and ``Constant`` outputs that folding left unused;
    ``warnings``: e.g. that the input model itself already fails ``onnx.checker``.
    """

    model: onnx.ModelProto
    decisions: list[FoldDecision]
    removed_initializers: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        seen = Counter(d.fate for d in self.decisions)
        return {fate: seen.get(fate, 0) for fate in FATES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "counts": self.counts,
            "removed_initializers": list(self.removed_initializers),
            "warnings": list(self.warnings),
        }


class _Skip(Exception):
    """A folding rule does not apply; the message says why (it ends up in the report)."""


@dataclasses.dataclass
class _Affine:
    """BN as y = a·x + b; a, b float64 of shape (C,)."""

    a: np.ndarray
    b: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.a.shape[0])


def fold_batchnorms(model: onnx.ModelProto, unfoldable: str = "keep") -> FoldResult:
    """Fold every BatchNormalization of the main graph where exact (see module docstring).

    unfoldable: "keep" a BN that no rule folds, or turn it into Mul + Add ("affine").
    Raises ``InvalidOptions`` for another `unfoldable`, ``VerificationFailed`` if the rewritten
    model fails ``onnx.checker`` while the input passes it (a bnfold bug; nothing should be written).
    """
    if unfoldable not in UNFOLDABLE:
        raise InvalidOptions(f"unfoldable must be one of {', '.join(UNFOLDABLE)}, got {unfoldable!r}")
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = EditableGraph(folded)
    decisions = [_fold_one(graph, bn, unfoldable) for bn in graph.batchnorms()]
    decisions += [
        FoldDecision(_label(bn), "kept", None, "inside an If/Loop/Scan body; only the main graph is folded")
        for bn in subgraph_batchnorms(folded.graph)
    ]
    removed = graph.finish()
    warnings = _check(folded, model)
    return FoldResult(folded, decisions, removed, warnings)


# --------------------------------------------------------------------------- per-BN decision


def _fold_one(g: EditableGraph, bn: onnx.NodeProto, unfoldable: str) -> FoldDecision:
    name = _label(bn)
    try:
        aff = _bn_affine(g, bn)
    except _Skip as why:
        return FoldDecision(name, "kept", None, str(why))
    reasons = []
    for fate, rule in (("folded_backward", _fold_backward), ("folded_forward", _fold_forward)):
        try:
            into, how = rule(g, bn, aff)
            return FoldDecision(name, fate, into, how)
        except _Skip as why:
            reasons.append(f"{fate.split('_')[1]}: {why}")
    if unfoldable == "keep":
        return FoldDecision(name, "kept", None, "no exact linear neighbour (" + "; ".join(reasons) + "); kept as "
                            "BatchNormalization (--unfoldable affine, unfoldable='affine' in the library/SDK/service, "
                            "writes Mul + Add instead)")
    try:
        _to_affine(g, bn, aff)
    except _Skip as why:
        return FoldDecision(name, "kept", None, "; ".join([*reasons, f"affine: {why}"]))
    return FoldDecision(name, "affine", None, "replaced by Mul + Add (" + "; ".join(reasons) + ")")


def _bn_affine(g: EditableGraph, bn: onnx.NodeProto) -> _Affine:
    attrs = _attrs(bn)
    if attrs.get("training_mode", 0):
        raise _Skip("training_mode=1: the BN normalises with batch statistics, not an affine map")
    if attrs.get("spatial", 1) == 0:
        raise _Skip("spatial=0: per-activation statistics (opset < 9) are not folded")
    if "is_test" in attrs and not attrs["is_test"]:
        raise _Skip("is_test=0: the BN runs in training mode (opset < 7)")
    if any(out and (g.consumers(out) or out in g.graph_outputs) for out in bn.output[1:]):
        raise _Skip("its running-statistics outputs are used")
    params = [g.const(name) for name in bn.input[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        raise _Skip("scale, B, mean and var are not all constant")
    scale, bias, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
    if not scale.shape == bias.shape == mean.shape == var.shape:
        raise _Skip("scale, B, mean and var have different lengths")
    denom = var + float(attrs.get("epsilon", 1e-5))
    if not np.all(denom > 0):
        raise _Skip("var + epsilon ≤ 0 in some channel; the BN output is not finite")
    a = scale / np.sqrt(denom)
    b = bias - mean * a
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise _Skip("non-finite BN parameters")
    return _Affine(a, b)


# --------------------------------------------------------------------------- backward rules


def _fold_backward(g: EditableGraph, bn: onnx.NodeProto, aff: _Affine) -> tuple[str, str]:
    x = bn.input[0]
    producer = g.producer(x)
    if producer is None:
        raise _Skip("its input is a graph input or a constant")
    _sole_use(g, x, bn, "its input")
    rule = _BACKWARD.get(producer.op_type) if producer.domain in DEFAULT_DOMAINS else None
    if rule is None:
        raise _Skip(f"its producer {producer.op_type} is not Conv, ConvTranspose, Gemm, MatMul, Concat or Transpose")
    into, how = rule(g, bn, producer, aff)
    g.remove(bn)
    return into, how


def _backward_into_layer(g: EditableGraph, bn, layer, aff: _Affine) -> tuple[str, str]:
    """Conv / ConvTranspose / Gemm → BN: the layer absorbs the BN and writes its output."""
    how = _apply_plan(g, layer, _layer_plan(g, layer, aff))
    layer.output[0] = bn.output[0]
    return _label(layer), how


def _layer_plan(g: EditableGraph, layer, aff: _Affine) -> tuple[np.ndarray, np.ndarray, str]:
    """The folded (weight, bias) of a Conv/ConvTranspose/Gemm, cast to their dtypes, and how.

    Nothing is written, so several layers can be checked before any is changed.
    """
    rule = _LAYERS.get(layer.op_type) if layer.domain in DEFAULT_DOMAINS else None
    if rule is None:
        raise _Skip(f"{_label(layer)} is {layer.op_type}, not Conv, ConvTranspose or Gemm")
    w64, bias64, how = rule(g, layer, aff)
    w, bias = _cast_pair(g, layer, w64, bias64)
    return w, bias, how


def _apply_plan(g: EditableGraph, layer, plan: tuple[np.ndarray, np.ndarray, str]) -> str:
    w, bias, how = plan
    _install(g, layer, w, bias)
    if layer.op_type == "Gemm":
        _drop_beta(layer)
    return how


def _out_channels(g: EditableGraph, layer) -> int:
    """Output channels (axis 1) of a Conv/ConvTranspose/Gemm, read from its constant weight."""
    if layer.op_type not in _LAYERS or layer.domain not in DEFAULT_DOMAINS:
        raise _Skip(f"{_label(layer)} is {layer.op_type}, not Conv, ConvTranspose or Gemm")
    w = _require_const(g, layer.input[1], f"the {layer.op_type} weight")
    attrs = _attrs(layer)
    if layer.op_type == "ConvTranspose":
        return int(attrs.get("group", 1)) * int(w.shape[1])
    if layer.op_type == "Gemm":
        return int(w.shape[0] if attrs.get("transB", 0) else w.shape[1])
    return int(w.shape[0])


def _backward_concat(g: EditableGraph, bn, concat, aff: _Affine) -> tuple[str, str]:
    """Concat(axis=1) of layer outputs → BN: each layer absorbs its slice of a and b.

    Input i covers channels [o_i, o_i + C_i) of the BN; its producer gets a[o_i:o_i+C_i],
    b[o_i:o_i+C_i]. Every input must be a Conv/ConvTranspose/Gemm output read only by the Concat.
    """
    axis, rank = int(_attrs(concat).get("axis", 1)), g.rank(bn.input[0])
    if axis < 0 and rank is not None:
        axis += rank
    if axis != 1:
        raise _Skip(f"its producer Concat joins axis {axis}, not the channel axis 1")
    layers = []
    for name in concat.input:
        layer = g.producer(name)
        if layer is None:
            raise _Skip(f"Concat input {name!r} is a graph input or a constant")
        _sole_use(g, name, concat, f"Concat input {name!r}")
        if layer.op_type not in _LAYERS or layer.domain not in DEFAULT_DOMAINS:
            raise _Skip(f"Concat input {name!r} comes from {layer.op_type}, not Conv, ConvTranspose or Gemm")
        layers.append(layer)
    sizes = [_out_channels(g, layer) for layer in layers]
    if sum(sizes) != aff.channels:
        raise _Skip(f"the Concat inputs have {sum(sizes)} channels, the BN {aff.channels}")
    edges = np.cumsum([0, *sizes])
    plans = [_layer_plan(g, layer, _Affine(aff.a[lo:hi], aff.b[lo:hi]))
             for layer, lo, hi in zip(layers, edges[:-1], edges[1:])]
    for layer, plan in zip(layers, plans):  # all planned first: a refusal leaves the graph as it was
        _apply_plan(g, layer, plan)
    concat.output[0] = bn.output[0]
    return ", ".join(_label(layer) for layer in layers), f"split along the Concat into {len(layers)} layers: " + plans[0][2]


def _backward_transpose(g: EditableGraph, bn, transpose, aff: _Affine) -> tuple[str, str]:
    """Layer → Transpose… → BN where the chain maps the BN's axis 1 back to the layer's axis 1.

    y = T(z) and BN scales y's axis 1, which is z's axis perm[1]; through a chain the perms
    compose. When that is the layer's channel axis, a·T(z) + b = T(a·z + b) along it.
    """
    node, axis = transpose, 1
    while node is not None and node.op_type == "Transpose" and node.domain in DEFAULT_DOMAINS:
        perm = _attrs(node).get("perm")
        if perm is None:
            rank = g.rank(node.input[0])
            if rank is None:
                raise _Skip("a Transpose without perm on a tensor of unknown rank")
            perm = list(range(rank))[::-1]
        axis = int(perm[axis])
        _sole_use(g, node.input[0], node, "the Transpose input")
        node = g.producer(node.input[0])
    if node is None:
        raise _Skip("the Transposes before it read a graph input or a constant")
    if axis != 1:
        raise _Skip(f"the Transposes before it map its channel axis to axis {axis} of {_label(node)}")
    if _out_channels(g, node) != aff.channels:
        raise _Skip(f"{_label(node)} has {_out_channels(g, node)} output channels, the BN {aff.channels}")
    how = _apply_plan(g, node, _layer_plan(g, node, aff))
    transpose.output[0] = bn.output[0]  # the layer keeps its output name; the Transposes stay
    return _label(node), how + ", through the Transpose(s) before the BN"


def _backward_conv(g: EditableGraph, conv, aff: _Affine) -> tuple[np.ndarray, np.ndarray, str]:
    w = _require_const(g, conv.input[1], "the Conv weight")
    if w.shape[0] != aff.channels:
        raise _Skip(f"Conv has {w.shape[0]} output channels, the BN {aff.channels}")
    w64 = w.astype(np.float64) * _along(aff.a, 0, w.ndim)
    return w64, _backward_bias(g, conv, aff), "output channels of W scaled by a, bias = a·bias + b"


def _backward_conv_transpose(g: EditableGraph, conv, aff: _Affine) -> tuple[np.ndarray, np.ndarray, str]:
    w = _require_const(g, conv.input[1], "the ConvTranspose weight")
    group = int(_attrs(conv).get("group", 1))
    c_in, per_group, kernel = w.shape[0], w.shape[1], w.shape[2:]
    if group * per_group != aff.channels or c_in % group:
        raise _Skip(f"ConvTranspose has {group * per_group} output channels, the BN {aff.channels}")
    # W is (C_in, M/group, k…); output channel g·(M/group)+j reads W[group g's rows, j].
    w64 = w.astype(np.float64).reshape(group, c_in // group, per_group, *kernel)
    w64 = (w64 * aff.a.reshape(group, 1, per_group, *[1] * len(kernel))).reshape(w.shape)
    how = f"W (C_in, M/group, k…) scaled along axis 1 per group (group={group}), bias = a·bias + b"
    return w64, _backward_bias(g, conv, aff), how


def _backward_bias(g: EditableGraph, conv, aff: _Affine) -> np.ndarray:
    bias = _third_const(g, conv, f"the {conv.op_type} bias")
    return aff.b.copy() if bias is None else bias.astype(np.float64).reshape(-1) * aff.a + aff.b


def _backward_gemm(g: EditableGraph, gemm, aff: _Affine) -> tuple[np.ndarray, np.ndarray, str]:
    attrs = _attrs(gemm)
    w = _require_const(g, gemm.input[1], "Gemm's B")
    trans_b = bool(attrs.get("transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if n != aff.channels:
        raise _Skip(f"Gemm has {n} output columns, the BN {aff.channels}")
    w64 = w.astype(np.float64) * (aff.a[:, None] if trans_b else aff.a[None, :])
    beta = float(attrs.get("beta", 1.0))
    c = _third_const(g, gemm, "Gemm's C")
    # C' = a·(β·C) + b: expanding a broadcast C (scalar, (N,), (1,N), (M,1)) by the product.
    c64 = aff.b if c is None or beta == 0 else beta * c.astype(np.float64) * aff.a + aff.b
    return w64, c64, "columns of B' scaled by a, C = a·β·C + b, β = 1"


def _backward_matmul(g: EditableGraph, bn, matmul, aff: _Affine) -> tuple[str, str]:
    w = _matmul_weight(g, bn, matmul, aff)
    _require_broadcasting(g)
    w_new, b_new = _cast(w.astype(np.float64) * aff.a, w.dtype), _cast(aff.b, w.dtype)
    matmul.input[1] = g.add_initializer(w_new, matmul.input[1])
    new_b = g.add_initializer(b_new, bn.input[2] or "bias")
    add = helper.make_node("Add", [matmul.output[0], new_b], [bn.output[0]], name=g.fresh(_label(bn) + "/bias"))
    g.insert_before(bn, add)
    return _label(matmul), "columns of W scaled by a; the shift b became an Add"


def _backward_add(g: EditableGraph, bn, add, aff: _Affine) -> tuple[str, str]:
    """MatMul(X, W) → Add(·, c) → BN, the ONNX export of Linear → BatchNorm1d."""
    k = next((i for i in (0, 1) if g.const(add.input[1 - i]) is not None), None)
    if k is None:
        raise _Skip("its producer Add has no constant operand")
    matmul = g.producer(add.input[k])
    if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in DEFAULT_DOMAINS:
        raise _Skip("its producer Add does not add a constant to a MatMul")
    _sole_use(g, add.input[k], add, "the MatMul output")
    w = _matmul_weight(g, bn, matmul, aff)
    c = g.const(add.input[1 - k])
    if c.ndim > 2 or c.dtype != w.dtype:
        raise _Skip("the Add constant is not a bias of rank ≤ 2 and the weight's dtype")
    w_new, c_new = _cast(w.astype(np.float64) * aff.a, w.dtype), _cast(c.astype(np.float64) * aff.a + aff.b, c.dtype)
    matmul.input[1] = g.add_initializer(w_new, matmul.input[1])
    add.input[1 - k] = g.add_initializer(c_new, add.input[1 - k])
    add.output[0] = bn.output[0]
    return _label(add), f"columns of W scaled by a in {_label(matmul)}, Add constant = a·c + b"


def _matmul_weight(g: EditableGraph, bn, matmul, aff: _Affine) -> np.ndarray:
    w = _require_const(g, matmul.input[1], "the MatMul weight")
    if w.ndim != 2 or w.shape[1] != aff.channels:
        raise _Skip(f"the MatMul weight has shape {list(w.shape)}, not (K, {aff.channels})")
    # BN normalises axis 1; that is MatMul's feature axis only for a rank-2 product. An X of
    # rank 2 gives one (an Add constant is checked to be rank ≤ 2), whatever inference knows.
    if 2 not in (g.rank(bn.input[0]), g.rank(matmul.input[0])):
        raise _Skip("the MatMul output is not known to be rank 2 (BN's axis 1 is not its feature axis)")
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


# --------------------------------------------------------------------------- forward rules


def _fold_forward(g: EditableGraph, bn: onnx.NodeProto, aff: _Affine) -> tuple[str, str]:
    y = bn.output[0]
    if y in g.graph_outputs:
        raise _Skip("its output is a graph output")
    users = g.consumers(y)
    if len(users) != 1:
        raise _Skip(f"its output has {len(users)} consumers")
    node = users[0]
    if list(node.input).count(y) != 1 or node.input[0] != y:
        raise _Skip(f"its output is not only the data input of {node.op_type}")
    rule = _FORWARD.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
    if rule is None:
        raise _Skip(f"its consumer {node.op_type} is not Conv or Gemm")
    how = rule(g, node, aff)
    node.input[0] = bn.input[0]
    g.remove(bn)
    return _label(node), how


def _forward_conv(g: EditableGraph, conv, aff: _Affine) -> str:
    attrs = _attrs(conv)
    w = _require_const(g, conv.input[1], "the Conv weight")
    group = int(attrs.get("group", 1))
    m, per_group = w.shape[0], w.shape[1]
    if group * per_group != aff.channels or m % group:
        raise _Skip(f"Conv reads {plural(group * per_group, 'channel')}, the BN has {aff.channels}")
    if _pads(attrs) and np.any(aff.b):
        raise _Skip("Conv zero-pads after the BN and b ≠ 0, so the padded border would change")
    wg = w.astype(np.float64).reshape(group, m // group, per_group, -1)
    ag, bg = aff.a.reshape(group, 1, per_group, 1), aff.b.reshape(group, per_group)
    shift = np.einsum("gmck,gc->gm", wg, bg).reshape(m)
    w64 = (wg * ag).reshape(w.shape)
    bias = _third_const(g, conv, "the Conv bias")
    bias64 = np.zeros(m) if bias is None else bias.astype(np.float64).reshape(-1)
    _rewrite(g, conv, w64, bias64 + shift)
    return f"input channels of W scaled by a per group (group={group}), bias += W·b"


def _forward_gemm(g: EditableGraph, gemm, aff: _Affine) -> str:
    attrs = _attrs(gemm)
    if attrs.get("transA", 0):
        raise _Skip("Gemm has transA=1, so the BN channels are its output rows")
    w = _require_const(g, gemm.input[1], "Gemm's B")
    trans_b = bool(attrs.get("transB", 0))
    k = w.shape[1] if trans_b else w.shape[0]
    if k != aff.channels:
        raise _Skip(f"Gemm reads {plural(k, 'feature')}, the BN has {aff.channels}")
    w64 = w.astype(np.float64)
    b_prime = w64.T if trans_b else w64  # B' = (K, N)
    shift = float(attrs.get("alpha", 1.0)) * (aff.b @ b_prime)
    w64 = w64 * (aff.a[None, :] if trans_b else aff.a[:, None])
    beta = float(attrs.get("beta", 1.0))
    c = _third_const(g, gemm, "Gemm's C")
    c64 = shift if c is None or beta == 0 else beta * c.astype(np.float64) + shift
    _rewrite(g, gemm, w64, c64)
    _drop_beta(gemm)
    return "rows of B' scaled by a, C = β·C + α·b·B', β = 1"


_FORWARD = {"Conv": _forward_conv, "Gemm": _forward_gemm}


# --------------------------------------------------------------------------- affine fallback


def _to_affine(g: EditableGraph, bn: onnx.NodeProto, aff: _Affine) -> None:
    x = bn.input[0]
    rank = g.rank(x)
    if rank is None or rank < 2:
        raise _Skip("the rank of its input is unknown, so Mul/Add constants cannot be shaped")
    dtype = g.dtype(x) or (g.const(bn.input[1]).dtype if g.opset < 15 else None)
    if dtype is None:
        raise _Skip("the element type of its input is unknown")
    _require_broadcasting(g)
    shape = (aff.channels,) + (1,) * (rank - 2)  # broadcasts over axis 1 only
    a, b = _cast(aff.a.reshape(shape), dtype), _cast(aff.b.reshape(shape), dtype)
    a_name = g.add_initializer(a, (bn.input[1] or "scale") + "_a")
    b_name = g.add_initializer(b, (bn.input[2] or "bias") + "_b")
    scaled = g.fresh(bn.output[0] + "_scaled")
    g.insert_before(bn, helper.make_node("Mul", [x, a_name], [scaled], name=g.fresh(_label(bn) + "/mul")))
    g.insert_before(bn, helper.make_node("Add", [scaled, b_name], [bn.output[0]], name=g.fresh(_label(bn) + "/add")))
    g.remove(bn)


# --------------------------------------------------------------------------- shared rewriting


def _third(node: onnx.NodeProto) -> str | None:
    """The optional third input (Conv bias, Gemm C); None when absent."""
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _rewrite(g: EditableGraph, node, w64: np.ndarray, bias64: np.ndarray) -> None:
    """New initializers for input 1 (weight) and input 2 (bias or C, created when absent)."""
    _install(g, node, *_cast_pair(g, node, w64, bias64))


def _cast_pair(g: EditableGraph, node, w64: np.ndarray, bias64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast before touching the node, so an overflow leaves the graph as it was."""
    third = _third(node)
    w = _cast(w64, g.const(node.input[1]).dtype)
    return w, _cast(np.asarray(bias64), g.const(third).dtype if third else w.dtype)


def _install(g: EditableGraph, node, w: np.ndarray, bias: np.ndarray) -> None:
    weight, third = node.input[1], _third(node)
    node.input[1] = g.add_initializer(w, weight)
    bias_name = g.add_initializer(bias, third or weight + "_bias")
    if len(node.input) > 2:
        node.input[2] = bias_name
    else:
        node.input.append(bias_name)


def _drop_beta(gemm: onnx.NodeProto) -> None:
    kept = [a for a in gemm.attribute if a.name != "beta"]  # β' = 1, the default in every opset
    del gemm.attribute[:]
    gemm.attribute.extend(kept)


def _require_const(g: EditableGraph, name: str, what: str) -> np.ndarray:
    value = g.const(name)
    if value is None:
        raise _Skip(f"{what} {name!r} is not a constant")
    return value


def _require_broadcasting(g: EditableGraph) -> None:
    if g.opset < 7:
        raise _Skip(f"opset {g.opset} < 7 has no multidirectional broadcasting for Add/Mul")


def _third_const(g: EditableGraph, node, what: str) -> np.ndarray | None:
    """The value of the optional third input (Conv bias, Gemm C); None when absent."""
    return None if _third(node) is None else _require_const(g, node.input[2], what)


def _cast(values: np.ndarray, dtype) -> np.ndarray:
    """float64 → the model's dtype, refusing overflow (e.g. a large a in float16)."""
    with np.errstate(over="ignore"):  # detected just below
        out = np.asarray(values).astype(dtype)
    if not np.all(np.isfinite(out.astype(np.float64)) | ~np.isfinite(values)):
        raise _Skip(f"folded values overflow {np.dtype(dtype).name}")
    return out


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """(C,) → shape broadcasting along ``axis`` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _pads(attrs: dict) -> bool:
    """Whether a Conv may pad its input (with zeros)."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True  # whether it actually pads depends on the runtime input size
    return any(attrs.get("pads", []))


def _sole_use(g: EditableGraph, name: str, user, what: str) -> None:
    if name in g.graph_outputs:
        raise _Skip(f"{what} {name!r} is also a graph output")
    users = g.consumers(name)
    if len(users) != 1 or users[0] is not user or list(user.input).count(name) != 1:
        others = sorted({_label(n) for n in users if n is not user})
        raise _Skip(f"{what} {name!r} is also used by {', '.join(others) or 'the same node twice'}")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _check(folded: onnx.ModelProto, original: onnx.ModelProto) -> list[str]:
    try:
        onnx.checker.check_model(folded, full_check=True)
        return []
    except (ValueError, EncodeError) as err:  # protobuf cannot serialise ≥ 2 GiB; the checker must
        return [f"onnx.checker was not run: {err}"]
    except (onnx.checker.ValidationError, shape_inference.InferenceError) as err:
        try:
            onnx.checker.check_model(original, full_check=True)
        except (onnx.checker.ValidationError, shape_inference.InferenceError) as err0:
            return [f"the input model already fails onnx.checker: {str(err0).splitlines()[0]}"]
        raise VerificationFailed(f"the folded model fails onnx.checker ({err}); this is a bnfold bug") from err


__all__ = ["FATES", "UNFOLDABLE", "Fate", "FoldDecision", "FoldResult", "fold_batchnorms"]
