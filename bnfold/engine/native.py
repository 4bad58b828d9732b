"""Stage graphs cut from ONNX Runtime's own optimized graph, so cut tensors stay in its layout.

Why: cutting the *source* graph at every BN level hands ORT a new model per level, and its CPU
optimizer converts each one to the blocked NCHWc layout on entry and back on exit. On
mobilenet_v2 at 224×224 those reorders cost 1.3× a whole inference pass (bench/RESULTS.md §5).

How: a *template* of the model, in which every BN is a depthwise 1×1 Conv with marker weights
(the per-channel map y = a·x + b that BN is in eval mode) and every BN input is a graph output,
goes once through ORT's optimizer at its highest level, and the optimized graph is saved. In that
graph each BN input is a plain tensor or a blocked one — behind a ``ReorderOutput`` to it, or
made from it by a ``ReorderInput`` — of shape (N, C_pad, H, W), in memory (N, C_pad/B, H, W, B);
the BN is the optimized Conv that reads it and carries the markers (with its activation and
residual Add fused in, C padded to C_pad). BNs without spatial axes (BN1d after a Linear) or of
unknown rank get their marker on an (N, C, L) view of the input.
`engine.plan` cuts that graph instead of the source; the runner measures blocked tensors with
their block size and writes each BN's a, b (zero-padded) into the optimized Conv's weights.

Exact as before: a, b enter the same float32 Conv ORT's own Conv+BN fusion would run. The
optimized graph is specific to this machine and this onnxruntime build (ORT warns so); it lives
only for one recalibration. Anything this module does not recognise — a BN that is not float32,
ORT fusing something into a marker Conv, a renamed or shared marker — returns None, and the
runner cuts the source graph as before.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from bnfold.engine import plan as g
from bnfold.onnx_graph import constant_tensors, value_shapes, without_weights
from bnfold.runtime import session_options

NCHWC = "com.microsoft.nchwc"


@dataclasses.dataclass
class NativeGraph:
    """ORT's optimized template, and where each source BN is in it.

    ``batchnorms[i]`` stands for source BN i: ``index`` is its marker Conv's position in
    ``model.graph.node``, ``x`` the tensor it reads there (blocked or plain); the other fields are
    the source BN's. ``block[x]``: NCHWc block size of measured tensor x (1: plain NCHW layout).
    ``weights[name]``: the (weight, bias) initializers of BN ``name``'s marker Conv.
    """

    model: onnx.ModelProto
    batchnorms: list[g.BatchNorm]
    block: dict[str, int]
    weights: dict[str, tuple[str, str]]

    def affine(self, bn: g.BatchNorm, a: np.ndarray, b: np.ndarray) -> list[onnx.TensorProto]:
        """The marker Conv's initializers computing y = a·x + b per channel (float64 (C,) each),
        zero-padded to the Conv's padded channel count."""
        constants = self._constants
        tensors = []
        for name, values in zip(self.weights[bn.name], (a, b)):
            dims = list(constants[name].dims)
            padded = np.zeros(int(np.prod(dims)), np.float32)
            padded[: len(values)] = values
            tensors.append(numpy_helper.from_array(padded.reshape(dims), name))
        return tensors

    @functools.cached_property
    def _constants(self) -> dict[str, onnx.TensorProto]:
        return constant_tensors(self.model.graph)


def native_graph(model: onnx.ModelProto, batchnorms: list[g.BatchNorm], types: dict, threads: int) -> NativeGraph | None:
    """The optimized template of `model` (see module docstring), or None where it does not apply.

    types: tensor name → (onnx elem type, dims) from shape inference of the source model."""
    ranks = [len(types.get(bn.x, (None, None))[1] or ()) for bn in batchnorms]
    if not batchnorms or max(ranks) > 5 or any(types.get(bn.x, (None,))[0] != onnx.TensorProto.FLOAT
                                               for bn in batchnorms):
        return None
    try:
        template, inputs = _template(model, batchnorms, ranks)
        optimized = _optimize(template, threads)
    except Exception:  # noqa: BLE001 - ORT's error types are not public; the source-graph path still works
        return None
    return _locate(optimized, batchnorms, inputs)


