"""/v1/jobs: submit, inspect, download, cancel and list recalibration jobs."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import time
import uuid
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from bnfold.pipeline import JobOptions

from ... import crud
from ...db import FINAL, JobRow, utcnow
from ...errors import (InvalidRequest, NotReady, PayloadTooLarge, ServiceError, Unavailable, problem_responses,
                       validation_errors)
from ...job import write_report_page
from ...precheck import SHUTDOWN_RETRY_AFTER, shutting_down
from ...schemas import Job, JobList, JobOptionsIn, JobState
from ...storage import (REPORT_FILE, REPORT_HTML_FILE, RESULT_FILE, Limits, Storage, Upload, receive_upload,
                        safe_filename)
from ..deps import DatabaseDep, MetricsDep, Owner, SettingsDep, StorageDep, SupervisorDep

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MULTIPART_OVERHEAD = 1 << 20  # headers, boundaries and the options part, on top of the two files
WAIT_DOC = "Block up to this many seconds (capped by the server's max_wait); 200 if the job finished by then."

UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["model", "samples"],
            "additionalProperties": False,
            "properties": {
                "model": {"type": "string", "format": "binary",
                          "description": "The ONNX model (self-contained, with BatchNormalization nodes)."},
                "samples": {"type": "string", "format": "binary",
                            "description": "Unlabeled samples of the new domain, recognised by content: .npy "
                                           "(single-input models), .npz (one array per input name), or a .zip / "
                                           ".tar / .tar.gz / .tar.bz2 / .tar.xz archive of PNG, JPEG, BMP or TIFF "
                                           "images (single-input models; see options.preprocess)."},
                "options": {"$ref": "#/components/schemas/JobOptionsIn"},
                "check_samples": {"type": "string", "format": "binary",
                                  "description": "Optional, with check_labels: a few labelled samples (.npy, or .npz "
                                                 "by input name) scored before and after; a worse score fails the "
                                                 "job unless options.allow_worse."},
                "check_labels": {"type": "string", "format": "binary",
                                 "description": "Optional, with check_samples: .npy of integer class indices (N,), or "
                                                "per-pixel masks (N, H, W) for segmentation (mean IoU); negative = "
                                                "ignore."},
            },
        },
        "encoding": {"options": {"contentType": "application/json"}},
    }},
}


@router.post(
    "", operation_id="createJob", status_code=202, response_model=Job, openapi_extra={"requestBody": UPLOAD_BODY},
    responses={
        200: {"model": Job, "description": "The job finished within ?wait seconds."},
        202: {"description": "Queued (or still running when ?wait ran out).",
              "headers": {"Location": {"description": "URL of the job.", "schema": {"type": "string"}}}},
        **problem_responses(401, 413, 415, 422, 429, 503),
    },
)
async def create_job(
    request: Request, owner: Owner, settings: SettingsDep, database: DatabaseDep, storage: StorageDep,
    supervisor: SupervisorDep, metrics: MetricsDep,
    wait: Annotated[float | None, Query(ge=0, le=3600, description=WAIT_DOC)] = None,
) -> Response:
    """Upload a model and samples; the job is checked (422 for unusable input) and queued.

    Either the job is admitted and this answers 200/202 with it, or nothing is left behind: a
    refusal (4xx, 503) removes the upload, and no error after admission hides an admitted job."""
    draining: asyncio.Event = request.app.state.draining
    await database.run(crud.check_capacity, settings.max_queued_jobs, settings.workers)
    _refuse_oversized_body(request, settings)
    job_id = uuid.uuid4().hex
    upload, options = await _receive_checked(request, storage.new_upload_dir(job_id), settings, metrics, draining)
    if draining.is_set():
        storage.remove_upload(upload)
        raise shutting_down()
    row = _new_row(job_id, owner, upload, options)
    await database.run(_admit, storage, upload, row, settings)
    supervisor.wake()
    retry = {}
    if wait:
        row, interrupted = await _wait_until_final(database, row, min(wait, settings.max_wait), draining)
        if interrupted:  # admitted: answer 202 (poll Location later), never a status that invites a re-POST
            retry = {"Retry-After": str(SHUTDOWN_RETRY_AFTER)}
    status = 200 if row.state in FINAL else 202
    body = to_resource(row, storage, with_report=status == 200).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers={"Location": body["url"], **retry})


@router.get("", operation_id="listJobs", response_model=JobList, responses=problem_responses(401, 422))
async def list_jobs(
    owner: Owner, database: DatabaseDep, storage: StorageDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page.")] = None,
    state: Annotated[JobState | None, Query()] = None,
) -> JobList:
    """This API key's jobs, newest first."""
    page = await database.run(crud.list_jobs, owner, limit, cursor, state)
    return JobList(items=[to_resource(row, storage) for row in page.rows], next_cursor=page.next_cursor)


