"""End-to-end: what happens to jobs when processes die, time out, are cancelled or the server restarts.

These servers run the app from `service_testapp`, whose job processes wait while a hold file
exists, so a job can be kept "running" for exactly as long as a test needs.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest
from service_helpers import Server, pid_gone, submit, wait_for


@pytest.fixture(scope="module")
def held_server(tmp_path_factory):
    """One worker, one queue slot."""
    with Server.single_slot(tmp_path_factory.mktemp("held") / "data") as srv:
        yield srv


@pytest.fixture
def held(held_server):
    """The held server with the hold on; afterwards hold off and every unfinished job cancelled."""
    with held_server.holding():
        yield held_server


def start_held_job(server: Server, client) -> tuple[dict, int]:
    job = submit(client).json()
    return job, server.worker_pid(job["id"])


def test_cancel_a_running_job_stops_its_process_and_deletes_its_files(held):
    with held.client() as client:
        job, pid = start_held_job(held, client)
        assert client.get(job["url"]).json()["state"] == "running"
        response = client.delete(job["url"])
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
        assert pid_gone(pid)
        assert wait_for(client, job["id"])["state"] == "cancelled"
        held.release()
        follow_up = submit(client, wait=20).json()  # the worker slot is free again
        assert follow_up["state"] == "succeeded"
    assert not (held.data_dir / "jobs" / job["id"]).exists()


def test_cancel_a_queued_job(held):
    with held.client() as client:
        running, _ = start_held_job(held, client)
        response = submit(client, wait=0.3)  # ?wait runs out: 202 and the job as it is
        assert response.status_code == 202 and response.json()["state"] == "queued"
        queued = response.json()
        response = client.delete(queued["url"])
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
        assert not (held.data_dir / "jobs" / queued["id"]).exists()
        assert client.delete(queued["url"]).status_code == 204  # now it is deleted for good
        assert client.get(queued["url"]).status_code == 404
        assert client.get(running["url"]).json()["state"] == "running"


def test_submissions_beyond_the_queue_bound_get_429_with_retry_after(held):
    with held.client() as client:
        start_held_job(held, client)  # the only worker is busy; the queue holds one more
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: submit(held.client()), range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [202, 429, 429, 429]
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.headers["content-type"] == "application/problem+json"
    assert list((held.data_dir / "incoming").iterdir()) == []


def test_a_killed_worker_fails_its_job_and_the_api_stays_up(held):
    with held.client() as client:
        job, pid = start_held_job(held, client)
        os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does
        failed = wait_for(client, job["id"])
        assert failed["state"] == "failed"
        assert failed["error"]["detail"] == "worker process died (signal 9 — out of memory?)"
        assert failed["error"]["title"] == "Worker process died"
        assert client.get("/readyz").status_code == 200
        held.release()
        assert submit(client, wait=20).json()["state"] == "succeeded"


def test_a_job_past_the_timeout_is_stopped_and_failed(tmp_path):
    srv = Server(tmp_path / "data", held=True, env={"BNFOLD_JOB_TIMEOUT": "1", "BNFOLD_WORKERS": "1"}).start()
    try:
        srv.hold()
        with srv.client() as client:
            job, pid = start_held_job(srv, client)
            failed = wait_for(client, job["id"], timeout=20)
        assert failed["state"] == "failed" and failed["error"]["title"] == "Job timed out"
        assert "BNFOLD_JOB_TIMEOUT" in failed["error"]["detail"]
        assert pid_gone(pid)
    finally:
        srv.release()
        srv.stop()


def test_restarts_keep_results_requeue_interrupted_jobs_and_give_up_after_two_attempts(tmp_path):
    srv = Server(tmp_path / "data", held=True, env={"BNFOLD_WORKERS": "1"}).start()
    try:
        with srv.client() as client:
            finished = submit(client, wait=20).json()
            etag = client.get(finished["result"]["model_url"]).headers["etag"]
            srv.hold()
            interrupted, pid = start_held_job(srv, client)
            waiting = submit(client).json()
        srv.crash()  # SIGKILL: no shutdown code runs
        assert pid_gone(pid), "the job process outlived its server"

        # 2nd server: the interrupted job runs again (attempt 2), the queued one still waits
        srv.forget_pid(interrupted["id"])
        srv.start()
        with srv.client() as client:
            pid = srv.worker_pid(interrupted["id"])
            job = client.get(interrupted["url"]).json()
            assert job["state"] == "running" and job["attempts"] == 2
            assert client.get(waiting["url"]).json()["state"] == "queued"
            again = client.get(finished["result"]["model_url"])
            assert again.status_code == 200 and again.headers["etag"] == etag
        srv.crash()
        assert pid_gone(pid)

        # 3rd server: a job whose server died under it twice is failed, not retried forever
        srv.start()
        with srv.client() as client:
            failed = wait_for(client, interrupted["id"])
            assert failed["state"] == "failed" and failed["error"]["title"] == "Server restarted"
            assert "stopped 2 times" in failed["error"]["detail"]
            pid = srv.worker_pid(waiting["id"])
        srv.stop()  # graceful: the running job goes back to the queue, the attempt does not count
        assert pid_gone(pid)

        srv.forget_pid(waiting["id"])
        srv.start()
        with srv.client() as client:
            srv.worker_pid(waiting["id"])
            assert client.get(waiting["url"]).json()["attempts"] == 1
            srv.release()
            assert wait_for(client, waiting["id"])["state"] == "succeeded"
            assert client.get(finished["result"]["model_url"]).headers["etag"] == etag
    finally:
        srv.release()
        srv.stop()


def test_a_killed_forkserver_does_not_fail_a_job_whose_process_still_runs(held):
    """kill -9 of the forkserver: its children live on, but multiprocessing reports them ended (255).
    The job used to be failed while its process kept running; now it is followed until it ends."""
    psutil = pytest.importorskip("psutil")
    with held.client() as client:
        job, pid = start_held_job(held, client)
        forkserver = psutil.Process(pid).parent()
        assert "forkserver" in " ".join(forkserver.cmdline())
        forkserver.kill()
        assert pid_gone(forkserver.pid)  # a zombie until the server reaps it
        time.sleep(1.5)  # several supervisor ticks
        assert client.get(job["url"]).json()["state"] == "running"
        assert psutil.pid_exists(pid)
        held.release()
        done = wait_for(client, job["id"])
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 1
        assert submit(client, wait=20).json()["state"] == "succeeded"  # a new forkserver serves new jobs
        assert client.get("/readyz").status_code == 200


def test_sigterm_with_an_open_wait_shuts_down_within_the_grace_period_and_keeps_the_attempt(tmp_path):
    """`docker stop` gives 10 s. A client holding POST ?wait=60 used to keep the server up past it
    (then SIGKILL: the job counted an attempt, and showed "running" for a minute under a new host
    name). Now the wait answers at once (202, the job's Location, Retry-After), the server exits
    well within the grace period, and the interrupted run does not count as an attempt."""
    srv = Server(tmp_path / "data", held=True, env={"BNFOLD_WORKERS": "1"}).start()
    try:
        srv.hold()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: submit(srv.client(), wait=60))
            job_id = next(iter(_pids_appearing(srv)))
            pid = srv.worker_pid(job_id)
            started = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            response = waiting.result(timeout=10)
            answered = time.monotonic() - started
        srv.process.wait(10)
        stopped = time.monotonic() - started
        assert response.status_code == 202, response.text
        assert response.json()["id"] == job_id and int(response.headers["retry-after"]) >= 1
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        assert answered < 3 and stopped < 8, (answered, stopped)
        assert srv.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once it is done: 143, not 137
        assert pid_gone(pid)

        srv.forget_pid(job_id)
        srv.start()
        with srv.client() as client:
            srv.worker_pid(job_id, timeout=10)  # taken up again at once, not after BNFOLD_STALE_AFTER
            assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1
            srv.release()
            assert wait_for(client, job_id)["state"] == "succeeded"
    finally:
        srv.release()
        srv.stop()


def _pids_appearing(server: Server, timeout: float = 30.0):
    """Job ids whose process has written its pid file (held jobs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p.stem for p in server.hold_dir.glob("*.pid")]
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("no job started")
