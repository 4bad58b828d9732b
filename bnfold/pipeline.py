"""The whole job on files, as the CLI and the service run it: recalibrate → fold → verify → stamp.

Pure core: takes paths/bytes and options, returns a ModelProto and a Report; no printing, no HTTP.
With ``fold=False`` the returned model differs from the input *only* in BN mean/var values (no
provenance is written either), so it can be diffed against the source — except that a BN whose
parameters the exporter shared or computed from constants gets its own copies (`engine.parameters`).
With folding, the folded model is checked against the unfolded recalibrated one on a subset of the
samples (random inputs at the scale the model implies when there are none: `bnfold.folding.probe`),
and refused (`VerificationFailed`) when they disagree; provenance goes into metadata_props.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold import provenance
from bnfold.engine.recalibrate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MEMORY_BUDGET,
    Progress,
    check_providers,
    recalibratable_batchnorms,
    recalibrate,
)
from bnfold.errors import InvalidOptions, InvalidSamples, QuantizationRefused
from bnfold.folding.fold import UNFOLDABLE, fold_batchnorms
from bnfold.folding.verify import check_equivalent
from bnfold.inputs.arrays import iter_batches, load_samples, model_inputs
from bnfold.inputs.model import load_model, read_model_bytes
from bnfold.quantize import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_COSINE,
    Int8Options,
    check_quantizable,
    quantize_int8,
)
from bnfold.report import Report
from bnfold.trust.check import labelled_check, load_check
from bnfold.trust.signals import SIGNAL_SAMPLES, label_free

if TYPE_CHECKING:  # the image extra (Pillow, tifffile, pydantic) is imported only when images are given
    from bnfold.inputs.images import ImageLimits, ImageSamples


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """fold: fold BN away after recalibration. batch_size: samples per ORT call.
    memory_budget: bytes of cut tensors kept in RAM (None: half the RAM available). verify_samples: samples of the set used to
    compare folded vs unfolded (0: random inputs at the scale the model implies). rtol/atol:
    verification tolerance (None: derived from the model's float type). unfoldable: a BN with no
    exact linear neighbour is kept as BatchNormalization ('keep') or becomes Mul + Add ('affine').
    Image samples (folders/archives, `bnfold.images`): preprocess: a `PreprocessSpec`, or a dict of its fields overriding the spec the model carries;
    on_bad_image: 'fail' or 'skip' an unreadable/mismatched image; image_limits: decoding bounds.
    Where and how fast, never what (kept out of the provenance): spill_dir: folder for the cut
    tensors beyond memory_budget (None: the system's temporary folder); threads: ONNX Runtime
    intra-op threads for recalibration and verification (0: one per core); disk_budget: bytes the spilled
    tensors may take on disk (None: unbounded; past it `DiskBudgetExceeded`); providers: ONNX Runtime
    execution providers for recalibration and verification, in order of preference (None: CPU).
    INT8 (`bnfold.quantize`): quantize: None, or 'int8' to quantize the folded model statically,
    calibrated on the same samples (needs fold); quantize_method: 'minmax', 'entropy' or 'percentile';
    min_agreement / min_cosine: the agreement gate's thresholds (top-1 agreement of classifier-like
    outputs, cosine similarity of every float output) below which the INT8 model is refused.
    memory_budget also bounds the samples kept in RAM between calibration and the gate; the INT8
    step's temporary files go to spill_dir.
    prior: source-prior weight in samples (`bnfold.engine.prior`; 0: off). allow_worse: keep an
    adaptation that lowers the labelled check metric (default: refuse it, `AdaptationWorse`)."""

    fold: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    memory_budget: int | None = DEFAULT_MEMORY_BUDGET
    verify_samples: int = 32
    rtol: float | None = None
    atol: float | None = None
    unfoldable: str = "keep"
    preprocess: Mapping[str, Any] | None = None
    on_bad_image: str = "fail"
    image_limits: ImageLimits | None = None
    spill_dir: str | os.PathLike | None = None
    threads: int = 0
    disk_budget: int | None = None
    quantize: str | None = None
    quantize_method: str = "minmax"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    min_cosine: float = DEFAULT_MIN_COSINE
    prior: float = 0.0
    allow_worse: bool = False
    providers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._check_quantize()
        from bnfold.engine.prior import check_prior

        try:
            check_prior(self.prior)
        except InvalidOptions as exc:
            exc.field = "options.prior"  # (the default instance is made before _naming exists)
            raise
        if self.on_bad_image not in ("fail", "skip"):
            raise _on_field(InvalidOptions(f"on_bad_image must be 'fail' or 'skip', got {self.on_bad_image!r}"),
                            "options.on_bad_image")
        if self.unfoldable not in UNFOLDABLE:
            raise _on_field(InvalidOptions(f"unfoldable must be one of {', '.join(UNFOLDABLE)}, got {self.unfoldable!r}"),
                            "options.unfoldable")
        if self.preprocess is not None:
            from bnfold.inputs.preprocess import PreprocessSpec, check_overrides

            whole = isinstance(self.preprocess, PreprocessSpec)  # kept as plain JSON data (provenance, service)
            with _naming("options.preprocess"):
                plain = self.preprocess.model_dump(mode="json") if whole else check_overrides(self.preprocess)
            object.__setattr__(self, "preprocess", plain)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise InvalidOptions(f"threads must be an integer ≥ 0 (0: one per core), got {self.threads!r}")
        if self.batch_size < 1:
            raise InvalidOptions(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.providers is not None:
            object.__setattr__(self, "providers", check_providers(self.providers))
        if self.memory_budget is not None and self.memory_budget < 0:
            raise InvalidOptions(f"memory_budget must be ≥ 0 bytes, got {self.memory_budget}")
        if self.verify_samples < 0:
            raise InvalidOptions(f"verify_samples must be ≥ 0, got {self.verify_samples}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and np.isfinite(value)):
                raise InvalidOptions(f"{name} must be a finite number ≥ 0, got {value}")


    def _check_quantize(self) -> None:
        if self.quantize not in (None, "int8"):
            raise _on_field(InvalidOptions(f"quantize must be 'int8' or absent, got {self.quantize!r}"), "options.quantize")
        if self.quantize and not self.fold:
            raise _on_field(InvalidOptions("quantize needs fold: BN is folded first so that the quantizer sees the "
                                           "final weights; drop --no-fold (fold: false)"), "options.quantize")
        for name in ("quantize_method", "min_agreement", "min_cosine"):
            try:
                Int8Options(**{name.removeprefix("quantize_"): getattr(self, name)})
            except InvalidOptions as exc:  # (_naming is defined below; JobOptions() runs at import)
                raise _on_field(exc, f"options.{name}") from None

    def int8_options(self) -> Int8Options:
        # memory_budget None (sized from the RAM at run time) leaves the INT8 step its own default
        budget = {} if self.memory_budget is None else {"keep_bytes": self.memory_budget}
        return Int8Options(method=self.quantize_method, min_agreement=self.min_agreement, min_cosine=self.min_cosine,
                           batch_size=self.batch_size, threads=self.threads, **budget)


@dataclasses.dataclass
class JobOutput:
    """model: the result. float_model: with quantize, the float (recalibrated, folded) model as well."""

    model: onnx.ModelProto
    report: Report
    float_model: onnx.ModelProto | None = None


def recalibrate_files(
    model_source: str | os.PathLike | bytes,
    samples_path: str | os.PathLike,
    options: JobOptions = JobOptions(),
    progress: Progress | None = None,
    check_samples: str | os.PathLike | None = None,
    check_labels: str | os.PathLike | None = None,
) -> JobOutput:
    """Recalibrate (and by default fold and verify) a model file on a .npy/.npz samples file, or on
    a folder / .zip / .tar(.gz) of images preprocessed by `options.preprocess` or the model's spec.
    check_samples/check_labels: a labelled check set (`bnfold.trust.check`), scored before and after;
    an adaptation that scores worse raises `AdaptationWorse` unless `options.allow_worse`.
    report.timings gains the job's own steps (seconds): "signals" (did it help), "fold_and_verify",
    "quantize", and "job", the whole call from reading the model to stamping the result; "total"
    stays the recalibration's."""
    started = time.perf_counter()
    data = _read_bytes(model_source)
    model = load_model(data)
    check = _load_check(check_samples, check_labels)
    images, origin = _image_samples(model, samples_path, options)
    samples = images if images is not None else load_samples(samples_path)
    try:
        result = recalibrate(
            model, samples, batch_size=options.batch_size, memory_budget=options.memory_budget,
            spill_dir=None if options.spill_dir is None else os.fspath(options.spill_dir), threads=options.threads,
            disk_budget=options.disk_budget, providers=options.providers,
            progress=progress, prior=options.prior, head_samples=SIGNAL_SAMPLES, checked=True,
        )
        if images is not None:
            result.report.extra["images"] = images.report() | {"spec_origin": origin}
        # One read (for images: one decode) of the first samples serves the signals and the verification.
        wanted = max(SIGNAL_SAMPLES, options.verify_samples if options.fold else 0)
        head = images.first(wanted) if images is not None else _first(samples, wanted)
        tick = time.perf_counter()
        _did_it_help(model, data, result, _first(head, SIGNAL_SAMPLES), check, options)
        result.report.timings["signals"] = time.perf_counter() - tick
        if not options.fold:
            result.report.timings["job"] = time.perf_counter() - started
            return JobOutput(result.model, result.report)
        tick = time.perf_counter()
        final = _fold_and_verify(result.model, result.report, _first(head, options.verify_samples), options)
        result.report.timings["fold_and_verify"] = time.perf_counter() - tick
        samples_sha256 = images.sha256 if images is not None else _file_sha256(samples_path)  # before another pass

        def stamp(target: onnx.ModelProto, stamped_options: JobOptions) -> None:
            _stamp(
                target,
                # the folded model keeps the preprocessing its statistics were measured with
                images.spec.to_json() if images is not None else _carried_spec(model),
                source_sha256=provenance.sha256_bytes(data),
                samples=result.report.samples,
                samples_sha256=samples_sha256,
                options=_provenance_options(stamped_options),
            )

        float_model = None
        if options.quantize:
            float_model = final
            stamp(float_model, dataclasses.replace(options, quantize=None))  # as the job without quantize makes it
            if progress is not None:
                progress("quantizing to INT8", 1.0)
            final = _quantize(final, images if images is not None else samples, result.report, options)
    finally:
        if images is not None:
            images.close()
    stamp(final, options)
    result.report.timings["job"] = time.perf_counter() - started
    return JobOutput(final, result.report, float_model)


def _load_check(samples_path, labels_path):
    if (samples_path is None) != (labels_path is None):
        raise InvalidOptions("give both check samples and check labels (or neither)")
    return None if samples_path is None else load_check(samples_path, labels_path)


def _did_it_help(model: onnx.ModelProto, data: bytes, result, signal_samples, check, options: JobOptions) -> None:
    """Label-free signals on the first samples; the labelled check (may refuse, before anything is written).
    data: `model`'s bytes as read."""
    report = result.report
    report.signals = label_free(model, result.model, signal_samples, options.batch_size, options.threads,
                                after=result.outputs, original_bytes=data)
    if check is not None:
        report.check = labelled_check(model, result.model, *check, options.batch_size, options.allow_worse,
                                      options.threads)


def _image_samples(model: onnx.ModelProto, path, options: JobOptions) -> tuple[ImageSamples | None, str | None]:
    """ImageSamples when `path` is a folder/archive of images (by content); the spec's origin."""
    from bnfold.inputs.image_sources import is_image_source

    if not is_image_source(path):
        if options.preprocess is not None:
            raise _on_field(InvalidOptions("preprocessing options apply to image samples (a folder or archive of "
                                           f"images), but {os.fspath(path)} holds arrays: drop them or give images"),
                            "options.preprocess")
        return None, None
    from bnfold.inputs.images import ImageLimits, ImageSamples
    from bnfold.inputs.preprocess import resolve_spec

    with _naming("options.preprocess"):
        spec, origin = resolve_spec(model, options.preprocess)
    (first_input, *others) = model_inputs(model)
    if others:
        raise InvalidSamples(f"the model has {1 + len(others)} inputs: image samples feed single-input models only")
    with _naming("options.preprocess"):
        spec.check_input(first_input.name, first_input.dims)
    images = ImageSamples(path, spec, batch_size=options.batch_size, on_error=options.on_bad_image,
                          limits=options.image_limits or ImageLimits(), sample_shape=first_input.dims[1:])
    return images, origin


def fold_file(model_source: str | os.PathLike | bytes, options: JobOptions = JobOptions(),
              samples_path: str | os.PathLike | None = None) -> JobOutput:
    """Fold only, no recalibration. Verification runs on the first `options.verify_samples` of
    `samples_path` (arrays or images, as `recalibrate_files` reads them) when given, else on
    random inputs at the scale the model implies."""
    if options.quantize:
        raise _on_field(InvalidOptions("INT8 quantization calibrates on samples: recalibrate with samples to quantize"),
                        "options.quantize")
    data = _read_bytes(model_source)
    model = load_model(data)
    report = Report(samples=0, batches=0, layers=[])
    feeds = None
    if samples_path is not None and options.verify_samples:
        images, _ = _image_samples(model, samples_path, options)
        if images is None:
            feeds = _first(load_samples(samples_path), options.verify_samples)
        else:
            with images:
                feeds = images.first(options.verify_samples)
    final = _fold_and_verify(model, report, feeds, options)
    _stamp(
        final, _carried_spec(model), source_sha256=provenance.sha256_bytes(data), samples=None, samples_sha256=None,
        options=_provenance_options(options),
    )
    return JobOutput(final, report)


PREPROCESS_KEY = "bnfold.preprocess"  # = bnfold.preprocess.METADATA_KEY, without importing pydantic


def _carried_spec(model: onnx.ModelProto) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == PREPROCESS_KEY), None)


