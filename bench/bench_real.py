"""bnfold at real sizes against the floor — a job that runs one plain ONNX Runtime pass — in one run.

    python -m bench.bench_real --repeats 1                    # the whole set, < 10 min on 2 quiet cores
    python -m bench.bench_real --cases mobilenet_v2-224 --repeats 3 --methods pass,bnfold,update_bn

Cases (``arch-size``, 512 samples unless ``arch-size-n``): torchvision mobilenet_v2, efficientnet_b0,
resnet50 at 224×224 × 512 (``bench.real_models``), the bench ResNet-18 at 128×128 × 512
(``bench.models``), mobilenet_v2 at 64×64 × 128.

Methods, each one job in its OWN process, timed from after the imports to the end (so session
building, reading, saving are all inside), interleaved per repeat pass, bnfold, update_bn, pass, …:

  pass       load the model and the samples (.npy), build a default InferenceSession, run the
             samples in batches of 64, save the model (onnx.save) — the floor
  bnfold     ``bnfold.pipeline.recalibrate_files(model, samples.npy, JobOptions(fold=False))``
             (what ``bnfold recalibrate --no-fold`` runs: default options), save the model
  bnfold_base  the same job with the bnfold found at ``--base`` (e.g. an unpacked older commit:
             ``git archive <commit> bnfold | tar -x -C /tmp/base``, plus its built C kernel): before/after
  update_bn  torch ``swa_utils.update_bn`` on the same weights and samples (approximate;
             building the torch model is not timed), batches of 64

Reported per case: median wall time, the median of per-repeat paired ratios to ``pass``, the CPU
time ratio (user+sys of the process), peak RSS (``ru_maxrss``), bnfold's own timings as shares of
its wall time, and (``--check``, default on, not timed) the fixed-point residual of bnfold's model:
its BN inputs re-measured in eval mode with its own statistics, max |Δμ|/σ and max rel Δvar.
Exact layer-by-layer in torch is not run here (hours at 224 on 2 cores); ``bench.bench_recalibrate``
runs it on the ResNet-18.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_CASES = "mobilenet_v2-224,efficientnet_b0-224,resnet50-224,resnet18bench-128,mobilenet_v2-64-128"
ROOT = Path(__file__).resolve().parents[1]


def _case(spec: str) -> tuple[str, int, int]:
    parts = spec.split("-")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 512


def _files(workdir: str, arch: str, size: int, n: int) -> tuple[str, str]:
    """Model and samples files, made in a child process: the driver must stay small, because a
    child's ru_maxrss starts from the RSS of the process that forked it (Linux keeps the larger
    hiwater across fork and exec), so a big driver would raise every method's peak RSS."""
    if arch == "resnet18bench":
        from bench import models

        cmd = ["-m", "bench.models", "--workdir", workdir, "--samples", str(n)]
        paths = (Path(workdir) / models.MODEL_FILE, Path(workdir) / models.samples_file(n))
    else:
        from bench import real_models

        cmd = ["-m", "bench.real_models", "--workdir", workdir, "--archs", arch, "--samples", str(n), "--size", str(size)]
        paths = (real_models.model_path(workdir, arch, size), real_models.samples_path(workdir, n, size))
    subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(paths[0]), str(paths[1])


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---- workers ------------------------------------------------------------------------------------


def _job_pass(model_path, samples_path, out, info):
    import onnx
    import onnxruntime as ort

    model = onnx.load(model_path)
    x = np.load(samples_path)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(0, len(x), 64):
        session.run(None, {name: x[i : i + 64]})
    onnx.save(model, out)


def _job_bnfold(model_path, samples_path, out, info):
    import onnx

    from bnfold.engine.memory import default_memory_budget
    from bnfold.pipeline import JobOptions, recalibrate_files

    info["memory_budget"] = default_memory_budget()  # what the job's auto budget sees, just before it
    result = recalibrate_files(model_path, samples_path, JobOptions(fold=False))
    onnx.save(result.model, out)
    info["timings"] = {k: float(v) for k, v in result.report.timings.items()}
    info["store"] = result.report.extra.get("store")


