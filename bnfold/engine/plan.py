"""Find the BatchNormalization nodes of a model and cut its graph into stages between BN levels.

Exact eval-mode statistics of BN k need every BN upstream of k to use its *new* statistics. Give
each node a stage: ``stage(n) = max(stage of the producers of n's inputs)``, plus one for a BN over
the stage that makes its input — the BN's *level*, the number of BN nodes on the longest path above
it. Then:

* every input of a level-s BN is computable in stage s using only BNs of levels < s, which are
  already recalibrated when stage s runs;
* BN nodes of the same level do not depend on each other and are measured in the same pass;
* every node runs exactly once per sample over the whole recalibration, so the total cost stays
  close to one inference pass. The tensors that cross a cut (BN inputs, residual branches, graph
  inputs used late) are kept between stages by `store.TensorStore`.

Only nodes upstream of some BN input run at all: classifier heads after the last BN are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx

from bnfold.errors import NoBatchNorm, UnsupportedModel
from bnfold.onnx_graph import constant_tensors, is_batchnorm, is_constant_node, node_inputs


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """One inference-mode BatchNormalization node of the main graph."""

    index: int  # position in graph.node
    name: str  # node name, or a stable synthetic one when the node is unnamed / not unique
    x: str  # the input being normalised, shape (N, C, ...)
    scale: str
    bias: str
    mean: str
    var: str
    epsilon: float
    channels: int


@dataclasses.dataclass
class StagePlan:
    """Which nodes run in which stage, and which tensors cross the cuts.

    ``nodes[s]``: indices into graph.node run in stage s (graph order, so topologically sorted).
    ``inputs[s]``: tensors stage s reads from outside itself (graph inputs or earlier cut tensors).
    ``outputs[s]``: tensors produced in stage s that are measured or needed by a later stage.
    ``measure[s]``: BN input tensors whose statistics are taken during stage s (BNs of level s).
    ``last_use[t]``: the last stage that reads cut tensor t, after which it can be dropped.
    ``late_inputs``: graph inputs read by a stage > 0, so they must be kept from stage 0 on.
    """

    levels: dict[str, int]  # BN name -> level
    nodes: list[list[int]]
    inputs: list[list[str]]
    outputs: list[list[str]]
    measure: list[list[str]]
    last_use: dict[str, int]
    late_inputs: list[str]

    @property
    def num_stages(self) -> int:
        return len(self.nodes)

    def first_stages(self) -> dict[int, int]:
        """node index → the first stage that runs it, i.e. makes its outputs (`engine.recompute`
        may run a node again in later stages)."""
        return {i: s for s in reversed(range(self.num_stages)) for i in self.nodes[s]}


def unique_names(graph: onnx.GraphProto) -> list[str]:
    """A label per node: its name when set and unique, else ``<op_type>#<index>``."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    return [
        node.name if node.name and counts[node.name] == 1 else f"{node.op_type}#{i}"
        for i, node in enumerate(graph.node)
    ]


def find_batchnorms(model: onnx.ModelProto) -> list[BatchNorm]:
    """The BN nodes of the main graph, validated for recalibration (raises `UnsupportedModel`)."""
    graph = model.graph
    constants = constant_tensors(graph)
    names = unique_names(graph)
    consumed = {name for node in graph.node for name in node_inputs(node)}
    consumed |= {o.name for o in graph.output}
    found = []
    for index, node in enumerate(graph.node):
        if is_batchnorm(node):
            found.append(_read_batchnorm(node, index, names[index], constants, consumed))
    return found


def require_batchnorms(model: onnx.ModelProto) -> list[BatchNorm]:
    """`find_batchnorms`, raising `NoBatchNorm` with export advice when there are none."""
    found = find_batchnorms(model)
    if not found:
        raise NoBatchNorm(
            "the model has no BatchNormalization node. It was probably folded into the convolutions "
            "at export: PyTorch folds BN in eval-mode export; keep it with torch.onnx.export(..., "
            "training=torch.onnx.TrainingMode.PRESERVE, dynamo=False). Keras 3 lowers BN to Mul/Add before "
            "tf2onnx sees it; export from tf_keras (Keras 2) with tf2onnx.convert.from_keras(..., optimizers={})."
        )
    return found


