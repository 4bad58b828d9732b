"""Operational endpoints, without authentication: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from ...errors import Unavailable, problem_responses
from ...schemas import Health, Readiness
from ..deps import MetricsDep, SessionDep, StorageDep, SupervisorDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", operation_id="health", response_model=Health)
async def health() -> Health:
    """The process is alive and serving HTTP."""
    return Health(status="ok")


@router.get("/readyz", operation_id="ready", response_model=Readiness, responses=problem_responses(503))
def ready(session: SessionDep, storage: StorageDep, supervisor: SupervisorDep) -> Readiness:
    """The job store answers, the data directory is writable and the worker supervisor runs."""
    checks = {"database": _database_ok(session), "storage": storage.writable(), "workers": supervisor.healthy()}
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


def _database_ok(session) -> bool:
    try:
        session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
