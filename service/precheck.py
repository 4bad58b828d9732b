"""The up-front check of an upload (`bnfold.pipeline.precheck`), run in a child process.

Why not in the API process: parsing and checking a model costs about four times its size in
memory (a 448 MB model took the API process from 147 MB to 1.9 GB), decoding and resizing images
can cost gigabytes, and unpacking a ``.tar.gz`` needs scratch space. A child from the supervisor's
forkserver (bnfold already imported, so it starts in milliseconds) does all of it, with its
temporary folder inside the upload's own directory (under the data directory, removed with it),
and ends when the check does: the API process keeps only the upload's bytes on disk and a pipe.

At most `slots` checks run at once (others wait, holding nothing); a check past `timeout` seconds,
or one whose process dies (e.g. out of memory), refuses the upload (422); a server shutting down
stops the checks in progress (503 + Retry-After: nothing was admitted, so a retry is safe).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import errors

SCRATCH = "scratch"  # the check's temporary folder, inside the upload directory
SHUTDOWN_RETRY_AFTER = 5  # seconds: about the time a restarted server needs


def check_main(model_path: str, samples_path: str, options: dict[str, Any], image_limits: dict[str, int],
               scratch: str, conn: Connection) -> None:
    """In the child: run the precheck; send None (usable) or the problem body (refused)."""
    from bnfold.errors import BnfoldError
    from bnfold.inputs.images import ImageLimits
    from bnfold.pipeline import JobOptions, precheck

    from .storage import check_paths

    Path(scratch).mkdir(exist_ok=True)
    tempfile.tempdir = scratch  # a .tar.gz is unpacked here, never in the system's temporary folder
    check_samples, check_labels = check_paths(Path(scratch).parent)  # the upload's optional labelled check
    try:
        precheck(model_path, samples_path, options=JobOptions(**options, image_limits=ImageLimits(**image_limits)),
                 check_samples=check_samples, check_labels=check_labels)
        conn.send(None)
    except BnfoldError as exc:
        conn.send(errors.problem_for(exc))
    except MemoryError:
        conn.send(_too_costly("it ran out of memory"))
    except Exception as exc:  # noqa: BLE001 - a bug in bnfold: a generic 500 for the client, the traceback for the log
        conn.send({**errors.problem_for(exc), "_traceback": traceback.format_exc(), "_error": repr(exc)[:300]})
    finally:
        conn.close()


class PrecheckRefused(errors.ServiceError):
    """The upload failed its up-front check; carries the problem body (status from the check). HTTP 422."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(body["detail"], field=body.get("field"))
        self.body = body
        self.status, self.title = body["status"], body["title"]


class Prechecker:
    def __init__(self, ctx, slots: int, timeout: float):
        self.ctx, self.timeout = ctx, timeout
        self._slots = asyncio.Semaphore(slots)

    async def check(self, upload_dir: Path, model_path: Path, samples_path: Path, options: dict[str, Any],
                    image_limits: dict[str, int], draining: asyncio.Event) -> None:
        """Return when the upload is usable; raise `PrecheckRefused` (422/500) or `Unavailable` (503)."""
        from anyio import to_thread

        scratch = upload_dir / SCRATCH
        try:
            async with self._slots:
                if draining.is_set():
                    raise shutting_down()
                body = await self._run(model_path, samples_path, options, image_limits, scratch, draining)
        finally:
            await to_thread.run_sync(shutil.rmtree, scratch, True)
        if body is not None:
            if "_traceback" in body:
                errors.log.error("precheck raised an unexpected error",
                                 extra={"exc": body.pop("_traceback"), "error": body.pop("_error")})
            raise PrecheckRefused(body)

    async def _run(self, model_path, samples_path, options, image_limits, scratch, draining) -> dict | None:
        from anyio import to_thread

        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=check_main, name="bnfold-precheck", daemon=True,
                                   args=(str(model_path), str(samples_path), options, image_limits, str(scratch), writer))
        outcome = "not started"
        try:
            await to_thread.run_sync(process.start)  # a round trip to the forkserver: not on the event loop
            writer.close()
            outcome = await _readable_or(reader, draining, self.timeout)
            if outcome == "draining":
                raise shutting_down()
            if outcome == "timeout":
                return _too_costly(f"it took longer than {self.timeout:g} s (BNFOLD_PRECHECK_TIMEOUT)")
            try:
                return reader.recv()
            except (EOFError, OSError):  # the process died without an answer
                await to_thread.run_sync(process.join, 5)
                code = process.exitcode
                why = "it ran out of memory" if code == -signal.SIGKILL else f"its process ended with status {code}"
                return _too_costly(why)
        finally:
            writer.close()
            if process.pid is not None:
                if outcome != "ready":  # timed out, shutting down, or this request was cancelled
                    process.kill()
                await to_thread.run_sync(process.join, 5)  # after an answer the child is exiting anyway
                if process.is_alive():
                    process.kill()
                    await to_thread.run_sync(process.join, 5)
            reader.close()


async def _readable_or(conn: Connection, draining: asyncio.Event, timeout: float) -> str:
    """'ready' once `conn` has data or EOF, 'draining' if the server starts shutting down first, or 'timeout'."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result("ready"))
    stop = asyncio.ensure_future(draining.wait())
    try:
        done, _ = await asyncio.wait({ready, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(conn.fileno())
        stop.cancel()
        ready.cancel()
    if ready in done:
        return "ready"
    return "draining" if stop in done else "timeout"


def _too_costly(why: str) -> dict[str, Any]:
    return errors.problem(422, "Upload not checkable", f"the upload could not be checked: {why}; send a smaller "
                          "model or fewer, smaller samples", kind="precheck-failed")


def shutting_down() -> errors.Unavailable:
    return errors.Unavailable("the server is shutting down; nothing was submitted — retry, another server (or this "
                              "one once restarted) will take it", retry_after=SHUTDOWN_RETRY_AFTER)
