"""ONNX graph helpers shared by the engine and folding (neither imports the other).

What counts as a constant (initializers and ``Constant`` nodes), which tensors a node reads
(including outer-scope names read inside If/Loop/Scan bodies), the default-domain opset,
element type / rank / static dims of every value from one weightless shape inference, and the
values of tensors that the graph computes from constants alone (`foldable_values`).
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


# Ops whose result is not a function of their inputs' values: never constant-folded.
_NOT_FOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FOLDABLE_LIMIT = 1 << 24  # elements: a larger constant subgraph stays in the graph (BN parameters are (C,))


def foldable_values(graph: onnx.GraphProto, names: Iterable[str], opset: int) -> dict[str, np.ndarray]:
    """The values of those `names` that the graph computes from constants alone.

    Exporters route parameters through nodes: PyTorch deduplicates identical initializers and
    hands each user an ``Identity`` of the survivor; others add ``Cast``, ``Reshape`` or
    ``Constant`` chains. Such a tensor is as constant as an initializer. Names already constant
    are returned as they are; a name depending on a graph input (or on a random op, a subgraph
    or a custom domain) is left out. `opset`: the model's default-domain opset. Why `onnx.reference`: it implements every standard op to the
    spec, in NumPy, without building an ONNX Runtime session for a handful of small tensors.
    """
    constants = constant_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output if out}
    found: dict[str, np.ndarray] = {}
    needed: dict[str, onnx.NodeProto] = {}
    for name in dict.fromkeys(names):
        if name in constants:
            found[name] = numpy_helper.to_array(constants[name])
        elif (chain := _constant_chain(name, producer, constants)) is not None:
            needed.update(chain)
    targets = [n for n in dict.fromkeys(names) if n not in found and n in needed]
    if not targets:
        return found
    nodes = [node for node in graph.node if any(out in needed for out in node.output)]  # graph order
    leaves = {t for node in nodes for t in node.input if t and t in constants and t not in needed}
    if sum(int(np.prod(constants[t].dims, dtype=np.int64)) for t in leaves) > _FOLDABLE_LIMIT:
        return found
    sub = helper.make_graph(nodes, "foldable", [], [onnx.ValueInfoProto(name=t) for t in targets],
                            initializer=[constants[t] for t in sorted(leaves)])
    try:
        from onnx.reference import ReferenceEvaluator  # imported late: it loads every op's implementation

        values = ReferenceEvaluator(sub, opsets={"": opset}).run(targets, {})
    except Exception:  # noqa: BLE001 - an op the reference cannot run: treat the tensor as computed
        return found
    found.update({t: np.asarray(v) for t, v in zip(targets, values)})
    return found


def _constant_chain(name: str, producer, constants) -> dict[str, onnx.NodeProto] | None:
    """output name → node for every node that `name` needs, if all its leaves are constants."""
    chain: dict[str, onnx.NodeProto] = {}
    todo = [name]
    while todo:
        t = todo.pop()
        if t in constants or t in chain:
            continue
        node = producer.get(t)
        if (node is None or node.domain not in DEFAULT_DOMAINS or node.op_type in _NOT_FOLDABLE
                or next(subgraphs(node), None) is not None):
            return None
        chain.update({out: node for out in node.output if out})
        todo.extend(i for i in node.input if i)
    return chain


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
    return {name: (elem, None if dims is None else len(dims)) for name, (elem, dims) in value_shapes(model).items()}


def value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, list[int | None] | None]]:
    """name → (elem_type, dims) from ONNX shape inference: each dim its static size, or None where
    symbolic or unknown; dims None where not even the rank is known. Empty where inference fails."""
    try:
        inferred = shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - custom ops or >2 GiB: fold with less information
        inferred = model
    shapes = {}
    g = inferred.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
            shapes[vi.name] = (t.elem_type or None, dims)
    return shapes


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
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
