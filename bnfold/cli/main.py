"""The `bnfold` command line: recalibrate (and fold) a model on a laptop, no server needed.

Every failure a user can cause ends in one readable line on stderr and a non-zero exit status:
1 for bad input (`BnfoldError`), 70 for a bug in bnfold (with a request to report it).
Outputs are written to a temporary file next to the target and renamed into place, so an
interrupted run never leaves a truncated model behind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from bnfold import __version__
from bnfold.cli.output import (
    EXIT_BAD_INPUT,
    check_writable,
    err,
    errors_to_exit,
    float_kept,
    out,
    print_fold,
    print_summary,
    progress_bar,
    write_outputs,
)
from bnfold.cli.remote import jobs_app
from bnfold.errors import InvalidOptions
from bnfold.pipeline import DEFAULT_BATCH_SIZE, JobOptions, fold_file, recalibrate_files
from bnfold.quantize import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_COSINE

app = typer.Typer(
    help="Recalibrate BatchNorm statistics of ONNX models on a new domain, exactly, and fold BN away.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(jobs_app, name="jobs")


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


# the image flags of `recalibrate` and `fold` (for its image --samples)
Resize = Annotated[Optional[str], _image_option("--resize", "Shorter side (256) or exact HxW (224x320).")]
Crop = Annotated[Optional[str], _image_option("--crop", "Center crop: 224 or HxW; zero-pads if larger.")]
Color = Annotated[Optional[str], _image_option("--color", "rgb, grey or keep (the decoded channels).")]
Channels = Annotated[Optional[str], _image_option("--channels", "Channels to keep, in order, e.g. 2,1,0 for BGR.")]
Scale = Annotated[Optional[str], _image_option("--scale", "Pixel multiplier: auto (1/255, 1/65535 by depth), 1/255, 0.5 ...")]
Mean = Annotated[Optional[str], _image_option("--mean", "Per-channel mean after scaling, e.g. 0.485,0.456,0.406.")]
Std = Annotated[Optional[str], _image_option("--std", "Per-channel std, e.g. 0.229,0.224,0.225.")]
Layout = Annotated[Optional[str], _image_option("--layout", "NCHW or NHWC.")]
Interpolation = Annotated[Optional[str], _image_option("--interpolation", "bilinear (default), nearest, bicubic, box, hamming, lanczos.")]


def _int8_option(name: str, help: str):
    return typer.Option(name, help=help, rich_help_panel="INT8 quantization")


def _trust_option(name: str, help: str):
    return typer.Option(name, help=help, rich_help_panel="Can I trust it? (prior, labelled check, HTML page)")


def _fold_option(name: str, help: str):
    return typer.Option(name, help=help, rich_help_panel="Folding and verification")


VerifySamples = Annotated[int, _fold_option("--verify-samples", "Samples the folded model is compared with the unfolded one "
                                            "on (0: random inputs at the scale the model implies).")]
Rtol = Annotated[Optional[float], _fold_option("--rtol", "Verification passes when max |Δ| ≤ atol + rtol·max |y| per output "
                                               "(default: from the float type, 1.2e-4 for float32).")]
Atol = Annotated[Optional[float], _fold_option("--atol", "Absolute part of the verification tolerance (default: rtol·2^-10).")]
Unfoldable = Annotated[str, _fold_option("--unfoldable", "A BN with no exact linear neighbour: keep it as BatchNormalization, "
                                         "or write it as Mul + Add (affine) for runtimes without BN.")]


@app.command("recalibrate")
def recalibrate_command(
    model: Annotated[Path, typer.Argument(help="ONNX model with BatchNormalization nodes.")],
    samples: Annotated[Path, typer.Argument(help=".npy (single-input models), .npz (one array per input name), or a folder / "
                                               ".zip / .tar(.gz) of PNG, JPEG, BMP or TIFF images.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the recalibrated model.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per inference call (≥ 1).")] = DEFAULT_BATCH_SIZE,
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="RAM for tensors kept between BN levels (e.g. 512MiB, 2GiB; auto: half the RAM "
                                                   "available, cgroup limits included); the rest spills to disk.")
    ] = "auto",
    providers: Annotated[Optional[str], typer.Option(
        "--providers", help="ONNX Runtime execution providers, comma-separated in order of preference "
                            "(e.g. CUDAExecutionProvider,CPUExecutionProvider); default CPU.")] = None,
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold BN into neighbouring layers (--no-fold: only BN mean/var change).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    server: Annotated[Optional[str], typer.Option(
        "--server", help="Run the job on a bnfold service at this URL (API key from BNFOLD_API_KEY; needs the 'client' "
                         "extra) instead of here: same outputs; --memory-budget is then the server's.")] = None,
    preprocess: Annotated[Optional[Path], _image_option("--preprocess", "JSON preprocessing spec; the flags below override its fields, "
                                                        "which override the spec the model carries.")] = None,
    resize: Resize = None,
    crop: Crop = None,
    color: Color = None,
    channels: Channels = None,
    scale: Scale = None,
    mean: Mean = None,
    std: Std = None,
    layout: Layout = None,
    interpolation: Interpolation = None,
    on_bad_image: Annotated[str, _image_option("--on-bad-image", "fail on an unreadable or mismatched image, or skip it (listed in the report).")] = "fail",
    verify_samples: VerifySamples = 32,
    rtol: Rtol = None,
    atol: Atol = None,
    unfoldable: Unfoldable = "keep",
    quantize: Annotated[Optional[str], _int8_option("--quantize", "int8: after folding, quantize statically (ONNX Runtime QDQ, "
                                                   "per-channel weights), calibrated on the same samples.")] = None,
    quantize_method: Annotated[str, _int8_option("--quantize-method", "Calibration: minmax, entropy or percentile.")] = "minmax",
    min_agreement: Annotated[float, _int8_option("--min-agreement", "Refuse the INT8 model below this top-1 agreement with "
                                                "the float model (classifier-like outputs).")] = DEFAULT_MIN_AGREEMENT,
    min_cosine: Annotated[float, _int8_option("--min-cosine", "Refuse the INT8 model below this cosine similarity to the "
                                             "float model's outputs.")] = DEFAULT_MIN_COSINE,
    float_output: Annotated[Optional[Path], _int8_option("--float-output", "Also write the float (recalibrated, folded) "
                                                        "model here, even when the INT8 model is refused.")] = None,
    prior: Annotated[float, _trust_option("--prior", "Mix the model's own statistics in with this weight, in samples "
                                          "(Schneider et al. 2020): helps mild shifts with very few samples, hurts severe "
                                          "shifts. 0: off.")] = 0.0,
    check_samples: Annotated[Optional[Path], _trust_option("--check-samples", "A few labelled samples (.npy/.npz) to score "
                                                           "the model on before and after.")] = None,
    check_labels: Annotated[Optional[Path], _trust_option("--check-labels", ".npy of class indices (N,) or masks (N, H, W) "
                                                          "for --check-samples; a worse score refuses the result.")] = None,
    allow_worse: Annotated[bool, _trust_option("--allow-worse", "Write the result even when the labelled check got "
                                               "worse.")] = False,
    report_html: Annotated[Optional[Path], _trust_option("--report-html", "Write a self-contained HTML page of the "
                                                         "report here (needs the 'report' extra).")] = None,
) -> None:
    """Recompute every BN's population mean/var on unlabeled samples of the new domain."""
    with errors_to_exit():
        from bnfold.inputs.preprocess import overrides_from_text

        spec = overrides_from_text(
            None if preprocess is None else str(preprocess), resize=resize, center_crop=crop, color=color, channels=channels,
            scale=scale, mean=mean, std=std, layout=layout, interpolation=interpolation)
        options = JobOptions(fold=fold, batch_size=batch_size, memory_budget=parse_bytes(memory_budget),
                             preprocess=spec, on_bad_image=on_bad_image, verify_samples=verify_samples, rtol=rtol,
                             atol=atol, unfoldable=unfoldable, quantize=quantize,
                             quantize_method=quantize_method, min_agreement=min_agreement, min_cosine=min_cosine,
                             prior=prior, allow_worse=allow_worse,
                             providers=None if providers is None else tuple(providers.split(",")))
        check_writable(output, report, float_output, report_html)
        if float_output is not None and (not quantize or server is not None):
            raise InvalidOptions("--float-output goes with --quantize int8, run here (not with --server)")
        check = {"check_samples": check_samples, "check_labels": check_labels}
        if server is not None:
            from bnfold.cli.remote import recalibrate_remote

            job = recalibrate_remote(server, model, samples, options, quiet, **check)
        else:
            with progress_bar(quiet) as callback, float_kept(float_output) as keep:
                job = recalibrate_files(model, samples, options, progress=callback, **check)
                keep.written(job)
        write_outputs(output, job, report, report_html)
        if not quiet:
            print_summary(job.report, output, report)


