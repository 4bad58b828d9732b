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
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from .demo_images import write_images
from .pipeline import JobOptions, recalibrate_files
from .preprocess import PreprocessSpec, write_spec
from .recalibrate import recalibrate
from .report import RECOMMENDED_MIN_SAMPLES, Report

EPS = 1e-5
N_SOURCE_TRAIN, N_SOURCE_TEST, N_CALIBRATION = 800, 300, 400  # the remaining 297 digits: new-lab evaluation
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


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Digits as images ``(1797, 1, 8, 8)`` float32 in [0, 1] and labels ``(1797,)`` int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return (digits.images[:, None] / 16.0).astype(np.float32), digits.target.astype(np.int64)


def make_new_lab(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same digits as another lab's scanner records them: ``(N, 1, 8, 8)`` → same shape, float32.

    Under-exposed (30 % of the source contrast), slightly out of focus (3×3 blur) and noisier
    (sensor noise σ = 0.02), clipped to the sensor range [0, 1]. To the network this is mostly a
    per-channel rescaling of its activations — what fresh BN statistics undo — while the lost
    detail and the noise are not, so recalibration helps a lot but does not reach source accuracy.
    """
    x = images.astype(np.float64)
    kernel = np.array([0.2, 0.6, 0.2])  # separable blur; edge padding keeps the borders dark
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    x = sum(k * padded[:, :, i : i + 8, :] for i, k in enumerate(kernel))
    padded = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1)), mode="edge")
    x = sum(k * padded[:, :, :, i : i + 8] for i, k in enumerate(kernel))
    x = 0.3 * x + rng.normal(0.0, 0.02, size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _conv(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """NumPy Conv with pad 1, no bias: ``(N, C, H, W)``, ``(K, C, 3, 3)`` → ``(N, K, H', W')`` float64."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    return np.einsum("nchwij,kcij->nkhw", windows[:, :, ::stride, ::stride], w, optimize=True)


def _bn_relu(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel population statistics of ``x`` ``(N, C, H, W)``, and ReLU(BN(x)) with them."""
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    y = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + EPS)
    return np.maximum(y, 0.0), mean, var


def build_demo_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The source-lab model and the data split.

    Returns the model — input ``"image"`` ``(N, 1, 8, 8)`` float32, output ``"logits"`` ``(N, 10)``:
    Conv(1→16, 3×3, pad 1) → BN → Relu → Conv(16→32, 3×3, stride 2, pad 1) → BN → Relu → Flatten → Gemm
    — and a dict of the split: ``source_train/source_test/new_lab`` images (float32, unshifted) and
    their ``*_labels`` (int64). Splits are disjoint and drawn with ``seed``.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    rng = np.random.default_rng(seed)
    images, labels = load_digits_images()
    order = rng.permutation(len(images))
    cuts = np.split(order, [N_SOURCE_TRAIN, N_SOURCE_TRAIN + N_SOURCE_TEST])
    split = {}
    for name, idx in zip(("source_train", "source_test", "new_lab"), cuts):
        split[name], split[name + "_labels"] = images[idx], labels[idx]

    # Random He-initialised filters: a fixed feature extractor; only the statistics and head are fitted.
    w1 = rng.normal(0.0, np.sqrt(2 / 9), size=(16, 1, 3, 3))
    w2 = rng.normal(0.0, np.sqrt(2 / 144), size=(32, 16, 3, 3))
    # BN statistics of the source lab, measured over the whole training split (what training leaves behind).
    h1, *stats1 = _bn_relu(_conv(split["source_train"].astype(np.float64), w1, stride=1))
    h2, *stats2 = _bn_relu(_conv(h1, w2, stride=2))
    # One BLAS thread: on a small shared CPU, multi-threaded BLAS on these tiny matrices spin-waits
    # and turns a 0.1 s fit into several seconds.
    with threadpool_limits(limits=1, user_api="blas"):
        head = LogisticRegression(C=0.1, max_iter=2000).fit(h2.reshape(len(h2), -1), split["source_train_labels"])

    params = {"conv1.weight": w1, "conv2.weight": w2, "fc.weight": head.coef_, "fc.bias": head.intercept_}
    for i, (mean, var) in ((1, stats1), (2, stats2)):
        params |= {f"bn{i}.scale": np.ones_like(mean), f"bn{i}.bias": np.zeros_like(mean), f"bn{i}.mean": mean, f"bn{i}.var": var}

    def bn(i: int) -> onnx.NodeProto:
        inputs = [f"conv{i}"] + [f"bn{i}.{p}" for p in ("scale", "bias", "mean", "var")]
        return helper.make_node("BatchNormalization", inputs, [f"bn{i}"], name=f"bn{i}", epsilon=EPS)

    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight"], ["conv1"], name="conv1", **conv),
        bn(1),
        helper.make_node("Relu", ["bn1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "conv2.weight"], ["conv2"], name="conv2", strides=[2, 2], **conv),
        bn(2),
        helper.make_node("Relu", ["bn2"], ["relu2"], name="relu2"),
        helper.make_node("Flatten", ["relu2"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "bnfold_demo_digits",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold.demo")
    model.ir_version = 8  # readable by any onnxruntime ≥ 1.11
    onnx.checker.check_model(model, full_check=True)
    return model, split


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (one float32 image input) on ``images`` ``(N, 1, 8, 8)``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny model; threads would only add overhead on a shared CPU
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float((logits.argmax(axis=1) == labels).mean())


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
    if report.warnings and report.samples < RECOMMENDED_MIN_SAMPLES:
        # Expected here: digits has only 1797 images. Spatial positions pool into each channel, so the
        # statistics are still well determined (in this demo, 50 images already give the same accuracy).
        fewest = min(layer.count for layer in report.layers)
        console.print(f"[dim](expected: the digits data set is small; each channel still pools ≥ {fewest:,} values)[/dim]")

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
