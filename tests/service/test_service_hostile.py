"""Hostile inputs over HTTP: every case gets a 4xx problem+json naming what was wrong (or a cleanly
failed job), messages stay short and free of server paths, and the server stays healthy.

Each case here broke before: 500s with tracebacks (overflowing .npy headers, resize 1e9), jobs
accepted that could only fail later (opset 99, custom domains), ``batch_size: true`` taken as 1,
bidi overrides in download names, 100 kB details, unbounded disk use by one job.
"""

from __future__ import annotations

import io
import json
import tempfile
import urllib.parse
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper
from service_helpers import (
    Server,
    npy_bytes,
    samples_array,
    submit,
    tiny_model,
    wait_for,
)

PROBLEM = "application/problem+json"


def _npy_header(shape) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(64)


def _model(edit) -> bytes:
    model = onnx.load_from_string(tiny_model())
    edit(model)
    return model.SerializeToString()


def _opset_99(model):
    model.opset_import[0].version = 99


def _custom_domain(model):
    model.graph.node[-1].domain = "com.example.evil"
    model.opset_import.append(helper.make_opsetid("com.example.evil", 1))


def _png_zip() -> bytes:
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.full((12, 10, 3), 128, np.uint8)).save(png, "PNG")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", png.getvalue())
    return buffer.getvalue()


