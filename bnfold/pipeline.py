"""The whole job on files, as the CLI and the service run it: recalibrate → fold → verify → stamp.

Pure core: takes paths/bytes and options, returns a ModelProto and a Report; no printing, no HTTP.
With ``fold=False`` the returned model differs from the input *only* in BN mean/var values (no
provenance is written either), so it can be diffed against the source — except that a BN whose
parameters the exporter shared or computed from constants gets its own copies (`engine.parameters`). With folding, the folded
model is checked against the unfolded recalibrated one on a subset of the samples plus random
inputs, and refused (`VerificationFailed`) when they disagree; provenance goes into metadata_props.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bnfold import provenance
from bnfold.engine.plan import require_batchnorms
from bnfold.engine.recalibrate import DEFAULT_MEMORY_BUDGET, Progress, recalibrate
from bnfold.errors import InvalidOptions, InvalidSamples
from bnfold.folding.fold import fold_batchnorms
from bnfold.folding.verify import check_equivalent
from bnfold.inputs.arrays import iter_batches, load_samples, model_inputs
from bnfold.inputs.model import load_model, read_model_bytes
from bnfold.report import Report

if TYPE_CHECKING:  # the image extra (Pillow, tifffile, pydantic) is imported only when images are given
    from bnfold.inputs.images import ImageLimits, ImageSamples


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """fold: fold BN away after recalibration. batch_size: samples per ORT call.
    memory_budget: bytes of cut tensors kept in RAM. verify_samples: samples of the set used to
    compare folded vs unfolded (random inputs are added). rtol/atol: verification tolerance
    (None: derived from the model's float type). Image samples (folders/archives, `bnfold.images`):
    preprocess: a `PreprocessSpec`, or a dict of its fields overriding the spec the model carries;
    on_bad_image: 'fail' or 'skip' an unreadable/mismatched image; image_limits: decoding bounds.
    Where and how fast, never what (kept out of the provenance): spill_dir: folder for the cut
    tensors beyond memory_budget (None: the system's temporary folder); threads: ONNX Runtime
    intra-op threads for recalibration and verification (0: one per core)."""

    fold: bool = True
    batch_size: int = 64
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    verify_samples: int = 32
    rtol: float | None = None
    atol: float | None = None
    preprocess: Mapping[str, Any] | None = None
    on_bad_image: str = "fail"
    image_limits: ImageLimits | None = None
    spill_dir: str | os.PathLike | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        if self.on_bad_image not in ("fail", "skip"):
            raise _on_field(InvalidOptions(f"on_bad_image must be 'fail' or 'skip', got {self.on_bad_image!r}"),
                            "options.on_bad_image")
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
        if self.memory_budget < 0:
            raise InvalidOptions(f"memory_budget must be ≥ 0 bytes, got {self.memory_budget}")
        if self.verify_samples < 0:
            raise InvalidOptions(f"verify_samples must be ≥ 0, got {self.verify_samples}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and np.isfinite(value)):
                raise InvalidOptions(f"{name} must be a finite number ≥ 0, got {value}")


@dataclasses.dataclass
class JobOutput:
    model: onnx.ModelProto
    report: Report


def recalibrate_files(
    model_source: str | os.PathLike | bytes,
    samples_path: str | os.PathLike,
    options: JobOptions = JobOptions(),
    progress: Progress | None = None,
) -> JobOutput:
    """Recalibrate (and by default fold and verify) a model file on a .npy/.npz samples file, or on
    a folder / .zip / .tar(.gz) of images preprocessed by `options.preprocess` or the model's spec."""
    data = _read_bytes(model_source)
    model = load_model(data)
    images, origin = _image_samples(model, samples_path, options)
    samples = images if images is not None else load_samples(samples_path)
    try:
        result = recalibrate(
            model, samples, batch_size=options.batch_size, memory_budget=options.memory_budget,
            spill_dir=None if options.spill_dir is None else os.fspath(options.spill_dir), threads=options.threads,
            progress=progress,
        )
        if images is not None:
            result.report.extra["images"] = images.report() | {"spec_origin": origin}
        if not options.fold:
            return JobOutput(result.model, result.report)
        first = images.first(options.verify_samples) if images is not None else _first(samples, options.verify_samples)
        final = _fold_and_verify(result.model, result.report, first, options)
    finally:
        if images is not None:
            images.close()
    _stamp(
        final,
        # the folded model keeps the preprocessing its statistics were measured with
        images.spec.to_json() if images is not None else _carried_spec(model),
        source_sha256=provenance.sha256_bytes(data),
        samples=result.report.samples,
        samples_sha256=images.sha256 if images is not None else _file_sha256(samples_path),
        options=_provenance_options(options),
    )
    return JobOutput(final, result.report)


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


def fold_file(model_source: str | os.PathLike | bytes, options: JobOptions = JobOptions()) -> JobOutput:
    """Fold only (no samples): verification runs on random inputs."""
    data = _read_bytes(model_source)
    model = load_model(data)
    report = Report(samples=0, batches=0, layers=[])
    final = _fold_and_verify(model, report, None, options)
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
    """The options that decide the result; spill_dir and threads do not (and a server's paths stay private)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in ("spill_dir", "threads")}


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
    folded = fold_batchnorms(model)
    check = check_equivalent(model, folded.model, None if feeds is None else [feeds], rtol=options.rtol, atol=options.atol,
                             threads=options.threads)
    report.extra["fold"] = folded.to_dict()
    report.extra["verification"] = check.to_dict()
    return folded.model


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
             options: JobOptions | None = None) -> None:
    """Cheap checks worth answering synchronously, before a job is queued: the model parses, passes
    the checker and has BN nodes; the samples file is readable and its first batch fits the model.
    Images: the spec resolves and fits the model input, the archive listing passes the safety
    checks, and the first images decode (options: preprocess, on_bad_image, image_limits).
    The rest of the data (e.g. NaN in a later batch) is checked by the job itself."""
    model = load_model(_read_bytes(model_source))
    require_batchnorms(model)
    options = dataclasses.replace(options or JobOptions(), batch_size=batch_size)
    images, _ = _image_samples(model, samples_path, options)
    if images is None:
        next(iter_batches(load_samples(samples_path), model_inputs(model), batch_size))
        return
    with images:
        next(iter_batches(images, model_inputs(model), batch_size))
