"""`bnfold demo`: a self-contained before/after story on scikit-learn's bundled digits.

1. *Source lab*: a small CNN with BatchNorm, built without any deep-learning framework. Its conv
   filters are random (seeded) — a fixed random feature extractor — its BN layers hold the
   statistics measured on the source training images (scale 1, bias 0, so BN standardises), and
   its last layer is a logistic regression trained on the resulting features.
2. *New lab*: held-out digits as another lab's scanner records them — under-exposed, slightly
   out of focus, noisier. The labels of this lab are used only to score.
3. `bnfold.recalibrate` re-measures the BN statistics on unlabeled new-lab images; we report
   accuracy on *other* new-lab images before and after.
4. The same, as a lab hands data over: the calibration images as 8-bit PNG files, read with the
   preprocessing spec the model carries (grey, ×1/255, NCHW), recalibrated, folded and verified by
   `bnfold.pipeline.recalibrate_files` — what `bnfold recalibrate model.onnx folder/` does.
   Needs Pillow (extra "images"); without it this step is skipped with a note.

Everything is deterministic given ``seed``, runs offline in a few seconds, and needs only
numpy, onnx, onnxruntime, scikit-learn and rich (and Pillow for the image step).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from bnfold.demo.images import write_images
from bnfold.demo.lab import N_CALIBRATION, accuracy, build_demo_model, make_new_lab
from bnfold.engine.recalibrate import recalibrate
from bnfold.inputs.preprocess import PreprocessSpec, write_spec
from bnfold.pipeline import JobOptions, recalibrate_files
from bnfold.report import Report

# How the lab's 8-bit grey image files become the model's input: pixel / 255 gives the [0, 1] range the
# model was built on (8-bit quantisation aside), one channel, NCHW. Carried in model.onnx's metadata.
IMAGE_SPEC = PreprocessSpec(color="grey", scale=1 / 255, layout="NCHW")


@dataclasses.dataclass
class DemoResult:
    """Accuracies are fractions in [0, 1] measured with onnxruntime on the saved models."""

    source_accuracy: float  # source model on the source test split
    before_accuracy: float  # source model (source BN statistics) on new-lab evaluation images
    after_accuracy: float  # recalibrated model on the same new-lab evaluation images
    calibration_samples: int
    evaluation_samples: int
    model_path: Path
    samples_path: Path
    recalibrated_path: Path
    report_path: Path
    # The image step (None when Pillow is missing): the calibration set as PNG files, and the model
    # recalibrated from them, folded (no BN left) and verified, scored on the same evaluation images.
    images_path: Path | None = None
    from_images_path: Path | None = None
    from_images_accuracy: float | None = None
    from_images_fold: dict | None = None  # report.extra["fold"] and ["verification"] of that job
    from_images_verification: dict | None = None


def run_demo(out_dir: Path, *, seed: int = 0, console: Console | None = None) -> DemoResult:
    """Build, shift, recalibrate, score; write model.onnx (carrying `IMAGE_SPEC`), samples.npy,
    recalibrated.onnx, report.json to ``out_dir``; then, with Pillow, new-lab-images/ (the calibration
    set as PNG) and recalibrated-from-images.onnx (recalibrated from them, folded and verified)."""
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])  # independent of the stream that built the model

    model, split = build_demo_model(seed)
    new_lab = make_new_lab(split["new_lab"], rng)
    # The new lab's images split into what a user has (unlabeled, for calibration) and an honest
    # held-out set that only scores — never seen by recalibration.
    calibration, evaluation = new_lab[:N_CALIBRATION], new_lab[N_CALIBRATION:]
    evaluation_labels = split["new_lab_labels"][N_CALIBRATION:]

    paths = {name: out_dir / name for name in ("model.onnx", "samples.npy", "recalibrated.onnx", "report.json")}
    write_spec(model, IMAGE_SPEC)
    onnx.save(model, paths["model.onnx"])
    np.save(paths["samples.npy"], calibration)
    result = recalibrate(model, calibration)
    onnx.save(result.model, paths["recalibrated.onnx"])
    paths["report.json"].write_text(result.report.to_json())

    demo = DemoResult(
        source_accuracy=accuracy(model, split["source_test"], split["source_test_labels"]),
        before_accuracy=accuracy(model, evaluation, evaluation_labels),
        after_accuracy=accuracy(result.model, evaluation, evaluation_labels),
        calibration_samples=len(calibration),
        evaluation_samples=len(evaluation),
        model_path=paths["model.onnx"],
        samples_path=paths["samples.npy"],
        recalibrated_path=paths["recalibrated.onnx"],
        report_path=paths["report.json"],
    )
    _print(console, demo, result.report)
    _from_images(console, demo, calibration, evaluation, evaluation_labels)
    return demo


def _from_images(console: Console, demo: DemoResult, calibration: np.ndarray, evaluation: np.ndarray,
                 evaluation_labels: np.ndarray) -> None:
    """Write the calibration set as PNG, recalibrate model.onnx from the folder (fold on), score, print."""
    try:
        import PIL  # noqa: F401  (the "images" extra)
    except ImportError:
        console.print("\n[dim](skipped recalibrating from image files: needs Pillow — pip install 'bnfold\\[images]')[/dim]")
        return
    out_dir = demo.model_path.parent
    folder, target = out_dir / "new-lab-images", out_dir / "recalibrated-from-images.onnx"
    write_images(calibration, folder, fmt="png", prefix="digit")  # 8-bit grey: round(x·255)
    job = recalibrate_files(demo.model_path, folder, JobOptions(fold=True))
    onnx.save(job.model, target)
    demo.images_path, demo.from_images_path = folder, target
    demo.from_images_accuracy = accuracy(job.model, evaluation, evaluation_labels)
    demo.from_images_fold = job.report.extra.get("fold")
    demo.from_images_verification = job.report.extra.get("verification")

    verification = demo.from_images_verification or {}
    worst = max((o["max_abs"] for o in verification.get("outputs", [])), default=0.0)
    left = sum(node.op_type == "BatchNormalization" for node in job.model.graph.node)
    folded = "folded: no BatchNormalization left" if not left else f"{left} BatchNormalization node(s) left unfolded"
    console.print(
        f"\n[bold]From image files[/bold], as a lab hands them over: the same {demo.calibration_samples} images as 8-bit PNG,\n"
        "read with the preprocessing spec model.onnx carries (grey, ×1/255, NCHW), recalibrated, then\n"
        f"BatchNorm folded into the convolutions and verified against the unfolded model (max |Δ| = {worst:.3g}).\n"
        f"  new lab, recalibrated from PNG files  [bold green]{demo.from_images_accuracy:6.1%}[/bold green]"
        f"  ({folded})\n"
        "\nFiles written:\n"
        f"  {folder}{os.sep}  ({demo.calibration_samples} PNG files)\n"
        f"  {target}\n"
        "\nThe same from the command line:\n"
        f"  bnfold recalibrate {demo.model_path} {folder} -o {target}",
        soft_wrap=True,
    )


def _print(console: Console, demo: DemoResult, report: Report) -> None:
    console.print(
        "[bold]bnfold demo[/bold]: a digit classifier trained in one lab, used with another lab's scanner "
        "(under-exposed, slightly blurred, noisier).\n"
        f"Recalibrating its BatchNorm statistics on {demo.calibration_samples} unlabeled new-lab images; "
        f"scoring on {demo.evaluation_samples} other, labeled ones.\n"
    )
    table = Table(title="How the new lab moved each BatchNorm layer's input")
    table.add_column("BN layer")
    table.add_column("channels", justify="right")
    table.add_column("mean shift", justify="right")  # |μ_new − μ_old| / σ_old, mean over channels
    table.add_column("max shift", justify="right")
    table.add_column("var ratio", justify="right")  # var_new / var_old, geometric mean
    table.add_column("KL", justify="right")  # KL(new ‖ old) in nats, mean over channels
    for layer in report.layers:
        s = layer.shift
        table.add_row(
            layer.name, str(layer.channels), f"{s.mean_shift:.2f} σ", f"{s.max_mean_shift:.2f} σ",
            f"{s.var_ratio:.2f}", f"{s.kl:.2f}",
        )
    console.print(table)
    layer_warnings = [f"{layer.name}: {w}" for layer in report.layers for w in layer.warnings]
    for warning in dict.fromkeys(report.warnings + layer_warnings):  # de-duplicated, in order
        console.print(f"[yellow]warning:[/yellow] {warning}")
    enough = "enough" if report.samples_sufficient else "too few"
    console.print(f"[dim]{report.samples} samples: {enough} for standard errors ≤ 2 % of σ; "
                  f"about {report.samples_recommended} recommended (estimated from how the images differ)[/dim]")

    gain = 100 * (demo.after_accuracy - demo.before_accuracy)
    console.print(
        "\n[bold]Accuracy[/bold]\n"
        f"  source lab, its own test images       {demo.source_accuracy:6.1%}\n"
        f"  new lab, source BN statistics         [bold red]{demo.before_accuracy:6.1%}[/bold red]\n"
        f"  new lab, recalibrated BN statistics   [bold green]{demo.after_accuracy:6.1%}[/bold green]"
        f"  ({gain:+.1f} points, no labels used)\n"
    )
    console.print("Files written:")
    for path in (demo.model_path, demo.samples_path, demo.recalibrated_path, demo.report_path):
        console.print(f"  {path}")
    d = demo.model_path.parent
    console.print(
        "\nThe same recalibration from the command line:\n"
        f"  bnfold recalibrate {d / 'model.onnx'} {d / 'samples.npy'} -o {d / 'recalibrated.onnx'} --report {d / 'report.json'}",
        soft_wrap=True,
    )
