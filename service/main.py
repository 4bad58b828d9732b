"""The bnfold recalibration service: `create_app(settings)` and `serve(host, port)` (``bnfold serve``).

A thin HTTP layer over `bnfold.pipeline`: routes parse requests, the core does the work in child
processes run by `service.worker.JobSupervisor`, and `service.errors` maps failures to
problem+json. Nothing happens at import or in `create_app`; the store, the data directory and the
supervisor come up in the app's lifespan (so generating the OpenAPI file touches nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import SecretStr

from . import errors
from .api.routes import health, info, jobs
from .core.config import ConfigError, Settings, is_loopback
from .db import Database, make_engine, make_sessionmaker
from .job import run_job
from .logs import RequestContext, logging_config
from .metrics import Metrics
from .precheck import Prechecker
from .storage import Storage
from .worker import JobSupervisor

API_VERSION = "1.0"
#: seconds uvicorn waits for open requests on SIGTERM (waits end at once; uploads may take this long)
#: before stopping the supervisor: together well inside a container's default grace period of 10 s
GRACEFUL_SHUTDOWN = 5
log = logging.getLogger("bnfold.service")


def create_app(settings: Settings, *, job_target: Callable = run_job) -> FastAPI:
    """The ASGI app. `job_target` is the function each job process runs (tests substitute one that
    can be held or crashed on demand); it must be importable by name from a child process."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.api_keys:
            log.warning("no API keys configured: every /v1 request will be refused (401)")
        storage = Storage(settings.data_dir)
        storage.prepare()
        engine = make_engine(settings.resolved_database_url)
        sessions = make_sessionmaker(engine)
        app.state.storage, app.state.database = storage, Database(sessions)
        app.state.metrics = Metrics(sessions)
        app.state.supervisor = JobSupervisor(settings, sessions, storage, app.state.metrics, job_target)
        app.state.supervisor.start()
        app.state.prechecker = Prechecker(app.state.supervisor.ctx, slots=settings.workers,
                                          timeout=settings.precheck_timeout)
        app.state.draining = asyncio.Event()
        _drain_on_signals(app.state.draining)
        log.info("bnfold service started", extra={"data_dir": str(storage.root), "workers": settings.workers,
                                                  "database": engine.url.render_as_string(hide_password=True)})
        try:
            yield
        finally:
            app.state.draining.set()
            await to_thread.run_sync(app.state.supervisor.stop)
            engine.dispose()

    app = FastAPI(
        title="bnfold recalibration service", version=API_VERSION, lifespan=lifespan, redoc_url=None,
        description="Recalibrate BatchNorm statistics of ONNX models on a new domain, exactly, then fold BN. "
                    "Every error body is application/problem+json; every response carries X-Request-ID.",
    )
    app.state.settings = settings
    errors.register(app)
    app.add_middleware(RequestContext, metrics_of=lambda scope: getattr(scope["app"].state, "metrics", None))
    for module in (jobs, health, info):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)
    return app


def _drain_on_signals(draining: asyncio.Event) -> None:
    """On SIGTERM/SIGINT, set `draining` at once, then let the server's own handler (uvicorn's)
    begin its graceful shutdown: open ``?wait=`` requests answer right away instead of holding the
    shutdown past a container's grace period (10 s), and uploads not yet admitted get 503.
    Without a handler to chain to (not the main thread, no server handler), nothing is installed."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum, frame, previous=previous):
                loop.call_soon_threadsafe(draining.set)
                previous(signum, frame)

            signal.signal(sig, handler)
        except ValueError:  # signal.signal works in the main thread only
            return


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with error responses declared as application/problem+json."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if int(status) >= 400 and "application/json" in content:
                        response["content"] = {errors.PROBLEM_JSON: content.pop("application/json")}
        app.openapi_schema = schema
    return app.openapi_schema


class DataDirError(ConfigError):
    """BNFOLD_DATA_DIR cannot be used by this user (not writable, not a directory); checked before serving."""


def check_data_dir(path) -> None:
    """Raise DataDirError, one line naming the directory and the uid, unless this process can create
    `path` and write in it and in the entries it already holds (a volume left by a root container)."""
    from pathlib import Path

    root = Path(path).absolute()
    uid = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
    fix = f"give {uid} a directory it can write (e.g. chown -R {os.getuid()}:{os.getgid()} the volume or bind mount)" \
        if hasattr(os, "getuid") else "give this user a directory it can write"
    try:
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(root))
        root.mkdir(parents=True, exist_ok=True)
        for directory in (root, *(d for d in (root / "jobs", root / "incoming") if d.is_dir())):
            try:
                tempfile.TemporaryFile(dir=directory).close()
            except OSError as exc:  # name the directory, not the random file name tried in it
                raise OSError(exc.errno, exc.strerror, str(directory)) from None
        for name in ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"):
            if (root / name).exists() and not os.access(root / name, os.R_OK | os.W_OK):
                raise PermissionError(13, "Permission denied", str(root / name))
    except OSError as exc:
        where = exc.filename or root
        raise DataDirError(f"data directory {root} (BNFOLD_DATA_DIR) is not usable by {uid}: "
                           f"{exc.strerror or exc}: {where}; {fix}") from None


def serve(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> None:
    """Run the service under uvicorn. Without BNFOLD_API_KEYS: refuse unless `host` is loopback, in
    which case one random key is generated for this run and printed once on stdout. A data directory
    this user cannot write raises DataDirError before anything starts."""
    import uvicorn

    settings = settings or Settings()
    if not settings.api_keys and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without API keys: set BNFOLD_API_KEYS=<key>[,<key>…] "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), or bind to 127.0.0.1"
        )
    check_data_dir(settings.data_dir)
    if not settings.api_keys:
        key = secrets.token_urlsafe(32)
        settings = settings.model_copy(update={"api_keys": [SecretStr(key)]})
        print(f"bnfold: BNFOLD_API_KEYS is not set; this run (loopback only) accepts the generated key:\n"
              f"API key: {key}", file=sys.stdout, flush=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=logging_config(settings.log_level),
                access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)