def _marker(k: int) -> tuple[float, float]:
    """Weight and bias values of BN k's marker Conv: distinct per BN, so no two are deduplicated
    and each is found again by value; exact in float32."""
    return 1.0 + (k + 1) / 4096.0, (k + 1) / 8192.0


def _template(model: onnx.ModelProto, batchnorms: list[g.BatchNorm], ranks: list[int]) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with BN k as a depthwise Conv (kernel 1 on each spatial axis) whose weight and bias
    hold `_marker(k)`, and the tensor each marker reads: the BN input, or where it has no spatial
    axes or an unknown rank (BN1d after a Linear, after a computed Reshape) its (N, C, L) view
    (Reshape → marker → Reshape back to Shape(x); the same numbers, so the same statistics)."""
    template = onnx.ModelProto()
    template.CopyFrom(model)
    graph = template.graph
    replaced, inputs = {}, []
    for k, (bn, rank) in enumerate(zip(batchnorms, ranks)):
        name = f"bnfold::marker::{k}"
        weight, bias = _marker(k)
        viewed = rank < 3  # 2: (N, C); 0: rank unknown
        kernel = [1] * (1 if viewed else rank - 2)
        graph.initializer.extend([
            numpy_helper.from_array(np.full((bn.channels, 1, *kernel), weight, np.float32), f"{name}::weight"),
            numpy_helper.from_array(np.full(bn.channels, bias, np.float32), f"{name}::bias"),
        ])
        x, y = bn.x, graph.node[bn.index].output[0]
        nodes = []
        if viewed:
            graph.initializer.append(numpy_helper.from_array(np.array([0, bn.channels, -1], np.int64), f"{name}::3d"))
            nodes += [onnx.helper.make_node("Reshape", [x, f"{name}::3d"], [f"{name}::input"], name=f"{name}::to3d"),
                      onnx.helper.make_node("Shape", [x], [f"{name}::shape"], name=f"{name}::shape")]
            x, y = f"{name}::input", f"{name}::output"
        nodes.append(onnx.helper.make_node("Conv", [x, f"{name}::weight", f"{name}::bias"], [y], name=name,
                                           group=bn.channels, kernel_shape=kernel))
        if viewed:
            nodes.append(onnx.helper.make_node("Reshape", [y, f"{name}::shape"], [graph.node[bn.index].output[0]],
                                               name=f"{name}::back"))
        replaced[bn.index] = nodes
        inputs.append(x)
    all_nodes = [new for i, node in enumerate(graph.node) for new in replaced.get(i, [node])]
    del graph.node[:]
    graph.node.extend(all_nodes)
    # BN inputs become outputs too, so ORT keeps each in a tensor of its own (in any layout); the
    # model's own outputs stay, so no marker Conv is pruned as unused
    outputs = {o.name for o in graph.output}
    graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)
                        for x in dict.fromkeys(inputs) if x not in outputs)
    return template, inputs


def _optimize(template: onnx.ModelProto, threads: int) -> onnx.ModelProto:
    """ORT's optimized graph of `template` (CPU provider, all levels), as ORT itself saves it."""
    with tempfile.TemporaryDirectory(prefix="bnfold-native-") as tmp:
        options = session_options(threads)
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(template.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def _locate(optimized: onnx.ModelProto, batchnorms: list[g.BatchNorm], inputs: list[str]) -> NativeGraph | None:
    """Each BN's marker Conv in ORT's optimized graph, and the tensor it reads (inputs[k]: the name
    marker k read in the template); None unless every marker is found once, untouched."""
    graph = optimized.graph
    if not _topologically_sorted(graph):
        return None
    constants = constant_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for t in node.input:
            readers.setdefault(t, []).append(i)
    found, block, weights = [], {}, {}
    for k, (bn, read) in enumerate(zip(batchnorms, inputs)):
        # The marker Conv reads the BN input plain or in ORT's blocked layout: the tensor behind
        # a ReorderOutput to it (made blocked), or a ReorderInput of it (made plain, e.g. by a
        # Concat or a grouped Conv, and blocked for the marker)
        source = producer.get(read)
        blocked = {source.input[0]} if _is_nchwc(source, "ReorderOutput") else set()
        blocked |= {graph.node[i].output[0] for i in readers.get(read, []) if _is_nchwc(graph.node[i], "ReorderInput")}
        convs = [(i, x) for x in (*sorted(blocked), read) for i in readers.get(x, [])
                 if _is_marker(graph.node[i], x, k, bn.channels, constants)]
        if len(convs) != 1:
            return None
        (index, x), conv = convs[0], graph.node[convs[0][0]]
        block[x] = _block_size() if x in blocked else 1
        weights[bn.name] = (conv.input[1], conv.input[2])
        found.append(dataclasses.replace(bn, index=index, x=x))
    markers = [t for pair in weights.values() for t in pair]
    if len(set(markers)) != len(markers):  # a shared marker tensor: one BN's write would change another
        return None
    return NativeGraph(optimized, found, block, weights)


def _is_nchwc(node, op_type: str) -> bool:
    return node is not None and node.domain == NCHWC and node.op_type == op_type


def _is_marker(node, x: str, k: int, channels: int, constants) -> bool:
    """Whether `node` is BN k's marker Conv, untouched: reads x, and its weight and bias still
    hold the markers on the first `channels` channels (ORT folding a Mul or Add into it would
    change them) and zeros beyond (NCHWc padding)."""
    if node.op_type not in ("Conv", "FusedConv") or len(node.input) < 3 or node.input[0] != x:
        return False
    if node.input[1] not in constants or node.input[2] not in constants:
        return False
    weight, bias = (numpy_helper.to_array(constants[t]).ravel() for t in node.input[1:3])
    expected = _marker(k)
    return all(
        len(v) >= channels and np.all(v[:channels] == np.float32(e)) and not np.any(v[channels:])
        for v, e in ((weight, expected[0]), (bias, expected[1]))
    )


def _topologically_sorted(graph: onnx.GraphProto) -> bool:
    """plan.plan_stages reads the node list in order; ORT's saved graph is, but check."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if any(t not in known for t in node.input):
            return False
        known.update(node.output)
    return True


_block = None


def _block_size() -> int:
    """Channels per block of ORT's NCHWc layout on this CPU (8 with AVX2, 16 with AVX-512), read
    off what ORT's own ``ReorderInput`` does to channel indices."""
    global _block
    if _block is None:
        channels = 64
        model = onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC)], "probe",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels, 2, 1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            ),
            opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid(NCHWC, 1)],
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = np.repeat(np.arange(channels, dtype=np.float32), 2).reshape(1, channels, 2, 1)
        flat = session.run(None, {"x": x})[0].ravel()
        # blocked order: (block, h, lane): channel 0 comes back at position B (h = 1, lane 0)
        _block = int(np.flatnonzero(flat[1:] == 0)[0] + 1)
    return _block


