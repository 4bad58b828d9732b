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
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .cli_remote import jobs_app
from .errors import BnfoldError, InvalidOptions
from .pipeline import JobOptions, fold_file, recalibrate_files
from .report import Report

app = typer.Typer(
    help="Recalibrate BatchNorm statistics of ONNX models on a new domain, exactly, and fold BN away.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(jobs_app, name="jobs")
err = Console(stderr=True, soft_wrap=True)
out = Console()

EXIT_BAD_INPUT = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE


def main() -> None:
    app()


def _print_version(value: bool) -> None:
    if value:
        out.print(f"bnfold {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _image_option(name: str, help: str):
    return typer.Option(name, help=help, rich_help_panel="Image samples (folder or archive)")


@app.command("recalibrate")
def recalibrate_command(
    model: Annotated[Path, typer.Argument(help="ONNX model with BatchNormalization nodes.")],
    samples: Annotated[Path, typer.Argument(help=".npy (single-input models), .npz (one array per input name), or a folder / "
                                               ".zip / .tar(.gz) of PNG, JPEG, BMP or TIFF images.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the recalibrated model.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per inference call (≥ 1).")] = 64,
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="RAM for tensors kept between BN levels (e.g. 512MiB, 2GiB); the rest spills to disk.")
    ] = "2GiB",
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold BN into neighbouring layers (--no-fold: only BN mean/var change).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    server: Annotated[Optional[str], typer.Option(
        "--server", help="Run the job on a bnfold service at this URL (API key from BNFOLD_API_KEY; needs the 'client' "
                         "extra) instead of here: same outputs; --memory-budget is then the server's.")] = None,
    preprocess: Annotated[Optional[Path], _image_option("--preprocess", "JSON preprocessing spec; the flags below override its fields, "
                                                        "which override the spec the model carries.")] = None,
    resize: Annotated[Optional[str], _image_option("--resize", "Shorter side (256) or exact HxW (224x320).")] = None,
    crop: Annotated[Optional[str], _image_option("--crop", "Center crop: 224 or HxW; zero-pads if larger.")] = None,
    color: Annotated[Optional[str], _image_option("--color", "rgb, grey or keep (the decoded channels).")] = None,
    channels: Annotated[Optional[str], _image_option("--channels", "Channels to keep, in order, e.g. 2,1,0 for BGR.")] = None,
    scale: Annotated[Optional[str], _image_option("--scale", "Pixel multiplier: auto (1/255, 1/65535 by depth), 1/255, 0.5 ...")] = None,
    mean: Annotated[Optional[str], _image_option("--mean", "Per-channel mean after scaling, e.g. 0.485,0.456,0.406.")] = None,
    std: Annotated[Optional[str], _image_option("--std", "Per-channel std, e.g. 0.229,0.224,0.225.")] = None,
    layout: Annotated[Optional[str], _image_option("--layout", "NCHW or NHWC.")] = None,
    interpolation: Annotated[Optional[str], _image_option("--interpolation", "bilinear (default), nearest, bicubic, box, hamming, lanczos.")] = None,
    on_bad_image: Annotated[str, _image_option("--on-bad-image", "fail on an unreadable or mismatched image, or skip it (listed in the report).")] = "fail",
) -> None:
    """Recompute every BN's population mean/var on unlabeled samples of the new domain."""
    with _errors_to_exit():
        from .preprocess import overrides_from_text

        spec = overrides_from_text(
            None if preprocess is None else str(preprocess), resize=resize, center_crop=crop, color=color, channels=channels,
            scale=scale, mean=mean, std=std, layout=layout, interpolation=interpolation)
        options = JobOptions(fold=fold, batch_size=batch_size, memory_budget=parse_bytes(memory_budget),
                             preprocess=spec, on_bad_image=on_bad_image)
        _check_writable(output, report)
        if server is not None:
            from .cli_remote import recalibrate_remote

            job = recalibrate_remote(server, model, samples, options, quiet)
        else:
            with _progress(quiet) as callback:
                job = recalibrate_files(model, samples, options, progress=callback)
        _write_outputs(output, job, report)
        if not quiet:
            _print_summary(job.report, output, report)


@app.command("fold")
def fold_command(
    model: Annotated[Path, typer.Argument(help="ONNX model with BatchNormalization nodes.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the folded model.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Fold BN into neighbouring layers without recalibrating (verified on random inputs)."""
    with _errors_to_exit():
        _check_writable(output, report)
        job = fold_file(model)
        _write_outputs(output, job, report)
        if not quiet:
            _print_fold(job.report)
            out.print(f"wrote {output}")


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '100MB', '0' → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]i?)?B?)\s*", text, re.IGNORECASE)
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


class _progress:
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


def _check_writable(*paths: Path | None) -> None:
    """Fail before the work, not after it, when an output cannot be written."""
    for path in paths:
        if path is not None and not Path(path).absolute().parent.is_dir():
            raise InvalidOptions(f"cannot write {path}: directory {Path(path).absolute().parent} does not exist")


def _write_outputs(model_path: Path, job, report_path: Path | None) -> None:
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
    _print_images(report)
    _print_fold(report)
    out.print(f"wrote {output}" + (f" and {report_path}" if report_path else "") + f" in {report.timings.get('total', 0):.2f} s")


def _print_images(report: Report) -> None:
    images = report.extra.get("images")
    if images:
        out.print(f"images: {images['used']} used, {images['skipped_count']} skipped, {images['ignored_count']} other "
                  f"files ignored (preprocessing from {images['spec_origin']})", highlight=False)
        for entry in images["skipped"][:5]:
            out.print(f"[yellow]skipped[/] {escape(entry['name'])}: {escape(entry['reason'])}", highlight=False)


def _print_fold(report: Report) -> None:
    fold = report.extra.get("fold")
    if fold:
        counts = ", ".join(f"{n} {fate.replace('_', ' ')}" for fate, n in fold.get("counts", {}).items() if n)
        out.print(f"folding: {counts}", highlight=False)
    check = report.extra.get("verification")
    if check:
        worst = max((o["max_abs"] for o in check.get("outputs", [])), default=0.0)
        out.print(f"verified against the unfolded model: max |Δ| = {worst:.3g} over all outputs", highlight=False)


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


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="Address to bind; without BNFOLD_API_KEYS only loopback is allowed.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
) -> None:
    """Run the HTTP jobs API (needs the 'service' extra). Configured by BNFOLD_* variables; see service/README.md."""
    try:
        from service.core.config import ConfigError
        from service.main import serve
    except ImportError as exc:
        err.print(f"[bold red]error:[/] cannot start the service ({exc}); install it with: pip install 'bnfold\\[service]'",
                  highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    from pydantic import ValidationError

    try:
        serve(host, port)
    except (ConfigError, ValidationError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
