"""Exact eval-mode BatchNorm recalibration on ONNX Runtime.

For every BatchNormalization node, the new running mean / variance are the population mean and
biased variance of its input over all samples (axes N and spatial), measured with every BN upstream
of it already using its *new* statistics — the fixed point that layer-by-layer recalibration in a
framework reaches, and that one pass with the old upstream statistics misses.

How (see `plan` for the stage plan): stage s runs, batch by batch, only the nodes between the cut
after BN level s−1 and the inputs of BN level s; the BN inputs of level s are reduced to float64
moments (`moments.Moments`) as they come out; once all batches are through, level s gets its new
statistics and stage s+1 starts from the tensors kept at the cut (`store.TensorStore`). Every node
runs once per sample, so the total cost stays close to one inference pass, and memory is bounded by
the store's budget, not the sample count.

Which graph is cut: on the CPU provider, ONNX Runtime's own optimized graph of the model
(`engine.native`), so the tensors crossing the cuts stay in ORT's blocked layout and each
recalibrated BN runs as the Conv ORT made of it; otherwise, or where that graph is not
recognised, the source graph.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import bnfold.onnx_graph as og
from bnfold.engine import plan as g
from bnfold.engine import prior as source_prior
from bnfold.engine import recompute
from bnfold.engine.memory import default_memory_budget
from bnfold.engine.native import NativeGraph, logical_shapes, native_graph
from bnfold.engine.moments import Moments, first_sample_shift, shifted_sample_sums
from bnfold.engine.parameters import with_private_parameters
from bnfold.engine.prior import check_prior, mix
from bnfold.engine.store import TensorStore
from bnfold.engine.uncertainty import SampleStream, assess
from bnfold.errors import InvalidOptions, UnsupportedModel, plural
from bnfold.inputs.arrays import Samples, iter_batches, model_inputs
from bnfold.inputs.model import check_model
from bnfold.report import LayerReport, Report, shift_score
from bnfold.runtime import session_options

DEFAULT_MEMORY_BUDGET = None  # sized from the RAM available at the start of each run (engine.memory)
# Samples per ORT call. 16, not 64: a stage's working set shrinks with it, and with it the memory
# the process must fault in and the cache misses of the marker Convs (224 × 512, one process per job:
# at 32, resnet50 17.5–17.8 s against 18.9–19.2 s at 64, peak RSS 3.3 against 3.9 GiB; at 16 against
# 32, three interleaved pairs: efficientnet_b0 1.35× against 1.45× a pass, RSS −0.1 to −0.4 GiB, the
# others within noise; 8 is slower on small models). A plain pass takes the same at 32 and 64
# (bench/RESULTS.md §5).
DEFAULT_BATCH_SIZE = 16

Progress = Callable[[str, float], None]


@dataclasses.dataclass
class RecalibrationResult:
    """The model with new BN statistics (same graph, same names) and what changed."""

    model: onnx.ModelProto
    report: Report
    #: the new model's first output on the first len(outputs) samples (`head_samples`), or None
    outputs: np.ndarray | None = None


def recalibrate(
    model: onnx.ModelProto,
    samples: Samples,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
    spill_dir: str | None = None,
    disk_budget: int | None = None,
    providers: Sequence[str] | None = None,
    threads: int = 0,
    progress: Progress | None = None,
    prior: float = 0.0,
    head_samples: int = 0,
    checked: bool = False,
) -> RecalibrationResult:
    """Recompute every BN's running mean/var on `samples` (exact fixed point, float64).

    samples: one array (N, ...) for single-input models, a dict {input name: array}, or an
        iterable of such batches (read once, lazily). Float arrays are cast to the input's type.
    batch_size: samples per ONNX Runtime call (speed/memory only; results do not depend on it).
    memory_budget: bytes of cut tensors kept in RAM between stages before spilling to disk
        (None: half of the RAM available now, cgroup limits included; see `engine.memory`).
    disk_budget: bytes those spilled tensors may take on disk at once (None: unbounded); past it,
        `DiskBudgetExceeded`.
    providers: ONNX Runtime execution providers (default: CPU).
    threads: ONNX Runtime intra-op threads (0: one per core), e.g. to share cores between jobs.
    progress: called as progress(description, fraction in [0, 1]).
    prior: weight N of the model's own (source) statistics, in samples (Schneider et al. 2020):
        each BN gets μ = (N·μ_src + n·μ_tgt)/(N + n) and likewise the variance, mixed before any
        BN downstream is measured. 0 (default): target statistics only. See `engine.prior`.
    head_samples: also return the new model's first output on the first ≥ head_samples samples
        (whole batches) as `RecalibrationResult.outputs`, computed from the tensors the stages
        made for them (only the part of the graph after the last BN runs again): what the
        before/after signals need, without a session over the whole model. 0 (default): not.
    checked: `model` has passed `inputs.model.check_model` already (`load_model` runs it): skip the
        ONNX checker here, which serialises the model (0.1 s for a 47 MB ResNet-18).
    """
    if memory_budget is None:
        memory_budget = default_memory_budget()
    if memory_budget < 0:
        raise InvalidOptions(f"memory_budget must be ≥ 0 bytes, got {memory_budget}")
    check_prior(prior)
    if threads < 0:
        raise InvalidOptions(f"threads must be ≥ 0 (0: one per core), got {threads}")
    providers = check_providers(providers) if providers is not None else None
    started = time.perf_counter()
    if not checked:
        check_model(model)
    work, notes = with_private_parameters(model)
    batchnorms = g.require_batchnorms(work)
    notes += _subgraph_batchnorm_notes(work)
    shapes = og.value_shapes(work)
    native = native_graph(work, batchnorms, shapes, threads) if _native_allowed(providers) else None
    graph, measured = (native.model, native.batchnorms) if native else (work, batchnorms)
    plan = g.plan_stages(graph, measured)
    expected = _expected_samples(samples)
    sizes = recompute.sizes_per_sample(logical_shapes(graph) if native else shapes)
    recomputed = recompute.lighten(plan, graph, sizes, expected)
    head = _plan_head(graph, plan) if head_samples > 0 else None
    runner = _StageRunner(graph, plan, providers, threads, progress, native, og.constant_tensors(work.graph),
                          og.value_shapes(graph) if native else shapes)
    planned = time.perf_counter()
    runner.expected_samples = expected
    runner.prior = float(prior)
    runner.head, runner.head_samples = head, head_samples
    with TensorStore(memory_budget, spill_dir, disk_budget=disk_budget) as store:
        batches = iter_batches(samples, model_inputs(work), batch_size)
        runner.run(batches, store, measured)
        outputs = runner._timed("head", runner.head_outputs) if head else None
        store_use = {"peak_bytes_in_memory": store.peak_bytes_in_memory, "bytes_spilled": store.bytes_spilled}
    ran = time.perf_counter()
    result = _result(work, batchnorms, measured, plan, runner, notes)
    result.outputs = outputs
    result.report.extra["stage_graph"] = "onnxruntime-optimized" if native else "source"
    result.report.extra["store"] = store_use
    # the BNs whose input a later stage computes again instead of keeping it (engine.recompute)
    result.report.extra["recomputed"] = [bn.name for bn in measured if bn.x in recomputed]
    timings = runner.timings
    timings["planning"] = planned - started
    # the loop itself, progress callbacks: negative only if a part were counted twice (tested)
    parts = ("reading", "sessions", "onnxruntime", "statistics", "store", "head")
    timings["other"] = ran - planned - sum(timings.get(k, 0.0) for k in parts)
    ended = time.perf_counter()  # one clock reading for both, so the parts add up to the total exactly
    timings["report"], timings["total"] = ended - ran, ended - started
    return result


def check_providers(providers: Sequence[str]) -> tuple[str, ...]:
    """ONNX Runtime execution provider names, each available in this onnxruntime build, as a tuple."""
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    names = tuple(str(p).strip() for p in providers)
    available = ort.get_available_providers()
    unknown = [p for p in names if p not in available]
    if unknown or not names:
        raise InvalidOptions(
            f"execution provider(s) {unknown or 'none given'} not available in this onnxruntime build; "
            f"available: {', '.join(available)}"
        )
    return names


def recalibratable_batchnorms(model: onnx.ModelProto) -> list[g.BatchNorm]:
    """The BNs `recalibrate` would measure — after the same constant-folding of their parameters
    (`engine.parameters`) — or the error it would raise: for cheap checks before a job is queued."""
    work, _ = with_private_parameters(model)
    return g.require_batchnorms(work)


class _StageRunner:
    """Runs the stages in order, keeping moments per measured tensor and the new BN statistics."""

    def __init__(self, model: onnx.ModelProto, plan: g.StagePlan, providers, threads: int, progress: Progress | None,
                 native: NativeGraph | None, source_constants: dict[str, onnx.TensorProto], shapes: dict):
        self.threads = threads
        self.native = native  # cutting ORT's optimized graph (engine.native), or None: the source graph
        self.source_constants = source_constants  # the BN parameters, wherever the stages are cut
        self.channels: dict[str, int] = {}  # measured tensor -> BN channels (blocked ones are padded)
        # once: stage outputs get their types from it, stage inputs their static sizes
        self.inferred_shapes = shapes  # og.value_shapes of the graph being cut
        self.inferred_types = {n: (e, None if d is None else len(d)) for n, (e, d) in self.inferred_shapes.items()}
        self.constants = og.constant_tensors(model.graph)  # once: the graph is never edited here
        self.model = model
        self.plan = plan
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.progress = progress or (lambda description, fraction: None)
        self.moments: dict[str, Moments] = {}
        self.between: dict[str, SampleStream] = {}  # per-sample moments: standard errors, split-half
        self.shifts: dict[str, np.ndarray] = {}  # tensor -> K (C,) of its float64 sums, fixed by the first batch
        self.overrides: dict[str, onnx.TensorProto] = {}  # BN mean/var tensors already measured
        self.stage_overrides: dict[str, onnx.TensorProto] = {}  # weights of BNs run as 1×1 convs
        self.replacements: dict[int, onnx.NodeProto] = {}
        self.types: dict[str, tuple[int, int]] = {}  # tensor -> (onnx elem type, rank)
        self.shapes: dict[str, tuple[int, ...]] = {}  # tensor -> shape in the first batch
        self.samples = 0
        self.prior = 0.0  # source-prior weight N (engine.prior); 0: target statistics only
        self.batches = 0
        self.expected_samples: int | None = None  # known up front for arrays: progress within stage 0
        self.pending = None  # Future of the last batch's [(tensor, Moments)]
        # float64 sums of batch b overlap ORT's run of batch b+1; measured on mobilenet_v2 224 × 256
        # (bench/RESULTS.md §5): wall 6.1/5.85/6.34 s against 6.8/6.4/6.71 s in step, same CPU time
        self.overlap = True
        # seconds per part; with "planning" and "report" (set by `recalibrate`) they add up to "total"
        self.timings: dict[str, float] = dict.fromkeys(("reading", "sessions", "onnxruntime", "statistics", "store"), 0.0)
        self.head: g.HeadPlan | None = None  # the rest of the graph, run on the first batches at the end
        self.head_samples = 0
        self.head_values: dict[str, list[np.ndarray]] = {}  # head input -> its values in the first batches
        self.head_batches = 0  # batches kept for the head: fixed in stage 0

    def run(self, batches, store: TensorStore, batchnorms: list[g.BatchNorm]) -> None:
        self.channels = {bn.x: bn.channels for bn in batchnorms}
        for s in range(self.plan.num_stages):
            self.moments.update({x: None for x in self.plan.measure[s]})
            session = None
            for b, feeds in enumerate(self._feeds(s, batches, store)):
                session = session or self._timed("sessions", self._session, s, feeds)
                self._step(s, b, session, feeds, store)
                self.progress(self._description(s), self._fraction(s, b))
            self._timed("statistics", self._collect)
            for name in [t for t, last in self.plan.last_use.items() if last == s]:
                store.drop(name)  # graph inputs kept for later stages; cut tensors went batch by batch
            self._timed("statistics", self._set_statistics, [bn for bn in batchnorms if self.plan.levels[bn.name] == s])

    def _timed(self, part: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - t0

    def _feeds(self, s, batches, store):
        """Stage 0 reads the samples (once); later stages read the cut tensors kept in the store."""
        if s > 0:
            for b in range(self.batches):
                yield self._timed("store", lambda b=b: {t: store.get(t, b) for t in self.plan.inputs[s]})
            return
        batches = iter(batches)
        for b in itertools.count():
            batch = self._timed("reading", next, batches, None)
            if batch is None:
                return
            self.samples += next(iter(batch.values())).shape[0]
            self.batches += 1
            for name in self.plan.late_inputs:
                self._observe(name, batch[name])
                store.put(name, b, batch[name])
            yield batch

    def _step(self, s, b, session, feeds, store) -> None:
        names = self.plan.outputs[s]
        t0 = time.perf_counter()
        run_feeds = {t: feeds[t] for t in self.plan.inputs[s]}
        try:
            values = dict(zip(names, session.run(names, run_feeds))) if names else {}
        except Exception as exc:  # ORT's error types are not a public hierarchy
            raise UnsupportedModel(
                f"ONNX Runtime failed running the model (BN level {s}, batch {b}): {_first_line(exc)}"
            ) from None
        t1 = time.perf_counter()
        self._collect()  # the previous batch's sums, computed while ORT ran this one
        tensors = [(x, values[x] if x in values else feeds[x]) for x in self.plan.measure[s]]
        if self.overlap:
            self.pending = _stats_executor().submit(self._measure, tensors)
        else:
            self._merge(self._measure(tensors))
        t2 = time.perf_counter()
        for name, value in values.items():
            self._observe(name, value)
            if self.plan.last_use.get(name, -1) > s:
                store.put(name, b, value)
        self._keep_for_head(s, b, values, feeds)
        if s > 0:  # inputs no later stage reads are freed now: ORT's arena reuses them for the next batch
            for name in self.plan.inputs[s]:
                store.done(name, b, last=self.plan.last_use.get(name) == s)
        self.timings["onnxruntime"] += t1 - t0
        self.timings["statistics"] += t2 - t1
        self.timings["store"] += time.perf_counter() - t2

    def _measure(self, tensors: list[tuple[str, np.ndarray]]) -> list[tuple[str, Moments]]:
        """One batch's pooled moments and per-sample moments (`uncertainty.SampleStream`), both from
        one read of each tensor (per-sample shifted sums, `moments.shifted_sample_sums`) around one
        shift per BN input, taken from the first batch. Batches arrive in order, one at a time (the
        previous one is collected before the next is submitted)."""
        measured = []
        for x, value in tensors:
            block = self.native.block.get(x, 1) if self.native else 1
            shift = self.shifts.get(x)
            if shift is None:
                shift = first_sample_shift(value, block)
                if len(value):  # fixed by the first batch with samples
                    self.shifts[x] = shift
            s1, s2, length = shifted_sample_sums(value, shift, block)
            channels = self.channels[x]  # blocked tensors carry zero padding past the BN's channels
            s1, s2, shift = s1[:, :channels], s2[:, :channels], shift[:channels]
            self.between.setdefault(x, SampleStream()).add_moments(s1 / max(length, 1), s2 / max(length, 1), shift)
            measured.append((x, Moments.from_sums(len(value) * length, shift, s1.sum(axis=0), s2.sum(axis=0))))
        return measured

    def _collect(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._merge(pending.result())

    def _keep_for_head(self, s, b, values, feeds) -> None:
        """Keep the head's inputs of the first batches (enough for `head_samples`)."""
        if self.head is None:
            return
        if s == 0 and self.samples - len(next(iter(feeds.values()))) < self.head_samples:
            self.head_batches = b + 1
        if b < self.head_batches:
            for name in self.head.inputs:
                if name in values and self.head.made_in.get(name) == s or s == 0 and name in feeds:
                    self.head_values.setdefault(name, []).append(values[name] if name in values else feeds[name])

    def head_outputs(self) -> np.ndarray | None:
        """The new model's first output on the kept first batches (None if the head cannot run)."""
        head = self.head
        if not self.head_values and head.inputs or any(len(v) != self.head_batches for v in self.head_values.values()):
            return None
        if not head.nodes:
            return np.concatenate(self.head_values[head.output])
        part = (head.nodes, head.inputs, [head.output], f"{self.model.graph.name}_head")
        try:
            model = g.part_model(self.model, part, self.types, self.overrides | self.stage_overrides,
                                 self.replacements, self.inferred_types, self.constants,
                                 {t: self._static_dims(t) for t in head.inputs})
            session = ort.InferenceSession(model.SerializeToString(), self._options(), providers=self.providers)
            parts = [session.run([head.output], {t: self.head_values[t][b] for t in head.inputs})[0]
                     for b in range(self.head_batches)]
        except Exception:  # noqa: BLE001 - the caller then runs the whole new model instead
            return None
        return np.concatenate(parts)

    def _merge(self, batch: list[tuple[str, Moments]]) -> None:
        """Merge one batch's moments, batches in order: the result does not depend on thread timing."""
        for x, batch_moments in batch:
            previous = self.moments[x]
            self.moments[x] = batch_moments if previous is None else previous.merge(batch_moments)

    def _session(self, s, feeds):
        if not self.plan.nodes[s]:
            return _NoNodes()
        for name, value in feeds.items():
            self._observe(name, value)
        stage = g.stage_model(
            self.model, self.plan, s, self.types, self.overrides | self.stage_overrides, self.replacements,
            self.inferred_types, self.constants, {t: self._static_dims(t) for t in self.plan.inputs[s]},
        )
        try:
            options = self._options()
            # ORT's idle workers would spin on the cores the float64 sums of the previous batch need
            # (mobilenet_v2 224 × 512, 5 interleaved pairs: 4.74 s against 4.89 s with spinning)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(stage.SerializeToString(), options, providers=self.providers)
        except Exception as exc:  # ORT raises several unrelated types; all mean "cannot run this"
            raise UnsupportedModel(
                f"ONNX Runtime cannot load the model (the part up to BN level {s}): {_first_line(exc)}. If the "
                "whole model loads in onnxruntime.InferenceSession, bnfold cut it wrongly: please report it."
            ) from None

    def _options(self) -> ort.SessionOptions:
        options = session_options(self.threads)
        if self.native:  # already ORT's optimized graph: optimizing it again could only undo the cut
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return options

    def _observe(self, name: str, value: np.ndarray) -> None:
        if name not in self.types:
            self.types[name] = _type_of(value)
            self.shapes[name] = value.shape

    def _static_dims(self, name: str) -> list[int | None]:
        """The sizes a stage input always has: those shape inference of the whole model proves, and
        the length of a 1-D integer tensor (a shape, size or index list, as Shape → Gather →
        Concat makes them), which does not change from batch to batch."""
        elem, rank = self.types[name]
        dims = self.inferred_shapes.get(name, (None, None))[1]
        dims = list(dims) if dims is not None and len(dims) == rank else [None] * rank
        if rank == 1 and dims[0] is None and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(elem), np.integer):
            dims[0] = self.shapes[name][0]
        return dims

    def _set_statistics(self, level: list[g.BatchNorm]) -> None:
        constants = self.source_constants
        for bn in level:
            moments = self.moments[bn.x]
            source = [numpy_helper.to_array(constants[t]) for t in (bn.mean, bn.var)]
            mean, var = mix(self.prior, self.samples, *source, moments.mean, moments.var)
            for name, value in ((bn.mean, mean), (bn.var, var)):
                dtype = onnx.helper.tensor_dtype_to_np_dtype(constants[name].data_type)
                self.overrides[name] = numpy_helper.from_array(value.astype(dtype), name)
            if self.native:
                a, b = _affine(bn, constants, mean, var)
                self.stage_overrides.update({t.name: t for t in self.native.affine(bn, a, b)})
            else:
                self._run_as_conv(bn, constants, mean, var)

    def _run_as_conv(self, bn: g.BatchNorm, constants, mean: np.ndarray, var: np.ndarray) -> None:
        """Let later stages run this BN as a depthwise 1×1 Conv computing the same y = a·x + b.

        Why: a stage starts at a cut, so ORT sees a lone BN on a stage input and runs it (and the
        Relu / Add after it) as separate passes over memory; as a Conv it enters ORT's NCHWc
        path, where the Relu and a residual Add fuse into the kernel, as in a plain inference
        pass. Same map up to float32 rounding — the rounding ORT's own Conv+BN fusion makes.
        Float32 only (ORT's CPU Conv), and only for (N, C, spatial...) inputs."""
        elem_type, rank = self.types.get(bn.x, (None, 0))
        if elem_type != onnx.TensorProto.FLOAT or rank < 3:
            return
        a, b = _affine(bn, constants, mean, var)
        weight, shift = f"bnfold::{bn.index}::weight", f"bnfold::{bn.index}::bias"
        kernel = [1] * (rank - 2)
        self.stage_overrides[weight] = numpy_helper.from_array(a.reshape(-1, 1, *kernel).astype(np.float32), weight)
        self.stage_overrides[shift] = numpy_helper.from_array(b.astype(np.float32), shift)
        output = self.model.graph.node[bn.index].output[0]
        self.replacements[bn.index] = onnx.helper.make_node(
            "Conv", [bn.x, weight, shift], [output], name=f"{bn.name}::as_conv", group=bn.channels, kernel_shape=kernel
        )

    def _fraction(self, s, b) -> float:
        """Stage 0 reads the samples lazily: its share is samples read / samples expected, when known."""
        if s > 0:
            within = (b + 1) / self.batches if self.batches else 0.0
        else:
            within = min(1.0, self.samples / self.expected_samples) if self.expected_samples else 0.0
        return (s + within) / self.plan.num_stages

    def _description(self, s) -> str:
        level = f"BN level {s + 1}/{self.plan.num_stages}"
        # Without a known count the fraction cannot move in stage 0; the count read still does.
        return f"{level} ({plural(self.samples, 'sample')} read)" if s == 0 and not self.expected_samples else level


