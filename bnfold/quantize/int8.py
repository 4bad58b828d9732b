"""Static INT8 quantization of a (recalibrated, folded) float model, calibrated on the same samples.

ONNX Runtime's quantization tools do the quantization: `quantize_static` in QDQ format, weights
int8 per output channel (symmetric), activations uint8 per tensor (ONNX Runtime's advice for x86
CPUs), with ranges from MinMax, Entropy or Percentile calibration. bnfold drives the calibration
itself, through ORT's own calibrators (`create_calibrator`), for three reasons:

* memory: ORT's histogram calibrators keep every activation of every batch until the reader is
  exhausted; fed one batch per ``collect_data`` call they merge as they go, so memory stays one
  batch of activations (the histogram methods also need equally sized batches otherwise);
* files: `quantize_static` writes its augmented model to the system's temporary folder; here it
  goes to ``work_dir`` (a service job's own folder), and the ranges reach `quantize_static` as its
  calibration cache, so it does not calibrate (nor write temporary files) again;
* passes: the samples are read once for calibration and, only if they do not fit in memory, once
  more for the agreement gate (`passes.SamplePasses`).

Then the gate (`gate`): the INT8 model must agree with the float one on the samples, or nothing is
returned. Refused up front: float16/bfloat16 models (the calibrators and the CPU INT8 kernels work
on float32) and models with no op that runs in INT8 on ONNX Runtime's CPU kernels (named).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.errors import InvalidOptions, QuantizationRefused, plural
from bnfold.inputs.arrays import Samples, model_inputs
from bnfold.onnx_graph import opset_version
from bnfold.quantize import gate, measure
from bnfold.quantize.passes import SamplePasses

METHODS = ("minmax", "entropy", "percentile")
#: batches kept in memory between calibration and the gate (beyond it, the samples are read again)
DEFAULT_KEEP_BYTES = 256 * 2**20
_MIN_OPSET = 13  # per-channel DequantizeLinear (axis attribute)
_HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """method: calibration, one of `METHODS`. min_agreement, min_cosine: the gate's thresholds (see
    `gate`). batch_size: samples per ORT call. keep_bytes: memory for samples kept between the two
    passes. threads: ORT intra-op threads (0: one per core). latency: measure batch 1/32 latency."""

    method: str = "minmax"
    min_agreement: float = gate.DEFAULT_MIN_AGREEMENT
    min_cosine: float = gate.DEFAULT_MIN_COSINE
    batch_size: int = 64
    keep_bytes: int = DEFAULT_KEEP_BYTES
    threads: int = 0
    latency: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptions(f"quantization method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("min_agreement", "min_cosine"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InvalidOptions(f"{name} must be a number in [0, 1], got {value!r}")


@dataclasses.dataclass
class Int8Result:
    """model: the QDQ model. report: plain JSON data (the report's ``extra["quantize"]``)."""

    model: onnx.ModelProto
    report: dict[str, Any]


def quantize_int8(model: onnx.ModelProto, samples: Samples, options: Int8Options = Int8Options(), *,
                  work_dir: str | Path | None = None) -> Int8Result:
    """Quantize `model` to INT8 on `samples` (any form `bnfold.recalibrate` takes); temporary files go
    to a fresh folder inside `work_dir` (None: the system's), removed at the end. Raises
    `QuantizationRefused` (with ``.report``, the figures so far) when not possible or not agreeing."""
    model = _checked(model)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-", dir=work_dir) as tmp:
        return _quantize(model, samples, options, Path(tmp))


def check_quantizable(model: onnx.ModelProto) -> None:
    """The refusals that need no samples (float16/bfloat16, no compute op); cheap, for a precheck."""
    graph = model.graph
    typed = [(v.name, v.type.tensor_type.elem_type) for v in (*graph.input, *graph.output)]
    typed += [(t.name, t.data_type) for t in graph.initializer]
    half = sorted({_HALF_TYPES[t] for _, t in typed if t in _HALF_TYPES})
    if half:
        raise QuantizationRefused(
            f"the model holds {' and '.join(half)} tensors (e.g. '{next(n for n, t in typed if t in _HALF_TYPES)}'): INT8 "
            "quantization here calibrates and quantizes float32 models only; convert the model to float32 first, or drop "
            "the quantize option")
    ops = {node.op_type for node in graph.node}
    if not ops & measure.COMPUTE_OPS:
        raise QuantizationRefused(
            f"nothing to quantize: the model has no {', '.join(sorted(measure.COMPUTE_OPS))} node (its ops: "
            f"{', '.join(sorted(ops))}), and INT8 only pays off on those; drop the quantize option")


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as quantized: opset ≥ 13, and every node named (ORT excludes nodes by name)."""
    check_quantizable(model)
    if any(not node.name for node in model.graph.node):
        model = copy.deepcopy(model)
        taken = {node.name for node in model.graph.node}
        for index, node in enumerate(model.graph.node):
            if not node.name:
                name = f"{node.op_type}_{index}"
                while name in taken:
                    name += "_"
                node.name = name
                taken.add(name)
    if opset_version(model) < _MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, _MIN_OPSET)
        except Exception as exc:  # noqa: BLE001 — the converter raises bare RuntimeErrors/ValueErrors per op adapter
            raise QuantizationRefused(
                f"the model's opset {opset_version(model)} is below {_MIN_OPSET}, which per-channel INT8 needs, and converting "
                f"it failed ({type(exc).__name__}: {exc}); export the model with opset ≥ {_MIN_OPSET}") from None
    return model


def _quantize(model: onnx.ModelProto, samples: Samples, options: Int8Options, work: Path) -> Int8Result:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    float_path = work / "float.onnx"
    onnx.save(model, str(float_path))
    passes = SamplePasses(samples, model_inputs(model), options.batch_size, options.keep_bytes)
    ranges, first = _calibrate(float_path, passes, options, work)
    timings["calibrate"] = time.perf_counter() - start
    excluded = _excluded(model)
    quantized = _quantize_static(float_path, ranges, options.method, work, [e["node"] for e in excluded])
    timings["quantize"] = time.perf_counter() - start - timings["calibrate"]
    float_bytes, int8_bytes = model.SerializeToString(), quantized.SerializeToString()
    report: dict[str, Any] = {
        "format": "QDQ", "weights": "int8, per channel, symmetric", "activations": "uint8, per tensor",
        "method": options.method,
        "calibration": {"samples": passes.samples},
        "size": {"float_bytes": len(float_bytes), "int8_bytes": len(int8_bytes),
                 "ratio": len(int8_bytes) / len(float_bytes)},
        "ops": measure.executed_ops(int8_bytes, work, options.threads),
        "excluded": excluded,
    }
    if not report["ops"]["int8"]:
        raise _refused(
            "no op of this model runs in INT8 on ONNX Runtime's CPU kernels (compute ops left in float: "
            f"{', '.join(report['ops']['float'])}): the INT8 model would only be smaller, not faster", report)
    report["warnings"] = [f"left in float: {e['node']} ({e['reason']})" for e in excluded]
    if report["ops"]["float"]:
        report["warnings"].append(f"no INT8 kernel for {', '.join(report['ops']['float'])}: these run in float between "
                                  "DequantizeLinear/QuantizeLinear (unless left in float above, weights stored in 8 bits)")
    tick = time.perf_counter()
    report["gate"] = _gate(float_bytes, int8_bytes, passes, options)
    timings["gate"] = time.perf_counter() - tick
    if report["gate"]["failures"]:
        raise _refused(f"the INT8 model disagrees with the float model on {plural(report['gate']['samples'], 'sample')}: "
                       + "; ".join(report["gate"]["failures"]), report)
    if options.latency:
        tick = time.perf_counter()
        report["latency"] = measure.compare_latency(float_bytes, int8_bytes, first, options.threads)
        timings["latency"] = time.perf_counter() - tick
    report["timings"] = timings
    return Int8Result(quantized, report)


def _refused(reason: str, report: dict[str, Any]) -> QuantizationRefused:
    exc = QuantizationRefused(
        f"{reason}. Nothing was written; the float model (recalibrated and folded) is unaffected: run again without "
        "the quantize option to get it (CLI: drop --quantize, or add --float-output PATH to keep it from a quantizing "
        "run; service/SDK: quantize null), or lower the thresholds (--min-agreement / --min-cosine) if this loss is "
        "acceptable")
    exc.report = report
    return exc


class _OneBatch:
    """An ORT CalibrationDataReader over one batch: each ``collect_data`` call then merges as it goes."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self._batch: dict[str, np.ndarray] | None = batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self._batch = self._batch, None
        return batch


def _calibrate(float_path: Path, passes: SamplePasses, options: Int8Options, work: Path):
    """Ranges of every tensor to quantize, saved as ORT's calibration cache; and the first batch."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.method]
    with _quiet():
        calibrator = create_calibrator(float_path, sorted(set(QDQRegistry) | set(QLinearOpsRegistry)),
                                       augmented_model_path=str(work / "augmented.onnx"), calibrate_method=method)
        # the calibrator's own session uses every core; a service job has its share (graph stays unoptimized,
        # as ORT's calibrators want: fusions would hide the tensors they measure)
        calibrator.infer_session = measure.session(calibrator.augmented_model_path, options.threads,
                                                   level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        first = None
        for batch in passes.first():
            first = first or batch
            calibrator.collect_data(_OneBatch(batch))
        ranges = calibrator.compute_data()
    path = work / "ranges.json"
    save_tensors_data(ranges, path)
    return path, first


def _excluded(model: onnx.ModelProto) -> list[dict[str, str]]:
    """Nodes ORT's quantizer gets wrong, to leave in float: a grouped ConvTranspose with a bias (folding
    gives every BN-followed ConvTranspose one) — per-channel, ORT sizes its weight scales by the
    out-channels of one group but the bias by all of them, and fails (onnxruntime 1.32)."""
    return [{"node": node.name, "op": node.op_type, "reason": "grouped ConvTranspose with a bias: ONNX Runtime's "
             "per-channel quantizer cannot size its bias scales"}
            for node in model.graph.node
            if node.op_type == "ConvTranspose" and len(node.input) > 2 and node.input[2]
            and any(a.name == "group" and a.i > 1 for a in node.attribute)]


def _quantize_static(float_path: Path, ranges: Path, method: str, work: Path, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    out = work / "int8.onnx"
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    try:
        with _quiet():
            quantize_static(str(float_path), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate_method, calibration_cache_path=str(ranges),
                            nodes_to_exclude=exclude)
    except TypeError as exc:
        if "calibration_cache_path" in str(exc):
            raise QuantizationRefused("INT8 needs onnxruntime's quantize_static with calibration_cache_path "
                                      "(onnxruntime ≥ 1.32): pip install -U onnxruntime") from None
        raise _failed(exc) from None
    except Exception as exc:  # noqa: BLE001 — ORT's quantizer raises ValueError/RuntimeError/AssertionError on models it cannot take
        raise _failed(exc) from None
    return onnx.load(str(out))


def _failed(exc: Exception) -> QuantizationRefused:
    return QuantizationRefused(f"ONNX Runtime's quantizer cannot quantize this model ({type(exc).__name__}: {exc}); "
                               "drop the quantize option to get the float model")


def _gate(float_bytes: bytes, int8_bytes: bytes, passes: SamplePasses, options: Int8Options) -> dict[str, Any]:
    reference = measure.session(float_bytes, options.threads)
    candidate = measure.session(int8_bytes, options.threads)
    names = [o.name for o in reference.get_outputs()]
    agreement = gate.Agreement(names)
    compared = 0
    for batch in passes.second():
        compared += len(next(iter(batch.values())))
        agreement.add(reference.run(names, batch), candidate.run(names, batch))
    outputs = agreement.result()
    return {"samples": compared, "subset": passes.subset, "samples_read_again": passes.rereads,
            "min_agreement": options.min_agreement, "min_cosine": options.min_cosine,
            "outputs": gate.to_dict(outputs), "failures": gate.failures(outputs, options.min_agreement, options.min_cosine)}


@contextlib.contextmanager
def _quiet():
    """ORT's quantization tools print progress to stdout and log advice to the root logger; the CLI's
    output and the service's logs are not theirs to write to."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
