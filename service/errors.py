"""The one place where failures become RFC 9457 ``application/problem+json`` bodies.

Core failures (`bnfold.errors.BnfoldError`, status on the class) and the service's own failures
(`ServiceError` below, status in each docstring) share one shape::

    {"type": "urn:bnfold:problem:invalid-model", "title": "Invalid model", "status": 422,
     "detail": "not an ONNX model (…)", "field": "model", "instance": "/v1/jobs", "request_id": "…"}

``field`` names the part of the request that was wrong (a multipart part, ``options.batch_size``,
``query.wait``, ``authorization``); request-validation failures also list every problem in
``errors``. A failed job stores the same shape (without instance/request_id) as its ``error``.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from bnfold.errors import BnfoldError

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("bnfold.service")


class ServiceError(Exception):
    """A request the service refuses for reasons of its own (not the core's). HTTP 500 by default."""

    status = 500
    title = "Internal server error"

    def __init__(self, detail: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.headers = headers or {}


class Unauthorized(ServiceError):
    """Missing or unknown API key. HTTP 401 with ``WWW-Authenticate: Bearer``."""

    status, title = 401, "Unauthorized"

    def __init__(self, detail: str):
        super().__init__(detail, field="authorization", headers={"WWW-Authenticate": 'Bearer realm="bnfold"'})


class NotFound(ServiceError):
    """No such job for this API key (another key's job is reported the same way). HTTP 404."""

    status, title = 404, "Not found"


class NotReady(ServiceError):
    """The job has no result to download (still running, failed or cancelled). HTTP 409."""

    status, title = 409, "Result not available"


class PayloadTooLarge(ServiceError):
    """An uploaded file (or the whole body) is above its configured size limit. HTTP 413."""

    status, title = 413, "Upload too large"


class UnsupportedMediaType(ServiceError):
    """The body is not multipart/form-data, or a file is not of an accepted type. HTTP 415."""

    status, title = 415, "Unsupported media type"


class InvalidRequest(ServiceError):
    """Malformed multipart, a missing/unknown part, or options that do not validate. HTTP 422."""

    status, title = 422, "Invalid request"

    def __init__(self, detail: str, *, field: str | None = None, errors: list[dict[str, str]] | None = None):
        super().__init__(detail, field=field)
        self.errors = errors


class QueueFull(ServiceError):
    """Too many jobs are waiting for a worker. HTTP 429 with ``Retry-After`` (seconds)."""

    status, title = 429, "Queue full"

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class Unavailable(ServiceError):
    """The job store or the worker supervisor is not usable right now, or the server is shutting
    down. HTTP 503, with ``Retry-After`` (seconds) when retrying soon is likely to work."""

    status, title = 503, "Service unavailable"

    def __init__(self, detail: str, *, retry_after: int | None = None):
        super().__init__(detail, headers={"Retry-After": str(retry_after)} if retry_after else None)


MAX_DETAIL = 1000  # characters of a detail (or of one entry of errors); a client's input can make messages long
MAX_FIELD = 200
MAX_ERRORS = 20
# an absolute path (the server's data directory, a library's install path): only its last component is the client's
_PATH = re.compile(r"(?<![\w.~:/])(?:/[^\s'\"/:,;()\[\]{}<>]+)+/([^\s'\"/:,;()\[\]{}<>]*)")
_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def clean(text: str, limit: int = MAX_DETAIL) -> str:
    """What a message may tell a client: no server paths (their last component stays), no Python
    object reprs, no control or bidi characters, at most `limit` characters."""
    text = _UNPRINTABLE.sub("", _REPR.sub(r"<\1>", _PATH.sub(r"\1", str(text))))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def problem(status: int, title: str, detail: str, *, kind: str | None = None, field: str | None = None,
            errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A problem body; every text in it is `clean`ed, so this is the one place messages are bounded."""
    body: dict[str, Any] = {
        "type": f"urn:bnfold:problem:{kind or _slug(title)}", "title": title, "status": status, "detail": clean(detail),
    }
    if field is not None:
        body["field"] = clean(field, MAX_FIELD)
    if errors:
        body["errors"] = [{"field": clean(e["field"], MAX_FIELD), "message": clean(e["message"])}
                          for e in errors[:MAX_ERRORS]]
    return body


def problem_for(exc: BaseException) -> dict[str, Any]:
    """The problem body for a core or service exception (anything else: a generic 500)."""
    if isinstance(exc, BnfoldError):
        return problem(exc.status, exc.title, exc.message, kind=_slug(type(exc).__name__), field=exc.field)
    if isinstance(exc, ServiceError) and getattr(exc, "body", None):  # a problem made elsewhere (a child process)
        return dict(exc.body)
    if isinstance(exc, ServiceError):
        return problem(exc.status, exc.title, exc.detail, kind=_slug(type(exc).__name__), field=exc.field,
                       errors=getattr(exc, "errors", None))
    return problem(500, "Internal server error", "an unexpected error occurred; the server log has the details")


def validation_errors(raw: list[dict[str, Any]], prefix: str = "") -> list[dict[str, str]]:
    """pydantic/FastAPI error dicts → [{"field": "query.wait", "message": "…"}]."""
    out = []
    for item in raw:
        parts = [str(p) for p in item.get("loc", ()) if p != "body"]
        field = ".".join(([prefix] if prefix else []) + parts) or prefix or "request"
        out.append({"field": field, "message": item.get("msg", "invalid value")})
    return out


def problem_responses(*statuses: int) -> dict[int, dict[str, Any]]:
    """OpenAPI ``responses`` entries for routes; `service.main` moves them to problem+json."""
    from .schemas import Problem

    headers = {
        401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
        429: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}},
        503: {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}},
    }
    responses: dict[int, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": Problem, "description": HTTPStatus(status).phrase}
        if status in headers:
            responses[status]["headers"] = headers[status]
    return responses


def _slug(name: str) -> str:
    """'InvalidModel' → 'invalid-model'; 'Invalid request' → 'invalid-request'."""
    if " " in name:
        return "-".join(name.lower().split())
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def register(app) -> None:
    """Install the handlers on a FastAPI app; imported lazily so job processes stay light."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def respond(request, body: dict[str, Any], headers: dict[str, str] | None = None):
        body = {**body, "instance": request.url.path}
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            body["request_id"] = request_id
            headers = {**(headers or {}), "X-Request-ID": request_id}
        return JSONResponse(body, status_code=body["status"], headers=headers, media_type=PROBLEM_JSON)

    @app.exception_handler(BnfoldError)
    async def _core(request, exc: BnfoldError):
        return respond(request, problem_for(exc))

    @app.exception_handler(ServiceError)
    async def _service(request, exc: ServiceError):
        return respond(request, problem_for(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errors = validation_errors(list(exc.errors()))
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return respond(request, problem(422, "Invalid request", detail, field=errors[0]["field"] if errors else None,
                                        errors=errors))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        title = HTTPStatus(exc.status_code).phrase
        detail = exc.detail if isinstance(exc.detail, str) else title
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists one route's methods; RFC 9110 wants all of the path's
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return respond(request, problem(exc.status_code, title, detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        return respond(request, problem_for(exc))


def _allowed_methods(request) -> list[str]:
    """The documented methods of the path template that the request's path matches."""
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), request.url.path):
            return sorted(method.upper() for method in operations)
    return []
