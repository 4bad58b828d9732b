"""Python client of the bnfold service: submit a model and samples, wait, get the model and report.

    from bnfold.client import Client

    with Client("http://127.0.0.1:8000", api_key="…") as client:   # or BNFOLD_URL / BNFOLD_API_KEY
        result = client.recalibrate("model.onnx", samples_array, batch_size=32)
    result.save("adapted.onnx", report="report.json")   # result.model: onnx.ModelProto; result.report: Report

`Client` (blocking) and `AsyncClient` (asyncio) have the same methods: `recalibrate` (submit, wait,
download; the job is cancelled if the wait is interrupted or times out), and the single steps
`submit`, `get`, `wait`, `download`, `report`, `cancel`, `list`, `info`.

Retries (tenacity, `bnfold.client.retries`): a request is retried with exponential backoff and
jitter (0.25 s doubling to 4 s) for up to ``retry_for`` seconds (default 30) when the server could
not be reached or answered 429 / 502 / 503 / 504; ``Retry-After`` is honoured, and a pause longer
than the remaining budget ends the retries at once. GETs are also retried when a connection broke
mid-answer; POST and DELETE only when the request cannot have been acted on (connection refused or
never established, 429/503), so a retry never creates a second job. Other 4xx and 500 are never
retried. Polling (`wait`) starts at 0.1 s and backs off to 2 s; each poll is a GET with the same
retries, so a server restart during a wait is ridden out when it takes less than ``retry_for``.

Errors are typed from the problem+json body (`bnfold.client.errors` has the table); a bad model or
bad samples raise the same `bnfold.errors` classes as a local run.

How it is built: `_Api` holds every endpoint once, as a generator of I/O-free steps
(`bnfold.client.protocol`); `Client` and `AsyncClient` differ only in how they carry a step out.
Adding an endpoint is one ``@endpoint`` generator in `_Api`; a job option or optional upload is one
field of `bnfold.client.uploads.SubmitOptions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

try:
    import httpx
    import tenacity  # noqa: F401 (checked here so the hint below names the extra)
except ImportError as exc:  # the 'client' extra
    raise ImportError(f"bnfold.client needs httpx and tenacity: pip install 'bnfold[client]' ({exc})") from exc

from bnfold import __version__
from bnfold.client.errors import (
    ClientError,
    ConnectionFailed,
    JobCancelled,
    JobFailed,
    ServerError,
    Unauthorized,
    WaitTimeout,
    error_from_problem,
)
from bnfold.client.jobs import Job, Result, report_from_dict, write_atomic
from bnfold.client.protocol import Pause, Run, Send, Steps, endpoint
from bnfold.client.retries import (
    RETRY_STATUSES,
    UNSENT,
    RetryableAnswer,
    describe,
    log,
    retrying,
)
from bnfold.client.uploads import ModelSource, SamplesSource, SubmitOptions, multipart
from bnfold.errors import BnfoldError
from bnfold.report import Report

__all__ = ["AsyncClient", "Client", "Job", "Result", "SubmitOptions"]

ENV_URL, ENV_KEY = "BNFOLD_URL", "BNFOLD_API_KEY"
Progress = Callable[[str, float], None]
JobRef = Job | str


class _Api:
    """Configuration, and every endpoint of the service written once as a generator of steps
    (`bnfold.client.protocol`); the subclasses only carry the steps out."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 retry_for: float = 30.0, poll_interval: tuple[float, float] = (0.1, 2.0),
                 headers: dict[str, str] | None = None):
        url = url or os.environ.get(ENV_URL)
        if not url:
            raise ClientError(f"no server URL: pass url= or set {ENV_URL} (e.g. http://127.0.0.1:8000)")
        self.url = url.rstrip("/")
        key = api_key or os.environ.get(ENV_KEY)
        self._has_key = bool(key)
        self.retry_for, self.poll_interval = retry_for, poll_interval
        self._headers = {"User-Agent": f"bnfold-client/{__version__}", **(headers or {})}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
            parts = urlsplit(self.url)
            if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
                log.warning("the API key goes unencrypted to %s: use https beyond this machine", self.url)
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._sleep: Callable[[float], Any] = time.sleep  # replaced by the async client (and by tests)

    # ------------------------------------------------------------------------------ endpoints

    @endpoint(options=SubmitOptions)
    def recalibrate(self, model: ModelSource, samples: SamplesSource, *, progress: Progress | None = None,
                    timeout: float | None = None, **options: Any) -> Steps[Result]:
        """Submit, wait (``progress(stage, fraction)`` on every change; ``timeout``: seconds for the job
        to finish), download. ``options``: `submit`'s (`SubmitOptions`). If the wait ends other than
        by the job's end (timeout, Ctrl-C, lost server, a cancelled task), the job is cancelled."""
        job = yield from self._submit(model, samples, SubmitOptions(**options))
        try:
            job = yield from self.wait.steps(job, timeout=timeout, progress=progress)
        except (JobFailed, JobCancelled):
            raise
        except BaseException:
            yield from self._cancel_quietly(job)
            raise
        content = yield from self.download.steps(job)
        return Result(job, content, job.report or (yield from self.report.steps(job)))

    @endpoint(options=SubmitOptions)
    def submit(self, model: ModelSource, samples: SamplesSource, *, wait: float | None = None,
               **options: Any) -> Steps[Job]:
        """Upload and queue a job; the server checks model and samples first, so a bad one raises here.
        ``options``: the fields of `SubmitOptions` (``fold``, ``batch_size``, ``verify_samples``,
        ``rtol``, ``atol``, ``preprocess``, ``on_bad_image``: those of ``bnfold recalibrate``; None:
        the server's default). ``wait``: block up to this many seconds (server-capped) for the job to end."""
        return (yield from self._submit(model, samples, SubmitOptions(**options), wait))

    @endpoint
    def get(self, job: JobRef, *, deadline: float | None = None) -> Steps[Job]:
        """The job as the server sees it now; ``deadline`` (time.monotonic()): stop retrying then."""
        response = yield from self._request("GET", _job_path(job), deadline=deadline)
        return Job.from_json(response.json())

    @endpoint
    def wait(self, job: JobRef, *, timeout: float | None = None, progress: Progress | None = None) -> Steps[Job]:
        """Poll until the job ends; return it when succeeded, raise `JobFailed` / `JobCancelled`
        otherwise, `WaitTimeout` after ``timeout`` seconds (the job goes on)."""
        poll = _Poll(timeout, self.poll_interval, progress)
        current = yield from self.get.steps(job, deadline=poll.deadline)
        while not poll.seen(current):
            yield Pause(poll.next_pause(current))
            current = yield from self.get.steps(current, deadline=poll.deadline)
        return _ended(current)

    @endpoint
    def download(self, job: JobRef, path: str | os.PathLike | None = None) -> Steps[bytes | Path]:
        """The result model's bytes (sha256-checked against the ETag); with ``path``, written there
        atomically and the path returned."""
        job = job if isinstance(job, Job) and job.model_sha256 else (yield from self.get.steps(job))
        response = yield from self._request("GET", _job_path(job, "/model"))
        return _saved(_checked_model(job, response.content, response.headers.get("etag")), path)

    @endpoint
    def report(self, job: JobRef) -> Steps[Report]:
        """The succeeded job's typed report."""
        response = yield from self._request("GET", _job_path(job, "/report"))
        return report_from_dict(response.json())

    @endpoint
    def report_html(self, job: JobRef, path: str | os.PathLike | None = None) -> Steps[bytes | Path]:
        """The report as one self-contained HTML page; with ``path``, saved there (atomically)."""
        response = yield from self._request("GET", _job_path(job, "/report.html"))
        return _saved(response.content, path)

    @endpoint
    def cancel(self, job: JobRef) -> Steps[Job | None]:
        """Cancel a queued/running job (returned, now cancelled); an ended job is deleted (None)."""
        response = yield from self._request("DELETE", _job_path(job))
        return None if response.status_code == 204 else Job.from_json(response.json())

    @endpoint
    def info(self) -> Steps[dict[str, Any]]:
        """Server version, limits and default options."""
        response = yield from self._request("GET", "/v1/info")
        return response.json()

    @endpoint
    def list(self, *, state: str | None = None, limit: int = 20) -> Steps[list[Job]]:
        """This key's jobs, newest first, at most ``limit`` (pages are followed)."""
        jobs: list[Job] = []
        cursor = None
        while len(jobs) < limit:
            params = {"limit": min(100, limit - len(jobs)), "state": state, "cursor": cursor}
            params = {k: v for k, v in params.items() if v is not None}
            page = (yield from self._request("GET", "/v1/jobs", params=params)).json()
            jobs += [Job.from_json(item) for item in page["items"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    # ------------------------------------------------------------------------ shared steps

    def _submit(self, model: ModelSource, samples: SamplesSource, options: SubmitOptions,
                wait: float | None = None) -> Steps[Job]:
        files, replayable = multipart(model, samples, options)
        timeout = self._timeout if not wait else httpx.Timeout(self._timeout.read + wait, connect=self._timeout.connect)
        response = yield from self._request("POST", "/v1/jobs", files=files, replayable=replayable,
                                            params={"wait": wait} if wait else None, timeout=timeout)
        return Job.from_json(response.json())

    def _cancel_quietly(self, job: Job) -> Steps[None]:
        """Best effort, once, and finished even by a task being cancelled: the server may be why we are here."""
        try:
            yield Send("DELETE", _job_path(job), {"timeout": 5.0}, shielded=True)
        except Exception:
            log.warning("could not cancel job %s", job.id)

    def _request(self, method: str, path: str, *, files: Callable[[], dict] | None = None, replayable: bool = True,
                 deadline: float | None = None, **arguments: Any) -> Steps[httpx.Response]:
        """One request under the retry policy (`bnfold.client.retries`); a 4xx/5xx raises its typed error.
        ``files``: makes the multipart files afresh for every attempt; ``deadline``: retry no later."""
        budget = self.retry_for if deadline is None else max(0.0, min(self.retry_for, deadline - time.monotonic()))
        pauses: list[float] = []  # tenacity's sleeps, carried out by the client as Pause steps
        attempts = 0
        try:
            for attempt in retrying(method, path, budget=budget, replayable=replayable, sleep=pauses.append,
                                    url=self.url):
                if pauses:
                    yield Pause(pauses.pop())
                with attempt, _opened(files) as body:
                    attempts += 1
                    response = yield Send(method, path, {"files": body, **arguments})
                    if response.status_code in RETRY_STATUSES:
                        raise RetryableAnswer(response)
        except (RetryableAnswer, httpx.TransportError) as exc:
            raise self._failed(method, exc, attempts) from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _failed(self, method: str, exc: BaseException, attempts: int) -> BnfoldError:
        """The typed error for the last failure of a request whose retries ran out."""
        if isinstance(exc, RetryableAnswer):
            return self._error(exc.response)
        maybe = "; the job may have been created (see list())" if method == "POST" and not isinstance(exc, UNSENT) else ""
        return ConnectionFailed(f"cannot reach the bnfold service at {self.url}: {describe(exc)} "
                                f"(after {attempts} attempt{'s' * (attempts > 1)}){maybe}")

    def _error(self, response: httpx.Response) -> BnfoldError:
        try:
            body = response.json()
        except ValueError:
            body = None
        text = response.text.strip()[:200]
        exc = error_from_problem(response.status_code, body, fallback=f"HTTP {response.status_code} "
                                 f"{response.reason_phrase}" + (f": {text}" if text else ""))
        if isinstance(exc, Unauthorized) and not self._has_key:
            exc.message = f"{exc.message} (no API key given: set {ENV_KEY} or pass api_key=)"
            exc.args = (exc.message,)
        return exc


# ---------------------------------------------------------------------------- transports


class Client(_Api):
    """Blocking client; use as a context manager or call `close()`. ``url``/``api_key`` default to
    ``BNFOLD_URL``/``BNFOLD_API_KEY``; ``timeout`` is per HTTP request (seconds), ``retry_for``
    the time a failing request keeps being retried, ``poll_interval`` (first, longest) pause."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, transport: httpx.BaseTransport | None = None,
                 **options: Any):
        super().__init__(url, api_key, **options)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _drive(self, steps: Steps[Any]) -> Any:
        run = Run(steps)
        while not run.done:
            with run:
                run.answer = self._perform(run.step)
        return run.value

    def _perform(self, step: Send | Pause) -> httpx.Response | None:
        if isinstance(step, Pause):
            return self._sleep(step.seconds)
        return self._http.request(step.method, step.path, **step.arguments)


class AsyncClient(_Api):
    """The asyncio twin of `Client`: the same methods, awaited; ``async with AsyncClient() as c``.
    A cancelled task cancels the job its `recalibrate` was waiting for."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None, **options: Any):
        super().__init__(url, api_key, **options)
        self._sleep = asyncio.sleep
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _drive(self, steps: Steps[Any]) -> Any:
        run = Run(steps)
        while not run.done:
            with run:
                run.answer = await self._perform(run.step)
        return run.value

    async def _perform(self, step: Send | Pause) -> httpx.Response | None:
        if isinstance(step, Pause):
            return await self._sleep(step.seconds)
        sending = self._http.request(step.method, step.path, **step.arguments)
        return await (asyncio.shield(sending) if step.shielded else sending)


# ------------------------------------------------------------------------------- helpers


class _Poll:
    """The waiting loop's state: deadline, next pause (backing off), progress reports."""

    def __init__(self, timeout: float | None, interval: tuple[float, float], progress: Progress | None):
        self.progress, self.timeout = progress, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.pause, self.max_pause = interval
        self.last: tuple[str, float] | None = None

    def seen(self, job: Job) -> bool:
        if self.progress is not None and (job.stage, job.fraction) != self.last:
            self.last = (job.stage, job.fraction)
            self.progress(job.stage, job.fraction)
        return job.done

    def next_pause(self, job: Job) -> float:
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise WaitTimeout(f"job {job.id} is still {job.state} ({job.stage}) after {self.timeout:g} s", job)
        pause = self.pause if left is None else min(self.pause, left)
        self.pause = min(self.max_pause, self.pause * 1.5)
        return pause


def _ended(job: Job) -> Job:
    if job.state == "failed":
        error = job.error or {}
        raise JobFailed(job, error_from_problem(int(error.get("status") or 500), error))
    if job.state == "cancelled":
        raise JobCancelled(job)
    return job


def _checked_model(job: Job, content: bytes, etag: str | None) -> bytes:
    digest = hashlib.sha256(content).hexdigest()
    expected = (etag or "").strip('"') or job.model_sha256
    if expected and digest != expected:
        raise ServerError(f"the model of job {job.id} arrived damaged (sha256 {digest}, expected {expected})")
    return content


def _saved(content: bytes, path: str | os.PathLike | None) -> bytes | Path:
    """A download's bytes, or (with ``path``) the path they were written to atomically."""
    if path is None:
        return content
    write_atomic(Path(path), content)
    return Path(path)


@contextlib.contextmanager
def _opened(files: Callable[[], dict] | None):
    """The multipart files of one attempt, opened afresh and closed after it (callers' own file
    objects are only wrapped, see `bnfold.client.uploads`, so they stay open)."""
    body = files() if files else None
    try:
        yield body
    finally:
        for value in (body or {}).values():
            if hasattr(value[1], "close"):
                value[1].close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _job_path(job: JobRef, suffix: str = "") -> str:
    return f"/v1/jobs/{quote(job.id if isinstance(job, Job) else str(job), safe='')}{suffix}"
