"""Operational endpoints, without authentication: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from ...errors import Unavailable, problem_responses
from ...schemas import Health, Readiness
from ..deps import DatabaseDep, MetricsDep, StorageDep, SupervisorDep

router = APIRouter(tags=["operations"])
READY_TIMEOUT = 1.5  # seconds


@router.get("/healthz", operation_id="health", response_model=Health)
async def health() -> Health:
    """The process is alive and serving HTTP."""
    return Health(status="ok")


@router.get("/readyz", operation_id="ready", response_model=Readiness, responses=problem_responses(503))
async def ready(database: DatabaseDep, storage: StorageDep, supervisor: SupervisorDep) -> Readiness:
    """The job store answers, the data directory is writable and the worker supervisor runs."""
    checks = {"database": await _database_ok(database), "storage": storage.writable(), "workers": supervisor.healthy()}
    if not all(checks.values()):
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        raise Unavailable(f"not ready: {failing} not usable")
    return Readiness(status="ready", checks=checks)


@router.get(
    "/metrics", operation_id="metrics", response_class=Response,
    responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(metrics: MetricsDep) -> Response:
    """Jobs by state, queue depth, job durations, bytes in/out, HTTP requests."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _database_ok(database) -> bool:
    """SELECT 1 within READY_TIMEOUT s: a store that hangs makes the server not ready, promptly."""
    try:
        with anyio.fail_after(READY_TIMEOUT):
            await database.run(lambda session: session.execute(text("SELECT 1")), ready=True)
        return True
    except Exception:
        return False