@router.get("/{job_id}", operation_id="getJob", response_model=Job, responses=problem_responses(401, 404, 422))
async def get_job(job_id: str, owner: Owner, database: DatabaseDep, storage: StorageDep) -> Job:
    """State, progress, timings; the report when it succeeded, the error when it failed."""
    return to_resource(await database.run(crud.get_job, job_id, owner), storage, with_report=True)


@router.get(
    "/{job_id}/model", operation_id="getJobModel", response_class=FileResponse,
    responses={
        200: {"description": "The recalibrated (and folded) ONNX model.",
              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "headers": {"ETag": {"description": "Quoted sha256 of the file.", "schema": {"type": "string"}}}},
        304: {"description": "If-None-Match matched: the copy the client has is current."},
        **problem_responses(401, 404, 409, 422),
    },
)
async def get_job_model(
    job_id: str, owner: Owner, database: DatabaseDep, storage: StorageDep, metrics: MetricsDep,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """Download the result; ETag is the sha256 of the file."""
    row = _succeeded(await database.run(crud.get_job, job_id, owner))
    etag = f'"{row.result_sha256}"'
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers={"ETag": etag})
    metrics.bytes_out.labels("model").inc(row.result_bytes or 0)
    filename = (safe_filename(row.model_filename or "") or "model.onnx").rsplit(".", 1)[0] + ".bnfold.onnx"
    return FileResponse(_artifact(storage, row, RESULT_FILE), media_type="application/octet-stream", filename=filename,
                        headers={"ETag": etag, "Cache-Control": "private, no-cache"})


@router.get(
    "/{job_id}/report", operation_id="getJobReport",
    responses={
        200: {"description": "The recalibration report (per BN layer: old/new statistics, shift scores; totals; timings).",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        **problem_responses(401, 404, 409, 422),
    },
)
async def get_job_report(job_id: str, owner: Owner, database: DatabaseDep, storage: StorageDep,
                         metrics: MetricsDep) -> Response:
    """The JSON report of a succeeded job."""
    row = _succeeded(await database.run(crud.get_job, job_id, owner))
    path = _artifact(storage, row, REPORT_FILE)
    metrics.bytes_out.labels("report").inc(path.stat().st_size)
    return FileResponse(path, media_type="application/json")


@router.get(
    "/{job_id}/report.html", operation_id="getJobReportHtml", response_class=FileResponse,
    responses={
        200: {"description": "The report as one self-contained HTML page: per-layer shifts with their uncertainty, "
                             "before/after signals and the labelled check, the fold fates (plots embedded, no network).",
              "content": {"text/html": {"schema": {"type": "string"}}}},
        **problem_responses(401, 404, 409, 422),
    },
)
async def get_job_report_html(job_id: str, owner: Owner, database: DatabaseDep, storage: StorageDep,
                              metrics: MetricsDep) -> Response:
    """The HTML page of a succeeded job's report (made from report.json if the job did not leave one)."""
    row = _succeeded(await database.run(crud.get_job, job_id, owner))
    path = storage.job_dir(row.id) / REPORT_HTML_FILE
    if not path.is_file():
        report = json.loads(_artifact(storage, row, REPORT_FILE).read_text())
        await anyio.to_thread.run_sync(write_report_page, storage.job_dir(row.id), report)
    page = _artifact(storage, row, REPORT_HTML_FILE)
    metrics.bytes_out.labels("report").inc(page.stat().st_size)
    return FileResponse(page, media_type="text/html; charset=utf-8")


@router.delete(
    "/{job_id}", operation_id="deleteJob", response_model=Job,
    responses={200: {"description": "The job was queued or running: it is now cancelled and its files deleted."},
               204: {"description": "The job had already ended: it and its files are deleted."},
               **problem_responses(401, 404, 422)},
)
async def delete_job(job_id: str, owner: Owner, database: DatabaseDep, storage: StorageDep,
                     supervisor: SupervisorDep) -> Response:
    """Cancel a queued or running job (its process is stopped within a second), or delete an ended one."""
    row, previous = await database.run(crud.cancel_or_delete_job, job_id, owner)
    if previous is None:
        storage.remove_job(row.id)
        return Response(status_code=204)
    if previous == "queued":
        storage.remove_job(row.id)
    supervisor.wake()  # a running job's process is stopped and its files removed by the supervisor
    return JSONResponse(to_resource(row, storage).model_dump(mode="json"))


# ------------------------------------------------------------------------------------- helpers


def to_resource(row: JobRow, storage: Storage, with_report: bool = False) -> Job:
    url = f"/v1/jobs/{row.id}"
    now = utcnow()
    report = None
    if with_report and row.state == "succeeded":
        try:
            report = json.loads((storage.job_dir(row.id) / REPORT_FILE).read_text())
        except (OSError, ValueError):
            report = None
    return Job.model_validate({
        "id": row.id, "state": row.state, "url": url, "attempts": row.attempts, "options": row.options,
        "created_at": _utc(row.created_at), "started_at": _utc(row.started_at), "finished_at": _utc(row.finished_at),
        "progress": {"stage": row.stage, "fraction": min(1.0, max(0.0, row.fraction))},
        "timings": {"queued_s": _seconds(row.created_at, row.started_at or row.finished_at or now),
                    "running_s": _seconds(row.started_at, row.finished_at or now) if row.started_at else None},
        "inputs": {"model": {"filename": row.model_filename, "bytes": row.model_bytes},
                   "samples": {"filename": row.samples_filename, "bytes": row.samples_bytes}},
        "result": {"model_url": f"{url}/model", "report_url": f"{url}/report", "report_html_url": f"{url}/report.html",
                   "model_sha256": row.result_sha256,
                   "model_bytes": row.result_bytes} if row.state == "succeeded" else None,
        "report": report, "error": row.error if row.state == "failed" else None,
    })


async def _receive_checked(request: Request, directory, settings, metrics, draining) -> tuple[Upload, dict[str, Any]]:
    """Stream the upload to disk, parse the options, and run the core's precheck in a child process
    (`service.precheck`): nothing of the upload's content is parsed or decoded in this process."""
    try:
        limits = Limits(int(settings.max_model_bytes), int(settings.max_samples_bytes))
        upload = await receive_upload(request.stream(), request.headers.get("content-type"), directory, limits)
        metrics.bytes_in.labels("model").inc(upload.model_bytes)
        metrics.bytes_in.labels("samples").inc(upload.samples_bytes)
        options = _parse_options(upload.options)
        JobOptions(**options)  # the core's own option checks (InvalidOptions → 422), cheap
        await request.app.state.prechecker.check(directory, upload.model_path, upload.samples_path, options,
                                                 settings.image_limits(), draining)
        return upload, options
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _admit(session, storage: Storage, upload: Upload, row: JobRow, settings) -> None:
    """Move the upload into jobs/ and insert its row, or undo the move: all in one worker thread,
    so a request cancelled meanwhile (client gone, shutdown) still ends with both or neither."""
    storage.admit(upload, row.id)
    try:
        crud.admit_job(session, row, settings.max_queued_jobs, settings.workers)
    except BaseException:
        storage.remove_upload(upload)
        raise


def _parse_options(raw: bytes | None) -> dict[str, Any]:
    try:
        return JobOptionsIn.model_validate_json(raw or b"{}").model_dump()
    except ValidationError as exc:
        errors = validation_errors(exc.errors(include_url=False), prefix="options")
        raise InvalidRequest("; ".join(f"{e['field']}: {e['message']}" for e in errors), field=errors[0]["field"],
                             errors=errors) from None


def _refuse_oversized_body(request: Request, settings) -> None:
    """413 before reading anything when Content-Length already says the body cannot fit."""
    limit = int(settings.max_model_bytes) + int(settings.max_samples_bytes) + MULTIPART_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the request body is {length} bytes; model and samples together may be at most "
                              f"{limit} bytes", field="body")


