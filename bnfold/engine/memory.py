"""The default memory budget: a share of the RAM this process can still use, cgroup limits included.

Why sized, not fixed: cut tensors that do not fit the budget are written to disk and read back at
every BN level (ResNet-50, 512 × 224×224: 9.6 GB spilled at a fixed 2 GiB), while a container may
allow far less than 2 GiB. The budget is half of what is available now: the smaller of the kernel's
MemAvailable and the cgroup's limit minus its usage (v2 ``memory.max``/``memory.current``, v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``), so ONNX Runtime's working memory, the model
and the samples keep the other half. Read from /proc and /sys directly: two small files, no dependency.
"""

from __future__ import annotations

from pathlib import Path

MIN_BUDGET = 256 * 2**20
FALLBACK_BUDGET = 2 * 2**30  # where nothing can be read (not Linux)
SHARE = 0.5

_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(meminfo: str = "/proc/meminfo", cgroup_files=_CGROUP_FILES) -> int | None:
    """Bytes this process can still allocate before the system or its cgroup runs out (None: unknown)."""
    candidates = [_meminfo_available(meminfo)]
    for limit_path, usage_path in cgroup_files:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 2**60:  # v1 says "no limit" with ~2^63
            candidates.append(max(0, limit - usage))
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def default_memory_budget(available: int | None = None) -> int:
    """Half of `available` (default: `available_memory()`), at least MIN_BUDGET."""
    available = available_memory() if available is None else available
    if available is None:
        return FALLBACK_BUDGET
    return max(MIN_BUDGET, int(available * SHARE))
