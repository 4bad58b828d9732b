"""The CLI's remote mode: ``bnfold recalibrate … --server URL`` and ``bnfold jobs list|show|cancel|download``.

Both go through the SDK (`bnfold.client`, the 'client' extra) and reuse the local command's
helpers from `bnfold.cli.output` — the progress bar, the atomic all-or-nothing writes, the summary and the
one-line errors (the SDK raises `bnfold.errors` classes, so exit statuses are the local ones).
The API key comes from ``BNFOLD_API_KEY`` only (a command-line flag would show in ``ps`` and
shell history); ``jobs`` commands also take the URL from ``BNFOLD_URL``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from bnfold.cli.output import check_writable, err, errors_to_exit, out, print_summary, progress_bar, write_outputs
from bnfold.errors import InvalidOptions

if TYPE_CHECKING:
    from bnfold.client import Client, Result
    from bnfold.pipeline import JobOptions

jobs_app = typer.Typer(help="Jobs on a bnfold service: list, show, cancel, download (URL from --server or BNFOLD_URL, "
                            "API key from BNFOLD_API_KEY).", no_args_is_help=True)

Server = Annotated[Optional[str], typer.Option("--server", envvar="BNFOLD_URL", show_envvar=True,
                                               help="URL of the bnfold service.")]
JobId = Annotated[str, typer.Argument(help="The job's id (from 'bnfold jobs list').")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the service's JSON instead.")]


def recalibrate_remote(server: str, model: Path, samples: Path, options: JobOptions, quiet: bool,
                       check_samples: Path | None = None, check_labels: Path | None = None) -> Result:
    """The job `bnfold recalibrate` would run here, run by the service; returns its model and report."""
    with _client(server) as client, progress_bar(quiet) as callback:
        return client.recalibrate(model, samples, fold=options.fold, batch_size=options.batch_size,
                                  verify_samples=options.verify_samples, rtol=options.rtol, atol=options.atol,
                                  preprocess=options.preprocess,
                                  on_bad_image=None if options.on_bad_image == "fail" else options.on_bad_image,
                                  unfoldable=None if options.unfoldable == "keep" else options.unfoldable,
                                  progress=callback, prior=options.prior or None,
                                  allow_worse=options.allow_worse or None, check_samples=check_samples,
                                  check_labels=check_labels, **_int8(options))


def _int8(options: JobOptions) -> dict:
    """The INT8 options, sent only when quantizing (older servers know none of them)."""
    if not options.quantize:
        return {}
    return {"quantize": options.quantize, "quantize_method": options.quantize_method,
            "min_agreement": options.min_agreement, "min_cosine": options.min_cosine}


@jobs_app.command("list")
def list_command(
    server: Server = None,
    state: Annotated[Optional[str], typer.Option(help="Only jobs in this state: queued, running, succeeded, failed, cancelled.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 20,
    as_json: AsJson = False,
) -> None:
    """This API key's jobs, newest first."""
    from rich.markup import escape

    with errors_to_exit(), _client(server) as client:
        jobs = client.list(state=state, limit=limit)
        if as_json:
            out.print_json(json.dumps([job.raw for job in jobs]))
            return
        rows = [("JOB", "STATE", "PROGRESS", "CREATED (UTC)", "MODEL", "SAMPLES")]
        for job in jobs:
            inputs = job.raw.get("inputs", {})
            rows.append((job.id, job.state, f"{job.fraction:4.0%} {job.stage}", f"{job.created_at:%Y-%m-%d %H:%M:%S}",
                         str(inputs.get("model", {}).get("filename")), str(inputs.get("samples", {}).get("filename"))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:  # plain columns, one job a line, never wrapped: for eyes, grep and cut alike
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
            out.print(escape(line), highlight=False, soft_wrap=True)


@jobs_app.command("show")
def show_command(job_id: JobId, server: Server = None, as_json: AsJson = False) -> None:
    """State, progress, timings, attempts; the error of a failed job, the result of a succeeded one."""
    from rich.markup import escape

    with errors_to_exit(), _client(server) as client:
        job = client.get(job_id)
        if as_json:
            out.print_json(json.dumps(job.raw))
            return
        timings = job.raw.get("timings", {})
        lines = [("job", job.id), ("state", job.state), ("stage", f"{job.stage} ({job.fraction:.0%})"),
                 ("attempts", job.attempts), ("created", f"{job.created_at:%Y-%m-%d %H:%M:%S %Z}"),
                 ("queued", _seconds(timings.get("queued_s"))), ("running", _seconds(timings.get("running_s"))),
                 ("options", json.dumps(job.options))]
        if job.error:
            lines.append(("error", f"{job.error.get('title')}: {job.error.get('detail')}"))
        if job.model_sha256:
            lines.append(("model", f"{job.model_bytes} bytes, sha256 {job.model_sha256}"))
        for name, value in lines:
            out.print(f"{name:>9}: {escape(str(value))}", highlight=False, soft_wrap=True)


@jobs_app.command("cancel")
def cancel_command(job_id: JobId, server: Server = None) -> None:
    """Cancel a queued or running job; a job that has ended is deleted with its files."""
    with errors_to_exit(), _client(server) as client:
        job = client.cancel(job_id)
        out.print(f"cancelled job {job_id}" if job is not None else f"deleted job {job_id} (it had ended)", highlight=False)


@jobs_app.command("download")
def download_command(
    job_id: JobId,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the model.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    server: Server = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Write a succeeded job's model (and report) as 'bnfold recalibrate' does."""
    from bnfold.client.jobs import Result

    with errors_to_exit():
        check_writable(output, report)
        with _client(server) as client:
            job = client.get(job_id)
            result = Result(job, client.download(job), job.report or client.report(job))
        write_outputs(output, result, report)
        if not quiet:
            print_summary(result.report, output, report)


def _client(server: str | None) -> Client:
    if not server:
        raise InvalidOptions("no server: pass --server URL or set BNFOLD_URL")
    try:
        from bnfold.client import Client, log
    except ImportError as exc:
        raise InvalidOptions(f"{exc}") from None
    if not any(isinstance(handler, _WarningLines) for handler in log.handlers):
        log.addHandler(_WarningLines())  # retries show while they happen ("warning: … retry 2 in 1.0 s")
    return Client(server)


class _WarningLines(logging.Handler):
    """The SDK's log records as "warning: …" lines on stderr, like the local command's warnings. The
    first retry of a request says plainly that the server is unreachable (or busy) and for how long
    the CLI keeps trying, so a silent wait never looks like a hang."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        err.print(f"[yellow]warning:[/] {escape(retry_line(record))}", highlight=False)


def retry_line(record: logging.LogRecord) -> str:
    facts = getattr(record, "bnfold_retry", None)
    if not facts or facts["retry"] != 1:
        return record.getMessage()
    busy = facts["reason"].startswith("HTTP ")
    what = f"{facts['url']} is busy" if busy else f"cannot reach {facts['url']}"
    return f"{what} ({facts['reason']}): retrying for up to {facts['left_s']:.0f} s"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
