"""What runs inside a job's own process: call `bnfold.pipeline.recalibrate_files`, write the result.

The process talks to its supervisor over one pipe: ``("progress", stage, fraction)`` while it
runs, then exactly one ``("succeeded", {sha256, bytes})`` or ``("failed", problem)``. Results are
written atomically (temporary file + rename) into the job directory before "succeeded" is sent.
The process watches a lifeline pipe to the server and kills itself when the server is gone, so a
job never outlives its server.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError
from bnfold.inputs.images import ImageLimits
from bnfold.pipeline import JobOptions, recalibrate_files

from . import errors
from .storage import MODEL_FILE, REPORT_FILE, REPORT_HTML_FILE, RESULT_FILE, check_paths, write_atomic

if TYPE_CHECKING:
    from .core.config import Settings

PROGRESS_INTERVAL = 0.2  # seconds between progress messages
TRACEBACK = "_traceback"  # key in a failure message that is logged by the supervisor, not stored


def process_main(lifeline: Connection, target: Callable[..., None], *args: Any) -> None:
    """Entry point of every job process: die with the server, run `target(*args)`.

    `lifeline` is the read end of a pipe whose only writer is the server process, so it reads EOF
    exactly when the server is gone (killed, crashed). (Forkserver children keep the forkserver
    alive, so "parent died" signals cannot serve here.)
    """
    threading.Thread(target=_exit_when_closed, args=(lifeline,), daemon=True, name="lifeline").start()
    target(*args)


def _exit_when_closed(lifeline: Connection) -> None:
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def job_runtime(settings: Settings) -> dict[str, Any]:
    """The server's side of a job's options (the client's are `options`): plain data for the job process."""
    return {"memory_budget": int(settings.job_memory_budget), "threads": settings.resolved_job_threads,
            "disk_budget": settings.resolved_job_disk_budget(), "image_limits": settings.image_limits(),
            "providers": list(settings.job_providers)}


def run_job(job_dir: str, samples_file: str, options: dict[str, Any], runtime: dict[str, Any], conn: Connection) -> None:
    """The job. Never raises: every outcome is one message on `conn`. runtime: from `job_runtime`."""
    directory = Path(job_dir)
    report = _Reporter(conn)
    try:
        report("loading", 0.0)
        spill = directory / "spill"
        spill.mkdir(exist_ok=True)
        # Temporary files of libraries (e.g. the decompressed copy of a .tar.gz of images) belong to
        # the job as well: this process is the job's alone, so its temporary folder can be too.
        tempfile.tempdir = str(spill)
        job_options = JobOptions(**options, memory_budget=runtime["memory_budget"], threads=runtime["threads"],
                                 disk_budget=runtime["disk_budget"], image_limits=ImageLimits(**runtime["image_limits"]),
                                 providers=tuple(runtime.get("providers") or ("CPUExecutionProvider",)), spill_dir=spill)
        check_samples, check_labels = check_paths(directory)
        output = recalibrate_files(directory / MODEL_FILE, directory / samples_file, job_options, report.recalibrating,
                                   check_samples=check_samples, check_labels=check_labels)
        report("writing results", 0.95)
        data = output.model.SerializeToString()
        write_atomic(directory / REPORT_FILE, output.report.to_json().encode())
        write_report_page(directory, output.report.to_dict())
        write_atomic(directory / RESULT_FILE, data)
        conn.send(("succeeded", {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))
    except BnfoldError as exc:
        conn.send(("failed", errors.problem_for(exc)))
    except MemoryError:
        conn.send(("failed", errors.problem(500, "Out of memory", "the job ran out of memory; use fewer or smaller "
                                             "samples per batch (options.batch_size)", kind="out-of-memory")))
    except Exception as exc:  # a bug in bnfold: the reason goes on the job, the traceback to the server's log
        problem = errors.problem(500, "Internal error", f"{type(exc).__name__}: {exc}", kind="internal-error")
        conn.send(("failed", {**problem, TRACEBACK: traceback.format_exc()}))
    finally:
        conn.close()


class _Reporter:
    """Progress callback: forwards at most one message per PROGRESS_INTERVAL (plus stage changes)."""

    def __init__(self, conn: Connection):
        self.conn, self.last, self.stage = conn, 0.0, None

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != self.stage or now - self.last >= PROGRESS_INTERVAL:
            self.conn.send(("progress", stage, float(fraction)))
            self.stage, self.last = stage, now

    def recalibrating(self, description: str, fraction: float) -> None:
        self(f"recalibrating: {description}", 0.05 + 0.85 * min(1.0, max(0.0, fraction)))


def write_report_page(directory: Path, report: dict[str, Any]) -> None:
    """report.html next to report.json (the service extra installs matplotlib; without it the route
    renders on demand and says what is missing)."""
    from bnfold.trust.page import render

    try:
        page = render(report, title="bnfold report")
    except BnfoldError:
        return
    write_atomic(directory / REPORT_HTML_FILE, page.encode())
