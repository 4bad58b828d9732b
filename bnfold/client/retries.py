"""The retry policy of every request (tenacity), and the pieces it reads from an answer.

A request is retried with exponential backoff and jitter (0.25 s doubling to 4 s, plus up to
0.25 s) for up to a budget of seconds when the server could not be reached or answered 429 / 502 /
503 / 504; ``Retry-After`` is honoured, and a pause longer than the remaining budget ends the
retries at once. GETs are also retried when a connection broke mid-answer; POST and DELETE only
when the request cannot have been acted on (connection never established, 429/503), so a retry
never creates a second job. A non-replayable request (an upload from an unseekable file) is sent once.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import tenacity

RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: failures after which the request surely never reached the application: safe to repeat any method
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
log = logging.getLogger("bnfold.client")  # retries and failed clean-ups, at WARNING
log.addHandler(logging.NullHandler())  # silent unless the application configures logging


class RetryableAnswer(Exception):
    """An answer whose status may change if asked again (`RETRY_STATUSES`)."""

    def __init__(self, response: httpx.Response):
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
        self.retry_after = retry_after(response.headers.get("retry-after"))


def retrying(method: str, path: str, *, budget: float, replayable: bool,
             sleep: Callable[[float], Any], url: str = "") -> tenacity.Retrying:
    """The tenacity loop for one request to ``url`` + ``path``; ``budget``: seconds it may keep
    retrying; ``sleep`` receives each pause (the clients carry it out as a step, see
    `bnfold.client.protocol`)."""
    backoff = tenacity.wait_exponential(multiplier=0.25, max=4.0) + tenacity.wait_random(0, 0.25)
    idempotent = method == "GET"

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception()
        if isinstance(exc, RetryableAnswer) and exc.retry_after is not None:
            return exc.retry_after
        return backoff(state)

    def retryable(exc: BaseException) -> bool:
        if isinstance(exc, RetryableAnswer):
            return idempotent or exc.response.status_code in (429, 503)
        return isinstance(exc, UNSENT) or (idempotent and isinstance(exc, httpx.TransportError))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        reason = describe(state.outcome.exception())
        # `bnfold_retry`: the same facts as fields, for applications (the CLI) that word them their own way
        facts = {"url": url, "method": method, "path": path, "reason": reason, "retry": state.attempt_number,
                 "sleep_s": state.upcoming_sleep, "left_s": max(0.0, budget - (state.seconds_since_start or 0.0))}
        log.warning("%s %s: %s; retry %d in %.1f s", method, path, reason, state.attempt_number,
                    state.upcoming_sleep, extra={"bnfold_retry": facts})

    stop = tenacity.stop_before_delay(budget) if replayable else tenacity.stop_after_attempt(1)
    return tenacity.Retrying(stop=stop, wait=wait, retry=tenacity.retry_if_exception(retryable), reraise=True,
                             before_sleep=before_sleep, sleep=sleep)


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP-date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def describe(exc: BaseException | None) -> str:
    if isinstance(exc, RetryableAnswer):
        return f"HTTP {exc.response.status_code}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
