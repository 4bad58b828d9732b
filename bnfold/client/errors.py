"""Exceptions of the client SDK (`bnfold.client`), typed from the service's problem+json bodies.

Where a server answer means the same as a core failure, the SDK raises the core class itself, so
``except bnfold.InvalidModel`` catches a bad model whether it ran locally or remotely, and the
CLI's error handling (one line, exit 1) is the same in both modes:

=======================================================  ==========================================
server answer                                            raised
=======================================================  ==========================================
422/415, type ``…:invalid-model`` / ``no-batch-norm`` …  that core class (`InvalidModel`, `NoBatchNorm`,
                                                         `UnsupportedModel`, `InvalidSamples`,
                                                         `InvalidOptions`, `VerificationFailed`)
422/415 otherwise, ``field`` model / samples / options…  `InvalidModel` / `InvalidSamples` / `InvalidOptions`
401                                                      `Unauthorized`
404                                                      `NotFound`
409 (no result yet)                                      `NotReady`
413                                                      `PayloadTooLarge`
other 4xx                                                `RequestRejected`
429, 503 (after the retries)                             `ServerBusy`
other 5xx                                                `ServerError`
no answer (after the retries)                            `ConnectionFailed`
a job that ended failed / cancelled                      `JobFailed` (``.error``: the typed cause) / `JobCancelled`
``wait(timeout=…)`` ran out                              `WaitTimeout` (also a `TimeoutError`)
=======================================================  ==========================================

Every exception raised from a server answer carries ``.problem`` (the body as a dict, ``{}`` when
the body was not problem+json) and ``.request_id`` (quote it to the server's operator).
Client-only exceptions derive from `ClientError`, itself a `bnfold.errors.BnfoldError`.
"""

from __future__ import annotations

from typing import Any

import bnfold.errors as core
from bnfold.errors import BnfoldError

#: problem ``type`` → core class (the service derives the type from the class name)
CORE_TYPES: dict[str, type[BnfoldError]] = {
    f"urn:bnfold:problem:{slug}": cls
    for slug, cls in {
        "invalid-model": core.InvalidModel, "unsupported-model": core.UnsupportedModel,
        "no-batch-norm": core.NoBatchNorm, "invalid-samples": core.InvalidSamples,
        "invalid-options": core.InvalidOptions, "verification-failed": core.VerificationFailed,
        "quantization-refused": core.QuantizationRefused,
    }.items()
}


class ClientError(BnfoldError):
    """Base of the SDK's own failures (not the core's): the request or the server is the problem."""

    title = "bnfold client error"

    def __init__(self, message: str, *, problem: dict[str, Any] | None = None, status: int | None = None):
        super().__init__(message, field=(problem or {}).get("field"))
        self.problem = problem or {}
        self.request_id = self.problem.get("request_id")
        if status is not None:
            self.status = status


class Unauthorized(ClientError):
    """HTTP 401: no API key, or one the server does not accept (BNFOLD_API_KEY / ``api_key=``)."""


class NotFound(ClientError):
    """HTTP 404: no such job for this API key (another key's jobs are not visible)."""


class NotReady(ClientError):
    """HTTP 409: the job has no result (yet): it is queued, running, failed or cancelled."""


class PayloadTooLarge(ClientError):
    """HTTP 413: the model or the samples are above the server's upload limit (see ``Client.info()``)."""


class RequestRejected(ClientError):
    """Any other 4xx: a request the server refuses (e.g. a bad ``wait`` or ``limit``); not retried."""


class ServerError(ClientError):
    """HTTP 5xx: the server failed (its log has the details; quote ``request_id``)."""


class ServerBusy(ServerError):
    """HTTP 429 (queue full) or 503 (not ready), still so when the retries ran out."""


class ConnectionFailed(ClientError):
    """No HTTP answer (refused, reset, timed out, DNS), still so when the retries ran out."""


class JobFailed(ClientError):
    """The job ended in state ``failed``. ``.job`` is the job; ``.error`` the typed cause (e.g. an
    `InvalidSamples` for NaN in a late batch, `ServerError` for a timed-out or killed job)."""

    def __init__(self, job, error: BnfoldError):
        super().__init__(f"job {job.id} failed: {error.message}", problem=job.error)
        self.job, self.error = job, error
        self.__cause__ = error


class JobCancelled(ClientError):
    """The job ended in state ``cancelled`` (``DELETE`` by this or another client of the same key)."""

    def __init__(self, job):
        super().__init__(f"job {job.id} was cancelled")
        self.job = job


class WaitTimeout(ClientError, TimeoutError):
    """``wait``/``recalibrate`` ran past ``timeout``. ``.job`` is the job as last seen."""

    def __init__(self, message: str, job):
        super().__init__(message)
        self.job = job


def error_from_problem(status: int, problem: dict[str, Any] | None, *, fallback: str = "") -> BnfoldError:
    """The exception for an error answer (or a failed job's ``error``) with this status and body."""
    problem = problem if isinstance(problem, dict) else {}
    detail = str(problem.get("detail") or problem.get("title") or fallback or f"HTTP {status}")
    field = problem.get("field") or ""
    core_class = CORE_TYPES.get(problem.get("type", ""))
    if core_class is None and status in (415, 422):
        core_class = _core_class_for_field(field)
    if core_class is not None:
        exc = core_class(detail)
        exc.field = field or exc.field  # e.g. "options.batch_size" rather than the class's "options"
        exc.problem, exc.request_id = problem, problem.get("request_id")
        return exc
    cls = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: NotReady, 413: PayloadTooLarge,
           429: ServerBusy, 503: ServerBusy}.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else RequestRejected
    return cls(detail, problem=problem, status=status)


def _core_class_for_field(field: str) -> type[BnfoldError] | None:
    head = field.split(".", 1)[0]
    return {"model": core.InvalidModel, "samples": core.InvalidSamples, "options": core.InvalidOptions}.get(head)
