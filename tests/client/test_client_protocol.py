"""The endpoints written once (bnfold.client.protocol) behave the same through both clients: the
interrupted wait cancels its job (Ctrl-C in `Client`, a cancelled task in `AsyncClient`), every
step's failure reaches the endpoint, and the submit body is built from `SubmitOptions` alone.
Scripted answers (httpx.MockTransport), no server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json

import httpx
import numpy as np
import pytest
from service_helpers import KEY_A, samples_array, tiny_model

from bnfold.client import AsyncClient, Client
from bnfold.client.uploads import SubmitOptions, multipart
from bnfold.errors import InvalidOptions


def job_json(state: str = "running") -> dict:
    return {"id": "j1", "state": state, "progress": {"stage": "recalibrate", "fraction": 0.5}, "attempts": 1,
            "created_at": "2026-12-01T00:00:00+00:00", "options": {}}


def handler(log: list[tuple[str, str]]):
    """POST creates job j1, which runs forever; DELETE cancels it."""

    def handle(request: httpx.Request) -> httpx.Response:
        log.append((request.method, request.url.path))
        if request.method == "POST":
            return httpx.Response(201, json=job_json("queued"))
        return httpx.Response(200, json=job_json("cancelled" if request.method == "DELETE" else "running"))

    return handle


def test_ctrl_c_during_a_wait_cancels_the_job():
    log, polls = [], []

    def progress(stage, fraction):
        polls.append(stage)
        if len(polls) == 1:
            raise KeyboardInterrupt

    with Client("http://bnfold.test", KEY_A, transport=httpx.MockTransport(handler(log))) as client:
        client._sleep = lambda seconds: None
        with pytest.raises(KeyboardInterrupt):
            client.recalibrate(tiny_model(), samples_array(), progress=progress)
    assert log == [("POST", "/v1/jobs"), ("GET", "/v1/jobs/j1"), ("DELETE", "/v1/jobs/j1")]


def test_a_cancelled_task_cancels_its_job_and_a_second_cancel_does_not_stop_that():
    log = []
    answer = handler(log)

    async def handle(request: httpx.Request) -> httpx.Response:
        response = answer(request)
        if request.method == "DELETE":
            await asyncio.sleep(0.05)  # the second cancel lands here
            log.append("deleted")
        return response

    async def run():
        async with AsyncClient("http://bnfold.test", KEY_A, transport=httpx.MockTransport(handle),
                               poll_interval=(0.01, 0.01)) as client:
            task = asyncio.create_task(client.recalibrate(tiny_model(), samples_array()))
            while log.count(("GET", "/v1/jobs/j1")) < 3:
                await asyncio.sleep(0.005)
            task.cancel()
            while ("DELETE", "/v1/jobs/j1") not in log:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.1)  # the shielded DELETE finishes on its own

    asyncio.run(run())
    assert log[0] == ("POST", "/v1/jobs") and log[-2:] == [("DELETE", "/v1/jobs/j1"), "deleted"]
    assert set(log[1:-2]) == {("GET", "/v1/jobs/j1")}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_transport_failure_reaches_the_endpoint_and_ends_as_connection_failed(kind):
    from bnfold.client.errors import ConnectionFailed

    def handle(request):
        raise httpx.ConnectError("refused")

    transport = httpx.MockTransport(handle)
    if kind == "sync":
        client = Client("http://bnfold.test", KEY_A, transport=transport, retry_for=0)
        call = client.info
    else:
        client = AsyncClient("http://bnfold.test", KEY_A, transport=transport, retry_for=0)

        def call():
            return asyncio.run(client.info())

    with pytest.raises(ConnectionFailed, match=r"ConnectError: refused \(after 1 attempt\)"):
        call()


def test_submit_options_become_the_options_part_and_unknown_ones_are_refused():
    files, replayable = multipart(tiny_model(), samples_array(), SubmitOptions(batch_size=8, rtol=None, fold=False))
    body = files()
    assert replayable and set(body) == {"model", "samples", "options"}
    assert json.loads(body["options"][1]) == {"fold": False, "batch_size": 8}  # None: the server's default
    with pytest.raises(TypeError, match="wait"), Client("http://bnfold.test", KEY_A) as client:
        client.recalibrate(tiny_model(), samples_array(), wait=3)  # submit's own keyword, not an option


def test_a_part_field_is_uploaded_under_its_name():
    """Optional uploads are fields with metadata part=… (the labelled check); None sends nothing."""
    check = SubmitOptions(check_samples=np.ones((2, 3), np.float32), check_labels=np.array([0, 1]))
    body = multipart(tiny_model(), samples_array(), check)[0]()
    assert set(body) == {"model", "samples", "check_samples", "check_labels", "options"}
    assert json.loads(body["options"][1]) == {"fold": True}
    assert np.load(body["check_samples"][1]).tolist() == np.ones((2, 3)).tolist()
    assert np.load(body["check_labels"][1]).tolist() == [0, 1]
    assert set(multipart(tiny_model(), samples_array(), SubmitOptions())[0]()) == {"model", "samples", "options"}
    with pytest.raises(InvalidOptions, match="both check_samples and check_labels"):
        SubmitOptions(check_samples=np.ones((2, 3), np.float32))


def test_both_clients_show_the_same_methods_and_signatures_and_the_async_ones_are_coroutines():
    names = ["recalibrate", "submit", "get", "wait", "download", "report", "cancel", "list", "info"]
    sync, asynchronous = Client("http://bnfold.test"), AsyncClient("http://bnfold.test")
    for name in names:
        method, twin = getattr(sync, name), getattr(asynchronous, name)
        assert inspect.signature(method) == inspect.signature(twin) and method.__doc__ == twin.__doc__, name
        assert inspect.iscoroutinefunction(twin) and not inspect.iscoroutinefunction(method), name
    submit = inspect.signature(sync.submit).parameters
    assert list(submit)[:3] == ["model", "samples", "wait"]
    assert list(submit)[3:] == [f.name for f in dataclasses.fields(SubmitOptions)]  # the options, spelled out
    assert str(inspect.signature(sync.get).return_annotation) == "Job"
