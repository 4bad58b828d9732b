"""End-to-end: the jobs API over HTTP against a real server process (the shared `server` fixture).

Submit → poll → download → check the model numerically against the core run locally; wait mode;
listing; deletion; every kind of bad input answered with the right status and a problem+json body
naming the field; keys that cannot see each other's jobs; request ids, JSON logs and metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from service_helpers import KEY_A, KEY_B, npy_bytes, samples_array, submit, tiny_model, wait_for

from bnfold.pipeline import JobOptions, recalibrate_files

PROBLEM = "application/problem+json"


def run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_submit_poll_download_and_verify(server, tmp_path):
    with server.client() as client:
        response = submit(client, options={"batch_size": 4})
        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}" == job["url"]
        assert job["state"] in ("queued", "running")
        done = wait_for(client, job["id"])
        assert done["state"] == "succeeded", done["error"]
        assert done["progress"] == {"stage": "done", "fraction": 1.0}
        assert done["timings"]["running_s"] >= 0 and done["attempts"] == 1
        assert done["report"]["layers"][0]["name"] == "bn" and done["report"]["samples"] == 16

        download = client.get(done["result"]["model_url"])
        assert download.status_code == 200
        assert download.headers["etag"] == f'"{hashlib.sha256(download.content).hexdigest()}"'
        assert done["result"]["model_sha256"] == hashlib.sha256(download.content).hexdigest()
        assert client.get(done["result"]["model_url"], headers={"If-None-Match": download.headers["etag"]}).status_code == 304
        report = client.get(done["result"]["report_url"])
        assert report.status_code == 200 and report.json()["layers"][0]["channels"] == 4

    model = onnx.load_from_string(download.content)
    onnx.checker.check_model(model)
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}
    # the same job run through the core directly gives the same function
    (tmp_path / "m.onnx").write_bytes(tiny_model())
    np.save(tmp_path / "s.npy", samples_array())
    expected = recalibrate_files(tmp_path / "m.onnx", tmp_path / "s.npy", JobOptions(batch_size=4)).model
    x = samples_array(5, seed=7)
    np.testing.assert_allclose(run(download.content, x), run(expected.SerializeToString(), x), rtol=1e-5, atol=1e-5)


def test_wait_mode_answers_200_with_the_finished_job(server):
    with server.client() as client:
        response = submit(client, options={"fold": False}, wait=20)
    assert response.status_code == 200
    job = response.json()
    assert job["state"] == "succeeded" and job["report"]["totals"]["bn_layers"] == 1
    assert response.headers["location"] == job["url"]


def test_unfolded_result_keeps_batchnorm_with_new_statistics(server):
    with server.client() as client:
        job = submit(client, options={"fold": False}, wait=20).json()
        model = onnx.load_from_string(client.get(job["result"]["model_url"]).content)
    assert [n.op_type for n in model.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    mean = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "mean")
    np.testing.assert_allclose(mean, job["report"]["layers"][0]["new_mean"], rtol=1e-6)


def test_npz_samples_are_accepted(server):
    buffer = io.BytesIO()
    np.savez(buffer, x=samples_array(8))
    with server.client() as client:
        job = submit(client, samples=buffer.getvalue(), samples_name="s.npz", wait=20).json()
    assert job["state"] == "succeeded", job["error"]


def test_bad_data_past_the_first_batch_fails_the_job_with_the_core_reason(server):
    samples = samples_array(32)
    samples[20, 0, 0, 0] = np.nan  # the synchronous precheck only reads the first batch
    with server.client() as client:
        response = submit(client, samples=npy_bytes(samples), options={"batch_size": 4}, wait=20)
    job = response.json()
    assert response.status_code == 200 and job["state"] == "failed"
    assert job["error"]["title"] == "Invalid samples" and job["error"]["field"] == "samples"
    assert "NaN" in job["error"]["detail"] and job["error"]["type"] == "urn:bnfold:problem:invalid-samples"
    with server.client() as client:
        assert client.get(f"/v1/jobs/{job['id']}/model").status_code == 409


def test_delete_of_a_finished_job_removes_it_and_its_files(server):
    with server.client() as client:
        job = submit(client, wait=20).json()
        assert (server.data_dir / "jobs" / job["id"] / "result.onnx").exists()
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not (server.data_dir / "jobs" / job["id"]).exists()


def test_inputs_are_removed_once_a_job_ends(server):
    with server.client() as client:
        job = submit(client, wait=20).json()
    assert sorted(p.name for p in (server.data_dir / "jobs" / job["id"]).iterdir()) == ["report.html", "report.json", "result.onnx"]


def test_listing_is_paginated_and_per_key(server):
    with server.client(KEY_B) as client:
        ids = [submit(client, options={"fold": False}, wait=20).json()["id"] for _ in range(3)]
        first = client.get("/v1/jobs", params={"limit": 2}).json()
        second = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        assert second["next_cursor"] is None
        assert [j["id"] for j in first["items"] + second["items"]][:3] == ids[::-1]
        assert all(j["report"] is None for j in first["items"])
        assert client.get("/v1/jobs", params={"state": "running"}).json()["items"] == []
        bad = client.get("/v1/jobs", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422 and bad.json()["field"] == "query.cursor"
    with server.client(KEY_A) as client:
        assert not {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]} & set(ids)


# ------------------------------------------------------------------------------------- bad input


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, weights=np.zeros(3))
    return buffer.getvalue()


BAD_INPUTS = {
    # name: (submit kwargs, status, field, title or None)
    "garbage bytes": (dict(model=b"this is not an ONNX model " * 40), 422, "model", "Invalid model"),
    "truncated onnx": (dict(model=tiny_model()[: len(tiny_model()) // 2]), 422, "model", "Invalid model"),
    "model without BN": (dict(model=tiny_model(batchnorm=False)), 422, "model", "No BatchNormalization node"),
    "model is an archive": (dict(model=_npz_bytes()), 415, "model", None),
    "mismatched samples": (dict(samples=npy_bytes(samples_array(channels=5))), 422, "samples", "Invalid samples"),
    "samples not numpy": (dict(samples=b"1,2,3\n4,5,6\n"), 415, "samples", None),
    "samples empty": (dict(samples=b""), 422, "samples", None),
    "samples pickled": (dict(samples=npy_bytes(np.array([{"a": 1}], dtype=object))), 422, "samples", "Invalid samples"),
    "samples missing": (dict(samples=False), 422, "samples", None),
    "model missing": (dict(model=False), 422, "model", None),
    "options not json": (dict(options="{fold: yes"), 422, "options", None),
    "options out of range": (dict(options={"batch_size": 0}), 422, "options.batch_size", None),
    "options unknown key": (dict(options={"bach_size": 4}), 422, "options.bach_size", None),
    "oversized samples": (dict(samples=npy_bytes(samples_array(n=400))), 413, "samples", None),
    "oversized model": (dict(model=tiny_model() + b"\x00" * (70 * 1024)), 413, "model", None),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_a_problem_naming_the_field(server, case):
    kwargs, status, field, title = BAD_INPUTS[case]
    with server.client() as client:
        response = submit(client, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["field"] == field and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"] and body["instance"] == "/v1/jobs"
    if title:
        assert body["title"] == title
    assert list((server.data_dir / "incoming").iterdir()) == []  # nothing of the upload is left behind


def test_body_that_is_not_multipart_is_415(server):
    with server.client() as client:
        response = client.post("/v1/jobs", json={"model": "x"})
    assert response.status_code == 415 and response.json()["field"] == "body"


def test_truncated_multipart_body_is_422(server):
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.onnx\"\r\n\r\n" + tiny_model()[:100])
    with server.client() as client:
        response = client.post("/v1/jobs", content=body, headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 422 and response.json()["field"] == "body"


def test_body_larger_than_both_limits_is_413_before_reading(server):
    with server.client() as client:
        response = client.post("/v1/jobs", content=b"\x00" * (1400 * 1024),
                               headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_npz_that_unpacks_beyond_the_limit_is_413(server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:  # 1 MiB of zeros, a few KiB packed
        with archive.open("x.npy", "w") as member:
            member.write(npy_bytes(np.zeros((64, 4096), np.float32)))
    with server.client() as client:
        response = submit(client, samples=buffer.getvalue(), samples_name="s.npz")
    assert response.status_code == 413 and "unpacks" in response.json()["detail"]


def test_wait_out_of_range_is_422(server):
    with server.client() as client:
        response = client.post("/v1/jobs", params={"wait": -1}, files={"model": ("m", b"x")})
    assert response.status_code == 422 and response.json()["field"] == "query.wait"


# ------------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-wrong-key-wrong"}, {"Authorization": "Basic eDp5"}])
def test_requests_without_a_valid_key_are_401(server, headers):
    with server.client(key=None) as client:
        for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/info"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/abc")):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["field"] == "authorization"


def test_another_keys_job_is_invisible(server):
    with server.client(KEY_A) as client:
        job = submit(client, wait=20).json()
    with server.client(KEY_B) as other:
        for path in ("", "/model", "/report"):
            response = other.get(f"/v1/jobs/{job['id']}{path}")
            assert response.status_code == 404 and response.headers["content-type"] == PROBLEM
        assert other.delete(f"/v1/jobs/{job['id']}").status_code == 404
    with server.client(KEY_A) as client:
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"


# ---------------------------------------------------------------------------------- operations


def test_health_ready_info(server):
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and all(ready["checks"].values())
        info = client.get("/v1/info").json()
    assert info["api_version"] == "v1" and info["limits"]["max_model_bytes"] == 64 * 1024
    assert info["default_options"]["fold"] is True


def test_unknown_route_and_method_are_problems(server):
    with server.client() as client:
        missing = client.get("/v2/nothing")
        method = client.put("/v1/jobs")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    assert method.status_code == 405 and "POST" in method.headers["allow"]


def test_request_id_is_echoed_and_logged_as_json(server):
    with server.client(headers={"X-Request-ID": "pipeline-run-42"}) as client:
        response = client.get("/v1/info")
    assert response.headers["x-request-id"] == "pipeline-run-42"
    with server.client(headers={"X-Request-ID": "bad id with spaces"}) as client:
        assert client.get("/healthz").headers["x-request-id"] != "bad id with spaces"
    time.sleep(0.2)
    lines = server.log_lines()  # every line is JSON
    access = [line for line in lines if line.get("request_id") == "pipeline-run-42"]
    assert access and access[0]["route"] == "/v1/info" and access[0]["status"] == 200
    assert not any(KEY_A in json.dumps(line) for line in lines)  # keys never reach the log


def test_metrics(server):
    with server.client() as client:
        submit(client, wait=20)
        text = client.get("/metrics").text
    assert 'bnfold_jobs{state="succeeded"}' in text
    assert "bnfold_queue_depth" in text and "bnfold_store_up 1.0" in text
    assert 'bnfold_upload_bytes_total{part="model"}' in text
    assert 'bnfold_job_duration_seconds_bucket{le="1.0",state="succeeded"}' in text
    assert 'bnfold_http_requests_total{method="POST",route="/v1/jobs",status="200"}' in text
