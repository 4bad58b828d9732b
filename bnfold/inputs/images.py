"""Image samples: a folder or archive of images, decoded and preprocessed batch by batch while streaming.

`ImageSamples` is an iterable of float32 batches that `bnfold.recalibrate` takes like any other
iterable of batches. Its source is listed and checked by `image_sources` (folder, .zip, .tar(.gz),
sorted member order, archive safety); each image is then decoded — TIFF (16-bit and multi-channel
microscopy images included) by tifffile, PNG / JPEG / BMP by Pillow, the content decides, not the
name — and made a sample by a `PreprocessSpec`. At most one batch of samples and one file's bytes
are held.

Safety while decoding (limits in `ImageLimits`), checked from the header, before the pixels are
decoded: width × height above ``max_image_pixels`` (and, for Pillow, ``PIL.Image.MAX_IMAGE_PIXELS``)
is refused, TIFF also above ``max_image_bytes`` decoded (all channels); all images of one pass
together decode at most ``max_total_pixels``. A member that turns out to be an archive is refused.

Listing problems, nested archives and the total pixel budget fail the whole source. A single image
that cannot be read, or that does not become a sample like the others, fails it too by default
(``on_error="fail"``), or is skipped and reported by name and reason (``on_error="skip"``).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import InvalidOptions, InvalidSamples
from bnfold.inputs.image_sources import ARCHIVE_MAGIC, ImageLimits, Member, is_image_source, open_source
from bnfold.inputs.preprocess import BadImage, PreprocessSpec, convert_color, parse_spec, pil_to_array, transform

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_LISTED = 1000  # names listed per kind in the report; the counts are always complete


class ImageSamples:
    """An iterable of float32 image batches ``(n, C, H, W)`` or ``(n, H, W, C)`` for `bnfold.recalibrate`.

    source: a folder, or a .zip / .tar / .tar.gz (.tgz, .bz2, .xz) archive of images.
    sample_shape: per-sample shape the model expects (None for free dims); images that end otherwise
        are mismatched. Without it, the first image fixes the shape.
    After a pass: ``used`` (images that became samples), ``skipped`` [(name, reason)], ``ignored``
    (non-image files), ``sha256`` (digest of the image files' names and bytes). Every pass re-reads
    the source; `first` decodes the first samples without touching these counters.
    """

    def __init__(self, source: str | os.PathLike, spec: PreprocessSpec | Mapping[str, Any], *, batch_size: int = 64,
                 on_error: str = "fail", limits: ImageLimits = ImageLimits(),
                 sample_shape: tuple[int | None, ...] | None = None):
        if on_error not in ("fail", "skip"):
            raise InvalidOptions(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        if batch_size < 1:
            raise InvalidOptions(f"batch_size must be ≥ 1, got {batch_size}")
        _require_extra()
        self.spec, self.batch_size, self.on_error, self.limits = parse_spec(spec), batch_size, on_error, limits
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self._source = open_source(Path(source), limits)
        self.name = Path(source).absolute().name
        self.used, self.skipped, self.sha256 = 0, [], None

    @property
    def kind(self) -> str:
        return self._source.kind

    @property
    def ignored(self) -> list[str]:
        return self._source.ignored

    def __len__(self) -> int:
        """Image files in the source (an upper bound on the samples: some may be skipped)."""
        return len(self._source.images)

    @property
    def expected_samples(self) -> int:
        """For progress: the samples a pass will yield, at most (`len`)."""
        return len(self)

    def __iter__(self) -> Iterator[np.ndarray]:
        self.used, self.skipped, self.sha256 = 0, [], None
        digest = hashlib.sha256()
        batch: list[np.ndarray] = []
        for sample in self._samples(_PixelBudget(self.limits.max_total_pixels), digest):
            self.used += 1
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)
        self.sha256 = digest.hexdigest()

    def first(self, count: int) -> np.ndarray | None:
        """The first `count` samples as one array (fewer if the source has fewer), None for none."""
        out: list[np.ndarray] = []
        if count > 0:
            for sample in self._samples(_PixelBudget(self.limits.max_total_pixels), None):
                out.append(sample)
                if len(out) == count:
                    break
        return np.stack(out) if out else None

    def report(self) -> dict[str, Any]:
        """The report section ``report.extra["images"]``: what was used, skipped, ignored, and the spec."""
        return {
            "source": self.name, "kind": self.kind, "images": len(self), "used": self.used,
            "skipped_count": len(self.skipped),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped[:MAX_LISTED]],
            "ignored_count": len(self.ignored), "ignored": self.ignored[:MAX_LISTED],
            "spec": self.spec.model_dump(mode="json"), "sha256": self.sha256,
        }

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> ImageSamples:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _samples(self, budget: _PixelBudget, digest) -> Iterator[np.ndarray]:
        """Samples in member order; bad images raise or are skipped (recorded when `digest` is given)."""
        first: tuple[str, tuple[int, ...]] | None = None  # the first sample's name and shape
        for member in self._source.images:
            try:
                sample = self._sample(member, budget, digest)
                _check_shape(sample, self.sample_shape, "the model expects", self.spec.layout)
                if first is not None:
                    _check_shape(sample, first[1], f"'{first[0]}' gave", self.spec.layout)
            except BadImage as exc:
                if self.on_error == "fail":
                    raise InvalidSamples(f"{self._source.where}: image '{member.name}' {exc}; fix or remove it, or skip "
                                         "bad images (on_error='skip', CLI --on-bad-image skip)") from None
                if digest is not None:
                    self.skipped.append((member.name, str(exc)))
                continue
            first = first or (member.name, sample.shape)
            yield sample

    def _sample(self, member: Member, budget: _PixelBudget, digest) -> np.ndarray:
        data = self._source.read(member)
        if digest is not None:
            digest.update(f"{member.name}\0{len(data)}\0".encode())
            digest.update(data)
        array, dtype = _decode(data, self.spec.color, self.limits, budget, f"{self._source.where}: {member.name}")
        return transform(array, self.spec, dtype)


def _check_shape(sample: np.ndarray, expected: tuple[int | None, ...] | None, origin: str, layout: str) -> None:
    if expected is None or (len(expected) == sample.ndim and all(e in (None, s) for e, s in zip(expected, sample.shape))):
        return
    shown = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"
    raise BadImage(f"becomes a sample of shape {sample.shape} ({layout[1:]}), but {origin} {shown}: "
                   "set resize/center_crop (and color/channels) so that every image fits")


def _require_extra() -> None:
    try:
        import PIL  # noqa: F401
        import tifffile  # noqa: F401
    except ImportError as exc:
        raise InvalidSamples(f"image samples need Pillow and tifffile ({exc.name} is missing): "
                             "pip install 'bnfold[images]'") from None


# -- decoding --------------------------------------------------------------------------------------


class _PixelBudget:
    def __init__(self, limit: int):
        self.left = limit

    def take(self, pixels: int, where: str) -> None:
        self.left -= pixels
        if self.left < 0:
            raise InvalidSamples(f"{where}: the images together exceed the limit on decoded pixels (max_total_pixels)")


def _decode(data: bytes, color: str, limits: ImageLimits, budget: _PixelBudget, where: str) -> tuple[np.ndarray, np.dtype]:
    """Image bytes → ((H, W, C) array after colour conversion, the decoded pixel dtype)."""
    if data.startswith(ARCHIVE_MAGIC) or data[257:262] == b"ustar":
        raise InvalidSamples(f"{where} is an archive, not an image; nested archives are not opened")
    if data.startswith(_TIFF_MAGIC):
        return _decode_tiff(data, color, limits, budget, where)
    return _decode_pillow(data, color, limits, budget, where)


def _check_pixels(height: int, width: int, limit: int, budget: _PixelBudget, where: str) -> None:
    if height * width > limit:
        raise BadImage(f"declares {width}×{height} = {height * width} pixels, above the limit of {limit} "
                       "(max_image_pixels): refused before decoding, as a possible decompression bomb")
    budget.take(height * width, where)


def _decode_pillow(data: bytes, color: str, limits: ImageLimits, budget: _PixelBudget, where: str):
    from PIL import Image, UnidentifiedImageError

    limit = min(limits.max_image_pixels, Image.MAX_IMAGE_PIXELS or math.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, more strictly
        try:
            image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "BMP"])  # reads the header only
        except Image.DecompressionBombError as exc:
            raise BadImage(f"is refused before decoding as a decompression bomb ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"is not a readable PNG, JPEG, BMP or TIFF image ({exc})") from None
        _check_pixels(image.height, image.width, int(limit), budget, where)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadImage(f"cannot be decoded ({exc})") from None
    array = pil_to_array(image, color)
    return array, array.dtype


def _decode_tiff(data: bytes, color: str, limits: ImageLimits, budget: _PixelBudget, where: str):
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            kept = [(axis, n) for axis, n in zip(series.axes, series.shape) if axis in "YX" or n != 1]
            axes = "".join(axis for axis, _ in kept)
            if axes not in ("YX", "YXS", "YXC") and not (len(axes) == 3 and axes[1:] == "YX" and axes[0] in "CSQI"):
                raise BadImage(f"is a TIFF with axes {series.axes} {tuple(series.shape)}; only 2-D images with at most "
                               "one channel axis are read (YX, YXS, CYX)")
            sizes = dict(kept)
            _check_bytes(math.prod(series.shape) * series.dtype.itemsize, limits.max_image_bytes)
            _check_pixels(sizes["Y"], sizes["X"], limits.max_image_pixels, budget, where)
            array = series.asarray().reshape([n for _, n in kept])
    except (BadImage, InvalidSamples, MemoryError):
        raise
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, KeyError, struct.error, ...)
        raise BadImage(f"is not a readable TIFF image ({type(exc).__name__}: {exc})") from None
    if axes == "YX":
        array = array[:, :, None]
    elif axes[0] != "Y":
        array = np.moveaxis(array, 0, -1)
    if array.dtype.kind not in "buif":
        raise BadImage(f"has {array.dtype} pixels; only integer and real images are read")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return convert_color(array, color), array.dtype


def _check_bytes(size: int, limit: int) -> None:
    if size > limit:
        raise BadImage(f"decodes to {size} bytes, above the limit of {limit} (max_image_bytes): refused before decoding")


__all__ = ["ImageLimits", "ImageSamples", "is_image_source"]
