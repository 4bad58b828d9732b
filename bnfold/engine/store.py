"""Tensors that cross a stage cut, one array per (tensor, batch), in RAM up to a budget, else on disk.

Stage-by-stage execution must keep every cut tensor for *all* samples until the next stages have
read it, which grows with the sample count. Arrays beyond ``budget`` bytes are written as .npy
files in a private temporary directory and read back (not memory-mapped, so they leave the
process's resident set once dropped). Peak RSS is therefore the budget plus a working set that
does not depend on the sample count (one stage's ONNX Runtime memory, one batch, the model):
measured 794 / 795 MiB at 1,024 / 4,096 ResNet-18 samples with a 256 MiB budget (bench/RESULTS.md).
Disk use is bounded too when ``disk_budget`` is given: a spill that would take the files on disk
past it raises `DiskBudgetExceeded` before anything is written.

A batch is released as soon as its last reader has run (`done`), not when the whole stage ends:
the arrays ONNX Runtime returned then go back to its arena and serve the next batch's outputs, and
the store holds one cut at a time instead of two.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from bnfold.errors import DiskBudgetExceeded


class TensorStore:
    def __init__(self, budget: int, spill_dir: str | os.PathLike | None = None, disk_budget: int | None = None):
        self.budget = budget
        self.disk_budget = disk_budget  # bytes of spilled arrays on disk at once; None: unbounded
        self.bytes_on_disk = 0
        self._spill_parent = spill_dir
        self._dir: str | None = None
        self._memory: dict[tuple[str, int], np.ndarray] = {}
        self._files: dict[tuple[str, int], str] = {}
        self._file_bytes: dict[tuple[str, int], int] = {}
        self._spills = 0  # only ever grows: a file name is never reused after a drop
        self.bytes_in_memory = 0
        self.peak_bytes_in_memory = 0
        self.bytes_spilled = 0

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, name: str, batch: int, array: np.ndarray) -> None:
        key = (name, batch)
        if self.bytes_in_memory + array.nbytes <= self.budget:
            self._memory[key] = array
            self.bytes_in_memory += array.nbytes
            self.peak_bytes_in_memory = max(self.peak_bytes_in_memory, self.bytes_in_memory)
            return
        if self.disk_budget is not None and self.bytes_on_disk + array.nbytes > self.disk_budget:
            raise DiskBudgetExceeded(
                f"the job needs more than its disk budget of {self.disk_budget} bytes for intermediate tensors "
                f"({self.bytes_on_disk + array.nbytes} with this batch, beyond {self.budget} bytes kept in memory); "
                "use fewer or smaller samples, or raise the budget (service: BNFOLD_JOB_DISK_BUDGET)")
        self._spills += 1
        path = os.path.join(self._spill_directory(), f"{self._spills}.npy")
        np.save(path, array, allow_pickle=False)
        self._files[key] = path
        self._file_bytes[key] = array.nbytes
        self.bytes_spilled += array.nbytes
        self.bytes_on_disk += array.nbytes

    def get(self, name: str, batch: int) -> np.ndarray:
        key = (name, batch)
        if key in self._memory:
            return self._memory[key]
        return np.load(self._files[key], allow_pickle=False)

    def release(self, name: str, batch: int) -> None:
        """Forget one batch of `name` (RAM or disk)."""
        key = (name, batch)
        if key in self._memory:
            self.bytes_in_memory -= self._memory.pop(key).nbytes
        elif key in self._files:
            os.remove(self._files.pop(key))
            self.bytes_on_disk -= self._file_bytes.pop(key)

    def done(self, name: str, batch: int, last: bool) -> None:
        """The reader of `get(name, batch)` has finished; `last`: no one reads it again."""
        if last:
            self.release(name, batch)

    def drop(self, name: str) -> None:
        """Forget every batch of `name` (RAM and disk)."""
        for key in [k for k in self._memory if k[0] == name] + [k for k in self._files if k[0] == name]:
            self.release(*key)

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        self._file_bytes.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _spill_directory(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="bnfold-spill-", dir=self._spill_parent)
        return self._dir
