"""CPU time of bnfold's per-batch statistics step against a plain ONNX Runtime pass, before/after.

    python -m bench.bench_stats_pass --base /tmp/base --repeats 5
    # --base: a folder holding an older bnfold package with its built C kernel
    #         (git archive <commit> bnfold setup.py pyproject.toml | tar -x -C /tmp/base;
    #          cd /tmp/base && python setup.py -q build_ext --inplace)

The end-to-end bench (bench_real) overlaps the statistics with ORT's run of the next batch, so on a
busy machine their cost hides in the wall time and in noisy whole-process CPU times. This one
isolates them: per case, each worker process (the bnfold of this tree, or the one at --base) runs
the samples in batches of 64 through (a) the plain model (timed: the floor) and (b) a probe session
that outputs every BN input (not timed), then times the recalibration runner's own
`_StageRunner._measure` (pooled `Moments` + per-sample `SampleStream` moments) on those tensors,
for every batch in order. CPU time is the process's user+sys (the statistics use a small thread
pool). ORT threads do not spin (`allow_spinning=0`), so their idle wait is not charged to the
statistics. Workers alternate new, base, new, base, …; the table gives medians of the statistics
CPU time as a multiple of the plain pass's CPU time in the same process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = "resnet18bench-128,mobilenet_v2-64-128"


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def worker(model_path: str, samples_path: str) -> dict:
    import onnx

    from bnfold.engine.recalibrate import _StageRunner

    model = onnx.load(model_path)
    xs = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization"))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in xs)
    plain, measured = _session(model), _session(probe)
    name = plain.get_inputs()[0].name
    x = np.load(samples_path)
    runner = types.SimpleNamespace(between={}, shifts={})  # the state `_measure` keeps across batches
    ort_cpu = stats_cpu = 0.0
    for i in range(0, len(x), 64):
        feed = {name: x[i : i + 64]}
        c0 = _cpu()
        plain.run(None, feed)
        ort_cpu += _cpu() - c0
        tensors = list(zip(xs, measured.run(xs, feed)))
        c0 = _cpu()
        _StageRunner._measure(runner, tensors)
        stats_cpu += _cpu() - c0
    return {"ort_cpu": ort_cpu, "stats_cpu": stats_cpu, "bnfold": str(Path(sys.modules["bnfold"].__file__).parent)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--base", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--base-first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.base_first:  # `-m` puts the cwd (this tree) first on sys.path, ahead of PYTHONPATH
            sys.path.insert(0, args.base)
        print(json.dumps(worker(*args.worker)))
        return 0
    from bench.bench_real import _case, _files

    print("| case | statistics CPU × plain-pass CPU, before (two reads) | after (one read) | after / before |")
    print("|---|---:|---:|---:|")
    for spec in args.cases.split(","):
        arch, size, n = _case(spec)
        model, samples = _files(args.workdir, arch, size, n)
        ratios: dict[str, list[float]] = {"new": [], "base": []}
        for _ in range(args.repeats):
            for impl in ("new", "base"):
                cmd = [sys.executable, "-m", "bench.bench_stats_pass", "--base", args.base, "--worker", model, samples,
                       *(["--base-first"] if impl == "base" else [])]  # fmt: skip
                out = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
                assert out["bnfold"] == (str(Path(args.base, "bnfold")) if impl == "base" else str(ROOT / "bnfold"))
                ratios[impl].append(out["stats_cpu"] / out["ort_cpu"])
                print(f"  {spec} {impl}: statistics {out['stats_cpu']:.2f} s CPU, plain pass {out['ort_cpu']:.2f} s CPU",
                      file=sys.stderr, flush=True)
        before, after = statistics.median(ratios["base"]), statistics.median(ratios["new"])
        print(f"| {spec} | {before:.3f}× | {after:.3f}× | {after / before:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
