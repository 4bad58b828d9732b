"""What INT8 buys, measured: serialized size, ONNX Runtime CPU latency, and which ops run in INT8.

Latency is the median wall time of a few `InferenceSession.run` calls after one warm-up, with
ONNX Runtime's default graph optimizations (what a user gets), at batch 1 and batch 32 built by
repeating the first sample. Few repeats on purpose: it is a cheap indication in the report;
`bench/bench_quantize.py` measures properly, side by side.

Which ops run in INT8 is read from the graph ONNX Runtime actually executes: the QDQ model is
optimized (extended level) and saved, and the compute ops left in float between
DequantizeLinear/QuantizeLinear pairs are the ones without an INT8 kernel on the CPU.
"""

from __future__ import annotations

import collections
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

#: float compute ops whose INT8 counterparts carry the speed-up (weights or large matmuls)
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: ops of an optimized graph that compute in 8-bit integers (ONNX and com.microsoft domains)
INT8_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
                      "QLinearConvTranspose", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat",
                      "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
                      "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QAttention", "QEmbedLayerNormalization"})
LATENCY_BATCHES = (1, 32)


def session(model: onnx.ModelProto | bytes | str, threads: int, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            optimized_path: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    options.log_severity_level = 3  # QDQ models warn about nodes they leave unfused; the report says which
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def executed_ops(model_bytes: bytes, work_dir: Path, threads: int) -> dict[str, list[str]]:
    """{'int8': sorted INT8 op types, 'float': sorted float compute op types left, as 'Op ×n'}."""
    path = work_dir / "int8-optimized.onnx"
    session(model_bytes, threads, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path)
    counts = collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    path.unlink(missing_ok=True)
    return {"int8": _counted(counts, INT8_OPS), "float": _counted(counts, COMPUTE_OPS)}


def _counted(counts: collections.Counter, ops: frozenset[str]) -> list[str]:
    return [f"{op} ×{n}" for op, n in sorted(counts.items()) if op in ops]


def latency_ms(model_bytes: bytes, first: dict[str, np.ndarray], threads: int, batch: int, repeats: int) -> float | None:
    """Median ms per run at `batch` samples (copies of the first sample); None if the model's batch
    axis is fixed to another size."""
    sess = session(model_bytes, threads)
    feed = {}
    for arg in sess.get_inputs():
        fixed = arg.shape[0] if arg.shape and isinstance(arg.shape[0], int) else None
        if fixed is not None and fixed != batch:
            return None
        feed[arg.name] = np.repeat(first[arg.name][:1], batch, axis=0)
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def compare_latency(float_bytes: bytes, int8_bytes: bytes, first: dict[str, np.ndarray], threads: int,
                    repeats: int = 5) -> dict[str, dict[str, float | None]]:
    """{'batch_1': {'float_ms', 'int8_ms', 'speedup'}, 'batch_32': …}; runs interleaved per batch size."""
    out = {}
    for batch in LATENCY_BATCHES:
        f = latency_ms(float_bytes, first, threads, batch, repeats)
        q = latency_ms(int8_bytes, first, threads, batch, repeats)
        out[f"batch_{batch}"] = {"float_ms": f, "int8_ms": q, "speedup": f / q if f and q else None}
    return out
