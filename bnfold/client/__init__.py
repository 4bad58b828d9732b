"""The SDK of the bnfold service (the 'client' extra): `Client` (blocking) and `AsyncClient` (asyncio).

`clients` holds every endpoint once and the two thin clients that carry it out; `protocol` the
I/O-free steps the endpoints are written in; `retries` the retry policy; `errors` the typed errors
from problem+json; `uploads` how models, samples and options are sent (`SubmitOptions`); `jobs`
the job and result values and the report parsing.
"""

from bnfold.client.clients import AsyncClient, Client, Job, Result, log
from bnfold.client.errors import (
    ClientError,
    ConnectionFailed,
    JobCancelled,
    JobFailed,
    NotFound,
    ServerBusy,
    ServerError,
    Unauthorized,
    WaitTimeout,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "Job",
    "JobCancelled",
    "JobFailed",
    "NotFound",
    "Result",
    "ServerBusy",
    "ServerError",
    "Unauthorized",
    "WaitTimeout",
    "log",
]