def _stamp(model: onnx.ModelProto, spec_json: str | None, **entries) -> None:
    """Provenance; stamping replaces every bnfold.* entry, so the preprocessing spec is put back."""
    provenance.stamp(model, **entries)
    if spec_json is not None:
        onnx.helper.set_model_props(model, {p.key: p.value for p in model.metadata_props} | {PREPROCESS_KEY: spec_json})


def _provenance_options(options: JobOptions) -> dict[str, Any]:
    """The options that decide the result; spill_dir, threads, disk_budget and providers do not (and a server's paths stay private)."""
    dropped = {"spill_dir", "threads", "disk_budget", "providers"} | (set() if options.quantize else set(_INT8_FIELDS))  # a float job: as before INT8
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in dropped}


_INT8_FIELDS = ("quantize", "quantize_method", "min_agreement", "min_cosine")


@contextlib.contextmanager
def _naming(field: str):
    """`InvalidOptions` raised inside is about `field` (e.g. 'options.preprocess')."""
    try:
        yield
    except InvalidOptions as exc:
        _on_field(exc, field)
        raise


def _on_field(exc: InvalidOptions, field: str) -> InvalidOptions:
    exc.field = field  # problem+json names the option, not just "options"
    return exc


def _fold_and_verify(model, report: Report, feeds, options: JobOptions) -> onnx.ModelProto:
    folded = fold_batchnorms(model, options.unfoldable)
    # Real samples when there are any: random inputs only where there are none (see verify.py).
    check = check_equivalent(model, folded.model, None if feeds is None else [feeds], rtol=options.rtol, atol=options.atol,
                             random_batches=0 if feeds is not None else 2, threads=options.threads,
                             providers=options.providers)
    report.extra["fold"] = folded.to_dict()
    report.extra["verification"] = check.to_dict()
    return folded.model


