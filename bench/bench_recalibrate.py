"""Recalibration speed, memory and accuracy, side by side, on a ResNet-18 (3×128×128, BN kept).

    python -m bench.bench_recalibrate --samples 512 --batch-size 64 --repeats 3
    python -m bench.bench_recalibrate --only bnfold --samples 4096 --repeats 1

Methods (each run in its OWN subprocess, so peak RSS is that process's ru_maxrss and imports do
not pollute each other; runs are interleaved a,b,c,d,a,b,c,d,...):

  ort        (a) one plain onnxruntime inference pass over the samples (default session options)
  bnfold     (b) bnfold.recalibrate(onnx.load(path), samples, batch_size=B)
  update_bn  (c) torch.optim.swa_utils.update_bn, float32
  exact      (d) torch exact layer-by-layer, float64: for each BN in forward order, one eval-mode
                 pass over all samples (stopped at that BN) with every earlier BN already updated;
                 Chan-merged float64 mean / population variance.  This is the reference.

Only the work is timed: each subprocess first imports, loads the model and the samples, then
times the method.  Times are reported as the median over repeats, as a ratio to the median of
(a).  Stats errors are against (d): max over BNs and channels of |Δμ|/σ with σ = sqrt(var_d + ε),
and of |Δvar| / (var_d + ε).  Statistics travel between processes as .npz files (no pickle).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = {
    "ort": "(a) ORT inference pass",
    "bnfold": "(b) bnfold.recalibrate",
    "update_bn": "(c) torch update_bn (f32)",
    "exact": "(d) torch exact layer-by-layer (f64)",
    "exact_naive": "(d') torch layer-by-layer, 20 passes",
}
DEFAULT_METHODS = ["ort", "bnfold", "update_bn", "exact"]


# --------------------------------------------------------------------------------------------
# worker side (runs in a fresh interpreter per method and repeat)
# --------------------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _cpu() -> float:
    """user + system CPU seconds of this process so far (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _save_stats(path: str, names, means, variances) -> None:
    arrays = {"names": np.array(list(names), dtype=str)}
    for i, (m, v) in enumerate(zip(means, variances)):
        arrays[f"mean_{i:03d}"] = np.asarray(m, np.float64)
        arrays[f"var_{i:03d}"] = np.asarray(v, np.float64)
    np.savez(path, **arrays)


def _load_stats(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["names"]]
        return {n: (z[f"mean_{i:03d}"], z[f"var_{i:03d}"]) for i, n in enumerate(names)}


def _torch_name_map(onnx_path: str) -> dict[str, str]:
    """torch BN qualified name -> ONNX BN node name, via the running-mean initializer name the
    exporter kept ("layer1.0.bn1.running_mean" is the BN node's 4th input)."""
    from bench.models import onnx_batchnorms

    out = {}
    for node, mean_init, _ in onnx_batchnorms(onnx_path):
        if not mean_init.endswith(".running_mean"):
            raise RuntimeError(f"cannot map ONNX BN {node}: running mean input is {mean_init!r}")
        out[mean_init[: -len(".running_mean")]] = node
    return out


def _work_ort(args, x, info):
    import onnxruntime as ort

    info["versions"]["onnxruntime"] = ort.__version__
    t0 = time.perf_counter()
    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    info["session_seconds"] = time.perf_counter() - t0
    info["rss_before"] = _rss()
    info["maxrss_before"] = _maxrss()
    info["cpu_before"] = _cpu()
    bs = args.batch_size
    t0 = time.perf_counter()
    for i in range(0, len(x), bs):
        sess.run(None, {"input": x[i : i + bs]})
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = _cpu() - info.pop("cpu_before")
    if args.ort_warm:  # a second pass on the now warm session, for information (not the baseline)
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            sess.run(None, {"input": x[i : i + bs]})
        info["warm_seconds"] = time.perf_counter() - t0
    return None


def _work_bnfold(args, x, info):
    import onnx
    import onnxruntime as ort

    import bnfold

    info["versions"]["onnxruntime"] = ort.__version__
    info["versions"]["bnfold"] = bnfold.__version__
    model = onnx.load(args.model)
    if args.samples_source == "npy":  # bnfold's own lazy .npy reader: samples never all in RAM
        from bnfold.inputs.arrays import load_samples

        samples = load_samples(args.samples_file)
    else:
        samples = x
    info["samples_source"] = args.samples_source
    events: list[tuple[float, str, float]] = []
    rss_by_phase: dict[str, int] = {}
    import psutil

    me = psutil.Process()

    def progress(phase: str, fraction: float) -> None:
        events.append((time.perf_counter(), str(phase), float(fraction)))
        rss = me.memory_info().rss  # RSS after each step: where in the run memory peaks
        rss_by_phase[str(phase)] = max(rss_by_phase.get(str(phase), 0), rss)

    info["rss_before"] = _rss()
    info["maxrss_before"] = _maxrss()
    info["cpu_before"] = _cpu()
    t0 = time.perf_counter()
    result = bnfold.recalibrate(model, samples, batch_size=args.batch_size, progress=progress)
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = _cpu() - info.pop("cpu_before")
    # time per progress phase: the interval that ends at an event is charged to that event's
    # phase (bnfold reports progress after each step); what follows the last event is "<finish>"
    phases: dict[str, float] = {}
    marks = [(t0, "<start>")] + [(t, p) for t, p, _ in events] + [(t0 + info["seconds"], "<finish>")]
    for (ta, _), (tb, pb) in zip(marks, marks[1:]):
        phases[pb] = phases.get(pb, 0.0) + (tb - ta)
    info["phases"] = phases
    info["rss_by_phase"] = rss_by_phase
    info["progress_events"] = len(events)
    report = result.report
    info["report_timings"] = {k: float(v) for k, v in (report.timings or {}).items()}
    info["report_extra"] = {}
    for k, v in (report.extra or {}).items():
        try:
            info["report_extra"][k] = json.loads(json.dumps(v))
        except (TypeError, ValueError):
            pass
    layers = report.layers
    return [l.name for l in layers], [l.new_mean for l in layers], [l.new_var for l in layers]


def _work_update_bn(args, x, info):
    import torch
    from torch.optim.swa_utils import update_bn

    from bench.models import batchnorms, load_model

    info["versions"]["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    model = load_model(args.state)
    bns = batchnorms(model)
    names = _torch_name_map(args.model)
    bs = args.batch_size
    loader = [torch.from_numpy(x[i : i + bs]) for i in range(0, len(x), bs)]
    info["rss_before"] = _rss()
    info["maxrss_before"] = _maxrss()
    info["cpu_before"] = _cpu()
    t0 = time.perf_counter()
    update_bn(loader, model)
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = _cpu() - info.pop("cpu_before")
    return (
        [names[n] for n, _ in bns],
        [m.running_mean.double().numpy() for _, m in bns],
        [m.running_var.double().numpy() for _, m in bns],
    )


class _Chan:
    """Per-channel float64 mean / M2, merged across batches with Chan et al.'s parallel formula."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, a):  # a: (N, C, H, W) float64 tensor
        nb = a.numel() // a.shape[1]
        mb = a.mean(dim=(0, 2, 3))
        m2b = ((a - mb[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def set(self, bn):
        bn.running_mean.copy_(self.mean)
        bn.running_var.copy_(self.m2 / self.n)  # biased / population variance


def _bn_outputs(args, model, names, bns):
    return (
        [names[n] for n, _ in bns],
        [m.running_mean.double().numpy().copy() for _, m in bns],
        [m.running_var.double().numpy().copy() for _, m in bns],
    )


def _work_exact(args, x, info):
    """Reference: exact layer-by-layer in float64.  Mathematically the same as running the model
    once per BN (in eval mode, every earlier BN already updated), but the prefix of the network
    that no longer changes is cached per ResNet block, so each conv is evaluated once over the
    whole set instead of once per later BN (20 passes -> ~1 pass of float64 compute)."""
    import torch

    from bench.models import batchnorms, load_model

    info["versions"]["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    model = load_model(args.state, dtype=torch.float64)
    bns = batchnorms(model)
    names = _torch_name_map(args.model)
    bs = args.batch_size
    xt = torch.from_numpy(x)
    relu = torch.relu
    per_bn: list[float] = []
    info["rss_before"] = _rss()
    info["maxrss_before"] = _maxrss()
    info["cpu_before"] = _cpu()
    t0 = time.perf_counter()

    def measure(bn, fn, sources):
        """This BN's inputs fn(s) for every batch s, its exact statistics set; returns the inputs."""
        tb = time.perf_counter()
        inputs = [fn(src) for src in sources]
        acc = _Chan()
        for t in inputs:
            acc.add(t)
        acc.set(bn)
        per_bn.append(time.perf_counter() - tb)
        return inputs

    with torch.no_grad():
        # stem: conv1 -> [bn1] -> relu -> maxpool
        batches = (xt[i : i + bs].to(torch.float64) for i in range(0, len(x), bs))
        c = measure(model.bn1, model.conv1, batches)
        h = [model.maxpool(relu(model.bn1(ci))) for ci in c]
        del c
        # BasicBlocks: conv1 -> [bn1] -> relu -> conv2 -> [bn2] (+ downsample conv -> [bn]) -> add -> relu
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                c1 = measure(block.bn1, block.conv1, h)
                c2 = measure(block.bn2, lambda t, blk=block: blk.conv2(relu(blk.bn1(t))), c1)
                del c1
                if block.downsample is not None:
                    ds_conv, ds_bn = block.downsample[0], block.downsample[1]
                    d = measure(ds_bn, ds_conv, h)
                    identity = [ds_bn(di) for di in d]
                    del d
                else:
                    identity = h
                h = [relu(block.bn2(c2i) + idi) for c2i, idi in zip(c2, identity)]
                del c2, identity
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = _cpu() - info.pop("cpu_before")
    info["per_bn_seconds"] = per_bn
    return _bn_outputs(args, model, names, bns)


class _Stop(Exception):
    pass


def _work_exact_naive(args, x, info):
    """The textbook way: for each BN in forward order, one eval-mode pass over all samples
    (stopped at that BN) with every earlier BN already updated; float32 model, float64
    Chan-merged statistics (``--naive-dtype float64`` for a float64 model).  20 passes over (parts of) the network."""
    import torch

    from bench.models import batchnorms, load_model

    info["versions"]["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    dtype = getattr(torch, args.naive_dtype)
    info["dtype"] = args.naive_dtype
    model = load_model(args.state, dtype=dtype)
    bns = batchnorms(model)  # forward (call) order = a topological order of the BNs
    names = _torch_name_map(args.model)
    bs = args.batch_size
    xt = torch.from_numpy(x)
    per_bn: list[float] = []
    info["rss_before"] = _rss()
    info["maxrss_before"] = _maxrss()
    info["cpu_before"] = _cpu()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, bn in bns:
            acc = _Chan()

            def hook(module, inputs, acc=acc):
                acc.add(inputs[0].to(torch.float64))
                raise _Stop  # nothing downstream of this BN is needed for it

            handle = bn.register_forward_pre_hook(hook)
            tb = time.perf_counter()
            try:
                for i in range(0, len(x), bs):
                    try:
                        model(xt[i : i + bs].to(dtype))
                    except _Stop:
                        pass
            finally:
                handle.remove()
            acc.set(bn)
            per_bn.append(time.perf_counter() - tb)
    info["seconds"] = time.perf_counter() - t0
    info["cpu_seconds"] = _cpu() - info.pop("cpu_before")
    info["per_bn_seconds"] = per_bn
    return _bn_outputs(args, model, names, bns)


WORKERS = {
    "ort": _work_ort,
    "bnfold": _work_bnfold,
    "update_bn": _work_update_bn,
    "exact": _work_exact,
    "exact_naive": _work_exact_naive,
}


def worker_main(args) -> None:
    info: dict = {
        "method": args.worker,
        "pid": os.getpid(),
        "versions": {"numpy": np.__version__, "python": platform.python_version()},
    }
    if args.worker == "bnfold" and args.samples_source == "npy":
        x = np.load(args.samples_file, mmap_mode="r")  # only for the sample count; never read
    else:
        x = np.load(args.samples_file)  # fully in memory: part of rss_before, not of the work
    info["samples"] = int(x.shape[0])
    info["samples_bytes"] = int(x.nbytes)
    try:
        stats = WORKERS[args.worker](args, x, info)
        info["ok"] = True
    except Exception as exc:  # reported, not fatal to the bench
        info["ok"] = False
        info["error"] = f"{type(exc).__name__}: {exc}"
        stats = None
    info["maxrss"] = _maxrss()
    info["rss_after"] = _rss()
    if stats is not None:
        _save_stats(args.result + ".npz", *stats)
    Path(args.result + ".json").write_text(json.dumps(info, indent=1))


# --------------------------------------------------------------------------------------------
# driver side (imports neither torch nor onnxruntime)
# --------------------------------------------------------------------------------------------


def _run_worker(method: str, paths: dict, samples_key: str, batch_size: int, result: str, args) -> dict:
    cmd = [
        sys.executable, "-m", "bench.bench_recalibrate", "--worker", method,
        "--model", paths["onnx"], "--state", paths["state"], "--samples-file", paths[samples_key],
        "--batch-size", str(batch_size), "--result", result, "--naive-dtype", args.naive_dtype,
        "--samples-source", args.samples_source, *(["--ort-warm"] if args.ort_warm else []),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    try:
        info = json.loads(Path(result + ".json").read_text())
    except FileNotFoundError:
        info = {"method": method, "ok": False, "error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}"}
    info["process_wall"] = wall
    return info


def _old_stats(onnx_path: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path)
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            m = numpy_helper.to_array(inits[node.input[3]]).astype(np.float64)
            v = numpy_helper.to_array(inits[node.input[4]]).astype(np.float64)
            out[node.name] = (m, v, eps)
    return out


def stats_error(stats: dict, ref: dict, eps: dict) -> dict:
    """max over BNs/channels of |Δμ|/sqrt(var_ref+ε) and |Δvar|/(var_ref+ε), and where."""
    missing = sorted(set(ref) - set(stats))
    worst_mu, worst_var, at_mu, at_var = 0.0, 0.0, None, None
    for name, (m_ref, v_ref) in ref.items():
        if name not in stats:
            continue
        m, v = stats[name]
        s2 = v_ref + eps[name]
        dmu = float(np.max(np.abs(m - m_ref) / np.sqrt(s2)))
        dvar = float(np.max(np.abs(v - v_ref) / s2))
        if dmu >= worst_mu:
            worst_mu, at_mu = dmu, name
        if dvar >= worst_var:
            worst_var, at_var = dvar, name
    return {"mu_sigma": worst_mu, "rel_var": worst_var, "at_mu": at_mu, "at_var": at_var, "missing": missing}


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:,.0f}"


def _machine() -> dict:
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {"cpu": model_name, "cpus": os.cpu_count(), "mem_gib": round(mem / 2**30, 1), "platform": platform.platform()}


def _code_state(root: Path) -> dict:
    """Which bnfold was measured: HEAD and whether bnfold/ had uncommitted changes (read-only git)."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"head": git("rev-parse", "--short", "HEAD"), "bnfold_dirty": bool(git("status", "--porcelain", "--", "bnfold"))}


def driver_main(args) -> int:
    methods = [m.strip() for m in args.only.split(",")] if args.only else list(DEFAULT_METHODS)
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    repeats_exact = args.repeats if args.repeats_exact is None else args.repeats_exact
    workdir = Path(args.workdir)
    root = Path(__file__).resolve().parents[1]

    print(f"preparing model and {args.samples} samples in {workdir} ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "bench.models", "--workdir", str(workdir), "--samples", str(args.samples)],
        check=True, cwd=root, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    paths = {
        "onnx": str((workdir / "resnet18.onnx").resolve()),
        "state": str((workdir / "resnet18_state.npz").resolve()),
        "samples": str((workdir / f"samples_{args.samples}.npy").resolve()),
    }

    machine = _machine()
    code = _code_state(root)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        for r in range(args.repeats):
            for m in methods:
                if m in ("exact", "exact_naive") and r >= repeats_exact:
                    continue
                result = os.path.join(tmp, f"{m}_{r}")
                info = _run_worker(m, paths, "samples", args.batch_size, result, args)
                info["repeat"] = r
                if info.get("ok") and os.path.exists(result + ".npz"):
                    info["stats"] = _load_stats(result + ".npz")
                runs[m].append(info)
                status = (
                    f"{info['seconds']:.2f} s (CPU {info['cpu_seconds']:.2f} s), peak RSS {_mib(info['maxrss'])} MiB"
                    if info.get("ok")
                    else info["error"]
                )
                print(f"  repeat {r + 1}/{args.repeats}  {METHODS[m]:40s} {status}", flush=True)
    total = time.perf_counter() - t_start
    load_after = os.getloadavg()

    # ---- summarise
    def median(m, key):
        vals = [i[key] for i in runs.get(m, []) if i.get("ok") and i.get(key) is not None]
        return statistics.median(vals) if vals else None

    base = median("ort", "seconds")
    base_cpu = median("ort", "cpu_seconds")
    ort_by_repeat = {i["repeat"]: i for i in runs.get("ort", []) if i.get("ok")}

    def paired(m, key):
        """Per repeat: this method's figure over (a)'s figure of the same repeat."""
        return [
            i[key] / ort_by_repeat[i["repeat"]][key]
            for i in runs.get(m, [])
            if i.get("ok") and i["repeat"] in ort_by_repeat
        ]
    old = _old_stats(paths["onnx"])
    eps = {k: v[2] for k, v in old.items()}
    ref = next((i["stats"] for i in runs.get("exact", []) if i.get("ok")), None)
    errors = {}
    if ref is not None:
        errors["source stats (no recalibration)"] = stats_error({k: (v[0], v[1]) for k, v in old.items()}, ref, eps)
        for m in ("bnfold", "update_bn", "exact_naive"):
            good = [i for i in runs.get(m, []) if i.get("ok")]
            if good:
                errors[m] = stats_error(good[-1]["stats"], ref, eps)
        exact_runs = [i for i in runs["exact"] if i.get("ok")]
        if len(exact_runs) > 1:
            errors["exact (repeat spread)"] = stats_error(exact_runs[-1]["stats"], ref, eps)

    rows = []
    for m in methods:
        ok = [i for i in runs[m] if i.get("ok")]
        row = {
            "method": m,
            "label": METHODS[m],
            "runs": len(runs[m]),
            "ok": len(ok),
            "seconds": [round(i["seconds"], 3) for i in ok],
            "median_seconds": median(m, "seconds"),
            "ratio": (median(m, "seconds") / base) if (base and median(m, "seconds")) else None,
            "paired_ratios": [round(v, 3) for v in paired(m, "seconds")],
            "paired_ratio_median": statistics.median(paired(m, "seconds")) if paired(m, "seconds") else None,
            "cpu_seconds": [round(i["cpu_seconds"], 3) for i in ok],
            "cpu_ratio": (median(m, "cpu_seconds") / base_cpu) if (base_cpu and median(m, "cpu_seconds")) else None,
            "peak_rss": max((i["maxrss"] for i in ok), default=None),
            "rss_before": median(m, "rss_before"),
            "maxrss_before": max((i["maxrss_before"] for i in ok), default=None),
            "errors": sorted({i["error"] for i in runs[m] if not i.get("ok")}),
            "stats_error": errors.get(m),
        }
        # details from the run whose time is the median (the lower middle one for even counts)
        mid = sorted(ok, key=lambda i: i["seconds"])[(len(ok) - 1) // 2] if ok else {}
        for extra in ("session_seconds", "warm_seconds", "report_extra", "phases", "rss_by_phase", "report_timings", "per_bn_seconds", "torch_threads", "versions"):
            if extra in mid:
                row[extra] = mid[extra]
        rows.append(row)

    print()
    print(f"samples={args.samples} batch={args.batch_size} repeats={args.repeats} (exact: {repeats_exact}); "
          f"machine: {machine['cpus']} CPUs {machine['cpu']}, {machine['mem_gib']} GiB; "
          f"load avg before {load_before[0]:.2f}, after {load_after[0]:.2f}; total {total:.0f} s; "
          f"code at {code['head']}{' + uncommitted bnfold/ changes' if code['bnfold_dirty'] else ''}")  # fmt: skip
    print()
    print("| method | median s | × (a) | × (a) paired by repeat: median (each) | runs (s) | CPU s × (a) "
          "| peak RSS MiB | RSS before work MiB | max |Δμ|/σ vs (d) | max rel Δvar vs (d) |")  # fmt: skip
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        e = row["stats_error"]
        if row["method"] == "exact":
            e_mu, e_var = "reference", "reference"
        else:
            e_mu = f"{e['mu_sigma']:.2g}" if e else "—"
            e_var = f"{e['rel_var']:.2g}" if e else "—"
        if not row["ok"]:
            print(f"| {row['label']} | FAILED: {'; '.join(row['errors'])[:200]} | | | | | | | | |")
            continue
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "—"
        pr = (
            f"{row['paired_ratio_median']:.2f} ({', '.join(f'{v:.2f}' for v in row['paired_ratios'])})"
            if row["paired_ratio_median"] is not None
            else "—"
        )
        cpu = f"{row['cpu_ratio']:.2f}" if row["cpu_ratio"] is not None else "—"
        print(f"| {row['label']} | {row['median_seconds']:.2f} | {ratio} | {pr} | {', '.join(f'{s:.2f}' for s in row['seconds'])} "
              f"| {cpu} | {_mib(row['peak_rss'])} | {_mib(row['rss_before'])} | {e_mu} | {e_var} |")  # fmt: skip
    if "source stats (no recalibration)" in errors:
        e = errors["source stats (no recalibration)"]
        print(f"| source stats, no recalibration | | | | | | | | {e['mu_sigma']:.2g} | {e['rel_var']:.2g} |")
    print()
    for name, e in errors.items():
        print(f"  error {name}: |Δμ|/σ {e['mu_sigma']:.3g} at {e['at_mu']}; rel Δvar {e['rel_var']:.3g} at {e['at_var']}"
              + (f"; MISSING {len(e['missing'])} BNs" if e["missing"] else ""))  # fmt: skip
    for row in rows:
        if "session_seconds" in row:
            print(f"  {row['method']}: session creation {row['session_seconds']:.2f} s (not timed)")
        if "warm_seconds" in row:
            print(f"  {row['method']}: second (warm) pass {row['warm_seconds']:.2f} s (not the baseline)")
        if "report_extra" in row:
            print(f"  {row['method']}: report.extra: {row['report_extra']}")
        if "phases" in row:
            print(f"  {row['method']}: progress phases (s): " + ", ".join(f"{k}={v:.2f}" for k, v in row["phases"].items()))
        if row.get("rss_by_phase"):
            print(f"  {row['method']}: max RSS seen at progress events (MiB): "
                  + ", ".join(f"{k}={v / 2**20:,.0f}" for k, v in row["rss_by_phase"].items()))  # fmt: skip
        if row.get("report_timings"):
            print(f"  {row['method']}: report.timings (s): " + ", ".join(f"{k}={v:.2f}" for k, v in row["report_timings"].items()))
        if "per_bn_seconds" in row:
            print(f"  {row['method']}: per-BN pass seconds: " + ", ".join(f"{s:.1f}" for s in row["per_bn_seconds"]))

    out = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.bench_recalibrate", *sys.argv[1:]]),
        "samples": args.samples,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "repeats_exact": repeats_exact,
        "machine": machine,
        "code": code,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "total_seconds": total,
        "rows": rows,
        "errors": errors,
        "runs": {m: [{k: v for k, v in i.items() if k != "stats"} for i in rs] for m, rs in runs.items()},
    }
    json_path = Path(args.json) if args.json else workdir / f"results_{args.samples}_{'-'.join(methods)}.json"
    json_path.write_text(json.dumps(out, indent=1, default=float))
    print(f"\nwrote {json_path}")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-exact", type=int, default=None, help="repeats for (d) exact (default: --repeats)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--workdir", default="bench/out", help="model/sample cache and JSON output (git-ignored)")
    ap.add_argument("--json", default=None, help="where to write the JSON results")
    ap.add_argument("--naive-dtype", default="float32", choices=["float32", "float64"], help="model dtype of exact_naive")
    ap.add_argument(
        "--samples-source",
        default="array",
        choices=["array", "npy"],
        help="how (b) gets the samples: 'array' = np.load'ed array (default), 'npy' = bnfold's lazy .npy reader",
    )
    ap.add_argument("--ort-warm", action="store_true", help="(a) also times a second, warm pass (for information)")
    # worker mode (internal)
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--state", help=argparse.SUPPRESS)
    ap.add_argument("--samples-file", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
