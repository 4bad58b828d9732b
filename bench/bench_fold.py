"""BN folding side by side with its peers: graph size, correctness and ORT latency.

    python -m bench.bench_fold                      # both models, ≈ 4 min on 2 busy cores
    python -m bench.bench_fold --models encdec --variants bnfold,ort-basic --rounds-64 3

Models (exported from torch with the BN nodes kept, ``TrainingMode.PRESERVE``, opset 17):

  resnet18  bench/models.py: ResNet-18, 3×128×128, 20 BN, every one after a Conv;
  encdec    a small encoder/decoder built here, 3×64×64, 6 BN: Conv+BN ×3 (one Conv with a bias),
            ConvTranspose(group=4, 64→64)+BN, ConvTranspose(group=2, 64→32, bias)+BN, then
            AdaptiveAvgPool(4) → flatten → Linear+BatchNorm1d (exported as Gemm → BN) → Linear.

Variants of each model:

  original       the exported model, BN unfolded;
  bnfold         bnfold.folding.fold.fold_batchnorms(model).model;
  onnxoptimizer  onnxoptimizer.optimize(model, ["fuse_bn_into_conv"]);
  onnxslim       onnxslim.slim(model) (default options);
  ort-basic      the model ORT writes to SessionOptions.optimized_model_filepath at ORT_ENABLE_BASIC
                 (standard ONNX ops only: constant folding, Conv+BN fusion, …);
  ort-extended   the same at ORT_ENABLE_EXTENDED (adds com.microsoft contrib ops such as FusedConv,
                 so only ORT can run it). ORT_ENABLE_ALL is not used: its NCHWc layout rewrite is
                 specific to the CPU that wrote the file, and ORT itself warns against saving it.

Per variant: node count and BN nodes left, serialized size, the time the tool takes (median of
``--transform-repeats`` interleaved runs, from an in-memory ModelProto — ORT from the serialized
bytes, session creation and file write included), and max |Δ| of the output against the original
on one seeded N(0,1) batch of 64, the original run with graph optimizations off (the unfused
reference) and the variant with optimizations off and on.

Latency: for each batch size (1, 64) one session per variant and graph-optimization level
(ENABLE_ALL "on", DISABLE_ALL "off") is built and warmed up, then ``rounds`` rounds run every
(variant, level) once each in a rotating order (one measurement = ``k`` back-to-back runs; at
batch 1 ``k`` is chosen so that a measurement takes ≈ ``--target-ms``). Ratios are to the original
model at the same level, and — the question for runtimes that do not fuse — each variant with
optimizations off against the original with them on. Reported: the median wall time per run; the
median over rounds of (variant time / original time in the same round) — the paired ratio, which
survives the drift of a shared machine better than a ratio of medians; and the ratio of median CPU
time of the calling thread. ORT runs with ONE intra-op thread by default (``--threads``): on a shared 2-core machine a
2-thread pool stalls whenever either thread is descheduled, while single-threaded CPU time (the
whole run, as no pool exists) barely notices the neighbours. Prints Markdown; writes JSON to
bench/out/results_fold.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.folding.fold import fold_batchnorms

VARIANTS = ("original", "bnfold", "onnxoptimizer", "onnxslim", "ort-basic", "ort-extended")
LEVELS = {"on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
ENCDEC_FILE = "encdec.onnx"


# --------------------------------------------------------------------------------------------
# the second model: Conv, grouped ConvTranspose and Gemm, each followed by BN
# --------------------------------------------------------------------------------------------


def build_encdec(path: Path) -> None:
    """Export the encoder/decoder (seeded weights and BN statistics) to ``path``."""
    import torch
    from torch import nn

    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            )
            self.dec = nn.Sequential(
                nn.ConvTranspose2d(64, 64, 4, 2, 1, groups=4, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                nn.ConvTranspose2d(64, 32, 4, 2, 1, groups=2), nn.BatchNorm2d(32), nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.head = nn.Sequential(nn.Linear(32 * 16, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x):
            return self.head(torch.flatten(self.pool(self.dec(self.enc(x))), 1))

    torch.manual_seed(0)
    model = EncDec()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # non-trivial affine map per channel
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias, 0.0, 0.3)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(
        model.eval(), torch.randn(2, 3, 64, 64), str(path),
        training=torch.onnx.TrainingMode.PRESERVE, dynamo=False, do_constant_folding=False,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def model_paths(workdir: Path, names: list[str]) -> dict[str, Path]:
    paths = {}
    if "resnet18" in names:
        from bench.models import prepare

        paths["resnet18"] = Path(prepare(workdir, sample_counts=())["onnx"])
    if "encdec" in names:
        paths["encdec"] = workdir / ENCDEC_FILE
        if not paths["encdec"].exists():
            build_encdec(paths["encdec"])
    return paths


# --------------------------------------------------------------------------------------------
# the transforms
# --------------------------------------------------------------------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _ort_offline(level: ort.GraphOptimizationLevel):
    def transform(model: onnx.ModelProto) -> onnx.ModelProto:
        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return onnx.load(so.optimized_model_filepath)

    return transform


TRANSFORMS = {
    "original": lambda m: m,
    "bnfold": lambda m: fold_batchnorms(m).model,
    "onnxoptimizer": lambda m: __import__("onnxoptimizer").optimize(m, ["fuse_bn_into_conv"]),
    "onnxslim": lambda m: __import__("onnxslim").slim(_copy(m)),
    "ort-basic": _ort_offline(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    "ort-extended": _ort_offline(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
}


def transform_all(model: onnx.ModelProto, names: list[str], repeats: int) -> tuple[dict[str, bytes], dict[str, float]]:
    """Serialized variants and the median transform time of each (interleaved repeats)."""
    times: dict[str, list[float]] = {v: [] for v in names}
    out: dict[str, bytes] = {}
    for _ in range(repeats):
        for v in names:
            t0 = time.perf_counter()
            result = TRANSFORMS[v](model)
            times[v].append(time.perf_counter() - t0)
            out[v] = result.SerializeToString()
    return out, {v: statistics.median(t) for v, t in times.items()}


def graph_facts(data: bytes, original: Counter) -> dict:
    model = onnx.load_from_string(data)
    ops = Counter(n.op_type for n in model.graph.node)
    changed = {op: ops.get(op, 0) - original.get(op, 0) for op in sorted(set(ops) | set(original))}
    return {
        "nodes": sum(ops.values()),
        "bn_left": ops.get("BatchNormalization", 0),
        "bytes": len(data),
        "ops": dict(ops),
        "op_changes": {op: d for op, d in changed.items() if d},
    }


# --------------------------------------------------------------------------------------------
# latency and correctness
# --------------------------------------------------------------------------------------------


def _session(data: bytes, level: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _timed(run, k: int) -> tuple[float, float]:
    """(wall, CPU time of this thread) per run, over k back-to-back runs."""
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(k):
        run()
    return (time.perf_counter() - t0) / k, (time.thread_time() - c0) / k


def _summary(wall: dict, cpu: dict, base: tuple) -> dict:
    """Per key: median wall, median paired wall ratio and CPU-time ratio to the key ``base``."""
    med = statistics.median
    return {
        "median_s": {v: med(t) for v, t in wall.items()},
        "paired_ratio": {v: med(a / b for a, b in zip(t, wall[base])) for v, t in wall.items()},
        "min_ratio": {v: min(t) / min(wall[base]) for v, t in wall.items()},
        "median_cpu_s": {v: med(t) for v, t in cpu.items()},
        "cpu_ratio": {v: med(t) / med(cpu[base]) for v, t in cpu.items()},
    }


def measure(variants: dict[str, bytes], x: np.ndarray, rounds: int, target_ms: float, threads: int) -> dict:
    """Latency of every (variant, optimization level) at one batch size, all interleaved in the same
    rounds; and each one's output on ``x`` (its first, cold run)."""
    keys = [(v, level) for level in LEVELS for v in variants]
    sessions = {key: _session(variants[key[0]], key[1], threads) for key in keys}
    name = sessions[keys[0]].get_inputs()[0].name
    runs = {key: (lambda s=s: s.run(None, {name: x})) for key, s in sessions.items()}
    outputs = {key: run()[0] for key, run in runs.items()}
    for run in runs.values():
        run()
    one = min(_timed(runs[("original", "on")], 1)[0] for _ in range(5))
    k = max(1, round(target_ms / 1e3 / one)) if len(x) == 1 else 1
    wall: dict[tuple, list[float]] = {key: [] for key in keys}
    cpu: dict[tuple, list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            w, c = _timed(runs[key], k)
            wall[key].append(w)
            cpu[key].append(c)
    out = {"k": k, "outputs": outputs}
    for level in LEVELS:
        mine = lambda d: {v: d[(v, level)] for v in variants}  # noqa: E731
        out[level] = _summary(mine(wall), mine(cpu), "original") | {"wall_s": mine(wall), "cpu_s": mine(cpu)}
    # the same runs, every variant at this level against the ORIGINAL model with optimizations ON
    out["vs_original_on"] = {
        level: {m: {v: r[(v, level)] for v in variants} for m, r in _summary(wall, cpu, ("original", "on")).items()}
        for level in LEVELS
    }
    return out


def bench_model(path: Path, args) -> dict:
    model = onnx.load(str(path))
    original_ops = Counter(n.op_type for n in model.graph.node)
    variants, transform_s = transform_all(model, args.variants, args.transform_repeats)
    facts = {v: graph_facts(variants[v], original_ops) | {"transform_s": transform_s[v]} for v in variants}
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x64 = np.random.default_rng(0).standard_normal([64, *dims]).astype(np.float32)
    latency, cross = {}, {}
    for batch, rounds in ((1, args.rounds_1), (64, args.rounds_64)):
        log(f"  {path.stem}: batch {batch}, {len(variants)} variants × optimizations on/off, {rounds} rounds")
        res = measure(variants, x64[:batch], rounds, args.target_ms, args.threads)
        for level in LEVELS:
            latency[f"b{batch}_{level}"] = res[level] | {"k": res["k"]}
        cross[f"b{batch}"] = res["vs_original_on"]
        outputs = res["outputs"]
    reference = outputs[("original", "off")]  # batch 64, the unfused graph
    for v in variants:
        facts[v]["max_abs_delta"] = {lvl: float(np.abs(outputs[(v, lvl)] - reference).max()) for lvl in LEVELS}
        facts[v]["max_abs_output"] = float(np.abs(reference).max())
    fold = fold_batchnorms(model)
    return {"path": str(path), "facts": facts, "latency": latency, "vs_original_on": cross,
            "bnfold_counts": fold.counts, "bnfold_kept": [d.reason for d in fold.decisions if d.fate == "kept"]}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ops_changed(changes: dict) -> str:
    return ", ".join(f"{op} {d:+d}" for op, d in sorted(changes.items(), key=lambda kv: kv[1])) or "—"


def _cell(m: dict, v: str, wall: bool = True) -> str:
    ms = f"{m['median_s'][v] * 1e3:.2f} ms · " if wall else ""
    return f"{ms}{m['paired_ratio'][v]:.2f}× · {m['cpu_ratio'][v]:.2f}×"


def markdown(name: str, res: dict) -> str:
    f, lat, cross = res["facts"], res["latency"], res["vs_original_on"]
    lines = [
        f"### {name}  (`{res['path']}`; bnfold: {res['bnfold_counts']})", "",
        "| variant | nodes | BN left | ops changed vs original | file MB | transform s "
        "| max abs Δ, opt off | max abs Δ, opt on |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for v, d in f.items():
        delta = d["max_abs_delta"]
        lines.append(f"| {v} | {d['nodes']} | {d['bn_left']} | {_ops_changed(d['op_changes'])} "
                     f"| {d['bytes'] / 1e6:.3f} | {d['transform_s']:.3f} | {delta['off']:.2g} | {delta['on']:.2g} |")
    lines.append(f"\nmax abs output of the original on the batch: {f['original']['max_abs_output']:.3g}\n")
    cols = {"b1_on": "batch 1, opt ON", "b1_off": "batch 1, opt OFF",
            "b64_on": "batch 64, opt ON", "b64_off": "batch 64, opt OFF"}
    lines += ["| variant | " + " | ".join(cols.values()) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {v} | " + " | ".join(_cell(lat[k], v) for k in cols) + " |" for v in f]
    lines.append("\ncells: median wall time per run · median paired wall ratio to original · ratio of median "
                 "CPU time (calling thread; the whole run when threads = 1)")
    lines.append(f"\nruns per measurement (k): batch 1: {lat['b1_on']['k']}, batch 64: {lat['b64_on']['k']}\n")
    lines += ["| variant, opt OFF ÷ original, opt ON | batch 1 | batch 64 |", "|---|---:|---:|"]
    lines += [f"| {v} | {_cell(cross['b1']['off'], v, False)} | {_cell(cross['b64']['off'], v, False)} |" for v in f]
    lines.append("\ncells: median paired wall ratio · CPU-time ratio, from the same interleaved rounds\n")
    return "\n".join(lines)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("numpy", "onnx", "onnxruntime", "onnxoptimizer", "onnxslim", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "loadavg": os.getloadavg(), "python": platform.python_version()} | versions


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--models", default="resnet18,encdec", help="comma list of resnet18,encdec")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--rounds-1", type=int, default=21, help="interleaved rounds at batch 1")
    ap.add_argument("--rounds-64", type=int, default=7, help="interleaved rounds at batch 64")
    ap.add_argument("--target-ms", type=float, default=100.0, help="length of one batch-1 measurement")
    ap.add_argument("--transform-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="ORT intra-op threads (0: ORT's default); 1 makes the CPU-time column the whole run")
    args = ap.parse_args(argv)
    args.variants = ["original", *[v for v in args.variants.split(",") if v != "original"]]
    if unknown := set(args.variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "command": " ".join(["python -m bench.bench_fold", *sys.argv[1:]]),
            "args": vars(args)}
    t0 = time.perf_counter()
    results = {}
    for name, path in model_paths(workdir, args.models.split(",")).items():
        results[name] = bench_model(path, args)
        print(markdown(name, results[name]), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    info |= {"wall_s": time.perf_counter() - t0, "loadavg_end": os.getloadavg(), "peak_rss_gib": peak,
             "results": results}
    print(f"machine: {json.dumps(info['machine'])}\nloadavg at end: {info['loadavg_end']}; "
          f"wall {info['wall_s']:.0f} s; peak RSS {peak:.1f} GiB")
    (workdir / "results_fold.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
