"""The SDK of the bnfold service (the 'client' extra): `Client` (blocking) and `AsyncClient` (asyncio).

`clients` holds both clients; `errors` the typed errors from problem+json; `uploads` how models and
samples are sent; `jobs` the job and result values and the report parsing.
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