@app.command("fold")
def fold_command(
    model: Annotated[Path, typer.Argument(help="ONNX model with BatchNormalization nodes.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the folded model.")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
    samples: Annotated[Optional[Path], _fold_option(
        "--samples", "Verify on these samples (.npy, .npz, or a folder / archive of images, preprocessed by the spec the "
                     "model carries or --preprocess) instead of random inputs.")] = None,
    verify_samples: VerifySamples = 32,
    rtol: Rtol = None,
    atol: Atol = None,
    unfoldable: Unfoldable = "keep",
    preprocess: Annotated[Optional[Path], _image_option("--preprocess", "JSON preprocessing spec for image --samples; the flags "
                                                        "below override its fields, which override the spec the model carries.")] = None,
    resize: Resize = None,
    crop: Crop = None,
    color: Color = None,
    channels: Channels = None,
    scale: Scale = None,
    mean: Mean = None,
    std: Std = None,
    layout: Layout = None,
    interpolation: Interpolation = None,
) -> None:
    """Fold BN into neighbouring layers without recalibrating (verified on --samples, else on random inputs
    at the scale the model's BN statistics imply)."""
    with errors_to_exit():
        from bnfold.inputs.preprocess import overrides_from_text

        spec = overrides_from_text(
            None if preprocess is None else str(preprocess), resize=resize, center_crop=crop, color=color, channels=channels,
            scale=scale, mean=mean, std=std, layout=layout, interpolation=interpolation)
        options = JobOptions(verify_samples=verify_samples, rtol=rtol, atol=atol, unfoldable=unfoldable, preprocess=spec)
        check_writable(output, report)
        job = fold_file(model, options, samples)
        write_outputs(output, job, report)
        if not quiet:
            print_fold(job.report)
            out.print(f"wrote {output}")


def parse_bytes(text: str) -> int | None:
    """'2GiB', '512MiB', '100MB', '0' → bytes; 'auto' → None (sized from the RAM available)."""
    if text.strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*((?:[KMGT]i?)?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise InvalidOptions(f"cannot read memory budget '{text}': use e.g. 512MiB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * scale[unit])


@app.command("demo")
def demo_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the demo's files.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Build a small BN model and 'new lab' samples, recalibrate, and show the accuracy recovered."""
    with errors_to_exit():
        from bnfold.demo.run import run_demo

        out_dir.mkdir(parents=True, exist_ok=True)
        run_demo(out_dir, seed=seed, console=out)


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="Address to bind; without BNFOLD_API_KEYS only loopback is allowed.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    on_data_error: Annotated[str, typer.Option(
        "--on-data-error", help="When BNFOLD_DATA_DIR is not writable: 'exit' (status 78), or 'wait': say so once, "
                                "then wait for SIGTERM and exit 78 (the image does, so a restart policy does not loop).",
    )] = "exit",
) -> None:
    """Run the HTTP jobs API (needs the 'service' extra). Configured by BNFOLD_* variables; see service/README.md."""
    if on_data_error not in ("exit", "wait"):
        err.print(f"[bold red]error:[/] --on-data-error must be 'exit' or 'wait', not {on_data_error!r}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        from service.core.config import ConfigError
        from service.main import DataDirError, serve
    except ImportError as exc:
        err.print(f"[bold red]error:[/] cannot start the service ({exc}); install it with: pip install 'bnfold\\[service]'",
                  highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    from pydantic import ValidationError

    try:
        serve(host, port)
    except DataDirError as exc:
        from rich.markup import escape

        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        if on_data_error == "wait":
            _wait_for_stop()
        raise typer.Exit(EXIT_DATA_DIR)
    except (ConfigError, ValidationError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)



EXIT_DATA_DIR = 78  # EX_CONFIG: the data directory cannot be used; distinct from bad options (1)


def _wait_for_stop() -> None:
    """Block until SIGTERM or SIGINT. Why: under a restart policy (compose `restart: unless-stopped`),
    exiting would restart the container into the same error forever; waiting leaves one error line
    in the log and a container that its healthcheck reports unhealthy until someone fixes the volume."""
    import signal

    err.print("waiting for SIGTERM (docker stop) so that a restart policy does not repeat this", highlight=False)
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    signal.sigwait(stops)