def _read_batchnorm(node, index, name, constants, consumed) -> BatchNorm:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("training_mode", 0) != 0 or attrs.get("is_test", 1) == 0:
        raise UnsupportedModel(
            f"BatchNormalization '{name}' runs in training mode (training_mode=1 / is_test=0): it normalises "
            "with each batch's statistics, not stored ones. Export the model in eval mode (model.eval() "
            "before torch.onnx.export) so BN uses its running statistics."
        )
    if any(out and out in consumed for out in node.output[1:]):
        raise UnsupportedModel(
            f"BatchNormalization '{name}' exposes its training outputs (running/saved mean and "
            "variance); bnfold needs inference-mode BN with a single output. Export in eval mode."
        )
    if attrs.get("spatial", 1) != 1:
        raise UnsupportedModel(
            f"BatchNormalization '{name}' has spatial=0 (statistics per activation, not per channel; opsets "
            "7-8): bnfold recalibrates per-channel BN only. Re-export with spatial=1 (the default, what "
            "BatchNorm1d/2d/3d compute) or at opset 9 or later."
        )
    if len(node.input) != 5 or not all(node.input):
        raise UnsupportedModel(f"BatchNormalization '{name}' does not have its five inputs (X, scale, B, mean, "
                               "var, as the ONNX spec requires); re-export the model.")
    x, scale, bias, mean, var = node.input
    for role, tensor in (("scale", scale), ("B", bias), ("input_mean", mean), ("input_var", var)):
        if tensor not in constants:
            raise UnsupportedModel(
                f"BatchNormalization '{name}': its {role} '{tensor}' is computed by the graph from its "
                "inputs, not from constants, so it has no stored value to recalibrate. Export the model with "
                "the BN parameters as initializers (constants or Identity/Cast chains of them are fine)."
            )
    mean_dims, var_dims = list(constants[mean].dims), list(constants[var].dims)
    channels = int(np.prod(mean_dims, dtype=np.int64))
    if len(mean_dims) != 1 or int(np.prod(var_dims, dtype=np.int64)) != channels:
        raise UnsupportedModel(f"BatchNormalization '{name}': mean/var are not 1-D of one length (one value per "
                               "channel, as per-channel BN stores them); re-export the model with per-channel BN.")
    return BatchNorm(index, name, x, scale, bias, mean, var, float(attrs.get("epsilon", 1e-5)), channels)


def plan_stages(model: onnx.ModelProto, batchnorms: Iterable[BatchNorm]) -> StagePlan:
    """Assign nodes to stages (see module docstring) and find the tensors crossing each cut."""
    graph = model.graph
    bn_at = {bn.index: bn for bn in batchnorms}
    producer, runtime_inputs, reads = dataflow(graph)

    stage = [0] * len(graph.node)
    level: dict[int, int] = {}
    for i in range(len(graph.node)):
        before = max((stage[producer[t]] for t in reads[i] if t in producer), default=0)
        if i in bn_at:
            # A BN is measured where its input is made; its output needs that level's statistics.
            # (A BN node with another runtime input — a residual Add that ORT fused into the
            # Conv standing for the BN, engine.native — runs no earlier than that input either.)
            x = bn_at[i].x
            level[i] = stage[producer[x]] if x in producer else 0
            before = max(before, level[i] + 1)
        stage[i] = before

    useful = _ancestors(graph, reads, producer, {bn.x for bn in bn_at.values()})
    num_stages = 1 + max(level.values())
    levels = {bn.name: level[i] for i, bn in bn_at.items()}
    measure = [sorted({bn.x for i, bn in bn_at.items() if level[i] == s}) for s in range(num_stages)]

    # A tensor is a cut tensor when a useful node of a later stage reads it (or it is measured).
    last_use: dict[str, int] = {}
    for i in sorted(useful):
        for t in reads[i]:
            first = stage[producer[t]] if t in producer else 0
            if stage[i] > first:
                last_use[t] = max(last_use.get(t, 0), stage[i])
    outputs = [[] for _ in range(num_stages)]
    for t in sorted(set(last_use) | {x for xs in measure for x in xs}):
        if t in producer and stage[producer[t]] < num_stages:
            outputs[stage[producer[t]]].append(t)
    nodes = [[i for i in sorted(useful) if stage[i] == s] for s in range(num_stages)]
    inputs = []
    for members in nodes:
        made = {out for i in members for out in graph.node[i].output}
        inputs.append(list(dict.fromkeys(t for i in members for t in reads[i] if t not in made)))
    late_inputs = sorted(t for t in last_use if t in runtime_inputs)
    return StagePlan(levels, nodes, inputs, outputs, measure, last_use, late_inputs)


@dataclasses.dataclass
class HeadPlan:
    """What is left to compute one graph output once every stage has run: ``nodes`` (indices into
    graph.node, in graph order) that no stage runs, and the tensors they read that stages make
    (``inputs``, each with the stage that makes it in ``made_in``) or that are graph inputs."""

    output: str
    nodes: list[int]
    inputs: list[str]
    made_in: dict[str, int]


def plan_head(model: onnx.ModelProto, plan: StagePlan, output: str) -> HeadPlan:
    """The rest of the graph after the stages, for `output` (see `HeadPlan`): run on the first
    batches with every BN's new statistics, it gives the adapted model's output without a second
    session over the whole model."""
    graph = model.graph
    producer, _, reads = dataflow(graph)
    staged = plan.first_stages()
    nodes, todo = set(), [producer[output]] if output in producer else []
    while todo:
        i = todo.pop()
        if i not in nodes and i not in staged:
            nodes.add(i)
            todo.extend(producer[t] for t in reads[i] if t in producer)
    made = {out for i in nodes for out in graph.node[i].output}
    wanted = [t for i in sorted(nodes) for t in reads[i] if t not in made]
    if output not in made:  # made by a stage (or a graph input): read as it is
        wanted.append(output)
    inputs = list(dict.fromkeys(wanted))
    return HeadPlan(output, sorted(nodes), inputs, {t: staged[producer[t]] for t in inputs if t in producer})


