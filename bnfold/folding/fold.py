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

Rules are tried in that order: `backward`, then `forward` (one module each; `weights` holds what
they share). A BN that no rule folds exactly (e.g.
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

from bnfold.errors import InvalidOptions, VerificationFailed
from bnfold.folding.backward import fold_backward
from bnfold.folding.edit import EditableGraph
from bnfold.folding.forward import fold_forward
from bnfold.folding.weights import (
    Affine,
    Skip,
    attrs_of,
    cast_to,
    label,
    require_broadcasting,
)
from bnfold.onnx_graph import subgraph_batchnorms

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
        FoldDecision(label(bn), "kept", None, "inside an If/Loop/Scan body; only the main graph is folded")
        for bn in subgraph_batchnorms(folded.graph)
    ]
    removed = graph.finish()
    warnings = _check(folded, model)
    return FoldResult(folded, decisions, removed, warnings)


# --------------------------------------------------------------------------- per-BN decision


def _fold_one(g: EditableGraph, bn: onnx.NodeProto, unfoldable: str) -> FoldDecision:
    name = label(bn)
    try:
        aff = _bn_affine(g, bn)
    except Skip as why:
        return FoldDecision(name, "kept", None, str(why))
    reasons = []
    for fate, rule in (("folded_backward", fold_backward), ("folded_forward", fold_forward)):
        try:
            into, how = rule(g, bn, aff)
            return FoldDecision(name, fate, into, how)
        except Skip as why:
            reasons.append(f"{fate.split('_')[1]}: {why}")
    if unfoldable == "keep":
        return FoldDecision(name, "kept", None, "no exact linear neighbour (" + "; ".join(reasons) + "); kept as "
                            "BatchNormalization (--unfoldable affine, unfoldable='affine' in the library/SDK/service, "
                            "writes Mul + Add instead)")
    try:
        _to_affine(g, bn, aff)
    except Skip as why:
        return FoldDecision(name, "kept", None, "; ".join([*reasons, f"affine: {why}"]))
    return FoldDecision(name, "affine", None, "replaced by Mul + Add (" + "; ".join(reasons) + ")")


def _bn_affine(g: EditableGraph, bn: onnx.NodeProto) -> Affine:
    attrs = attrs_of(bn)
    if attrs.get("training_mode", 0):
        raise Skip("training_mode=1: the BN normalises with batch statistics, not an affine map")
    if attrs.get("spatial", 1) == 0:
        raise Skip("spatial=0: per-activation statistics (opset < 9) are not folded")
    if "is_test" in attrs and not attrs["is_test"]:
        raise Skip("is_test=0: the BN runs in training mode (opset < 7)")
    if any(out and (g.consumers(out) or out in g.graph_outputs) for out in bn.output[1:]):
        raise Skip("its running-statistics outputs are used")
    params = [g.const(name) for name in bn.input[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        raise Skip("scale, B, mean and var are not all constant")
    scale, bias, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
    if not scale.shape == bias.shape == mean.shape == var.shape:
        raise Skip("scale, B, mean and var have different lengths")
    denom = var + float(attrs.get("epsilon", 1e-5))
    if not np.all(denom > 0):
        raise Skip("var + epsilon ≤ 0 in some channel; the BN output is not finite")
    a = scale / np.sqrt(denom)
    b = bias - mean * a
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise Skip("non-finite BN parameters")
    return Affine(a, b)




# --------------------------------------------------------------------------- affine fallback


def _to_affine(g: EditableGraph, bn: onnx.NodeProto, aff: Affine) -> None:
    x = bn.input[0]
    rank = g.rank(x)
    if rank is None or rank < 2:
        raise Skip("the rank of its input is unknown, so Mul/Add constants cannot be shaped")
    dtype = g.dtype(x) or (g.const(bn.input[1]).dtype if g.opset < 15 else None)
    if dtype is None:
        raise Skip("the element type of its input is unknown")
    require_broadcasting(g)
    shape = (aff.channels,) + (1,) * (rank - 2)  # broadcasts over axis 1 only
    a, b = cast_to(aff.a.reshape(shape), dtype), cast_to(aff.b.reshape(shape), dtype)
    a_name = g.add_initializer(a, (bn.input[1] or "scale") + "_a")
    b_name = g.add_initializer(b, (bn.input[2] or "bias") + "_b")
    scaled = g.fresh(bn.output[0] + "_scaled")
    g.insert_before(bn, helper.make_node("Mul", [x, a_name], [scaled], name=g.fresh(label(bn) + "/mul")))
    g.insert_before(bn, helper.make_node("Add", [scaled, b_name], [bn.output[0]], name=g.fresh(label(bn) + "/add")))
    g.remove(bn)





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
