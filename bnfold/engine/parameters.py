"""Give every BatchNormalization its own constant parameters before recalibration.

Exporters do not always hand a BN its scale, B, mean and var as initializers of its own:

* PyTorch deduplicates identical initializers, so every BN that was never trained (γ=1, β=0,
  μ=0, σ²=1) reads the one surviving tensor, often through an ``Identity`` per reader;
* other exporters route parameters through ``Constant``, ``Cast``, ``Reshape``, … nodes.

All of these are constants (`onnx_graph.foldable_values`). This pre-pass rewires each BN to
initializers of its own — a private copy of mean and var whenever anything else reads them, so that
writing one BN's new statistics changes no other reader — and leaves the rest of the graph as it was,
except the nodes and initializers that only fed the rewired parameters, which are dropped.

It also drops the running_mean / running_var outputs that an inference-mode BN of opset 14+ lists
but nothing reads: the spec allows them only with ``training_mode=1``, and ONNX Runtime refuses to
load such a node ("number of op outputs should be 1 when training_mode = False").
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

import bnfold.onnx_graph as og
from bnfold.engine.plan import unique_names

_ROLES = ("scale", "B", "input_mean", "input_var")  # BN inputs 1..4, as the ONNX spec names them


def with_private_parameters(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose BNs read constant initializers of their own; notes on what changed.

    A parameter that the graph really computes (from a graph input) is left alone; the BN scan
    (`plan.find_batchnorms`) then refuses the model naming that BN and tensor.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    constants = og.constant_tensors(graph)
    readers = _readers(graph)
    labels = unique_names(graph)
    bns = [i for i, node in enumerate(graph.node) if og.is_batchnorm(node) and len(node.input) == 5]
    computed = {t for i in bns for t in graph.node[i].input[1:] if t and t not in constants}
    values = og.foldable_values(graph, computed, og.opset_version(model)) if computed else {}
    taken = _names(graph)
    copied: dict[str, list[str]] = {"computed": [], "shared": []}
    rewired = set()
    for index in bns:
        node, label = graph.node[index], labels[index]
        for slot, role in enumerate(_ROLES, start=1):
            tensor = node.input[slot]
            statistic = role in ("input_mean", "input_var")
            if tensor in constants and not (statistic and readers.get(tensor, 0) > 1):
                continue
            if tensor not in constants and tensor not in values:
                continue
            private = _fresh(f"{tensor}__{label}", taken)
            if tensor in constants:
                copy = onnx.TensorProto()
                copy.CopyFrom(constants[tensor])
                copy.name = private
            else:
                copy = numpy_helper.from_array(values[tensor], private)
            graph.initializer.append(copy)
            if model.ir_version < 4:  # every initializer is also a graph input there
                graph.input.append(onnx.helper.make_tensor_value_info(private, copy.data_type, list(copy.dims)))
            node.input[slot] = private
            readers[tensor] -= 1
            rewired.add(tensor)
            copied["shared" if tensor in constants else "computed"].append(f"{label}: {role} '{tensor}'")
    _drop_unread(graph, rewired, model.ir_version < 4)
    notes = [_note(copied["computed"], "computed from constants (e.g. an Identity of a deduplicated initializer)"),
             _note(copied["shared"], "statistics tensors shared with other readers")]
    notes = [n for n in notes if n]
    if og.opset_version(work) >= 14:
        notes += _drop_unused_training_outputs(graph, unique_names(graph))
    return work, notes


def _note(items: list[str], what: str) -> str | None:
    if not items:
        return None
    shown = "; ".join(items[:3]) + ("; …" if len(items) > 3 else "")
    return f"{len(items)} BN parameter(s) were {what}; each BN now reads its own copy ({shown})"


def _drop_unused_training_outputs(graph: onnx.GraphProto, labels: list[str]) -> list[str]:
    readers = _readers(graph)
    notes = []
    for node, label in zip(graph.node, labels):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if not og.is_batchnorm(node) or attrs.get("training_mode", 0) or len(node.output) < 2:
            continue
        if any(readers.get(out, 0) for out in node.output[1:] if out):
            continue  # used: `plan.find_batchnorms` refuses the model, naming the BN
        del node.output[1:]
        notes.append(f"BN '{label}': dropped its unused running_mean/var outputs (opset 14+ allows them only "
                     "with training_mode=1)")
    return notes


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in og.node_inputs(node):
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    return readers


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input, node.output)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}__{count}"
    taken.add(name)
    return name


def _drop_unread(graph: onnx.GraphProto, start: set[str], legacy_inputs: bool) -> None:
    """Remove the nodes and initializers that, after rewiring, nothing reads any more.

    Only walks up from the rewired tensors, so unused parts of the graph that were already there
    stay as the user had them."""
    readers = _readers(graph)
    todo = [t for t in start if readers.get(t, 0) == 0]
    dead_nodes: set[int] = set()
    dead_inits: set[str] = set()
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    # an initializer that is also a graph input (IR ≥ 4) is a default the caller may override: keep it
    declared = set() if legacy_inputs else {v.name for v in graph.input}
    init_names = {t.name for t in graph.initializer} - declared
    while todo:
        t = todo.pop()
        if t in producer and producer[t] not in dead_nodes:
            node = graph.node[producer[t]]
            if all(readers.get(out, 0) == 0 for out in node.output if out):
                dead_nodes.add(producer[t])
                for i in og.node_inputs(node):
                    readers[i] -= 1
                    if readers[i] == 0:
                        todo.append(i)
        elif t in init_names:
            dead_inits.add(t)
    for i in sorted(dead_nodes, reverse=True):
        del graph.node[i]
    for i in reversed([i for i, init in enumerate(graph.initializer) if init.name in dead_inits]):
        del graph.initializer[i]
    if legacy_inputs:
        for i in reversed([i for i, v in enumerate(graph.input) if v.name in dead_inits]):
            del graph.input[i]
