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
    runtime = job_runtime(Settings(job_threads=2, job_memory_budget=0, max_image_pixels=4096, job_disk_budget="3MiB"))
    assert runtime["image_limits"]["max_image_pixels"] == 4096 and runtime["disk_budget"] == 3 * 2**20
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
    assert seen["recalibrate"]["disk_budget"] == 3 * 2**20
    assert seen["recalibrate"]["providers"] == ("CPUExecutionProvider",) == seen["check_equivalent"]["providers"]
    assert list((tmp_path / "spill").iterdir()) == []  # the store cleans up after itself
    provenance = (tmp_path / "result.onnx").read_bytes()
    assert str(tmp_path).encode() not in provenance  # where a job ran is not written into its model


def test_the_default_disk_budget_shares_half_the_free_space_between_the_workers(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    budget = Settings(data_dir=tmp_path, workers=4).resolved_job_disk_budget()
    assert 0.9 * free / 8 < budget < 1.1 * free / 8  # the free space moves a little meanwhile (shared disk)


def test_a_store_that_does_not_answer_is_503_with_retry_after_never_500(tmp_path):
    """Database.call: pool timeouts and operational errors (locked, unreachable) become Unavailable."""
    import pytest
    from sqlalchemy import create_engine, text

    from service.db import Database, make_sessionmaker
    from service.errors import Unavailable, problem_for

    unreachable = create_engine(f"sqlite:///{tmp_path}/no/such/dir/jobs.sqlite3")
    database = Database(make_sessionmaker(unreachable))
    with pytest.raises(Unavailable) as info:
        database.call(lambda session: session.execute(text("SELECT 1")))
    assert problem_for(info.value)["status"] == 503 and int(info.value.headers["Retry-After"]) >= 1
    assert str(tmp_path) not in problem_for(info.value)["detail"]


def _prechecker_run(tmp_path, timeout: float, draining: bool = False):
    import asyncio

    from service.precheck import Prechecker

    (tmp_path / "model.onnx").write_bytes(tiny_model())
    np.save(tmp_path / "samples.npy", samples_array())

    async def main():
        stop = asyncio.Event()
        if draining:
            asyncio.get_running_loop().call_later(0.05, stop.set)
        checker = Prechecker(mp.get_context("spawn"), slots=1, timeout=timeout)
        await checker.check(tmp_path, tmp_path / "model.onnx", tmp_path / "samples.npy", {}, {}, stop)

    return asyncio.run(main())


def test_the_precheck_process_answers_and_leaves_no_scratch(tmp_path):
    assert _prechecker_run(tmp_path, timeout=120) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "samples.npy"]


def test_a_precheck_past_its_timeout_refuses_the_upload(tmp_path):
    import pytest

    from service.precheck import PrecheckRefused

    with pytest.raises(PrecheckRefused) as info:  # a spawned interpreter alone takes longer than 10 ms
        _prechecker_run(tmp_path, timeout=0.01)
    assert info.value.status == 422 and "BNFOLD_PRECHECK_TIMEOUT" in info.value.detail


def test_a_shutdown_stops_the_precheck_with_a_retryable_503(tmp_path):
    import pytest

    from service.errors import Unavailable

    with pytest.raises(Unavailable) as info:
        _prechecker_run(tmp_path, timeout=120, draining=True)
    assert int(info.value.headers["Retry-After"]) >= 1
