"""The service side of issue 15: option `prior`, the optional check_samples/check_labels parts (a
worse check fails the job and keeps no result), and GET /v1/jobs/{id}/report.html.

The tiny model's output (N, 4, 8, 8) is read as per-pixel scores of 4 classes, so masks (N, 8, 8)
are scored by mean IoU. Labels taken from the *original* model's own predictions score 1.0 before
adaptation, so any change of the predictions makes the check worse — a real refusal, not a mock.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from service_helpers import npy_bytes, samples_array, submit, tiny_model, wait_for

pytest.importorskip("matplotlib")


def _masks_of_original(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(tiny_model(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].argmax(axis=1).astype(np.int64)


def _submit_with_check(client, labels: np.ndarray, x: np.ndarray, options=None):
    files = {"model": ("tiny.onnx", tiny_model(), "application/octet-stream"),
             "samples": ("s.npy", npy_bytes(samples_array()), "application/octet-stream"),
             "check_samples": ("cx.npy", npy_bytes(x), "application/octet-stream"),
             "check_labels": ("cy.npy", npy_bytes(labels), "application/octet-stream")}
    if options is not None:
        import json

        files["options"] = (None, json.dumps(options), "application/json")
    return client.post("/v1/jobs", files=files)


def test_worse_check_fails_the_job_and_keeps_nothing(server):
    x = samples_array(6, seed=3)
    with server.client() as client:
        response = _submit_with_check(client, _masks_of_original(x), x)
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"])
        assert job["state"] == "failed" and job["result"] is None
        error = job["error"]
        assert error["status"] == 422 and error["field"] == "check_labels"
        assert "mean_iou 1.0000 before" in error["detail"] and "after" in error["detail"]
        assert client.get(f"/v1/jobs/{job['id']}/model").status_code == 409
        assert client.get(f"/v1/jobs/{job['id']}/report.html").status_code == 409
    assert not any(p.name.startswith(("result", "report")) for p in (server.data_dir / "jobs" / job["id"]).iterdir())


def test_allow_worse_keeps_it_and_reports_the_check(server):
    x = samples_array(6, seed=3)
    with server.client() as client:
        response = _submit_with_check(client, _masks_of_original(x), x, {"allow_worse": True, "prior": 4})
        job = wait_for(client, response.json()["id"])
        assert job["state"] == "succeeded", job["error"]
        check = job["report"]["check"]
        assert check["metric"] == "mean_iou" and check["before"] == 1.0 and check["after"] < 1.0 and check["samples"] == 6
        assert job["report"]["extra"]["statistics"]["prior"] == 4 and job["options"]["prior"] == 4
        page = client.get(job["result"]["report_html_url"])
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text.count("data:image/png;base64,") == 2 and "mean iou" in page.text


@pytest.mark.parametrize("parts, field, status", [
    ({"check_samples": npy_bytes(samples_array(2))}, "check_labels", 422),
    ({"check_labels": npy_bytes(np.zeros((2, 8, 8), np.int64))}, "check_samples", 422),
    ({"check_samples": npy_bytes(samples_array(2)), "check_labels": b"labels as text"}, "check_labels", 415),
    ({"check_samples": npy_bytes(samples_array(2)), "check_labels": npy_bytes(np.zeros(3, np.int64))}, "check_labels", 422),
])
def test_bad_check_parts_are_refused_up_front(server, parts, field, status):
    files = {"model": ("tiny.onnx", tiny_model(), "application/octet-stream"),
             "samples": ("s.npy", npy_bytes(samples_array()), "application/octet-stream"),
             **{name: (f"{name}.npy", data, "application/octet-stream") for name, data in parts.items()}}
    with server.client() as client:
        response = client.post("/v1/jobs", files=files)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


def test_bad_prior_is_a_422_naming_it(server):
    with server.client() as client:
        response = submit(client, options={"prior": -1})
    assert response.status_code == 422 and response.json()["field"] == "options.prior"
