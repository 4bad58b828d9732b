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

from bnfold.errors import BnfoldError, InvalidOptions, plural
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
    """Fail before the work, not after it, when an output cannot be written: its directory is missing
    or not writable, the path is a directory, or two outputs are the same file (the second would
    replace the first). Outputs are renamed into place, so only the directory needs to be writable."""
    seen: dict[Path, Path] = {}
    for path in paths:
        if path is None:
            continue
        target = Path(path).absolute()
        if not target.parent.is_dir():
            raise InvalidOptions(f"cannot write {path}: directory {target.parent} does not exist")
        if target.is_dir():
            raise InvalidOptions(f"cannot write {path}: it is a directory; give a file name")
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise InvalidOptions(f"cannot write {path}: directory {target.parent} is not writable")
        same = seen.get(target.resolve())
        if same is not None:
            raise InvalidOptions(f"cannot write {path}: it is the same file as {same}; give each output its own path")
        seen[target.resolve()] = Path(path)


def write_outputs(model_path: Path, job, report_path: Path | None, html_path: Path | None = None) -> None:
    """Write model, report (and HTML page) all or nothing: each goes to a temporary file next to its
    target, then all are renamed into place; if a rename fails, the targets already replaced get their
    previous contents back (kept as hard links until all are in place)."""
    pending = [(Path(model_path), job.model.SerializeToString())]
    if report_path is not None:
        pending.append((Path(report_path), job.report.to_json().encode()))
    if html_path is not None:
        from bnfold.trust.page import render

        page = render(job.report.to_dict(), title=f"bnfold report: {Path(model_path).name}")
        pending.append((Path(html_path), page.encode()))
    check_writable(*(path for path, _ in pending))
    temps: list[str] = []
    placed: list[tuple[Path, str | None]] = []  # (target, hard link to its previous contents)
    current = pending[0][0]
    try:
        for path, data in pending:
            current = path
            fd, tmp = temp_beside(path)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for (path, _), tmp in zip(pending, temps):
            current = path
            previous = _keep_previous(path)
            placed.append((path, previous))
            os.replace(tmp, path)
    except OSError as exc:
        _restore(placed)
        raise InvalidOptions(f"cannot write {current}: {exc.strerror or exc}") from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)
        for _, previous in placed:
            if previous is not None:
                Path(previous).unlink(missing_ok=True)


def _keep_previous(path: Path) -> str | None:
    """A hard link to the file at `path` (None if there is none), to put back if the run fails."""
    if not path.is_file():
        return None
    link = path.absolute().parent / f".{path.name}.{os.getpid()}.previous"
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
    except OSError:  # a file system without hard links: replaced without a way back
        return None
    return str(link)


def _restore(placed: list[tuple[Path, str | None]]) -> None:
    for path, previous in reversed(placed):
        try:
            if previous is not None:
                os.replace(previous, path)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass  # the error being reported is the first one


class float_kept:
    """With a path: the float model of a quantizing job is written there — on success, and when the
    INT8 model is refused (the error then says where it is)."""

    def __init__(self, path: Path | None):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self.path is None:
            return False
        model = getattr(exc, "float_model", None) if exc is not None else None
        if model is not None:
            write_model(self.path, model)
            exc.message += f" (the float model was written to {self.path})"
        return False

    def written(self, job) -> None:
        if self.path is not None and job.float_model is not None:
            write_model(self.path, job.float_model)


def temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to `path`, to be renamed onto it, with the permissions a plain new file
    gets (0666 less the umask): mkstemp's private 0600 would follow the rename, and a model written
    for a team or a container could then be read by its owner alone."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_model(path: Path, model) -> None:
    fd, tmp = temp_beside(Path(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except OSError as exc:
        raise InvalidOptions(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def print_summary(report: Report, output: Path, report_path: Path | None) -> None:
    totals = report.totals
    table = Table(title=f"BN statistics on {plural(report.samples, 'sample')} ({plural(totals['levels'], 'BN level')})")
    for column in ("BN node", "level", "channels", "mean shift (σ)", "max shift (σ)", "KL (nats)"):
        table.add_column(column, justify="left" if column == "BN node" else "right")
    for layer in report.layers:
        s = layer.shift
        table.add_row(layer.name, str(layer.level), str(layer.channels), f"{s.mean_shift:.3f}", f"{s.max_mean_shift:.3f}", f"{s.kl:.4f}")
    out.print(table)
    for warning in report.warnings + [f"{l.name}: {w}" for l in report.layers for w in l.warnings]:
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)
    print_trust(report)
    print_images(report)
    print_fold(report)
    print_quantize(report)
    out.print(f"wrote {output}" + (f" and {report_path}" if report_path else "") + f" in {report.timings.get('job', report.timings.get('total', 0)):.2f} s")


def print_trust(report: Report) -> None:
    """Sample sufficiency, the label-free signals and the labelled check, one line each."""
    if report.samples_recommended is not None:
        enough = "enough" if report.samples_sufficient else "too few"
        out.print(f"samples: {report.samples} ({enough}; about {report.samples_recommended} recommended for standard "
                  "errors ≤ 2 % of σ)", highlight=False)
    signals = report.signals
    if signals and signals.get("kind") == "classifier":
        b, a = signals["before"], signals["after"]
        out.print(f"signals (not accuracy) on {plural(signals['samples'], 'sample')}: mean top probability "
                  f"{b['mean_max_probability']:.1%} → {a['mean_max_probability']:.1%}, entropy {b['mean_entropy']:.3f} → "
                  f"{a['mean_entropy']:.3f} nats, {signals['changed_argmax']:.1%} of predictions changed", highlight=False)
    elif signals:
        out.print(f"signals (not accuracy) on {plural(signals['samples'], 'sample')}: output shift {signals['output_shift']:.3f} σ, "
                  f"spread ratio {signals['output_std_ratio']:.3f}", highlight=False)
    if report.check:
        c = report.check
        out.print(f"check on {c['samples']} labelled samples: {c['metric']} {c['before']:.4f} → {c['after']:.4f}",
                  highlight=False)


def print_images(report: Report) -> None:
    images = report.extra.get("images")
    if images:
        out.print(f"images: {images['used']} used, {images['skipped_count']} skipped, "
                  f"{plural(images['ignored_count'], 'other file')} ignored (preprocessing from {images['spec_origin']})",
                  highlight=False)
        for entry in images["skipped"][:5]:
            out.print(f"[yellow]skipped[/] {escape(entry['name'])}: {escape(entry['reason'])}", highlight=False)


def print_quantize(report: Report) -> None:
    q = report.extra.get("quantize")
    if not q:
        return
    size = q["size"]
    out.print(f"INT8 ({q['method']}): {size['int8_bytes']:,} bytes, {100 * size['ratio']:.0f} % of the float model's "
              f"{size['float_bytes']:,}; runs in INT8: {', '.join(q['ops']['int8'])}", highlight=False)
    for o in q["gate"]["outputs"]:
        figures = [f"top-1 agreement {o['top1']:.4f}"] if o.get("top1") is not None else []
        if o["kind"] != "discrete":
            figures.append(f"cosine {_figure(o['cosine'], '.5f')}, rel. max |Δ| {_figure(o['rel_max'], '.3g')}")
        out.print(f"agreement with the float model on {plural(q['gate']['samples'], 'sample')}, {o['name']}: {', '.join(figures)}",
                  highlight=False)
    for batch, t in q.get("latency", {}).items():
        if t["speedup"]:
            out.print(f"CPU latency {batch.replace('_', ' ')}: float {t['float_ms']:.3g} ms, INT8 {t['int8_ms']:.3g} ms "
                      f"(speed-up {t['speedup']:.2f}×)", highlight=False)
    for warning in q.get("warnings", []):
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)  # None: not finite (see bnfold.quantize.gate.to_dict)


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
