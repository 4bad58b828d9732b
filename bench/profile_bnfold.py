"""Where bnfold's time goes, relative to one plain ORT inference pass, in ONE process.

    python -m bench.profile_bnfold --samples 512 --batch-size 64 --repeats 3 [--cprofile]

Alternates (plain ORT pass, bnfold.recalibrate) ``--repeats`` times in the same process, so each
pair sees the same machine load, and splits bnfold's wall time with its ``report.timings``:
ORT ``run`` calls of all stages, float64 statistics, the tensor store, and the rest (graph
planning, one session build per stage, report).  Each part is printed as a multiple of the plain
pass of the same pair.  ``--cprofile`` adds the top functions of one extra bnfold call;
``--ort-ops`` runs one more profiled pair with ONNX Runtime's own profiler and sums kernel time
per operator type (plain session vs all of bnfold's stage sessions).  ``--ort-ops`` wraps the
``ort`` name inside ``bnfold.recalibrate`` (a private detail) to switch profiling on.

Run ``python -m bench.models --samples N`` (or bench_recalibrate) first to create the files.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--ort-ops", action="store_true")
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort

    import bnfold

    workdir = Path(args.workdir)
    model_path = workdir / "resnet18.onnx"
    x = np.load(workdir / f"samples_{args.samples}.npy")
    proto = onnx.load(str(model_path))
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    bs = args.batch_size

    def plain() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            sess.run(None, {"input": x[i : i + bs]})
        return time.perf_counter() - t0

    def recal():
        t0 = time.perf_counter()
        result = bnfold.recalibrate(proto, x, batch_size=bs)
        return time.perf_counter() - t0, dict(result.report.timings)

    plain()  # warm the plain session once (its first run allocates its arena)
    rows = []
    for r in range(args.repeats):
        a = plain()
        b, timings = recal()
        parts = {k: timings.get(k, 0.0) for k in ("onnxruntime", "statistics", "store")}
        parts["other"] = b - sum(parts.values())
        rows.append((a, b, parts))
        print(
            f"pair {r + 1}: plain {a:.2f} s, bnfold {b:.2f} s = {b / a:.2f}× ("
            + ", ".join(f"{k} {v / a:.2f}×" for k, v in parts.items())
            + ")",
            flush=True,
        )
    med = lambda vals: statistics.median(vals)  # noqa: E731
    print(
        f"median over {args.repeats} pairs: bnfold {med([b / a for a, b, _ in rows]):.2f}× plain; "
        + ", ".join(f"{k} {med([p[k] / a for a, _, p in rows]):.2f}×" for k in rows[0][2])
    )

    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        bnfold.recalibrate(proto, x, batch_size=bs)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)

    if args.ort_ops:
        ort_ops(proto, str(model_path), x, bs)


def _kernel_times(files) -> tuple[dict[str, float], dict[str, int], float]:
    import collections
    import json

    per_op: dict[str, float] = collections.Counter()
    calls: dict[str, int] = collections.Counter()
    run_total = 0.0
    for f in files:
        for e in json.loads(Path(f).read_text()):
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"] / 1e6
                calls[e["args"]["op_name"]] += 1
            elif e.get("cat") == "Session" and e.get("name") == "model_run":
                run_total += e["dur"] / 1e6
    return per_op, calls, run_total


def ort_ops(proto, model_path: str, x, bs: int) -> None:
    import sys
    import tempfile

    import onnxruntime as ort

    import bnfold

    module = sys.modules["bnfold.engine.recalibrate"]
    if getattr(module, "ort", None) is not ort:
        raise SystemExit("--ort-ops: bnfold.recalibrate no longer calls onnxruntime through `ort`")
    with tempfile.TemporaryDirectory(prefix="bnfold-ortprof-") as tmp:

        def options(prefix, so=None):
            so = so or ort.SessionOptions()
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / prefix)
            return so

        plain = ort.InferenceSession(model_path, options("plain"), providers=["CPUExecutionProvider"])
        for i in range(0, len(x), bs):
            plain.run(None, {"input": x[i : i + bs]})
        plain_files = [plain.end_profiling()]

        sessions = []

        class Profiled:
            def __getattr__(self, name):
                return getattr(ort, name)

            def InferenceSession(self, model, sess_options=None, providers=None, **kw):  # noqa: N802
                s = ort.InferenceSession(model, options("stage", sess_options), providers=providers, **kw)
                sessions.append(s)
                return s

        module.ort = Profiled()
        try:
            bnfold.recalibrate(proto, x, batch_size=bs)
        finally:
            module.ort = ort
        stage_files = [s.end_profiling() for s in sessions]
        a, na, ra = _kernel_times(plain_files)
        b, nb, rb = _kernel_times(stage_files)
    print(f"\nONNX Runtime profile (cold sessions): model_run total plain {ra:.2f} s, "
          f"{len(stage_files)} stage sessions {rb:.2f} s ({rb / ra:.2f}×)")  # fmt: skip
    print(f"{'operator':24s} {'plain s':>9s} {'calls':>6s} {'stages s':>9s} {'calls':>6s} {'stages / plain run':>19s}")
    for op in sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0) + b.get(k, 0))):
        print(f"{op:24s} {a.get(op, 0):9.3f} {na.get(op, 0):6d} {b.get(op, 0):9.3f} {nb.get(op, 0):6d} {b.get(op, 0) / ra:18.2f}×")


if __name__ == "__main__":
    main()
