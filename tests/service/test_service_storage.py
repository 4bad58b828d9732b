"""Data-directory housekeeping (service/storage.py): deleting never blocks its caller."""

from __future__ import annotations

import shutil
import threading
import time

from service.storage import Storage


def test_removing_a_job_returns_at_once_and_deletes_in_the_background(tmp_path, monkeypatch):
    """Unlinking a job's spilled tensors took ~40 s once, inside the supervisor loop (readiness went
    503). Here rmtree is made slow on purpose: the caller must not wait for it."""
    storage = Storage(tmp_path / "data")
    storage.prepare()
    for job_id in ("a", "b"):
        (storage.job_dir(job_id) / "spill").mkdir(parents=True)
        (storage.job_dir(job_id) / "spill" / "1.npy").write_bytes(b"x" * 1000)
        (storage.job_dir(job_id) / "model.onnx").write_bytes(b"m")
        (storage.job_dir(job_id) / "result.onnx").write_bytes(b"r")
    released = threading.Event()
    real = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        released.wait(10)
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    start = time.monotonic()
    storage.remove_job("a")
    storage.remove_inputs("b")
    assert time.monotonic() - start < 1.0
    assert not storage.job_dir("a").exists()  # gone for readers at once (renamed into trash/)
    assert sorted(p.name for p in storage.job_dir("b").iterdir()) == ["result.onnx"]
    released.set()
    deadline = time.monotonic() + 10
    while any(storage.trash.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(storage.trash.iterdir()) == []