def _quantize(model: onnx.ModelProto, samples, report: Report, options: JobOptions) -> onnx.ModelProto:
    """The INT8 model (report.extra["quantize"]); a refusal carries the float model (``exc.float_model``)."""
    start = time.perf_counter()
    try:
        result = quantize_int8(model, samples, options.int8_options(), work_dir=options.spill_dir)
    except QuantizationRefused as exc:
        exc.float_model = model
        raise
    report.extra["quantize"] = result.report
    report.timings["quantize"] = time.perf_counter() - start
    return result.model


def _first(samples, count: int) -> dict[str, np.ndarray] | np.ndarray | None:
    if count == 0:
        return None
    if isinstance(samples, Mapping):
        return {name: np.asarray(array[:count]) for name, array in samples.items()}
    return np.asarray(samples[:count])


def _read_bytes(source: str | os.PathLike | bytes) -> bytes:
    return source if isinstance(source, bytes) else read_model_bytes(source)


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def precheck(model_source: str | os.PathLike | bytes, samples_path: str | os.PathLike, batch_size: int = 8,
             options: JobOptions | None = None, check_samples: str | os.PathLike | None = None,
             check_labels: str | os.PathLike | None = None) -> None:
    """Cheap checks worth answering synchronously, before a job is queued: the model parses, passes
    the checker and has BN nodes; the samples file is readable and its first batch fits the model.
    Images: the spec resolves and fits the model input, the archive listing passes the safety
    checks, and the first images decode (options: preprocess, on_bad_image, image_limits).
    With options.quantize, models INT8 cannot take (float16, no compute op) are refused here.
    Check samples/labels: readable, one label per sample, first batch fits the model.
    The rest of the data (e.g. NaN in a later batch) is checked by the job itself."""
    model = load_model(_read_bytes(model_source))
    recalibratable_batchnorms(model)  # as the job will see them: shared or Identity-routed parameters are fine
    check = _load_check(check_samples, check_labels)  # labels readable, one per sample; first batch fits
    if check is not None:
        next(iter_batches(check[0], model_inputs(model), batch_size))
    options = dataclasses.replace(options or JobOptions(), batch_size=batch_size)
    if options.quantize:
        check_quantizable(model)
    images, _ = _image_samples(model, samples_path, options)
    if images is None:
        next(iter_batches(load_samples(samples_path), model_inputs(model), batch_size))
        return
    with images:
        next(iter_batches(images, model_inputs(model), batch_size))
