"""Python client of the bnfold service: submit a model and samples, wait, get the model and report.

    from bnfold.client import Client

    with Client("http://127.0.0.1:8000", api_key="…") as client:   # or BNFOLD_URL / BNFOLD_API_KEY
        result = client.recalibrate("model.onnx", samples_array, batch_size=32)
    result.save("adapted.onnx", report="report.json")   # result.model: onnx.ModelProto; result.report: Report

`Client` (blocking) and `AsyncClient` (asyncio) have the same methods: `recalibrate` (submit, wait,
download; the job is cancelled if the wait is interrupted or times out), and the single steps
`submit`, `get`, `wait`, `download`, `report`, `cancel`, `list`, `info`.

Retries (tenacity): a request is retried with exponential backoff and jitter (0.25 s doubling to
4 s) for up to ``retry_for`` seconds (default 30) when the server could not be reached or answered
429 / 502 / 503 / 504; ``Retry-After`` is honoured, and a pause longer than the remaining budget
ends the retries at once. GETs are also retried when a connection broke mid-answer; POST and
DELETE only when the request cannot have been acted on (connection refused or never established,
429/503), so a retry never creates a second job. Other 4xx and 500 are never retried. Polling
(`wait`) starts at 0.1 s and backs off to 2 s; each poll is a GET with the same retries, so a
server restart during a wait is ridden out when it takes less than ``retry_for``.

Errors are typed from the problem+json body (`bnfold.client.errors` has the table); a bad model or
bad samples raise the same `bnfold.errors` classes as a local run.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

try:
    import httpx
    import tenacity
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
from bnfold.client.uploads import ModelSource, SamplesSource, model_part, samples_part
from bnfold.errors import BnfoldError
from bnfold.report import Report

__all__ = ["AsyncClient", "Client", "Job", "Result"]

ENV_URL, ENV_KEY = "BNFOLD_URL", "BNFOLD_API_KEY"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: failures after which the request surely never reached the application: safe to repeat any method
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
Progress = Callable[[str, float], None]
JobRef = Job | str
log = logging.getLogger("bnfold.client")  # retries and failed clean-ups, at WARNING
log.addHandler(logging.NullHandler())  # silent unless the application configures logging


class _RetryableAnswer(Exception):
    def __init__(self, response: httpx.Response):
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
        self.retry_after = _retry_after(response.headers.get("retry-after"))


class _Base:
    """Configuration and everything that does not depend on sync vs async I/O."""

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

    # ---------------------------------------------------------------------------- retries

    def _retry_args(self, method: str, path: str, *, replayable: bool = True, deadline: float | None = None) -> dict:
        budget = self.retry_for if deadline is None else max(0.0, min(self.retry_for, deadline - time.monotonic()))
        backoff = tenacity.wait_exponential(multiplier=0.25, max=4.0) + tenacity.wait_random(0, 0.25)
        idempotent = method == "GET"

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception()
            if isinstance(exc, _RetryableAnswer) and exc.retry_after is not None:
                return exc.retry_after
            return backoff(state)

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, _RetryableAnswer):
                return idempotent or exc.response.status_code in (429, 503)
            return isinstance(exc, UNSENT) or (idempotent and isinstance(exc, httpx.TransportError))

        def before_sleep(state: tenacity.RetryCallState) -> None:
            log.warning("%s %s: %s; retry %d in %.1f s", method, path, _describe(state.outcome.exception()),
                        state.attempt_number, state.upcoming_sleep)

        stop = tenacity.stop_before_delay(budget) if replayable else tenacity.stop_after_attempt(1)
        return dict(stop=stop, wait=wait, retry=tenacity.retry_if_exception(retryable), reraise=True,
                    before_sleep=before_sleep, sleep=self._sleep)

    def _failed(self, method: str, exc: BaseException, attempts: int) -> BnfoldError:
        """The typed error for the last failure of a request whose retries ran out."""
        if isinstance(exc, _RetryableAnswer):
            return self._error(exc.response)
        maybe = "; the job may have been created (see list())" if method == "POST" and not isinstance(exc, UNSENT) else ""
        return ConnectionFailed(f"cannot reach the bnfold service at {self.url}: {_describe(exc)} "
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

    # --------------------------------------------------------------------------- requests

    @staticmethod
    def _submit_parts(model: ModelSource, samples: SamplesSource, options: dict[str, Any]):
        parts = {"model": model_part(model), "samples": samples_part(samples)}
        options_json = json.dumps({k: v for k, v in options.items() if v is not None})

        def files() -> dict:
            return {**{name: part.field() for name, part in parts.items()},
                    "options": (None, options_json, "application/json")}

        return files, all(part.replayable for part in parts.values())

    def _request_timeout(self, wait: float | None) -> httpx.Timeout:
        return self._timeout if not wait else httpx.Timeout(self._timeout.read + wait, connect=self._timeout.connect)

    @staticmethod
    def _job_path(job: JobRef, suffix: str = "") -> str:
        return f"/v1/jobs/{quote(_job_id(job), safe='')}{suffix}"

    @staticmethod
    def _ended(job: Job) -> Job:
        if job.state == "failed":
            error = job.error or {}
            raise JobFailed(job, error_from_problem(int(error.get("status") or 500), error))
        if job.state == "cancelled":
            raise JobCancelled(job)
        return job

    @staticmethod
    def _checked_content(job: Job, content: bytes, etag: str | None) -> bytes:
        digest = hashlib.sha256(content).hexdigest()
        expected = (etag or "").strip('"') or job.model_sha256
        if expected and digest != expected:
            raise ServerError(f"the model of job {job.id} arrived damaged (sha256 {digest}, expected {expected})")
        return content


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


# ------------------------------------------------------------------------------------- sync


class Client(_Base):
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

    def _send(self, method: str, path: str, *, files: Callable[[], dict] | None = None, replayable: bool = True,
              deadline: float | None = None, **kwargs: Any) -> httpx.Response:
        attempts = 0
        try:
            for attempt in tenacity.Retrying(**self._retry_args(method, path, replayable=replayable, deadline=deadline)):
                with attempt, _opened(files) as body:
                    attempts += 1
                    response = self._http.request(method, path, files=body, **kwargs)
                    if response.status_code in RETRY_STATUSES:
                        raise _RetryableAnswer(response)
        except (_RetryableAnswer, httpx.TransportError) as exc:
            raise self._failed(method, exc, attempts) from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def recalibrate(self, model: ModelSource, samples: SamplesSource, *, fold: bool = True, batch_size: int | None = None,
                    verify_samples: int | None = None, rtol: float | None = None, atol: float | None = None,
                    preprocess: dict[str, Any] | None = None, on_bad_image: str | None = None,
                    unfoldable: str | None = None, progress: Progress | None = None,
                    timeout: float | None = None) -> Result:
        """Submit, wait (``progress(stage, fraction)`` on every change; ``timeout``: seconds for the job
        to finish), download. The options are `submit`'s. If the wait ends other than by the job's
        end (timeout, Ctrl-C, lost server), the job is cancelled."""
        job = self.submit(model, samples, fold=fold, batch_size=batch_size, verify_samples=verify_samples,
                          rtol=rtol, atol=atol, preprocess=preprocess, on_bad_image=on_bad_image,
                          unfoldable=unfoldable)
        try:
            job = self.wait(job, timeout=timeout, progress=progress)
        except (JobFailed, JobCancelled):
            raise
        except BaseException:
            self._cancel_quietly(job)
            raise
        return Result(job, self.download(job), job.report or self.report(job))

    def submit(self, model: ModelSource, samples: SamplesSource, *, fold: bool = True, batch_size: int | None = None,
               verify_samples: int | None = None, rtol: float | None = None, atol: float | None = None,
               preprocess: dict[str, Any] | None = None, on_bad_image: str | None = None,
               unfoldable: str | None = None, wait: float | None = None) -> Job:
        """Upload and queue a job; the server checks model and samples first, so a bad one raises here.
        Options are those of ``bnfold recalibrate`` / `bnfold.pipeline.JobOptions`; None: the
        server's default (image samples only: ``preprocess`` overrides, ``on_bad_image``;
        ``unfoldable``: 'keep' a BN no rule folds, or 'affine' for Mul + Add).
        ``wait``: block up to this many seconds (server-capped) for the job to end."""
        files, replayable = self._submit_parts(model, samples, dict(
            fold=fold, batch_size=batch_size, verify_samples=verify_samples, rtol=rtol, atol=atol,
            preprocess=preprocess, on_bad_image=on_bad_image, unfoldable=unfoldable))
        response = self._send("POST", "/v1/jobs", files=files, replayable=replayable,
                              params={"wait": wait} if wait else None, timeout=self._request_timeout(wait))
        return Job.from_json(response.json())

    def get(self, job: JobRef, *, deadline: float | None = None) -> Job:
        return Job.from_json(self._send("GET", self._job_path(job), deadline=deadline).json())

    def wait(self, job: JobRef, *, timeout: float | None = None, progress: Progress | None = None) -> Job:
        """Poll until the job ends; return it when succeeded, raise `JobFailed` / `JobCancelled`
        otherwise, `WaitTimeout` after ``timeout`` seconds (the job goes on)."""
        poll = _Poll(timeout, self.poll_interval, progress)
        current = self.get(job, deadline=poll.deadline)
        while not poll.seen(current):
            self._sleep(poll.next_pause(current))
            current = self.get(current, deadline=poll.deadline)
        return self._ended(current)

    def download(self, job: JobRef, path: str | os.PathLike | None = None) -> bytes | Path:
        """The result model's bytes (sha256-checked against the ETag); with ``path``, written there
        atomically and the path returned."""
        job = job if isinstance(job, Job) and job.model_sha256 else self.get(job)
        response = self._send("GET", self._job_path(job, "/model"))
        content = self._checked_content(job, response.content, response.headers.get("etag"))
        if path is None:
            return content
        write_atomic(Path(path), content)
        return Path(path)

    def report(self, job: JobRef) -> Report:
        return report_from_dict(self._send("GET", self._job_path(job, "/report")).json())

    def cancel(self, job: JobRef) -> Job | None:
        """Cancel a queued/running job (returned, now cancelled); an ended job is deleted (None)."""
        response = self._send("DELETE", self._job_path(job))
        return None if response.status_code == 204 else Job.from_json(response.json())

    def info(self) -> dict[str, Any]:
        """Server version, limits and default options."""
        return self._send("GET", "/v1/info").json()

    def list(self, *, state: str | None = None, limit: int = 20) -> list[Job]:
        """This key's jobs, newest first, at most ``limit`` (pages are followed)."""
        jobs: list[Job] = []
        cursor = None
        while len(jobs) < limit:
            params = {"limit": min(100, limit - len(jobs)), "state": state, "cursor": cursor}
            page = self._send("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None}).json()
            jobs += [Job.from_json(item) for item in page["items"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    def _cancel_quietly(self, job: Job) -> None:
        try:
            self._http.delete(self._job_path(job), timeout=5.0)
        except Exception:  # best effort: the server may be the reason we are here
            log.warning("could not cancel job %s", job.id)


# ------------------------------------------------------------------------------------ async


class AsyncClient(_Base):
    """The asyncio twin of `Client`: the same methods, awaited; ``async with AsyncClient() as c``."""

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

    async def _send(self, method: str, path: str, *, files: Callable[[], dict] | None = None, replayable: bool = True,
                    deadline: float | None = None, **kwargs: Any) -> httpx.Response:
        attempts = 0
        try:
            async for attempt in tenacity.AsyncRetrying(**self._retry_args(method, path, replayable=replayable,
                                                                           deadline=deadline)):
                with attempt, _opened(files) as body:
                    attempts += 1
                    response = await self._http.request(method, path, files=body, **kwargs)
                    if response.status_code in RETRY_STATUSES:
                        raise _RetryableAnswer(response)
        except (_RetryableAnswer, httpx.TransportError) as exc:
            raise self._failed(method, exc, attempts) from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    async def recalibrate(self, model: ModelSource, samples: SamplesSource, *, fold: bool = True,
                          batch_size: int | None = None, verify_samples: int | None = None, rtol: float | None = None,
                          atol: float | None = None, preprocess: dict[str, Any] | None = None,
                          on_bad_image: str | None = None, unfoldable: str | None = None,
                          progress: Progress | None = None, timeout: float | None = None) -> Result:
        """See `Client.recalibrate`; a cancelled task cancels the job."""
        job = await self.submit(model, samples, fold=fold, batch_size=batch_size, verify_samples=verify_samples,
                                rtol=rtol, atol=atol, preprocess=preprocess, on_bad_image=on_bad_image,
                                unfoldable=unfoldable)
        try:
            job = await self.wait(job, timeout=timeout, progress=progress)
        except (JobFailed, JobCancelled):
            raise
        except BaseException:
            await asyncio.shield(self._cancel_quietly(job))
            raise
        return Result(job, await self.download(job), job.report or await self.report(job))

    async def submit(self, model: ModelSource, samples: SamplesSource, *, fold: bool = True,
                     batch_size: int | None = None, verify_samples: int | None = None, rtol: float | None = None,
                     atol: float | None = None, preprocess: dict[str, Any] | None = None,
                     on_bad_image: str | None = None, unfoldable: str | None = None,
                     wait: float | None = None) -> Job:
        files, replayable = self._submit_parts(model, samples, dict(
            fold=fold, batch_size=batch_size, verify_samples=verify_samples, rtol=rtol, atol=atol,
            preprocess=preprocess, on_bad_image=on_bad_image, unfoldable=unfoldable))
        response = await self._send("POST", "/v1/jobs", files=files, replayable=replayable,
                                    params={"wait": wait} if wait else None, timeout=self._request_timeout(wait))
        return Job.from_json(response.json())

    async def get(self, job: JobRef, *, deadline: float | None = None) -> Job:
        return Job.from_json((await self._send("GET", self._job_path(job), deadline=deadline)).json())

    async def wait(self, job: JobRef, *, timeout: float | None = None, progress: Progress | None = None) -> Job:
        poll = _Poll(timeout, self.poll_interval, progress)
        current = await self.get(job, deadline=poll.deadline)
        while not poll.seen(current):
            await self._sleep(poll.next_pause(current))
            current = await self.get(current, deadline=poll.deadline)
        return self._ended(current)

    async def download(self, job: JobRef, path: str | os.PathLike | None = None) -> bytes | Path:
        job = job if isinstance(job, Job) and job.model_sha256 else await self.get(job)
        response = await self._send("GET", self._job_path(job, "/model"))
        content = self._checked_content(job, response.content, response.headers.get("etag"))
        if path is None:
            return content
        write_atomic(Path(path), content)
        return Path(path)

    async def report(self, job: JobRef) -> Report:
        return report_from_dict((await self._send("GET", self._job_path(job, "/report"))).json())

    async def cancel(self, job: JobRef) -> Job | None:
        response = await self._send("DELETE", self._job_path(job))
        return None if response.status_code == 204 else Job.from_json(response.json())

    async def info(self) -> dict[str, Any]:
        return (await self._send("GET", "/v1/info")).json()

    async def list(self, *, state: str | None = None, limit: int = 20) -> list[Job]:
        jobs: list[Job] = []
        cursor = None
        while len(jobs) < limit:
            params = {"limit": min(100, limit - len(jobs)), "state": state, "cursor": cursor}
            page = (await self._send("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})).json()
            jobs += [Job.from_json(item) for item in page["items"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    async def _cancel_quietly(self, job: Job) -> None:
        try:
            await self._http.delete(self._job_path(job), timeout=5.0)
        except Exception:
            log.warning("could not cancel job %s", job.id)


@contextlib.contextmanager
def _opened(files: Callable[[], dict] | None):
    """The multipart files of one attempt, opened afresh and closed after it (callers' own file
    objects are only wrapped, see `bnfold.client_uploads`, so they stay open)."""
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


def _job_id(job: JobRef) -> str:
    return job.id if isinstance(job, Job) else str(job)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP-date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, _RetryableAnswer):
        return f"HTTP {exc.response.status_code}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
