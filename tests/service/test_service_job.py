"""The job process's body, run in-process: the server's settings reach the core as job options."""

from __future__ import annotations

import multiprocessing as mp
import tempfile

import numpy as np
from service_helpers import samples_array, tiny_model

import bnfold.pipeline as pipeline
from service.core.config import Settings
from service.job import job_runtime, run_job
from service.schemas import JobOptionsIn


def test_job_spills_into_its_directory_and_uses_the_configured_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # run_job redirects it for its own process
    seen: dict[str, dict] = {}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name] = kwargs
            return real(*args, **kwargs)
        monkeypatch.setattr(pipeline, name, call)

    spy("recalibrate", pipeline.recalibrate)
    spy("check_equivalent", pipeline.check_equivalent)
    (tmp_path / "model.onnx").write_bytes(tiny_model())
    np.save(tmp_path / "samples.npy", samples_array())
    runtime = job_runtime(Settings(job_threads=2, job_memory_budget=0, max_image_pixels=4096))
    assert runtime["image_limits"]["max_image_pixels"] == 4096
    reader, writer = mp.Pipe(duplex=False)
    run_job(str(tmp_path), "samples.npy", JobOptionsIn(batch_size=4).model_dump(), runtime, writer)
    messages = []
    while True:  # run_job closes its end when done
        try:
            messages.append(reader.recv())
        except EOFError:
            break
    assert messages[-1][0] == "succeeded", messages[-1]
    assert seen["recalibrate"]["spill_dir"] == str(tmp_path / "spill") and seen["recalibrate"]["threads"] == 2
    assert seen["recalibrate"]["memory_budget"] == 0 and seen["check_equivalent"]["threads"] == 2
    assert seen["recalibrate"]["providers"] == ("CPUExecutionProvider",) == seen["check_equivalent"]["providers"]
    assert list((tmp_path / "spill").iterdir()) == []  # the store cleans up after itself
    provenance = (tmp_path / "result.onnx").read_bytes()
    assert str(tmp_path).encode() not in provenance  # where a job ran is not written into its model
