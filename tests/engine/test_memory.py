"""`engine.memory`: the default budget is half the RAM available, the cgroup's limit included."""

from __future__ import annotations

from bnfold.engine.memory import (
    FALLBACK_BUDGET,
    MIN_BUDGET,
    available_memory,
    default_memory_budget,
)

GIB = 2**30


def _meminfo(tmp_path, available_kib: int):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       32000000 kB\nMemFree:         1000 kB\nMemAvailable:   {available_kib} kB\n")
    return str(path)


def _cgroup(tmp_path, name: str, limit: str, usage: str):
    (tmp_path / f"{name}.limit").write_text(limit + "\n")
    (tmp_path / f"{name}.usage").write_text(usage + "\n")
    return (str(tmp_path / f"{name}.limit"), str(tmp_path / f"{name}.usage"))


def test_meminfo_alone(tmp_path):
    assert available_memory(_meminfo(tmp_path, 8 * 2**20), cgroup_files=()) == 8 * GIB


def test_a_cgroup_limit_below_the_machine_wins(tmp_path):
    v2 = _cgroup(tmp_path, "v2", str(3 * GIB), str(1 * GIB))
    assert available_memory(_meminfo(tmp_path, 8 * 2**20), cgroup_files=(v2,)) == 2 * GIB


def test_unlimited_cgroups_are_ignored(tmp_path):
    v2 = _cgroup(tmp_path, "v2", "max", str(GIB))
    v1 = _cgroup(tmp_path, "v1", str(2**63 - 4096), str(GIB))  # cgroup v1's "no limit"
    assert available_memory(_meminfo(tmp_path, 4 * 2**20), cgroup_files=(v2, v1)) == 4 * GIB


def test_usage_above_the_limit_leaves_nothing(tmp_path):
    v1 = _cgroup(tmp_path, "v1", str(GIB), str(2 * GIB))
    assert available_memory(_meminfo(tmp_path, 4 * 2**20), cgroup_files=(v1,)) == 0


def test_nothing_readable(tmp_path):
    assert available_memory(str(tmp_path / "none"), cgroup_files=((str(tmp_path / "a"), str(tmp_path / "b")),)) is None


def test_default_budget_is_half_with_a_floor():
    assert default_memory_budget(8 * GIB) == 4 * GIB
    assert default_memory_budget(0) == MIN_BUDGET
    assert default_memory_budget(3 * GIB) == 3 * GIB // 2


def test_default_budget_on_this_machine_is_sane():
    budget = default_memory_budget()
    available = available_memory()
    assert budget == (FALLBACK_BUDGET if available is None else max(MIN_BUDGET, available // 2))
