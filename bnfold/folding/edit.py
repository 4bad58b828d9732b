"""A model's main graph opened for rewriting, as `bnfold.folding.fold` needs it.

`EditableGraph` takes a model (which it edits in place) and copies out its node list. It answers
what a rewrite rule asks — which node produces or consumes a tensor, whether a tensor is a constant
and its value, its element type and rank from ONNX shape inference — and records the edits: new
initializers under fresh names, inserted and removed nodes. `finish()` writes the node list back and
drops the initializers and ``Constant`` nodes the edits left unused.

A node consumes a tensor when it reads it directly or from inside one of its If/Loop/Scan bodies
(`graph.node_inputs`), so a tensor a body reads is never taken to be free to rewrite or drop.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.onnx_graph import (
    constant_node_tensor,
    foldable_values,
    is_batchnorm,
    is_constant_node,
    node_inputs,
    opset_version,
    subgraphs,
    value_types,
)


class EditableGraph:
    """The main graph as a mutable node list plus constant/shape lookups."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        # Before IR 4 every initializer is also listed as an input, yet it is a constant.
        self.legacy_inputs = model.ir_version < 4
        self.nodes = [_copy(n) for n in self.graph.node]
        self.graph_outputs = {o.name for o in self.graph.output}
        input_names = {i.name for i in self.graph.input}
        self.inits = {
            t.name: t for t in self.graph.initializer if self.legacy_inputs or t.name not in input_names
        }
        self._arrays: dict[str, np.ndarray] = {}
        # Read once: no rewrite edits a node that has a body (If/Loop/Scan), and walking the body
        # again on every consumer query would cost its size each time.
        self._body_reads = {
            id(n): frozenset(node_inputs(n)) for n in self.nodes if next(subgraphs(n), None) is not None
        }
        self.used_before = self._used()
        self.names = _names_in(self.graph)
        self.types = value_types(model)
        self._fresh_count = 0

    def batchnorms(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if is_batchnorm(n)]

    def uses(self, node) -> set[str]:
        return set(node.input) | self._body_reads.get(id(node), frozenset())

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if name in self.uses(n)]

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node computing `name`; None for graph inputs, initializers and ``Constant`` nodes."""
        node = self._writer(name)
        return None if node is None or is_constant_node(node) else node

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant initializer or ``Constant`` node output, or of a tensor computed
        from constants only (e.g. the ``Identity`` of a deduplicated initializer); None otherwise."""
        if name not in self._arrays:
            if name in self.inits:
                self._arrays[name] = numpy_helper.to_array(self.inits[name])
            elif (node := self._writer(name)) is not None and (tensor := constant_node_tensor(node)) is not None:
                self._arrays[name] = numpy_helper.to_array(tensor)
            elif node is not None:
                # graph.node, not self.nodes: a value computed from the model's constants as given
                self._arrays.update(foldable_values(self.graph, [name], self.opset))
        return self._arrays.get(name)

    def rank(self, name: str) -> int | None:
        if (value := self.const(name)) is not None:
            return value.ndim
        return self.types.get(name, (None, None))[1]

    def dtype(self, name: str) -> np.dtype | None:
        elem = self.types.get(name, (None, None))[0]
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None

    def fresh(self, base: str) -> str:
        """`base`, or `base__N`: a name used nowhere in the model, now reserved."""
        name = base
        while name in self.names:
            self._fresh_count += 1
            name = f"{base}__{self._fresh_count}"
        self.names.add(name)
        return name

    def add_initializer(self, value: np.ndarray, base: str) -> str:
        name = self.fresh(f"{base}_bnfold")
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        self._arrays[name] = value
        if self.legacy_inputs:
            self.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, value.shape))
        return name

    def insert_before(self, anchor, node) -> None:
        self.nodes.insert(self._index(anchor), node)

    def remove(self, node) -> None:
        del self.nodes[self._index(node)]

    def finish(self) -> list[str]:
        """Write the node list back; drop constants that folding left unused. Returns their names."""
        # Nodes whose every output the edits left unread go too (the Constant, Identity or Cast
        # that fed a folded parameter), repeatedly up their chain; nothing else is touched.
        dead: list[onnx.NodeProto] = []
        while True:
            unused = self.used_before - self._used()
            newly = [n for n in self.nodes if all(o in unused for o in n.output if o) and any(n.output)]
            if not newly:
                break
            for node in newly:
                self.remove(node)
            dead += newly
        dead = [n for n in dead if is_constant_node(n)]
        removed = sorted({t.name for t in self.graph.initializer if t.name in unused})
        removed += sorted(n.output[0] for n in dead)
        gone = set(removed)
        _drop(self.graph.initializer, lambda t: t.name in gone)
        if self.legacy_inputs:
            _drop(self.graph.input, lambda v: v.name in gone)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        defined = {v.name for v in self.graph.input} | {t.name for t in self.graph.initializer}
        defined |= {o for n in self.nodes for o in n.output}
        _drop(self.graph.value_info, lambda v: v.name not in defined)
        return removed

    def _writer(self, name: str) -> onnx.NodeProto | None:
        return next((n for n in self.nodes if name in n.output), None)

    def _index(self, node) -> int:
        # by identity: NodeProto == compares whole messages
        return next(i for i, n in enumerate(self.nodes) if n is node)

    def _used(self) -> set[str]:
        used = set(self.graph_outputs)
        for node in self.nodes:
            used |= self.uses(node)
        return used


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _names_in(graph: onnx.GraphProto) -> set[str]:
    """Every value and node name of a graph and of its If/Loop/Scan bodies, at any depth.

    New names must avoid all of them, not only the outer-scope names a body reads
    (`graph.node_inputs`): a main-graph name equal to one local to a body would be shadowed there.
    """
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input, node.output, [node.name])
        for sub in subgraphs(node):
            names |= _names_in(sub)
    return names


def _drop(repeated, predicate) -> None:
    # in place, from the back: copying out the kept items would copy every weight
    for i in reversed([i for i, item in enumerate(repeated) if predicate(item)]):
        del repeated[i]


__all__ = ["EditableGraph"]