def dataflow(graph: onnx.GraphProto) -> tuple[dict[str, int], set[str], list[list[str]]]:
    """producer (tensor → index of the node making it; Constant nodes make none: they are handed
    to every stage as initializers), the runtime graph inputs, and per node the inputs it reads
    that are made by a node or are runtime inputs."""
    producer = {out: i for i, node in enumerate(graph.node) if not is_constant_node(node) for out in node.output if out}
    runtime_inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    reads = [[t for t in node_inputs(node) if t in producer or t in runtime_inputs] for node in graph.node]
    return producer, runtime_inputs, reads


def _ancestors(graph, reads, producer, targets: set[str]) -> set[int]:
    """Indices of the nodes needed to compute `targets`."""
    needed: set[int] = set()
    todo = [producer[t] for t in targets if t in producer]
    while todo:
        i = todo.pop()
        if i not in needed:
            needed.add(i)
            todo.extend(producer[t] for t in reads[i] if t in producer)
    return needed


def stage_model(
    model: onnx.ModelProto,
    plan: StagePlan,
    s: int,
    input_types: dict[str, tuple[int, int]],
    overrides: dict[str, onnx.TensorProto],
    replacements: dict[int, onnx.NodeProto] | None = None,
    output_types: dict[str, tuple[int | None, int | None]] | None = None,
    constants: dict[str, onnx.TensorProto] | None = None,
    input_dims: dict[str, list[int | None]] | None = None,
) -> onnx.ModelProto:
    """A standalone model running stage s: its inputs are cut tensors, its outputs `plan.outputs[s]`.

    ``input_types`` maps each cut tensor / graph input to (onnx elem type, rank), observed from the
    arrays that actually flow, so no shape inference over the whole model is needed.
    ``overrides`` replaces (or adds) constant tensors by name: the new statistics of BNs already
    measured. ``replacements`` swaps graph.node[i] for another node computing the same output.
    ``output_types`` (from shape inference of the whole model, done once) types the outputs where
    known, which makes the stage a checker-valid model; ORT itself would run untyped outputs too.
    ``constants``: `constant_tensors(model.graph)`, when the caller has it already (one per stage
    costs ~2 ms on a 50-level model).
    ``input_dims`` gives stage inputs their static sizes where known (None: dynamic). This matters
    for shape tensors: a ``Resize`` whose ``sizes`` come from ``Shape → Gather → Concat`` in an
    earlier stage must see a 1-D input *of length rank(X)*, or ORT refuses to load the stage.
    """
    part = (plan.nodes[s], plan.inputs[s], plan.outputs[s], f"{model.graph.name}_stage{s}")
    return part_model(model, part, input_types, overrides, replacements, output_types, constants, input_dims)


def part_model(model, part: tuple[list[int], list[str], list[str], str], input_types, overrides, replacements=None,
               output_types=None, constants=None, input_dims=None) -> onnx.ModelProto:
    """`stage_model` for any part = (node indices, input names, output names, graph name), e.g. a
    `HeadPlan`'s."""
    graph = model.graph
    indices, inputs, outputs, name = part
    replacements = replacements or {}
    nodes = [replacements.get(i, graph.node[i]) for i in indices]
    initializers = (constant_tensors(graph) if constants is None else constants) | overrides
    read = list(dict.fromkeys(t for node in nodes for t in node_inputs(node)))
    stage_graph = onnx.helper.make_graph(
        nodes,
        name,
        [_input_value_info(t, input_types[t], (input_dims or {}).get(t)) for t in inputs],
        [_output_value_info(t, (output_types or {}).get(t)) for t in outputs],
        initializer=[initializers[t] for t in read if t in initializers],
    )
    stage = onnx.helper.make_model(
        stage_graph, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    stage.functions.extend(model.functions)
    return stage


def _input_value_info(name: str, elem_rank: tuple[int, int], dims: list[int | None] | None) -> onnx.ValueInfoProto:
    elem_type, rank = elem_rank
    if dims is None or len(dims) != rank:
        dims = [None] * rank
    return onnx.helper.make_tensor_value_info(name, elem_type, dims)


def _output_value_info(name: str, elem_rank: tuple[int | None, int | None] | None) -> onnx.ValueInfoProto:
    if elem_rank is None or None in elem_rank:
        return onnx.ValueInfoProto(name=name)
    return onnx.helper.make_tensor_value_info(name, *_type_and_shape(elem_rank))


def _type_and_shape(elem_rank: tuple[int, int]) -> tuple[int, list[None]]:
    elem_type, rank = elem_rank
    return elem_type, [None] * rank
