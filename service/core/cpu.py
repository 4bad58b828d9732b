"""How many CPUs this process may really use: CPU affinity, capped by the cgroup's CPU quota.

``docker run --cpus=2``, compose ``cpus:`` and Kubernetes ``resources.limits.cpu`` do not change
the affinity mask (the container still sees every core of the host); they set a CFS bandwidth
quota: ``quota / period`` CPUs' worth of time per period, after which the cgroup is throttled.
Sizing ONNX Runtime's thread pools from the affinity alone then starts e.g. 64 threads on a 2-CPU
quota, and they spend their time throttled. The quota lives in

- cgroup v2: ``<cgroup>/cpu.max`` = ``"<quota> <period>"`` or ``"max <period>"`` (no limit);
- cgroup v1: ``<cpu controller>/<cgroup>/cpu.cfs_quota_us`` (``-1``: no limit) and ``cpu.cfs_period_us``.

A quota set on any ancestor cgroup applies too, so the smallest one on the path to the root
counts. In a container the cgroup file system is usually mounted at the container's own cgroup
(``/proc/self/cgroup`` then names a path that does not exist in the mount), so both the named path
and the mount's root are read. CPUs = ceil(quota / period), as Go's GOMAXPROCS and the JVM round.

Hand-written because neither the standard library (``os.process_cpu_count`` is affinity only)
nor psutil reads the quota; the JVM, .NET and Go runtimes each carry the same few lines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cpus() -> int:
    """Cores in this process's affinity mask (all cores where the OS has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def quota_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup (and its ancestors) in CPUs, e.g. 1.5; None when unlimited
    or unknown (no cgroup file system, unreadable files). Paths default to CGROUP_ROOT and PROC_CGROUP."""
    cgroup_root = cgroup_root or CGROUP_ROOT
    try:
        lines = (proc_cgroup or PROC_CGROUP).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:  # "0::<path>": the cgroup v2 hierarchy
            limits += _along(cgroup_root, path, _v2_limit)
        elif "cpu" in controllers.split(","):
            for mount in (cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
                if mount.is_dir():
                    limits += _along(mount, path, _v1_limit)
                    break
    return min(limits) if limits else None


def usable_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """min(affinity, ceil(quota)), at least 1."""
    cpus = affinity_cpus()
    quota = quota_cpus(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _along(mount: Path, path: str, read) -> list[float]:
    """Limits found at `path` under `mount` and at each of its ancestors, down to the mount itself."""
    found = []
    relative = Path(path.strip("/")) if path.strip("/") else Path()
    for where in {mount / relative, *(mount / parent for parent in relative.parents), mount}:
        limit = read(where)
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota < 0 else _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None