def _affine(bn: g.BatchNorm, constants, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BN as y = a·x + b per channel: a = γ/√(var+ε), b = β − mean·a (float64 (C,) each)."""
    scale, bias = (numpy_helper.to_array(constants[t]).astype(np.float64) for t in (bn.scale, bn.bias))
    a = scale / np.sqrt(var + bn.epsilon)
    return a, bias - mean * a


def _plan_head(graph: onnx.ModelProto, plan: g.StagePlan) -> g.HeadPlan:
    """The head for the first graph output; the stages are told to output the tensors it reads."""
    head = g.plan_head(graph, plan, graph.graph.output[0].name)
    for name, s in head.made_in.items():
        if name not in plan.outputs[s]:
            plan.outputs[s].append(name)
    return head


def _native_allowed(providers) -> bool:
    """ORT's optimized graph is cut only for the CPU provider (others optimize differently), and not
    when BNFOLD_STAGE_GRAPH=source asks for the source graph (A/B runs, bisecting a bad result)."""
    cpu_only = providers is None or list(providers) == ["CPUExecutionProvider"]
    return cpu_only and os.environ.get("BNFOLD_STAGE_GRAPH", "native") != "source"


def _expected_samples(samples: Samples) -> int | None:
    """How many samples stage 0 will read, if known before reading them: the length of an array (or of
    a dict's arrays), or a source's own `expected_samples` (image folders: the image files, an upper
    bound when some are skipped). None for a plain iterable of batches."""
    first = next(iter(samples.values()), None) if isinstance(samples, Mapping) else samples
    shape = getattr(first, "shape", None)
    if shape:
        return int(shape[0])
    hint = getattr(samples, "expected_samples", None)
    return int(hint) if hint else None


class _NoNodes:
    """Stage with nothing to run: every BN of this level reads a graph input directly."""

    def run(self, names, feeds):
        return []


_executor = None


def _stats_executor():
    """One thread for the float64 sums of batch b while ORT runs batch b+1 (ORT and the C kernel
    both release the GIL)."""
    global _executor
    if _executor is None:
        from concurrent.futures import ThreadPoolExecutor

        _executor = ThreadPoolExecutor(1, thread_name_prefix="bnfold-overlap")
    return _executor


def _type_of(value: np.ndarray) -> tuple[int, int]:
    return onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.ndim


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _subgraph_batchnorm_notes(model) -> list[str]:
    inside = len(og.subgraph_batchnorms(model.graph))
    return [f"{inside} BatchNormalization node(s) inside If/Loop/Scan bodies were not recalibrated"] if inside else []


def _result(work, batchnorms, measured, plan, runner: _StageRunner, notes) -> RecalibrationResult:
    """measured[i]: source BN i as the stages saw it (its input tensor there may be a blocked copy)."""
    constants = og.constant_values(work.graph, [t for bn in batchnorms for t in (bn.mean, bn.var)])
    layers = []
    for bn, seen in zip(batchnorms, measured):
        moments = runner.moments[seen.x]
        warnings = []
        low = int((moments.var < bn.epsilon).sum())
        if low:
            warnings.append(
                f"{low} of {plural(bn.channels, 'channel')} {'has' if low == 1 else 'have'} variance below epsilon={bn.epsilon:g} on the new "
                "samples (dead or constant channels): their BN output is dominated by epsilon"
            )
        old_mean, old_var = constants[bn.mean].astype(np.float64), constants[bn.var].astype(np.float64)
        new_mean, new_var = mix(runner.prior, runner.samples, old_mean, old_var, moments.mean, moments.var)
        layers.append(
            LayerReport(
                name=bn.name, input=bn.x, level=plan.levels[bn.name], channels=bn.channels,
                count=moments.count, epsilon=bn.epsilon, old_mean=old_mean, old_var=old_var,
                new_mean=new_mean, new_var=new_var,
                shift=shift_score(old_mean, old_var, new_mean, new_var, bn.epsilon),
                warnings=warnings,
                **({"target_mean": moments.mean, "target_var": moments.var} if runner.prior else {}),
            )
        )
    certainty = assess([(bn.name, runner.between[bn.x], runner.moments[bn.x].var, bn.epsilon) for bn in measured],
                       runner.samples)
    for layer, (stderr_mean, stderr_var) in zip(layers, certainty.stderr):
        layer.stderr_mean, layer.stderr_var = stderr_mean, stderr_var
    report = Report(samples=runner.samples, batches=runner.batches, layers=layers, timings=runner.timings,
                    warnings=notes + certainty.warnings, samples_recommended=certainty.samples_recommended,
                    samples_sufficient=certainty.samples_sufficient)
    report.extra["uncertainty"] = certainty.summary()
    report.extra["statistics"] = source_prior.summary(runner.prior, runner.samples)
    return RecalibrationResult(_write_statistics(work, runner.overrides), report)


def _write_statistics(work: onnx.ModelProto, tensors: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """The working model with the new mean/var values, wherever the constants live."""
    graph = work.graph
    for init in graph.initializer:
        if init.name in tensors:
            init.CopyFrom(tensors[init.name])
    for node in graph.node:
        if og.is_constant_node(node) and node.output[0] in tensors:
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", tensors[node.output[0]]))
    return work
