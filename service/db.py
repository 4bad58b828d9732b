"""The job table (SQLAlchemy 2) and its engine: embedded SQLite by default, any SQLAlchemy URL otherwise.

The table is the queue: a job is a row whose ``state`` moves queued → running → succeeded | failed
| cancelled (or back to queued when the server running it went away). A supervisor claims a row with
a conditional UPDATE (``… WHERE id = ? AND state = 'queued'``), which exactly one replica wins on
SQLite and on PostgreSQL alike. Timestamps are naive UTC. The schema is created on start-up
(``create_all``); there are no migrations yet.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Engine, Float, Index, Integer, String, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
#: PostgreSQL advisory lock taken while creating the schema (any constant bigint; "bnfold" in ASCII)
SCHEMA_LOCK_KEY = 0x626E666F6C64


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_owner_created", "owner", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))  # sha256 of the API key; the key itself is never stored
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(200), default="queued")
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_filename: Mapped[str | None] = mapped_column(String(255))
    samples_filename: Mapped[str | None] = mapped_column(String(255))
    samples_file: Mapped[str] = mapped_column(String(32))  # stored name: samples.npy or samples.npz
    model_bytes: Mapped[int] = mapped_column(BigInteger)
    samples_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # who runs it: the supervisor instance (one per server process), its host and pid, the job's pid
    supervisor_id: Mapped[str | None] = mapped_column(String(32))
    supervisor_host: Mapped[str | None] = mapped_column(String(255))
    supervisor_pid: Mapped[int | None] = mapped_column(Integer)
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    result_sha256: Mapped[str | None] = mapped_column(String(64))
    result_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)


def make_engine(url: str) -> Engine:
    """Engine with the table created. SQLite gets WAL and a busy timeout so API threads, the
    supervisor thread and a restarted server can share the file. The pool has room for every
    thread that may hold a connection at once (`Database` lets ROUTE_CONNECTIONS requests query at a
    time, readiness READY_CONNECTIONS, plus the supervisor and a metrics scrape), so no query waits
    for a connection; a database that does not answer fails a request in POOL_TIMEOUT s (503)."""
    pool = {"pool_size": ROUTE_CONNECTIONS + READY_CONNECTIONS + 2, "max_overflow": 2, "pool_timeout": POOL_TIMEOUT}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, **pool)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas starting together would all see no table and all CREATE it (DuplicateTable):
            # one at a time, under a lock held until this transaction ends (PostgreSQL DDL is transactional).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        Base.metadata.create_all(connection)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


#: requests that may run queries at the same time (each in a worker thread, one connection each)
ROUTE_CONNECTIONS = 8
READY_CONNECTIONS = 2
POOL_TIMEOUT = 5.0
RETRY_AFTER = 2  # seconds a client is told to wait when the job store does not answer


class Database:
    """Queries for the routes, each in its own short session: a connection is held while `run`
    executes one function's queries, never while a request uploads, prechecks or waits.

    `run(fn, *args)` calls ``fn(session, *args)`` in a worker thread, at most ROUTE_CONNECTIONS at
    a time (others wait in the event loop, holding nothing). A store that is busy past its timeouts
    or unreachable becomes `Unavailable` (503 + Retry-After), never a 500."""

    def __init__(self, sessions: sessionmaker):
        import anyio

        self.sessions = sessions
        self._routes = anyio.CapacityLimiter(ROUTE_CONNECTIONS)
        self._ready = anyio.CapacityLimiter(READY_CONNECTIONS)  # readiness is never queued behind requests

    async def run(self, fn, *args, ready: bool = False):
        from anyio import to_thread

        # readiness gives up on a hung store (fail_after) without waiting for the thread to return
        return await to_thread.run_sync(self.call, fn, *args, limiter=self._ready if ready else self._routes,
                                        abandon_on_cancel=ready)

    def call(self, fn, *args):
        from sqlalchemy.exc import OperationalError
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        from .errors import Unavailable

        try:
            with self.sessions() as session:
                return fn(session, *args)
        except (PoolTimeout, OperationalError) as exc:
            raise Unavailable(f"the job store did not answer ({type(exc).__name__}); retry in a few seconds",
                              retry_after=RETRY_AFTER) from None


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
