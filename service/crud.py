"""Queries on the job table, for the routes (first half) and the supervisor (second half).

Every state change made by a supervisor is conditional on the row still being in the state and in
the hands it expects (``state = 'running' AND supervisor_id = me``), so a job cancelled by a user
or re-queued by another replica is never overwritten by a late result.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from bnfold.errors import plural

from .db import ACTIVE, STATES, JobRow, utcnow
from .errors import InvalidRequest, NotFound, QueueFull

#: A job re-queued after its server went away this many times is failed instead of retried again.
MAX_ATTEMPTS = 2

# Counting queued jobs and inserting one must not interleave within a process, or two requests
# could both take the last queue slot. (Across replicas the bound may be overshot by one per replica.)
_admission = threading.Lock()


# ---------------------------------------------------------------------------------------- routes


def admit_job(session: Session, row: JobRow, max_queued: int, workers: int) -> JobRow:
    """Insert a queued job, or raise `QueueFull` when max_queued jobs are already waiting."""
    with _admission:
        check_capacity(session, max_queued, workers)
        session.add(row)
        session.commit()
    return row


def check_capacity(session: Session, max_queued: int, workers: int) -> None:
    queued = session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == "queued")) or 0
    if queued >= max_queued:
        raise QueueFull(f"{plural(queued, 'job')} {'is' if queued == 1 else 'are'} waiting for a worker (limit {max_queued}); retry later",
                        retry_after=retry_after(session, queued, workers))


def retry_after(session: Session, queued: int, workers: int) -> int:
    """Seconds until a queue slot is likely free: recent mean run time × jobs ahead / workers."""
    recent = session.execute(
        select(JobRow.started_at, JobRow.finished_at).where(JobRow.state == "succeeded")
        .order_by(JobRow.finished_at.desc()).limit(20)
    ).all()
    durations = [(end - start).total_seconds() for start, end in recent if start and end]
    mean = sum(durations) / len(durations) if durations else 5.0
    return int(min(300, max(1, math.ceil(mean * max(1, queued) / max(1, workers)))))


def get_job(session: Session, job_id: str, owner: str) -> JobRow:
    row = session.get(JobRow, job_id)
    if row is None or row.owner != owner:
        raise NotFound(f"no job '{job_id}' for this API key", field="job_id")
    return row


def reload_job(session: Session, job_id: str) -> JobRow | None:
    """The row as committed now (ends the session's transaction first, so no stale snapshot)."""
    session.rollback()
    return session.get(JobRow, job_id, populate_existing=True)


@dataclass
class Page:
    rows: list[JobRow]
    next_cursor: str | None


def list_jobs(session: Session, owner: str, limit: int, cursor: str | None, state: str | None) -> Page:
    """Newest first, keyset-paginated on (created_at, id)."""
    query = select(JobRow).where(JobRow.owner == owner)
    if state is not None:
        query = query.where(JobRow.state == state)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        query = query.where(or_(JobRow.created_at < created, and_(JobRow.created_at == created, JobRow.id < job_id)))
    rows = list(session.scalars(query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, _encode_cursor(rows[-1]) if more else None)


def cancel_job(session: Session, row: JobRow) -> str | None:
    """Mark a queued/running job cancelled; return the state it had, or None if it had already ended."""
    previous = row.state
    result = session.execute(
        update(JobRow).where(JobRow.id == row.id, JobRow.state.in_(ACTIVE))
        .values(state="cancelled", stage="cancelled", finished_at=utcnow())
    )
    session.commit()
    session.refresh(row)
    return previous if result.rowcount == 1 else None


def delete_job(session: Session, row: JobRow) -> None:
    session.delete(row)
    session.commit()


def cancel_or_delete_job(session: Session, job_id: str, owner: str) -> tuple[JobRow, str | None]:
    """DELETE /v1/jobs/{id} in one session: cancel a queued/running job (returns the state it had), or
    delete an ended one (returns None)."""
    row = get_job(session, job_id, owner)
    previous = cancel_job(session, row)
    if previous is None:
        delete_job(session, row)
    return row, previous


def counts_by_state(session: Session) -> dict[str, int]:
    counts = dict(session.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all())
    return {state: int(counts.get(state, 0)) for state in STATES}


def _encode_cursor(row: JobRow) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return dt.datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidRequest("cursor is not one this server handed out; start again without it",
                             field="query.cursor") from None


# ------------------------------------------------------------------------------------ supervisor


@dataclass(frozen=True)
class Supervisor:
    """Identity of one server process's supervisor, written on the rows it runs."""

    id: str
    host: str
    pid: int


def claim_next(session: Session, me: Supervisor) -> JobRow | None:
    """Oldest queued job, now running under `me`; None when the queue is empty."""
    for _ in range(5):  # another replica may win a row; try the next one
        job_id = session.scalar(select(JobRow.id).where(JobRow.state == "queued").order_by(JobRow.created_at).limit(1))
        if job_id is None:
            return None
        now = utcnow()
        won = session.execute(
            update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued").values(
                state="running", stage="starting", fraction=0.0, started_at=now, heartbeat_at=now,
                attempts=JobRow.attempts + 1, supervisor_id=me.id, supervisor_host=me.host, supervisor_pid=me.pid,
                worker_pid=None,
            )
        ).rowcount
        session.commit()
        if won:
            return session.get(JobRow, job_id, populate_existing=True)
    return None


def _mine(job_id: str, me: Supervisor):
    return (JobRow.id == job_id, JobRow.state == "running", JobRow.supervisor_id == me.id)


def set_running(session: Session, job_id: str, me: Supervisor, **values: Any) -> bool:
    """Update a running job of mine (pid, progress); False if it is no longer mine or running."""
    done = session.execute(update(JobRow).where(*_mine(job_id, me)).values(**values)).rowcount == 1
    session.commit()
    return done


def finish(session: Session, job_id: str, me: Supervisor, state: str, **values: Any) -> bool:
    """Running → succeeded/failed; False if the job was cancelled or taken away meanwhile."""
    return set_running(session, job_id, me, state=state, finished_at=utcnow(), worker_pid=None, **values)


def heartbeat(session: Session, me: Supervisor) -> None:
    session.execute(update(JobRow).where(JobRow.state == "running", JobRow.supervisor_id == me.id)
                    .values(heartbeat_at=utcnow()))
    session.commit()


def states_of(session: Session, job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """{id: (state, supervisor_id)} for the given jobs (deleted jobs are absent)."""
    if not job_ids:
        return {}
    rows = session.execute(select(JobRow.id, JobRow.state, JobRow.supervisor_id).where(JobRow.id.in_(job_ids)))
    return {job_id: (state, owner) for job_id, state, owner in rows}


def requeue(session: Session, job_id: str, me: Supervisor, stage: str, count_attempt: bool) -> bool:
    """Give a running job of mine back to the queue (graceful shutdown: the attempt does not count)."""
    values: dict[str, Any] = dict(state="queued", stage=stage, fraction=0.0, started_at=None, supervisor_id=None,
                                  supervisor_host=None, supervisor_pid=None, worker_pid=None, heartbeat_at=None)
    if not count_attempt:
        values["attempts"] = JobRow.attempts - 1
    return set_running(session, job_id, me, **values)


def recover_orphans(session: Session, me: Supervisor, alive, stale_after: float) -> list[tuple[str, str]]:
    """Running jobs whose server is gone → queued again (or failed after MAX_ATTEMPTS).

    A server is gone when its heartbeat is older than `stale_after`, or when it ran on this host
    and its process is dead (`alive(pid)` is False) or is this very process under a new supervisor.
    Returns [(job id, new state)].
    """
    stale_before = utcnow() - dt.timedelta(seconds=stale_after)
    rows = session.scalars(select(JobRow).where(JobRow.state == "running", JobRow.supervisor_id != me.id)).all()
    changed = []
    for row in rows:
        same_host_dead = row.supervisor_host == me.host and (row.supervisor_pid == me.pid or not alive(row.supervisor_pid))
        if not (same_host_dead or (row.heartbeat_at or row.started_at or stale_before) < stale_before):
            continue
        gone = Supervisor(row.supervisor_id or "", row.supervisor_host or "", row.supervisor_pid or 0)
        if row.attempts >= MAX_ATTEMPTS:
            detail = (f"the server running this job stopped {row.attempts} times while it ran; it is not retried "
                      "again (a job that takes its server down, e.g. by exhausting memory, fails this way)")
            error = {"type": "urn:bnfold:problem:server-restarted", "title": "Server restarted", "status": 500,
                     "detail": detail}
            ok = finish(session, row.id, gone, "failed", stage="failed", error=error)
            new_state = "failed"
        else:
            ok = requeue(session, row.id, gone, "re-queued: the server running it stopped", count_attempt=True)
            new_state = "queued"
        if ok:
            changed.append((row.id, new_state))
    return changed
