"""The job supervisor: a thread in the API process that runs each job in its own child process.

At most ``BNFOLD_WORKERS`` children run at once. Children come from a forkserver that has already
imported bnfold (so a job starts in milliseconds, not the second a fresh interpreter needs); where
forkserver does not exist, from spawn. One loop, woken by child messages, child exits, or `wake()`:

* claims queued jobs from the database while a slot is free, starts a child per job;
* stores the child's progress messages, and its result or failure when it ends;
* a child that dies without a result (SIGKILL from the OOM killer, a segfault) fails its job with
  "worker process died (signal 9 — out of memory?)"; the API is unaffected;
* a child past ``BNFOLD_JOB_TIMEOUT`` is killed and its job failed;
* a job cancelled (or deleted) through the API, or taken over by another replica, has its child
  killed; a cancelled job's files are deleted;
* every few seconds: heartbeat on the rows it runs, and recovery of rows whose server is gone.
* if the forkserver dies (kill -9), its children live on but `multiprocessing` reports them ended
  (exit status 255): a child whose pid still runs is then followed by pid ("detached") until it
  really ends, so its job is neither failed nor left running twice; new children come from a new
  forkserver.
On a graceful stop, running children are killed and their jobs re-queued (the attempt does not count).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable

from sqlalchemy.orm import sessionmaker

from . import crud, errors
from .core.config import Settings
from .job import TRACEBACK, job_runtime, process_main, run_job
from .metrics import Metrics
from .storage import Storage

log = logging.getLogger("bnfold.service")
IDLE_POLL = 0.5  # seconds between looks at the queue when nothing wakes the loop
HEARTBEAT_EVERY = 5.0


@dataclasses.dataclass
class _Running:
    job_id: str
    process: mp.process.BaseProcess
    conn: mp.connection.Connection
    keepalive: mp.connection.Connection  # closing it (or dying) makes the job process exit
    started: float  # monotonic
    outcome: tuple[str, dict] | None = None
    kill_reason: str | None = None  # "timeout" | "cancelled" | "deleted" | "taken"
    detached: bool = False  # its forkserver died: multiprocessing no longer knows it, its pid still runs


class JobSupervisor:
    def __init__(self, settings: Settings, sessions: sessionmaker, storage: Storage, metrics: Metrics,
                 target: Callable = run_job):
        self.settings, self.sessions, self.storage, self.metrics, self.target = settings, sessions, storage, metrics, target
        self.me = crud.Supervisor(uuid.uuid4().hex, socket.gethostname(), os.getpid())
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self.ctx = mp.get_context(method)
        self.running: dict[str, _Running] = {}
        self._wake_r, self._wake_w = os.pipe()  # non-blocking: a stalled loop never blocks a request
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bnfold-supervisor", daemon=True)
        self._started_workers = threading.Event()
        self.last_tick: float | None = None  # set after each pass of the loop
        self._next_heartbeat = self._next_recovery = 0.0

    # -------------------------------------------------------------------- API-process side

    def start(self) -> None:
        if self.ctx.get_start_method() == "forkserver":
            self.ctx.set_forkserver_preload(sorted({"service.job", "service.precheck", self.target.__module__}))
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(timeout)
        with self.sessions() as session:
            for run in list(self.running.values()):
                _kill(run)
                _join(run, 2)
                crud.requeue(session, run.job_id, self.me, "re-queued: the server shut down", count_attempt=False)
                run.conn.close()
                run.keepalive.close()
        self.running.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def wake(self) -> None:
        """Have the loop look at the database now (a new job, a cancellation)."""
        try:
            os.write(self._wake_w, b"!")
        except OSError:  # full (the loop has unread wake-ups already) or closed (stopped)
            pass

    def healthy(self) -> bool:
        """The loop is alive, has ticked recently and can start worker processes."""
        return (self._thread.is_alive() and self._started_workers.is_set() and self.last_tick is not None
                and time.monotonic() - self.last_tick < 30)

    # -------------------------------------------------------------------- supervisor thread

    def _loop(self) -> None:
        try:
            if self.ctx.get_start_method() == "forkserver":
                from multiprocessing import forkserver
                forkserver.ensure_running()  # pay the bnfold import once, now, not on the first job
            self._started_workers.set()
        except Exception:
            log.exception("cannot start the worker process server")
            return
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # e.g. the database is briefly unreachable: log, back off, go on
                log.exception("supervisor tick failed")
                self._stop.wait(1.0)
            self.last_tick = time.monotonic()
            handles = [self._wake_r, *(r.conn for r in self.running.values() if not r.conn.closed),
                       *(r.process.sentinel for r in self.running.values() if not r.detached)]
            ready = mp.connection.wait(handles, timeout=IDLE_POLL)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass

    def _tick(self) -> None:
        with self.sessions() as session:
            for run in list(self.running.values()):
                self._read(session, run)
                if not run.process.is_alive() and not self._still_running(run):
                    self._reap(session, run)
            self._enforce_timeouts()
            self._follow_database(session)
            now = time.monotonic()
            if now >= self._next_heartbeat:
                crud.heartbeat(session, self.me)
                self._next_heartbeat = now + min(HEARTBEAT_EVERY, self.settings.stale_after / 3)
            if now >= self._next_recovery:
                self._recover(session)
                self._next_recovery = now + min(10.0, self.settings.stale_after / 2)
            while not self._stop.is_set() and len(self.running) < self.settings.workers:
                row = crud.claim_next(session, self.me)
                if row is None:
                    break
                self._launch(session, row)

    def _launch(self, session, row) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        lifeline, keepalive = self.ctx.Pipe(duplex=False)
        args = (str(self.storage.job_dir(row.id)), row.samples_file, row.options, job_runtime(self.settings), writer)
        process = self.ctx.Process(target=process_main, args=(lifeline, self.target, *args),
                                   name=f"bnfold-job-{row.id}", daemon=True)
        try:
            process.start()
        except Exception as exc:
            keepalive.close()
            log.exception("cannot start a job process", extra={"job_id": row.id})
            detail = f"could not start a worker process: {type(exc).__name__}: {exc}"
            crud.finish(session, row.id, self.me, "failed", stage="failed",
                        error=errors.problem(500, "Worker failed to start", detail, kind="worker-start-failed"))
            return
        finally:
            writer.close()
            lifeline.close()
        self.running[row.id] = _Running(row.id, process, reader, keepalive, time.monotonic())
        crud.set_running(session, row.id, self.me, worker_pid=process.pid)
        if row.created_at and row.started_at:
            self.metrics.queue_wait.observe((row.started_at - row.created_at).total_seconds())
        log.info("job started", extra={"job_id": row.id, "pid": process.pid, "attempt": row.attempts})

    def _read(self, session, run: _Running) -> None:
        while not run.conn.closed:
            try:
                if not run.conn.poll():
                    return
                message = run.conn.recv()
            except (EOFError, OSError, ValueError, TypeError):  # closed, or half a message from a dying child
                run.conn.close()
                return
            if message[0] == "progress":
                crud.set_running(session, run.job_id, self.me, stage=message[1][:200], fraction=message[2],
                                 heartbeat_at=crud.utcnow())
            else:
                run.outcome = (message[0], message[1])

    def _reap(self, session, run: _Running) -> None:
        """The job's process has exited: store how the job ended, then forget the process (not
        before: if the database is unreachable now, the next tick tries again)."""
        self._read(session, run)
        run.process.join()
        duration = time.monotonic() - run.started
        state: str | None = "cancelled"
        if run.kill_reason == "taken":  # another replica runs it now; its files are in use
            state = None
        elif run.kill_reason not in ("cancelled", "deleted"):
            state, values = self._outcome(run)
            if crud.finish(session, run.job_id, self.me, state, **values):
                self.storage.remove_inputs(run.job_id)
                detail = {"error": values["error"]["detail"]} if "error" in values else {}
                log.info(f"job {state}", extra={"job_id": run.job_id, "duration_s": round(duration, 3), **detail})
            else:  # cancelled while it finished
                state = "cancelled"
        if state == "cancelled":
            self.storage.remove_job(run.job_id)
            log.info("job cancelled", extra={"job_id": run.job_id})
        if state is not None:
            self.metrics.job_duration.labels(state).observe(duration)
        run.conn.close()
        run.keepalive.close()
        del self.running[run.job_id]

    def _outcome(self, run: _Running) -> tuple[str, dict]:
        if run.outcome and run.outcome[0] == "succeeded":
            result = run.outcome[1]
            return "succeeded", dict(stage="done", fraction=1.0, result_sha256=result["sha256"], result_bytes=result["bytes"])
        if run.outcome and run.outcome[0] == "failed":
            problem = dict(run.outcome[1])
            if TRACEBACK in problem:
                log.error("job raised an unexpected error", extra={"job_id": run.job_id, "exc": problem.pop(TRACEBACK)})
            return "failed", dict(stage="failed", error=problem)
        if run.kill_reason == "timeout":
            detail = f"the job ran longer than {self.settings.job_timeout:g} s (BNFOLD_JOB_TIMEOUT) and was stopped"
            return "failed", dict(stage="failed", error=errors.problem(500, "Job timed out", detail, kind="job-timeout"))
        code = run.process.exitcode
        if run.detached:
            detail = "worker process ended without a result after its process server was killed"
        elif code is not None and code < 0:
            sig = -code
            why = " — out of memory?" if sig == signal.SIGKILL else f", {_signal_name(sig)}"
            detail = f"worker process died (signal {sig}{why})"
        else:
            detail = f"worker process exited with status {code} without a result"
        return "failed", dict(stage="failed", error=errors.problem(500, "Worker process died", detail, kind="worker-died"))

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for run in self.running.values():
            if run.kill_reason is None and now - run.started > self.settings.job_timeout:
                run.kill_reason = "timeout"
                _kill(run)

    def _follow_database(self, session) -> None:
        """Kill children whose job was cancelled, deleted or taken over by another replica."""
        states = crud.states_of(session, list(self.running))
        for job_id, run in self.running.items():
            if run.kill_reason is not None:
                continue
            state, owner = states.get(job_id, ("deleted", None))
            if state == "running" and owner == self.me.id:
                continue
            run.kill_reason = state if state in ("cancelled", "deleted") else "taken"
            _kill(run)

    def _recover(self, session) -> None:
        for job_id, state in crud.recover_orphans(session, self.me, _pid_alive, self.settings.stale_after):
            log.warning(f"orphaned job {state}", extra={"job_id": job_id})
            if state == "failed":
                self.storage.remove_inputs(job_id)


    def _still_running(self, run: _Running) -> bool:
        """multiprocessing says the child ended, but is its pid still running? (Only when its forkserver
        died: a child that really exited has been reaped by then, so its pid is gone.)"""
        if not _pid_running(run.process.pid):
            return False
        if not run.detached:
            run.detached = True
            log.warning("the worker process server died; following the job's process by pid",
                        extra={"job_id": run.job_id, "pid": run.process.pid})
        return True


def _kill(run: _Running) -> None:
    if run.detached:  # multiprocessing would not signal a process it believes ended
        try:
            os.kill(run.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        run.process.kill()


def _join(run: _Running, timeout: float) -> None:
    if not run.detached:
        run.process.join(timeout)
        return
    deadline = time.monotonic() + timeout
    while _pid_running(run.process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _pid_running(pid: int | None) -> bool:
    """The process exists and is not a zombie (one that is our child is reaped on the way)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return _pid_alive(pid)  # no /proc: signal 0 (a zombie counts as running there)
    if state != "Z":
        return True
    try:
        os.waitpid(pid, os.WNOHANG)  # an orphan re-parented to us (we are PID 1 in a container)
    except ChildProcessError:
        pass
    return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