# ORT's own ops by a standard op of the same output shape (others keep their name: the NCHWc pools)
_STANDARD = {"ReorderInput": "Identity", "ReorderOutput": "Identity", "FusedConv": "Conv", "QuickGelu": "Identity",
             "Gelu": "Identity", "FastGelu": "Identity", "BiasGelu": "Identity"}


def logical_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, list[int | None] | None]]:
    """`onnx_graph.value_shapes` of ORT's optimized graph: ONNX shape inference knows none of ORT's
    own ops, so it runs on a copy where each is its standard counterpart of the same output shape
    (NCHWc and fused Conv → Conv, NCHWc pools → pools; reorders and fused activations → Identity of
    their first input). Channel counts come out as the ops' padded ones, as the arrays ORT returns
    have them. For sizing only (`engine.recompute`): never for a stage's declared input shapes."""
    view = without_weights(model)  # a copy, without copying the weights
    for node in view.graph.node:
        if node.domain not in (NCHWC, "com.microsoft"):
            continue
        op = _STANDARD.get(node.op_type, node.op_type)
        try:
            schema = onnx.defs.get_schema(op, domain="")
        except onnx.defs.SchemaError:
            continue  # left unknown: its outputs get no shape
        keep = [a for a in node.attribute if a.name in schema.attributes]
        inputs = list(node.input)[: schema.max_input]
        del node.attribute[:], node.input[:]
        node.attribute.extend(keep)
        node.input.extend(inputs)
        node.op_type, node.domain = op, ""
    return value_shapes(view)
