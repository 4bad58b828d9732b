"""INT8 after folding vs ONNX Runtime's `quantize_static` on the unfolded model: size, CPU latency, accuracy.

    python -m bench.bench_quantize [--resnet] [--encdec] [--repeats 20] [--threads 1]

For each case the BN statistics are first recalibrated on the new lab's unlabeled samples (bnfold),
giving the recalibrated float model R (BN kept). Then, all calibrated with MinMax on the same samples,
QDQ, per-channel int8 weights, uint8 activations (identical quantizer settings):

* (a) R, float, unfolded;               (b) F = R folded by bnfold, float;
* (c) bnfold: F → `bnfold.quantize.quantize_int8` (what ``--quantize int8`` does);
* (d) ORT `quantize_static` on R (unfolded: BN stays, between Q/DQ pairs);
* (e) ORT's recommended flow on R: `quant_pre_process` (its ORT graph optimisation fuses Conv+BN)
  then `quantize_static`.

Reported: serialized size, median latency (ORT CPU, default graph optimizations, batch 1 and 32,
interleaved repeats after a warm-up; one intra-op thread unless ``--threads``), held-out accuracy /
mean IoU where labels exist, and top-1 agreement / cosine similarity with (b) on the calibration samples. Cases: the demo's digits CNN
(lab shift), the U-Net-like segmentation model (`bnfold.demo.shapes`), and with ``--resnet`` the
ResNet-18 of `bench.models` (needs torch; 128 samples of 3×128×128, no labels), with ``--encdec`` the
encoder/decoder of `bench.bench_fold`, whose BN after grouped ConvTranspose and after Gemm ORT's
optimizer does not fuse (256 shifted random samples, no labels).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.engine.recalibrate import recalibrate
from bnfold.folding.fold import fold_batchnorms
from bnfold.quantize import Int8Options, quantize_int8


def _ort_int8(model: onnx.ModelProto, samples: np.ndarray, name: str, work: Path, pre_process: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: samples[i : i + 64]} for i in range(0, len(samples), 64)])

        def get_next(self):
            return next(self.batches, None)

    source = work / "r.onnx"
    onnx.save(model, source)
    if pre_process:
        quant_pre_process(str(source), str(work / "r_pre.onnx"))
        source = work / "r_pre.onnx"
    quantize_static(str(source), str(work / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return onnx.load(str(work / "q.onnx"))


THREADS = [1]  # set from --threads


def _attempt(make, *args):
    """The peer's model, or why it failed (one line)."""
    try:
        return make(*args)
    except Exception as exc:  # noqa: BLE001 — a peer's failure is a result to report, not a crash of the bench
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS[0]
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _latencies(models: dict[str, bytes], sample: np.ndarray, name: str, batch: int, repeats: int) -> dict[str, float]:
    """Median ms per model; the models take turns in every repeat, so load drift hits all alike."""
    sessions = {k: _session(v) for k, v in models.items()}
    feed = {name: np.repeat(sample[:1], batch, axis=0)}
    times: dict[str, list[float]] = {k: [] for k in models}
    for s in sessions.values():
        s.run(None, feed)
    for _ in range(repeats):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _agreement(reference: bytes, candidate: bytes, samples: np.ndarray, name: str) -> tuple[float | None, float]:
    f = _session(reference).run(None, {name: samples})[0].astype(np.float64)
    q = _session(candidate).run(None, {name: samples})[0].astype(np.float64)
    top1 = float(np.mean(f.argmax(1) == q.argmax(1))) if f.ndim == 2 else None
    return top1, float(np.sum(f * q) / np.sqrt(np.sum(f * f) * np.sum(q * q)))


