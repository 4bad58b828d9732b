"""Folding real torchvision exports: verification inputs, fold accuracy vs peers, unfoldable BNs.

    python -m bench.bench_fold_real                 # ≈ 5 min on 2 busy cores
    python -m bench.bench_fold_real --rounds 5      # quicker latency

Models: torchvision efficientnet_b0, regnet_y_400mf (3×64×64) and densenet121 (3×224×224 for the
latency), random init with distinct BN parameters and statistics measured on image-like samples,
exported with BN kept (tests/folding/real_models.py, the recipe of the heavy tests).

1. Fold accuracy (efficientnet_b0, regnet_y_400mf): max |Δ| / max |y| of each fold against the
   unfolded model on 32 held-out samples (ORT, graph optimizations off for both), for bnfold,
   onnxslim (default options) and onnxoptimizer (fuse_bn_into_conv) when installed (bench extra);
   and the same ratio for bnfold's fold on what verification runs without samples: standard-normal
   inputs (before) and inputs at the scale the model implies (`bnfold.folding.probe`, now), with the
   output scale max |y| each reaches.
2. DenseNet121 with its 62 post-Concat BNs kept as BatchNormalization (default) vs Mul + Add
   (unfoldable="affine"): node counts, and ORT latency at batch 1 (median over interleaved rounds,
   one intra-op thread, optimizations on and off), with the paired ratio keep/affine.

Prints Markdown; writes JSON to bench/out/results_fold_real.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "folding"))
from real_models import export_torchvision, image_samples  # noqa: E402

from bnfold.folding.fold import fold_batchnorms  # noqa: E402
from bnfold.folding.verify import verify_equivalent  # noqa: E402

LEVELS = {"on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def session(model: onnx.ModelProto, level: str = "off", threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relative_diff(reference: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    """(max |Δ| / max |y|, max |y|) on x, both models unoptimised."""
    want = session(reference).run(None, {"input": x})[0].astype(np.float64)
    got = session(folded).run(None, {"input": x})[0].astype(np.float64)
    scale = float(np.max(np.abs(want)))
    return float(np.max(np.abs(got - want))) / scale, scale


def peers() -> dict:
    out = {}
    try:
        import onnxslim

        out["onnxslim"] = lambda m: onnxslim.slim(m)
    except ImportError:
        pass
    try:
        import onnxoptimizer

        out["onnxoptimizer"] = lambda m: onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])
    except ImportError:
        pass
    return out


def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def accuracy(name: str, workdir: Path) -> dict:
    samples, held_out = image_samples(48, seed=0), image_samples(32, seed=1)
    model = onnx.load(export_torchvision(name, workdir / f"{name}.onnx", samples))
    folds = {"bnfold": fold_batchnorms(model).model} | {k: f(model) for k, f in peers().items()}
    row = {"model": name, "nodes": len(model.graph.node), "bn": bn_count(model), "folds": {}}
    for tool, folded in folds.items():
        rel, scale = relative_diff(model, folded, held_out)
        row["folds"][tool] = {"rel_diff": rel, "max_y": scale, "nodes": len(folded.graph.node), "bn_left": bn_count(folded)}
    bnfold = folds["bnfold"]
    for kind in ("normal", "implied"):
        report = verify_equivalent(model, bnfold, random_inputs=kind, dims={"batch": 8}, threads=1)
        out = report.outputs[0]
        row[f"random_{kind}"] = {"rel_diff": out.max_rel, "max_y": out.scale, "passed": report.passed,
                                 "inputs": report.random_inputs.note}
    return row


def latency(workdir: Path, rounds: int, runs: int) -> dict:
    samples = image_samples(16, size=224, seed=0)
    model = onnx.load(export_torchvision("densenet121", workdir / "densenet121_224.onnx", samples))
    variants = {"original": model, "keep": fold_batchnorms(model).model, "affine": fold_batchnorms(model, "affine").model}
    x = image_samples(1, size=224, seed=2)
    sessions = {(v, lvl): session(m, lvl) for v, m in variants.items() for lvl in LEVELS}
    for s in sessions.values():
        s.run(None, {"input": x})  # warm-up
    times: dict = {key: [] for key in sessions}
    for r in range(rounds):
        keys = list(sessions)
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate the order each round
            start = time.perf_counter()
            for _ in range(runs):
                sessions[key].run(None, {"input": x})
            times[key].append((time.perf_counter() - start) / runs * 1e3)
    out = {"nodes": {v: len(m.graph.node) for v, m in variants.items()},
           "bn": {v: bn_count(m) for v, m in variants.items()}, "ms": {}, "affine_over_keep": {}}
    for lvl in LEVELS:
        out["ms"][lvl] = {v: statistics.median(times[(v, lvl)]) for v in variants}
        out["affine_over_keep"][lvl] = statistics.median(
            a / k for a, k in zip(times[("affine", lvl)], times[("keep", lvl)]))
    return out


def markdown(rows: list[dict], lat: dict) -> str:
    lines = ["| model | tool | max |Δ| / max |y| on real samples | max |y| | nodes | BN left |", "|---|---|---|---|---|---|"]
    for row in rows:
        for tool, f in row["folds"].items():
            lines.append(f"| {row['model']} ({row['nodes']} nodes, {row['bn']} BN) | {tool} | {f['rel_diff']:.2g} | "
                         f"{f['max_y']:.3g} | {f['nodes']} | {f['bn_left']} |")
    lines += ["", "| model | verification inputs | max |Δ| / max |y| | max |y| | passes (rtol 1.2e-4) |", "|---|---|---|---|---|"]
    for row in rows:
        for kind in ("normal", "implied"):
            v = row[f"random_{kind}"]
            lines.append(f"| {row['model']} | {v['inputs']} | {v['rel_diff']:.2g} | {v['max_y']:.3g} | {v['passed']} |")
    lines += ["", "| densenet121 | nodes | BN | ORT ms, opt. on | ORT ms, opt. off |", "|---|---|---|---|---|"]
    for v in lat["nodes"]:
        lines.append(f"| {v} | {lat['nodes'][v]} | {lat['bn'][v]} | {lat['ms']['on'][v]:.1f} | {lat['ms']['off'][v]:.1f} |")
    lines.append(f"\naffine / keep, paired median: opt. on {lat['affine_over_keep']['on']:.3f}×, "
                 f"opt. off {lat['affine_over_keep']['off']:.3f}×")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=3, help="back-to-back runs per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [accuracy(name, Path(tmp)) for name in ("efficientnet_b0", "regnet_y_400mf")]
        lat = latency(Path(tmp), args.rounds, args.runs)
    versions = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    for name in ("onnxslim", "onnxoptimizer"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "results_fold_real.json").write_text(json.dumps({"accuracy": rows, "densenet121": lat, "versions": versions},
                                                           indent=2))
    print(markdown(rows, lat))
    print(f"\n{versions}")


if __name__ == "__main__":
    main()
