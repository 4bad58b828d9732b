"""What the fold rules share: a BN as an affine map, the reason a rule does not apply, and the
helpers that read constant weights and write folded ones (float64 in, cast once to the tensor's dtype,
always as new initializers — a weight read elsewhere is never changed in place)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bnfold.folding.edit import EditableGraph


class Skip(Exception):
    """A folding rule does not apply; the message says why (it ends up in the report)."""


@dataclasses.dataclass
class Affine:
    """BN as y = a·x + b; a, b float64 of shape (C,)."""

    a: np.ndarray
    b: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.a.shape[0])




def third_input(node: onnx.NodeProto) -> str | None:
    """The optional third input (Conv bias, Gemm C); None when absent."""
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def rewrite(g: EditableGraph, node, w64: np.ndarray, bias64: np.ndarray) -> None:
    """New initializers for input 1 (weight) and input 2 (bias or C, created when absent)."""
    install(g, node, *cast_pair(g, node, w64, bias64))


def cast_pair(g: EditableGraph, node, w64: np.ndarray, bias64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast before touching the node, so an overflow leaves the graph as it was."""
    third = third_input(node)
    w = cast_to(w64, g.const(node.input[1]).dtype)
    return w, cast_to(np.asarray(bias64), g.const(third).dtype if third else w.dtype)


def install(g: EditableGraph, node, w: np.ndarray, bias: np.ndarray) -> None:
    weight, third = node.input[1], third_input(node)
    node.input[1] = g.add_initializer(w, weight)
    bias_name = g.add_initializer(bias, third or weight + "_bias")
    if len(node.input) > 2:
        node.input[2] = bias_name
    else:
        node.input.append(bias_name)


def drop_beta(gemm: onnx.NodeProto) -> None:
    kept = [a for a in gemm.attribute if a.name != "beta"]  # β' = 1, the default in every opset
    del gemm.attribute[:]
    gemm.attribute.extend(kept)


def require_const(g: EditableGraph, name: str, what: str) -> np.ndarray:
    value = g.const(name)
    if value is None:
        raise Skip(f"{what} {name!r} is not a constant")
    return value


def require_broadcasting(g: EditableGraph) -> None:
    if g.opset < 7:
        raise Skip(f"opset {g.opset} < 7 has no multidirectional broadcasting for Add/Mul")


def third_const(g: EditableGraph, node, what: str) -> np.ndarray | None:
    """The value of the optional third input (Conv bias, Gemm C); None when absent."""
    return None if third_input(node) is None else require_const(g, node.input[2], what)


def cast_to(values: np.ndarray, dtype) -> np.ndarray:
    """float64 → the model's dtype, refusing overflow (e.g. a large a in float16)."""
    with np.errstate(over="ignore"):  # detected just below
        out = np.asarray(values).astype(dtype)
    if not np.all(np.isfinite(out.astype(np.float64)) | ~np.isfinite(values)):
        raise Skip(f"folded values overflow {np.dtype(dtype).name}")
    return out


def along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """(C,) → shape broadcasting along ``axis`` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def pads_anything(attrs: dict) -> bool:
    """Whether a Conv may pad its input (with zeros)."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True  # whether it actually pads depends on the runtime input size
    return any(attrs.get("pads", []))


def require_sole_use(g: EditableGraph, name: str, user, what: str) -> None:
    if name in g.graph_outputs:
        raise Skip(f"{what} {name!r} is also a graph output")
    users = g.consumers(name)
    if len(users) != 1 or users[0] is not user or list(user.input).count(name) != 1:
        others = sorted({label(n) for n in users if n is not user})
        raise Skip(f"{what} {name!r} is also used by {', '.join(others) or 'the same node twice'}")


def attrs_of(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"
