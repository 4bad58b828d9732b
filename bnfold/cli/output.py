"""What the command line shows and writes, shared by the local and the remote commands.

One readable line and a non-zero exit for every failure a user can cause (1: bad input, 70: a bug
in bnfold); a progress bar only on a terminal; outputs written all or nothing (temporary files
renamed into place); the summary table of a finished job.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bnfold.errors import BnfoldError, InvalidOptions
from bnfold.report import Report

err = Console(stderr=True, soft_wrap=True)
out = Console()

EXIT_BAD_INPUT = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE


class errors_to_exit:
    """Context manager: BnfoldError → one line + exit 1; anything unexpected → one line + exit 70."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, KeyboardInterrupt)):
            return False
        if isinstance(exc, BnfoldError):
            err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT)
        if isinstance(exc, OSError):
            err.print(f"[bold red]error:[/] {escape(str(exc.strerror or exc))}: {escape(str(exc.filename or ''))}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT)
        detail = escape(f"{type(exc).__name__}: {exc}")
        err.print(f"[bold red]internal error[/] ({detail}); please report this with the command you ran.", highlight=False)
        if os.environ.get("BNFOLD_DEBUG"):
            return False
        raise typer.Exit(EXIT_INTERNAL)


class progress_bar:
    def __init__(self, quiet: bool):
        # Only on a terminal: elsewhere a bar is noise (and rich ends it with a stray blank line).
        self.bar = None if quiet or not err.is_terminal else Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
            console=err, transient=True,
        )

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.start()
        task = self.bar.add_task("recalibrating", total=1.0)
        return lambda description, fraction: self.bar.update(task, description=description, completed=fraction)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def check_writable(*paths: Path | None) -> None:
    """Fail before the work, not after it, when an output cannot be written."""
    for path in paths:
        if path is not None and not Path(path).absolute().parent.is_dir():
            raise InvalidOptions(f"cannot write {path}: directory {Path(path).absolute().parent} does not exist")


def write_outputs(model_path: Path, job, report_path: Path | None) -> None:
    """Write model and report to temporary files, then rename both: all or nothing."""
    pending = [(model_path, job.model.SerializeToString())]
    if report_path is not None:
        pending.append((report_path, job.report.to_json().encode()))
    temps = []
    current = model_path
    try:
        for path, data in pending:
            current = path
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", dir=Path(path).absolute().parent)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for (path, _), tmp in zip(pending, temps):
            current = path
            os.replace(tmp, path)
    except OSError as exc:
        raise InvalidOptions(f"cannot write {current}: {exc.strerror or exc}") from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)


def print_summary(report: Report, output: Path, report_path: Path | None) -> None:
    totals = report.totals
    table = Table(title=f"BN statistics on {report.samples} samples ({totals['levels']} BN levels)")
    for column in ("BN node", "level", "channels", "mean shift (σ)", "max shift (σ)", "KL (nats)"):
        table.add_column(column, justify="left" if column == "BN node" else "right")
    for layer in report.layers:
        s = layer.shift
        table.add_row(layer.name, str(layer.level), str(layer.channels), f"{s.mean_shift:.3f}", f"{s.max_mean_shift:.3f}", f"{s.kl:.4f}")
    out.print(table)
    for warning in report.warnings + [f"{l.name}: {w}" for l in report.layers for w in l.warnings]:
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)
    print_images(report)
    print_fold(report)
    out.print(f"wrote {output}" + (f" and {report_path}" if report_path else "") + f" in {report.timings.get('total', 0):.2f} s")


def print_images(report: Report) -> None:
    images = report.extra.get("images")
    if images:
        out.print(f"images: {images['used']} used, {images['skipped_count']} skipped, {images['ignored_count']} other "
                  f"files ignored (preprocessing from {images['spec_origin']})", highlight=False)
        for entry in images["skipped"][:5]:
            out.print(f"[yellow]skipped[/] {escape(entry['name'])}: {escape(entry['reason'])}", highlight=False)


def print_fold(report: Report) -> None:
    fold = report.extra.get("fold")
    if fold:
        counts = ", ".join(f"{n} {fate.replace('_', ' ')}" for fate, n in fold.get("counts", {}).items() if n)
        out.print(f"folding: {counts}", highlight=False)
    check = report.extra.get("verification")
    if check:
        worst = max((o["max_abs"] for o in check.get("outputs", [])), default=0.0)
        on = f"{check.get('feeds', 0)} batch(es) of samples" if check.get("feeds") else (
            f"{check.get('random', 0)} random batch(es), {check.get('random_inputs', {}).get('note', 'standard normal')}")
        out.print(f"verified against the unfolded model: max |Δ| = {worst:.3g} over all outputs, on {on}", highlight=False)
