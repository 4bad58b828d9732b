"""Two passes over the samples — calibrate, then compare — reading them a second time only if they must be.

Quantization needs the samples twice: once to calibrate activation ranges on the float model, once
to compare the INT8 model, which exists only after calibration, with the float one. `SamplePasses`
reads the samples once for calibration and keeps the validated batches while they fit in
``keep_bytes``; the comparison then runs on what was kept. Only when they do not fit is the source
read again — arrays, .npy/.npz files, image folders/archives and any iterable whose ``iter()``
starts afresh can be. A one-shot iterator (a generator) cannot: the comparison then runs on the
first batches that fitted, and `subset` says so (the report carries it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bnfold.inputs.arrays import ModelInput, Samples, iter_batches


class SamplePasses:
    """samples: as `bnfold.inputs.arrays.iter_batches` takes them. keep_bytes: memory for batches kept
    between the passes. After `first` has run: ``samples`` (count), ``subset`` (True when `second`
    gives only a prefix of them), ``rereads`` (True when `second` reads the source again)."""

    def __init__(self, samples: Samples, inputs: list[ModelInput], batch_size: int, keep_bytes: int):
        self._source, self._inputs, self._batch_size, self._keep_bytes = samples, inputs, batch_size, keep_bytes
        self.one_shot = isinstance(samples, Iterator)
        self._kept: list[dict[str, np.ndarray]] | None = []
        self._kept_bytes = 0
        self.samples = 0
        self.kept_samples = 0
        self.complete = True

    def first(self) -> Iterator[dict[str, np.ndarray]]:
        """Every batch, validated; the ones that fit are kept for `second`."""
        for batch in iter_batches(self._source, self._inputs, self._batch_size):
            count = len(next(iter(batch.values())))
            self.samples += count
            self._keep(batch, count)
            yield batch

    def _keep(self, batch: dict[str, np.ndarray], count: int) -> None:
        if self._kept is None or not self.complete and self.one_shot:
            return
        size = sum(a.nbytes for a in batch.values())
        if self._kept_bytes + size <= self._keep_bytes or (self.one_shot and not self._kept):
            self._kept.append(batch)  # a one-shot source keeps at least its first batch
            self._kept_bytes += size
            self.kept_samples += count
            return
        self.complete = False
        if not self.one_shot:
            self._kept = None  # read again instead: keeping a part would not spare the second read

    @property
    def subset(self) -> bool:
        return not self.complete and self.one_shot

    @property
    def rereads(self) -> bool:
        return not self.complete and not self.one_shot

    def second(self) -> Iterator[dict[str, np.ndarray]]:
        """The batches again: from memory when they were all kept (or the source is one-shot), else re-read."""
        if self.rereads:
            yield from iter_batches(self._source, self._inputs, self._batch_size)
        else:
            yield from self._kept or []