def _job_update_bn(model_path, samples_path, out, info, arch):
    import torch
    from torch.optim.swa_utils import update_bn

    if arch == "resnet18bench":
        from bench.models import STATE_FILE, load_model

        model = load_model(Path(model_path).parent / STATE_FILE)
    else:
        from bench.real_models import build

        model = build(arch)
    cpu0, t0 = _cpu(), time.perf_counter()  # from here: building the torch model is not timed
    x = torch.from_numpy(np.load(samples_path))
    update_bn([x[i : i + 64] for i in range(0, len(x), 64)], model)
    info["update_bn_seconds"] = time.perf_counter() - t0
    info["update_bn_cpu_seconds"] = _cpu() - cpu0


def worker(args) -> None:
    info: dict = {"method": args.worker}
    if args.worker == "update_bn":
        import torch  # noqa: F401  (imports are outside the timed part for every method)
    else:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        import bnfold.pipeline  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.onnx")
        info["bnfold"] = str(Path(sys.modules["bnfold"].__file__).parent) if "bnfold" in sys.modules else None
        cpu0, t0 = _cpu(), time.perf_counter()
        if args.worker == "pass":
            _job_pass(args.model, args.samples_file, out, info)
        elif args.worker == "bnfold":
            _job_bnfold(args.model, args.samples_file, out, info)
            if args.keep:
                os.replace(out, args.keep)
        else:
            _job_update_bn(args.model, args.samples_file, out, info, args.arch)
        info["seconds"] = time.perf_counter() - t0
        info["cpu_seconds"] = _cpu() - cpu0
    if args.worker == "update_bn":  # the timed part: load the samples, update_bn
        info["seconds"] = info.pop("update_bn_seconds")
        info["cpu_seconds"] = info.pop("update_bn_cpu_seconds")
    info["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.result).write_text(json.dumps(info))


# ---- fixed-point check (not timed) ----------------------------------------------------------------


def fixed_point_residual(model_path: str, samples_path: str) -> tuple[float, float]:
    """Re-measure bnfold's model's BN inputs in eval mode with its own statistics (float64 moments,
    batches of 64); max over BNs/channels of |Δμ|/√(var+ε) and |Δvar|/(var+ε)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from bnfold.engine.moments import Moments

    model = onnx.load(model_path)
    inits = {t.name: t for t in model.graph.initializer}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    xs = list(dict.fromkeys(n.input[0] for n in bns))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in xs)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.load(samples_path, mmap_mode="r")
    moments: dict[str, Moments] = {}
    for i in range(0, len(x), 64):
        for t, v in zip(xs, session.run(xs, {name: np.ascontiguousarray(x[i : i + 64])})):
            m = Moments.of(v)
            moments[t] = m if t not in moments else moments[t].merge(m)
    worst_mu = worst_var = 0.0
    for n in bns:
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        mean, var = (numpy_helper.to_array(inits[n.input[k]]).astype(np.float64) for k in (3, 4))
        got = moments[n.input[0]]
        worst_mu = max(worst_mu, float(np.max(np.abs(got.mean - mean) / np.sqrt(var + eps))))
        worst_var = max(worst_var, float(np.max(np.abs(got.var - var) / (var + eps))))
    return worst_mu, worst_var


def _check(model: str, samples: str, tmp: str) -> tuple[float, float] | None:
    """`fixed_point_residual` in a child process (it holds every BN input of a batch)."""
    out = os.path.join(tmp, "check.json")
    code = ("import json, sys; from bench.bench_real import fixed_point_residual as f; "
            "json.dump(f(sys.argv[1], sys.argv[2]), open(sys.argv[3], 'w'))")
    proc = subprocess.run([sys.executable, "-c", code, model, samples, out], cwd=ROOT, capture_output=True, text=True, check=False)
    return tuple(json.loads(Path(out).read_text())) if proc.returncode == 0 else None


# ---- driver -------------------------------------------------------------------------------------


def _run(method, arch, model, samples, tmp, keep=None, base=None) -> dict:
    result = os.path.join(tmp, f"{method}.json")
    worker = "bnfold" if method == "bnfold_base" else method
    cmd = [sys.executable, "-m", "bench.bench_real", "--worker", worker, "--arch", arch, "--model", model,
           "--samples-file", samples, "--result", result, *(["--keep", keep] if keep else [])]  # fmt: skip
    if method == "bnfold_base":  # that bnfold first on sys.path (see main); bench/ still from this tree (cwd)
        cmd += ["--base", base]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if proc.returncode or not os.path.exists(result):
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(Path(result).read_text())


def _gib(b) -> str:
    return f"{b / 2**30:.2f}"


def driver(args) -> int:
    methods = args.methods.split(",")
    cases = [_case(c) for c in args.cases.split(",")]
    rows, raw = [], {}
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    for arch, size, n in cases:
        label = f"{'resnet18 (bench)' if arch == 'resnet18bench' else arch} {size}×{size} × {n}"
        model, samples = _files(args.workdir, arch, size, n)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
            kept = os.path.join(tmp, "bnfold.onnx")
            for r in range(args.repeats):
                for m in methods:
                    info = _run(m, arch, model, samples, tmp, kept if m == "bnfold" else None, args.base)
                    info["repeat"] = r
                    runs[m].append(info)
                    print(f"  {label:34s} {m:9s} " + (f"{info['seconds']:.2f} s, CPU {info['cpu_seconds']:.2f} s, "
                          f"peak RSS {_gib(info['maxrss'])} GiB" if "seconds" in info else info["error"]), flush=True)  # fmt: skip
            check = _check(kept, samples, tmp) if args.check and os.path.exists(kept) else None
        raw[label] = runs
        rows.append(_summary(label, runs, check))
    total = time.perf_counter() - started
    print(f"\n{args.repeats} repeat(s); load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after; {total:.0f} s\n")
    _table(rows, methods)
    Path(args.workdir, "results_real.json").write_text(json.dumps({"rows": rows, "runs": raw}, indent=1, default=str))
    return 0


def _summary(label, runs, check) -> dict:
    ok = {m: [i for i in rs if "seconds" in i] for m, rs in runs.items()}
    base = {i["repeat"]: i for i in ok.get("pass", [])}
    row = {"case": label, "check": check}
    for m, rs in ok.items():
        if not rs:
            row[m] = {"error": runs[m][0].get("error")}
            continue
        paired = [i["seconds"] / base[i["repeat"]]["seconds"] for i in rs if i["repeat"] in base]
        cpu = [i["cpu_seconds"] / base[i["repeat"]]["cpu_seconds"] for i in rs if i["repeat"] in base]
        row[m] = {
            "seconds": statistics.median(i["seconds"] for i in rs),
            "paired": statistics.median(paired) if paired else None,
            "cpu": statistics.median(cpu) if cpu else None,
            "maxrss": max(i["maxrss"] for i in rs),
            "timings": rs[len(rs) // 2].get("timings"),
            "store": rs[len(rs) // 2].get("store"),
            "memory_budget": rs[len(rs) // 2].get("memory_budget"),
        }
    return row


def _table(rows, methods) -> None:
    others = [m for m in methods if m != "pass"]
    head = "| case | pass s | " + " | ".join(f"{m} s · × pass (paired) · × CPU" for m in others)
    head += " | peak RSS GiB: " + " / ".join(methods) + " | bnfold fixed-point residual |μ|/σ, var |"
    print(head)
    print("|---|---:|" + "---:|" * len(others) + "---|---|")
    for row in rows:
        cells = [row["case"], f"{row['pass']['seconds']:.1f}" if "seconds" in row.get("pass", {}) else "—"]
        for m in others:
            v = row.get(m, {})
            cells.append(f"{v['seconds']:.1f} · {v['paired']:.2f}× · {v['cpu']:.2f}×" if "seconds" in v else f"failed: {v.get('error')}")
        cells.append(" / ".join(_gib(row[m]["maxrss"]) if "maxrss" in row.get(m, {}) else "—" for m in methods))
        cells.append(f"{row['check'][0]:.1e}, {row['check'][1]:.1e}" if row["check"] else "—")
        print("| " + " | ".join(cells) + " |")
    print("\nbnfold's report.timings, as shares of its wall time (median-time repeat):")
    for row in rows:
        for m in [m for m in methods if m.startswith("bnfold")]:
            t = row.get(m, {}).get("timings")
            if t:
                total = t["total"]
                parts = ", ".join(f"{k} {v / total:.0%}" for k, v in t.items() if k != "total")
                print(f"  {row['case']} ({m}): total {total:.1f} s = {parts}; statistics {t['statistics']:.2f} s; "
                      f"store {row[m].get('store')}, budget {row[m].get('memory_budget')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--methods", default="pass,bnfold")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--base", help="folder holding an older bnfold package, for the method bnfold_base")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--samples-file", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--keep", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.base:  # bnfold_base: `-m` puts the cwd (this tree) first on sys.path, ahead of PYTHONPATH
            sys.path.insert(0, args.base)
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