SPEC = {"center_crop": 8, "mean": [0.5], "std": [0.25]}
CASES = {
    # id: (submit kwargs, status, field, words in the detail)
    "npy-overflowing-shape": (dict(samples=_npy_header((10, 2**32, 2**32))), 422, "samples", ["truncated"]),
    "npy-negative-dimension": (dict(samples=_npy_header((10, -1, 8, 8))), 422, "samples", ["negative dimension"]),
    "opset-99": (dict(model=_model(_opset_99)), 422, "model", ["opset 99"]),
    "custom-domain": (dict(model=_model(_custom_domain)), 422, "model", ["com.example.evil"]),
    "batch-size-true": (dict(options={"batch_size": True}), 422, "options.batch_size", ["integer"]),
    "verify-samples-float": (dict(options={"verify_samples": 4.0}), 422, "options.verify_samples", ["integer"]),
    "fold-string": (dict(options={"fold": "yes"}), 422, "options.fold", ["boolean"]),
    "resize-1e9": (dict(samples="png-zip", options={"preprocess": {**SPEC, "resize": 1e9}}), 422,
                   "options.preprocess", ["resize"]),
    "resize-huge-int": (dict(samples="png-zip", options={"preprocess": {**SPEC, "resize": 10**9}}), 422,
                        "options.preprocess", ["8192"]),
    "resize-40000-square": (dict(samples="png-zip", options={"preprocess": {**SPEC, "resize": [40000, 40000]}}), 422,
                            "options.preprocess", ["8192"]),
    "preprocess-for-arrays": (dict(options={"preprocess": {"resize": 8}}), 422, "options.preprocess", ["samples.npy"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_a_short_problem_naming_the_field(server, case):
    kwargs, status, field, words = CASES[case]
    if kwargs.get("samples") == "png-zip":
        pytest.importorskip("PIL")
        kwargs = {**kwargs, "samples": _png_zip(), "samples_name": "x.zip"}
    with server.client() as client:
        response = submit(client, **kwargs)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == PROBLEM
        body = response.json()
        assert body["field"] == field, body
        for word in words:
            assert word in body["detail"], body["detail"]
        _assert_clean(body, server)
        assert client.get("/readyz").status_code == 200
    assert list((server.data_dir / "incoming").iterdir()) == []  # a refused upload leaves nothing


def _assert_clean(body: dict, server: Server) -> None:
    text = json.dumps(body)
    assert str(server.data_dir) not in text and "/incoming/" not in text and "/jobs/" not in text, text
    assert " object at 0x" not in text and "Traceback" not in text
    assert len(body["detail"]) <= 1000


def test_long_messages_are_bounded(server):
    """One unknown preprocessing field per name the client sends: the message used to list them all."""
    fields = {f"field_{i:05d}_{'x' * 20}": 1 for i in range(1500)}  # 50 kB, under the 64 KiB options limit
    with server.client() as client:
        response = submit(client, samples=_npy_header((0, 3, 8, 8)), options={"preprocess": fields})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "options.preprocess" and len(body["detail"]) <= 1000
    assert len(response.content) < 4000


def test_bidi_and_control_characters_never_reach_a_download_name(server):
    name = "report\u202egnp.onnx"  # shows as "reportxnno.png" in a right-to-left override
    with server.client() as client:
        files = {"model": (name, tiny_model(), "application/octet-stream"),
                 "samples": ("s\u200b\u2066.npy", npy_bytes(samples_array()), "application/octet-stream")}
        job = client.post("/v1/jobs", files=files, params={"wait": 20}).json()
        assert job["state"] == "succeeded", job
        assert job["inputs"]["model"]["filename"] == "reportgnp.onnx"
        assert job["inputs"]["samples"]["filename"] == "s.npy"
        disposition = client.get(job["result"]["model_url"]).headers["content-disposition"]
    decoded = urllib.parse.unquote(disposition)
    assert "\u202e" not in decoded and "%E2%80%AE" not in disposition.upper()
    assert "reportgnp.bnfold.onnx" in decoded


@pytest.mark.parametrize("raw, kept", [("a\u202eb.onnx", "ab.onnx"), ("x\x07\x00y\r\n.npy", "xy.npy"),
                                       ("../../etc/passwd", "passwd"), ("C:\\dir\\m.onnx", "m.onnx"),
                                       ("\u2028\u200f", None), ("..hidden", "hidden")])
def test_safe_filename(raw, kept):
    from service.storage import safe_filename

    assert safe_filename(raw) == kept


def test_a_job_past_its_disk_budget_fails_naming_the_limit_and_leaves_no_spill(tmp_path):
    """A 20 kB .npz of zeros that expands to 512 samples whose cut tensors need 768 KiB of disk."""
    pytest.importorskip("models")
    from models import residual_block

    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((512, 4, 8, 8), np.float32))
    srv = Server(tmp_path / "data", env={"BNFOLD_JOB_MEMORY_BUDGET": "0", "BNFOLD_JOB_DISK_BUDGET": "256KiB"}).start()
    try:
        with srv.client() as client:
            job = submit(client, model=residual_block().SerializeToString(), samples=buffer.getvalue(),
                         samples_name="s.npz", wait=30).json()
            job = wait_for(client, job["id"])
            assert job["state"] == "failed", job
            assert job["error"]["title"] == "Disk budget exceeded"
            assert "262144 bytes" in job["error"]["detail"] and "BNFOLD_JOB_DISK_BUDGET" in job["error"]["detail"]
            _assert_clean(job["error"], srv)
            assert client.get("/readyz").status_code == 200
        assert not (srv.data_dir / "jobs" / job["id"] / "spill").exists()
    finally:
        srv.stop()


def test_the_upload_check_unpacks_archives_under_the_data_directory(tmp_path, monkeypatch):
    """The check of a .tar.gz unpacks it to a temporary file: under the upload's own directory, not
    the system's temporary folder (a tmpfs in the compose file). Run in-process to see where."""
    pytest.importorskip("PIL")
    import multiprocessing
    import tarfile

    from service.precheck import SCRATCH, check_main

    upload = tmp_path / "data" / "incoming" / "job"
    upload.mkdir(parents=True)
    (upload / "model.onnx").write_bytes(tiny_model())
    with tarfile.open(upload / "samples.tar.gz", "w:gz") as archive:
        from PIL import Image

        for i in range(3):
            png = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(png, "PNG")
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(png.getvalue())
            archive.addfile(info, io.BytesIO(png.getvalue()))
    used = []
    real = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        used.append(kwargs.get("dir") or tempfile.gettempdir())
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    reader, writer = multiprocessing.Pipe(duplex=False)
    check_main(str(upload / "model.onnx"), str(upload / "samples.tar.gz"), {"preprocess": SPEC}, {},
               str(upload / SCRATCH), writer)
    assert reader.recv() is None
    assert used and all(path == str(upload / SCRATCH) for path in used), used