def run_case(title, model, calibration, score, repeats: int) -> list[str]:
    name = model.graph.input[0].name
    recalibrated = recalibrate(model, calibration).model
    folded = fold_batchnorms(recalibrated).model
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "(a) float, unfolded": recalibrated,
            "(b) float, folded (bnfold)": folded,
            "(c) bnfold fold → INT8": quantize_int8(  # gate off: the table reports agreement for every variant
                folded, calibration, Int8Options(latency=False, min_agreement=0, min_cosine=0)).model,
            "(d) ORT quantize_static, unfolded": _attempt(_ort_int8, recalibrated, calibration, name, Path(tmp), False),
            "(e) ORT quant_pre_process + quantize_static": _attempt(_ort_int8, recalibrated, calibration, name, Path(tmp),
                                                                    True),
        }
    failed = {k: v for k, v in variants.items() if isinstance(v, str)}
    variants = {k: v for k, v in variants.items() if k not in failed}
    data = {k: m.SerializeToString() for k, m in variants.items()}
    lat = {b: _latencies(data, calibration, name, b, repeats) for b in (1, 32)}
    ref = data["(b) float, folded (bnfold)"]
    rows = [f"### {title}", "",
            ("| variant | size KiB | × (b) size | BN nodes | batch 1 ms | × (b) | batch 32 ms | × (b) | "
             "× (c) batch 32 | score | top-1 vs (b) | cosine vs (b) |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in variants.items():
        top1, cosine = _agreement(ref, data[k], calibration, name)
        bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
        s = score(data[k])
        rows.append(
            f"| {k} | {len(data[k]) / 1024:.1f} | {len(data[k]) / len(ref):.2f} | {bn} | {lat[1][k]:.3f} | "
            f"{lat[1][k] / lat[1]['(b) float, folded (bnfold)']:.2f} | {lat[32][k]:.3f} | "
            f"{lat[32][k] / lat[32]['(b) float, folded (bnfold)']:.2f} | {lat[32][k] / lat[32]['(c) bnfold fold → INT8']:.2f} | "
            f"{'—' if s is None else f'{s:.4f}'} | {'—' if top1 is None else f'{top1:.4f}'} | {cosine:.5f} |")
    rows += [f"| {k} | fails: {reason} |||||||||||" for k, reason in failed.items()]
    return rows + [""]


def _digits(repeats):
    from bnfold.demo.lab import N_CALIBRATION, build_demo_model, make_new_lab

    model, split = build_demo_model(0)
    new_lab = make_new_lab(split["new_lab"], np.random.default_rng([0, 1]))
    images, labels = new_lab[N_CALIBRATION:], split["new_lab_labels"][N_CALIBRATION:]

    def score(data):
        return float(np.mean(_session(data).run(None, {"image": images})[0].argmax(1) == labels))

    return run_case("Digits CNN, new lab (score: held-out accuracy, 297 images; 400 calibration samples)", model,
                    new_lab[:N_CALIBRATION], score, repeats)


def _shapes(repeats):
    from bnfold.demo.shapes import build_segmentation_model, mean_iou

    model, d = build_segmentation_model(0)
    return run_case("U-Net-like segmentation, new lab (score: held-out mean IoU, 300 images; 300 calibration samples)",
                    model, d["new_lab_calibration"], lambda data: mean_iou(data, d["new_lab_test"], d["new_lab_test_masks"]),
                    repeats)


def _resnet(repeats, workdir):
    from bench.models import prepare

    paths = prepare(workdir, (128,))
    return run_case("ResNet-18 (bench.models), 128 samples 3×128×128 (no labels: agreement only)",
                    onnx.load(paths["onnx"]), np.load(paths["samples_128"]), lambda data: None, repeats)


def _encdec(repeats, workdir):
    from bench.bench_fold import model_paths

    path = model_paths(Path(workdir), ["encdec"])["encdec"]
    rng = np.random.default_rng(3)  # a shifted input distribution: other mean and scale per channel
    samples = (rng.normal(size=(256, 3, 64, 64)) * [[[0.6]], [[1.3]], [[0.9]]] + [[[0.4]], [[-0.2]], [[0.1]]])
    return run_case("Encoder/decoder of bench_fold (grouped ConvTranspose+BN, Gemm+BatchNorm1d), 256 samples "
                    "3×64×64 (no labels)", onnx.load(str(path)), samples.astype(np.float32), lambda data: None, repeats)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--resnet", action="store_true", help="also ResNet-18 (needs torch; builds bench/out once)")
    ap.add_argument("--encdec", action="store_true", help="also bench_fold's encoder/decoder (needs torch, once)")
    ap.add_argument("--only", choices=["resnet", "encdec"], help="run only this torch-built case")
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the timings (default 1: on a "
                    "shared machine, spinning thread pools make multi-thread timings mostly contention)")
    args = ap.parse_args(argv)
    THREADS[0] = args.threads
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, repeats {args.repeats}, threads {args.threads}\n")
    rows = [] if args.only else _digits(args.repeats) + _shapes(args.repeats)
    if args.resnet or args.only == "resnet":
        rows += _resnet(max(5, args.repeats // 2), args.workdir)
    if args.encdec or args.only == "encdec":
        rows += _encdec(args.repeats, args.workdir)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
