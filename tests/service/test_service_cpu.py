"""CPUs a job may use: affinity capped by the cgroup CPU quota (`service.core.cpu`), on faked cgroup files.

Each case writes the files a kernel would show (/proc/self/cgroup and the cgroup file system) into
a temporary folder, laid out as cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`),
and as seen from inside a container (cgroup namespace: the path is `/`) or from the host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.core import cpu
from service.core.config import Settings


@pytest.fixture(autouse=True)
def _eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for name in [n for n in os.environ if n.startswith("BNFOLD_")]:
        monkeypatch.delenv(name)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _v2(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    _write(tmp_path / "fs", files)
    _write(tmp_path, {"cgroup": proc})
    return tmp_path / "fs", tmp_path / "cgroup"


@pytest.mark.parametrize("cpu_max, expected", [
    ("200000 100000\n", 2.0),       # docker run --cpus=2
    ("150000 100000\n", 1.5),       # --cpus=1.5
    ("50000 100000\n", 0.5),        # Kubernetes limits.cpu: 500m
    ("max 100000\n", None),         # no limit
])
def test_cgroup_v2_quota_inside_a_container(tmp_path, cpu_max, expected):
    root, proc = _v2(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert cpu.quota_cpus(root, proc) == expected


def test_cgroup_v2_quota_of_an_ancestor_applies_and_the_smallest_wins(tmp_path):
    root, proc = _v2(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "600000 100000",
        "kubepods/pod1/cpu.max": "300000 100000",
        "kubepods/pod1/ctr/cpu.max": "max 100000",
    })
    assert cpu.quota_cpus(root, proc) == 3.0
    assert cpu.usable_cpus(root, proc) == 3


def test_cgroup_v1_quota_seen_from_the_host_and_from_a_container(tmp_path):
    # From the host: /proc/self/cgroup names the container's cgroup under the controller's mount.
    host = tmp_path / "host"
    _write(host, {"cgroup": "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
                  "fs/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
                  "fs/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                  "fs/cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "fs/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cpu.quota_cpus(host / "fs", host / "cgroup") == 2.5
    assert cpu.usable_cpus(host / "fs", host / "cgroup") == 3  # rounded up, as GOMAXPROCS and the JVM do
    # In the container without a cgroup namespace: the same host path, but the mount is the container's cgroup.
    inside = tmp_path / "inside"
    _write(inside, {"cgroup": "3:cpu,cpuacct:/docker/abc\n", "fs/cpu/cpu.cfs_quota_us": "100000\n",
                    "fs/cpu/cpu.cfs_period_us": "100000\n"})
    assert cpu.quota_cpus(inside / "fs", inside / "cgroup") == 1.0


def test_unlimited_or_unreadable_cgroups_leave_the_affinity(tmp_path):
    root, proc = _v2(tmp_path, "1:cpu:/\n0::/\n", {"cpu.max": "max 100000", "cpu/cpu.cfs_quota_us": "-1",
                                                    "cpu/cpu.cfs_period_us": "100000"})
    assert cpu.quota_cpus(root, proc) is None
    assert cpu.usable_cpus(root, proc) == 8
    assert cpu.quota_cpus(tmp_path / "none", tmp_path / "missing") is None  # not Linux, or no cgroup fs
    _write(tmp_path / "bad", {"cgroup": "0::/\n", "fs/cpu.max": "garbage"})
    assert cpu.usable_cpus(tmp_path / "bad" / "fs", tmp_path / "bad" / "cgroup") == 8


def test_affinity_smaller_than_the_quota_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    root, proc = _v2(tmp_path, "0::/\n", {"cpu.max": "400000 100000"})
    assert cpu.usable_cpus(root, proc) == 2


def test_job_threads_are_sized_from_the_quota_not_the_affinity(tmp_path, monkeypatch):
    root, proc = _v2(tmp_path, "0::/\n", {"cpu.max": "400000 100000"})  # --cpus=4 on an 8-core host
    monkeypatch.setattr(cpu, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpu, "PROC_CGROUP", proc)
    monkeypatch.setenv("BNFOLD_WORKERS", "2")
    assert Settings().resolved_job_threads == 2  # 4 CPUs of quota / 2 workers; the affinity alone said 4
    (root / "cpu.max").write_text("50000 100000")  # 500m
    assert Settings().resolved_job_threads == 1
