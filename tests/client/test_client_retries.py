"""Retries, waiting and the job's own ends: a server restarted during a wait, a full queue, timeouts,
cancellation, a killed worker (real held servers, see service_testapp); and the retry policy
itself, request by request, against scripted answers (httpx.MockTransport).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal

import httpx
import numpy as np
import pytest
import service_helpers
from service_helpers import KEY_A, samples_array, tiny_model

from bnfold.client import Client
from bnfold.client.errors import (
    ConnectionFailed,
    JobCancelled,
    JobFailed,
    NotFound,
    NotReady,
    RequestRejected,
    ServerBusy,
    ServerError,
    WaitTimeout,
)

# ------------------------------------------------------------------------ real held servers


def test_a_wait_rides_out_a_server_restart(held, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="bnfold.client")
    with Client(held.url, KEY_A, retry_for=60) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = client.submit(tiny_model(), samples_array(), fold=False)
        held.worker_pid(job.id)  # running, and held there
        waiting = pool.submit(client.wait, job, timeout=90)
        held.stop()  # graceful: the running job goes back to the queue
        held.forget_pid(job.id)
        monkeypatch.setattr(service_helpers, "free_port", lambda: int(client.url.rsplit(":", 1)[1]))
        held.start()  # same port, same data directory
        held.worker_pid(job.id)
        held.release()
        done = waiting.result(timeout=60)
        assert done.state == "succeeded" and done.attempts == 1  # a graceful stop does not count an attempt
        assert len(client.download(done)) == done.model_bytes
    assert any("retry" in record.getMessage() for record in caplog.records), "the wait never had to retry"


def test_a_timed_out_recalibration_cancels_its_job(held):
    with Client(held.url, KEY_A) as client:
        with pytest.raises(WaitTimeout, match="still running") as caught:
            client.recalibrate(tiny_model(), samples_array(), timeout=0.5)
        assert isinstance(caught.value, TimeoutError)
        assert client.get(caught.value.job).state == "cancelled"


def test_a_job_cancelled_elsewhere_ends_the_wait_and_has_no_result(held):
    with Client(held.url, KEY_A) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = client.submit(tiny_model(), samples_array())
        held.worker_pid(job.id)
        with pytest.raises(NotReady, match="running"):
            client.download(job.id)
        waiting = pool.submit(client.wait, job)
        assert client.cancel(job).state == "cancelled"
        with pytest.raises(JobCancelled, match=job.id):
            waiting.result(timeout=30)


def test_a_killed_worker_fails_the_job_with_a_server_error(held):
    with Client(held.url, KEY_A) as client:
        job = client.submit(tiny_model(), samples_array())
        os.kill(held.worker_pid(job.id), signal.SIGKILL)
        with pytest.raises(JobFailed, match="worker process died") as caught:
            client.wait(job, timeout=30)
        assert isinstance(caught.value.error, ServerError)


def test_a_full_queue_raises_server_busy_once_the_retries_run_out(held):
    with Client(held.url, KEY_A, retry_for=0.5) as client:
        held.worker_pid(client.submit(tiny_model(), samples_array()).id)  # the only worker
        client.submit(tiny_model(), samples_array())  # the only queue slot
        with pytest.raises(ServerBusy, match="waiting for a worker") as caught:
            client.submit(tiny_model(), samples_array())
        assert caught.value.problem["status"] == 429


# ------------------------------------------------------------------ the policy, scripted


def scripted(*answers):
    """A client whose requests get `answers` in turn (a status, (status, headers), or an exception);
    it records every request and every pause instead of sleeping."""
    answers, requests, pauses = list(answers), [], []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request.method)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        body = {"type": "urn:bnfold:problem:x", "title": "t", "status": status, "detail": f"answer {status}"}
        return httpx.Response(status, json={"api_version": "v1"} if status == 200 else body, headers=headers)

    client = Client("http://bnfold.test", KEY_A, transport=httpx.MockTransport(handle), retry_for=30)
    client._sleep = pauses.append
    return client, requests, pauses


def test_retry_after_is_honoured_for_429_and_503():
    client, requests, pauses = scripted((429, {"Retry-After": "7"}), (503, {"Retry-After": "2"}), 200)
    assert client.info() == {"api_version": "v1"}
    assert requests == ["GET"] * 3 and pauses == [7.0, 2.0]


def test_backoff_grows_without_retry_after_and_connection_errors_are_retried():
    refused = httpx.ConnectError("connection refused")
    client, requests, pauses = scripted(refused, refused, 502, 504, 200)
    client.info()
    assert len(requests) == 5 and all(0.25 <= p <= 4.25 for p in pauses) and pauses[-1] > pauses[0]


@pytest.mark.parametrize("status, error", [(400, RequestRejected), (404, NotFound), (409, NotReady),
                                           (422, RequestRejected), (500, ServerError)])
def test_other_errors_are_not_retried(status, error):
    client, requests, pauses = scripted(status, 200)
    with pytest.raises(error, match=f"answer {status}"):
        client.info()
    assert requests == ["GET"] and pauses == []


def test_a_retry_after_beyond_the_budget_gives_up_at_once():
    client, requests, pauses = scripted((429, {"Retry-After": "3600"}), 200)
    with pytest.raises(ServerBusy):
        client.info()
    assert requests == ["GET"] and pauses == []


def test_a_broken_answer_is_retried_for_get_but_not_for_a_submission():
    client, requests, _ = scripted(httpx.ReadError("reset"), 200)
    client.info()
    assert requests == ["GET", "GET"]
    client, requests, _ = scripted(httpx.ReadError("reset"), 200)  # the job may exist: never submit twice
    with pytest.raises(ConnectionFailed, match="ReadError"):
        client.submit(tiny_model(), np.zeros((1, 3, 8, 8), np.float32))
    assert requests == ["POST"]


def test_a_refused_submission_is_sent_again_from_its_first_byte(tmp_path):
    bodies = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(503, headers={"Retry-After": "0"}) if len(bodies) == 1 else httpx.Response(500)

    (tmp_path / "m.onnx").write_bytes(tiny_model())
    with Client("http://bnfold.test", KEY_A, transport=httpx.MockTransport(handle)) as client:
        client._sleep = lambda seconds: None
        with pytest.raises(ServerError, match="HTTP 500"):
            client.submit(tmp_path / "m.onnx", samples_array())
    first, second = ([line for line in body.split(b"\r\n") if not line.startswith(b"--")] for body in bodies)
    assert len(bodies) == 2 and first == second and len(bodies[0]) > len(tiny_model()) + samples_array().nbytes
