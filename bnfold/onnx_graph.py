"""ONNX graph helpers shared by the engine and folding (neither imports the other).

What counts as a constant (initializers and ``Constant`` nodes), which tensors a node reads
(including outer-scope names read inside If/Loop/Scan bodies), the default-domain opset, and
element type / rank of every value from one weightless shape inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

DEFAULT_DOMAINS = ("", "ai.onnx")
_LARGE = 1024  # elements: initializers above this are stood in for by typed inputs during inference


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in DEFAULT_DOMAINS


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset (a model that imports none gets the newest this onnx knows)."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), onnx.defs.onnx_opset_version())


def is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of If / Loop / Scan (any GRAPH or GRAPHS attribute)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def subgraph_batchnorms(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The BatchNormalization nodes inside the If / Loop / Scan bodies of `graph`, at any depth."""
    found = []
    for node in graph.node:
        for sub in subgraphs(node):
            found += [inner for inner in sub.node if is_batchnorm(inner)]
            found += subgraph_batchnorms(sub)
    return found


def constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a `Constant` node as a tensor named like its output (None: not numeric)."""
    if not is_constant_node(node) or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
    elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
        value = np.asarray(onnx.helper.get_attribute_value(attr))
        tensor = numpy_helper.from_array(value.astype(np.float32 if "float" in attr.name else np.int64))
    else:  # sparse / string constants never feed BN statistics or foldable weights
        return None
    tensor.name = node.output[0]
    return tensor


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Tensors known without running the graph: initializers and the values of `Constant` nodes."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        tensor = constant_node_tensor(node)
        if tensor is not None:
            tensors[tensor.name] = tensor
    return tensors


def constant_values(graph: onnx.GraphProto, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The values of the named constants, or of all (converting every weight costs time)."""
    tensors = constant_tensors(graph)
    return {name: numpy_helper.to_array(tensors[name]) for name in (tensors if names is None else names)}


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs plus outer-scope names used inside its subgraphs."""
    names = [name for name in node.input if name]
    for sub in subgraphs(node):
        names.extend(_outer_scope_names(sub))
    return names


def _outer_scope_names(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    outer = []
    for node in graph.node:
        outer.extend(name for name in node_inputs(node) if name not in local)
        local.update(node.output)
    outer.extend(o.name for o in graph.output if o.name not in local)
    return outer


def value_types(model: onnx.ModelProto) -> dict[str, tuple[int | None, int | None]]:
    """name → (elem_type, rank) from ONNX shape inference; empty where inference fails."""
    try:
        inferred = shape_inference.infer_shapes(_without_weights(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - custom ops or >2 GiB: fold with less information
        inferred = model
    types = {}
    g = inferred.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            types[vi.name] = (t.elem_type or None, len(t.shape.dim) if t.HasField("shape") else None)
    return types


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference in which large initializers are graph inputs of the same type.

    Inference reads only the values of small (shape-like) constants; serialising every weight
    into it would dominate the time to fold a large model.
    """
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    source, graph = model.graph, light.graph
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(source, field))
    declared = {v.name for v in source.input}
    for t in source.initializer:
        if np.prod(t.dims, dtype=np.int64) <= _LARGE:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light
