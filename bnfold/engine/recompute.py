"""Recompute cheap producers of the largest cut tensors instead of keeping them: memory for compute.

Why: a stage plan keeps every cut tensor for all samples until its last reader has run, and on a
real model one level dwarfs the others — mobilenet_v2 at 224 × 512 keeps 2.47 GB for one BN input
(96 channels at 112×112), next to ≤ 1.13 GB at every other level. The process has to fault that
memory in once (ORT's arena keeps it afterwards): on the 2-core dev VM 4 GB of first touches cost
~4 s of system CPU, and the same recalibration run again in the process (arena grown, no faults)
took 3.9 s instead of 6.2 s (bench/RESULTS.md §5). That BN input is a 1×1 Conv of a 16-channel
tensor; keeping the 16 channels and running the Conv again in the next stage costs 0.14 s per 256
samples (ORT's profiler; a whole plain pass: 1.07 s), and the job went from 6.6 to 5.1–5.3 s.

Which: a cut tensor t is *recomputable* when it is a measured BN input (so the stage that makes it
still returns it, for its statistics and for `plan.plan_head`) made by a convolution with constant
weights, one runtime input u, at most `MAX_MACS` multiply-adds per output element, and u takes at
most half of t's bytes. Greedy on the peak: while every cut at the peak (the most bytes kept across
one stage boundary) holds a recomputable tensor, recompute the largest such tensor at each; stop
when a peak cut has none or the peak would not drop by `MIN_GAIN`. So only the tensors that set the
peak pay compute (mobilenet_v2 224: one Conv; resnet50 224: three), and models whose kept data is
small anyway (< `MIN_BYTES` at the peak) are left alone.

Exact: stage t' reads u — the very values the first stage computed — and runs the same ORT
kernel on them; t's statistics were already taken where it was first made.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold.engine import plan as g
from bnfold.onnx_graph import constant_tensors

#: most multiply-adds per output element of a recomputed Conv (a 1×1 Conv from ≤ 64 channels)
MAX_MACS = 64
#: peak bytes (all samples) below which nothing is recomputed: faulting that in is cheaper
MIN_BYTES = 256 << 20
#: a round of recomputation must lower the peak by at least this fraction
MIN_GAIN = 0.1

_CONVS = {("", "Conv"), ("com.microsoft.nchwc", "Conv"), ("com.microsoft", "FusedConv")}


@dataclasses.dataclass(frozen=True)
class _Candidate:
    tensor: str
    source: str  # u: the one runtime tensor its producer reads
    node: int  # the producer's index in graph.node
    from_input: bool  # u is a graph input (the samples), not made by a node
    saving: int  # bytes per sample kept less once recomputed: bytes(t) − bytes(u)


def lighten(plan: g.StagePlan, model: onnx.ModelProto, sizes: dict[str, int], samples: int | None) -> list[str]:
    """Edit `plan` in place to recompute the cut tensors that set its memory peak; return them.

    sizes: bytes per sample of the graph's tensors, where known (if a kept tensor's is not, nothing
    is recomputed). samples: how many samples will flow, if known (None: assume enough to matter)."""
    graph = model.graph
    producer, _, reads = g.dataflow(graph)
    first = plan.first_stages()

    def made(t: str) -> int:  # the stage that makes t (graph inputs: read in stage 0)
        return first[producer[t]] if t in producer else 0

    if any(t not in sizes for t in plan.last_use):
        return []  # a kept tensor of unknown size: the peak is not known, so neither is what lowers it
    candidates = _candidates(plan, graph, producer, reads, sizes)
    chosen: list[str] = []
    while True:
        loads = _loads(plan, sizes, made)
        peak = max(loads, default=0)
        if not peak or samples is not None and peak * samples < MIN_BYTES:
            return chosen
        picks = []
        for b in (b for b, load in enumerate(loads) if load >= 0.99 * peak):
            crossing = [c for t, c in candidates.items() if made(t) <= b < plan.last_use.get(t, -1)]
            if not crossing:
                return chosen
            picks.append(max(crossing, key=lambda c: c.saving))
        trial = _copy(plan)
        for pick in dict.fromkeys(picks):
            _recompute(trial, pick, made)
        if max(_loads(trial, sizes, made), default=0) > (1 - MIN_GAIN) * peak:
            return chosen
        _assign(plan, trial)
        for pick in dict.fromkeys(picks):
            chosen.append(pick.tensor)
            del candidates[pick.tensor]


def _candidates(plan, graph, producer, reads, sizes) -> dict[str, _Candidate]:
    constants = constant_tensors(graph)
    measured = {t for ts in plan.measure for t in ts}
    found = {}
    for t in plan.last_use:
        if t not in measured or t not in producer:
            continue
        i = producer[t]
        node = graph.node[i]
        if (node.domain, node.op_type) not in _CONVS or len(reads[i]) != 1 or len(node.input) < 2:
            continue
        weight = constants.get(node.input[1])
        macs = int(np.prod(weight.dims[1:], dtype=np.int64)) if weight is not None and len(weight.dims) >= 3 else None
        u = reads[i][0]
        if macs is None or macs > MAX_MACS or not sizes.get(t) or not sizes.get(u) or 2 * sizes[u] > sizes[t]:
            continue
        found[t] = _Candidate(t, u, i, u not in producer, sizes[t] - sizes[u])
    return found


def _loads(plan: g.StagePlan, sizes: dict[str, int], made) -> list[int]:
    """Bytes per sample kept across each stage boundary b (between stages b and b + 1)."""
    loads = [0] * max(plan.num_stages - 1, 0)
    for t, last in plan.last_use.items():
        for b in range(made(t), last):
            loads[b] += sizes.get(t, 0)
    return loads


def _recompute(plan: g.StagePlan, c: _Candidate, made) -> None:
    """Stages after t's own read c.source and run t's producer again; t is no longer kept."""
    last = plan.last_use.pop(c.tensor)
    for s in range(made(c.tensor) + 1, last + 1):
        if c.tensor in plan.inputs[s]:
            plan.nodes[s] = sorted({*plan.nodes[s], c.node})  # graph order is topological
            plan.inputs[s] = list(dict.fromkeys(c.source if t == c.tensor else t for t in plan.inputs[s]))
    home = made(c.source)
    plan.last_use[c.source] = max(plan.last_use.get(c.source, home), last)
    if c.from_input:  # kept from stage 0 on, batch by batch as read
        plan.late_inputs[:] = sorted({*plan.late_inputs, c.source})
    elif c.source not in plan.outputs[home]:
        plan.outputs[home].append(c.source)


def sizes_per_sample(shapes: dict[str, tuple[int | None, list[int | None] | None]]) -> dict[str, int]:
    """Bytes per sample of each tensor whose dims after the first (the batch axis) are static, from
    `onnx_graph.value_shapes`-style (elem type, dims)."""
    sizes = {}
    for name, (elem, dims) in shapes.items():
        if elem and dims and all(d is not None for d in dims[1:]):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
            sizes[name] = int(np.prod(dims[1:], dtype=np.int64)) * itemsize
    return sizes


def _copy(plan: g.StagePlan) -> g.StagePlan:
    return dataclasses.replace(
        plan, nodes=[list(n) for n in plan.nodes], inputs=[list(i) for i in plan.inputs],
        outputs=[list(o) for o in plan.outputs], last_use=dict(plan.last_use), late_inputs=list(plan.late_inputs),
    )


def _assign(plan: g.StagePlan, trial: g.StagePlan) -> None:
    for field in ("nodes", "inputs", "outputs", "last_use", "late_inputs"):
        setattr(plan, field, getattr(trial, field))
