"""Dependencies of the route handlers, as ``Annotated`` aliases.

``Owner`` authenticates the request: ``Authorization: Bearer <key>`` with a key from
``BNFOLD_API_KEYS``, compared in constant time. A job belongs to the sha256 of the key that created
it (keys are never stored) and is invisible to every other key.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..core.config import Settings
from ..db import Database
from ..errors import Unauthorized
from ..metrics import Metrics
from ..storage import Storage
from ..worker import JobSupervisor

_bearer = HTTPBearer(auto_error=False, description="An API key from BNFOLD_API_KEYS.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    """Queries in short sessions (`service.db.Database`): no route holds a connection for its whole life."""
    return request.app.state.database


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_supervisor(request: Request) -> JobSupervisor:
    return request.app.state.supervisor


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def current_owner(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    if credentials is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    given = credentials.credentials.encode()
    known = False
    for key in request.app.state.settings.key_values():
        known |= hmac.compare_digest(given, key.encode())
    if not known:
        raise Unauthorized("the API key is not one this server accepts")
    return owner_of(credentials.credentials)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SupervisorDep = Annotated[JobSupervisor, Depends(get_supervisor)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
Owner = Annotated[str, Depends(current_owner)]