def _new_row(job_id: str, owner: str, upload: Upload, options: dict[str, Any]) -> JobRow:
    return JobRow(
        id=job_id, owner=owner, state="queued", stage="queued", fraction=0.0, options=options,
        model_filename=upload.model_filename, samples_filename=upload.samples_filename,
        samples_file=upload.samples_file, model_bytes=upload.model_bytes, samples_bytes=upload.samples_bytes,
        created_at=utcnow(), attempts=0,
    )


async def _wait_until_final(database, row: JobRow, seconds: float, draining: asyncio.Event) -> tuple[JobRow, bool]:
    """The row once final or after `seconds`; True if the wait was cut short by a shutdown. The job is
    admitted already: a store that does not answer meanwhile only leaves the last state seen."""
    deadline, pause = time.monotonic() + seconds, 0.05
    while row.state not in FINAL and time.monotonic() < deadline:
        with anyio.move_on_after(min(pause, max(0.0, deadline - time.monotonic()))):
            await draining.wait()
        if draining.is_set():
            return row, True
        pause = min(0.5, pause * 1.5)
        try:
            row = await database.run(crud.reload_job, row.id) or row
        except Unavailable:
            pass
    return row, False


def _succeeded(row: JobRow) -> JobRow:
    if row.state != "succeeded":
        raise NotReady(f"job {row.id} is {row.state}; a result exists only once it has succeeded", field="job_id")
    return row


def _artifact(storage: Storage, row: JobRow, name: str):
    path = storage.job_dir(row.id) / name
    if not path.is_file():
        raise ServiceError(f"the {name} of job {row.id} is missing from the data directory")
    return path


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    return value.replace(tzinfo=dt.UTC) if value is not None else None


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None
