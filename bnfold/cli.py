"""The `bnfold` command line: recalibrate (and fold) a model on a laptop, no server needed.

Every failure a user can cause ends in one readable line on stderr and a non-zero exit status:
1 for bad input (`BnfoldError`), 70 for a bug in bnfold (with a request to report it).
Outputs are written to a temporary file next to the target and renamed into place, so an
interrupted run never leaves a truncated model behind.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import BnfoldError, InvalidOptions
from .model_io import load_model
from .recalibrate import DEFAULT_MEMORY_BUDGET, recalibrate
from .report import Report
from .samples import load_samples

app = typer.Typer(
    help="Recalibrate BatchNorm statistics of ONNX models on a new domain, exactly, and fold BN away.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console()

EXIT_BAD_INPUT = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE


def main() -> None:
    app()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"bnfold {__version__}")
        raise typer.Exit()


@app.command("recalibrate")
def recalibrate_command(
    model: Annotated[Path, typer.Argument(help="ONNX model with BatchNormalization nodes.")],
    samples: Annotated[Path, typer.Argument(help=".npy (single-input models) or .npz (one array per input name).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the recalibrated model.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per inference call.")] = 64,
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="RAM for tensors kept between BN levels (e.g. 512MiB, 2GiB); the rest spills to disk.")
    ] = "2GiB",
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold BN into neighbouring layers (--no-fold: only BN mean/var change).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Recompute every BN's population mean/var on unlabeled samples of the new domain."""
    with _errors_to_exit():
        budget = parse_bytes(memory_budget)
        onnx_model = load_model(model)
        data = load_samples(samples)
        with _progress(quiet) as callback:
            result = recalibrate(onnx_model, data, batch_size=batch_size, memory_budget=budget, progress=callback)
        final = result.model
        if fold:
            final = _fold(final, result.report)
        _write_atomic(output, final.SerializeToString())
        if report is not None:
            _write_atomic(report, result.report.to_json().encode())
        if not quiet:
            _print_summary(result.report, output, report)


def _fold(model, report: Report):
    # Folding lands with its own module; until then BN nodes stay and the report says so.
    try:
        from .fold import fold_batchnorms
    except ImportError:
        report.warnings.append("folding is not available in this version; BN nodes were kept")
        return model
    folded = fold_batchnorms(model)
    report.extra["fold"] = folded.to_dict()
    return folded.model


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '100MB', '0' → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise InvalidOptions(f"cannot read memory budget '{text}': use e.g. 512MiB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * scale[unit])


class _errors_to_exit:
    """Context manager: BnfoldError → one line + exit 1; anything unexpected → one line + exit 70."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, KeyboardInterrupt)):
            return False
        if isinstance(exc, BnfoldError):
            err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT)
        if isinstance(exc, OSError):
            err.print(f"[bold red]error:[/] {exc.strerror or exc}: {exc.filename or ''}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT)
        err.print(f"[bold red]internal error[/] ({type(exc).__name__}: {exc}); please report this with the command you ran.", highlight=False)
        if os.environ.get("BNFOLD_DEBUG"):
            return False
        raise typer.Exit(EXIT_INTERNAL)


class _progress:
    def __init__(self, quiet: bool):
        self.bar = None if quiet else Progress(
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


def _write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _print_summary(report: Report, output: Path, report_path: Path | None) -> None:
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
    out.print(f"wrote {output}" + (f" and {report_path}" if report_path else "") + f" in {report.timings.get('total', 0):.2f} s")


@app.command("demo")
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the demo's files.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Build a small BN model and 'new lab' samples, recalibrate, and show the accuracy recovered."""
    with _errors_to_exit():
        from .demo import run_demo

        out_dir.mkdir(parents=True, exist_ok=True)
        run_demo(out_dir, seed=seed, console=out)


if __name__ == "__main__":
    main()
