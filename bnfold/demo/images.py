"""Lab images that the project makes itself: the demo's digits written as image files.

A lab hands over images, not arrays. `write_images` writes float images ``(N, C, H, W)`` in [0, 1]
as 8-bit PNG / BMP / JPEG or 16-bit TIFF files (channels-first ``CYX`` for microscopy-style
multi-channel TIFF), optionally enlarged to given (height, width) sizes so that resizing and
cropping have work to do. `write_new_lab_digits` renders the demo's "new lab" digits
(`bnfold.demo.make_new_lab`: under-exposed, blurred, noisier) into a folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

FORMATS = {"png": ".png", "bmp": ".bmp", "jpeg": ".jpg", "tiff16": ".tif"}


def write_images(images: np.ndarray, folder: str | Path, *, fmt: str = "png",
                 sizes: Sequence[tuple[int, int]] | None = None, prefix: str = "img") -> list[Path]:
    """Write ``images[i]`` to ``folder/{prefix}{i:05d}{ext}``; sizes[i % len(sizes)] enlarges it first
    (bilinear, in float). 8-bit formats round x·255, 16-bit TIFF rounds x·65535."""
    from PIL import Image

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(np.asarray(images, np.float64)):
        if sizes:
            h, w = sizes[i % len(sizes)]
            image = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
                              for c in image])
        image = np.clip(image, 0.0, 1.0)
        path = folder / f"{prefix}{i:05d}{FORMATS[fmt]}"
        if fmt == "tiff16":
            import tifffile

            pixels = np.round(image * 65535).astype(np.uint16)
            tifffile.imwrite(path, pixels[0] if len(pixels) == 1 else pixels, **({} if len(pixels) == 1 else {"metadata": {"axes": "CYX"}}))
        else:
            pixels = np.round(image * 255).astype(np.uint8).transpose(1, 2, 0)
            Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)
        paths.append(path)
    return paths


def write_new_lab_digits(folder: str | Path, *, seed: int = 0, count: int = 100, fmt: str = "png",
                         sizes: Sequence[tuple[int, int]] | None = None) -> tuple[list[Path], np.ndarray]:
    """The first `count` new-lab digits of the demo (seed as in `bnfold.demo`), written as images.

    Returns the paths and the digits' labels. Needs scikit-learn (the demo's data set)."""
    from bnfold.demo.lab import build_demo_model, make_new_lab

    _, split = build_demo_model(seed)
    digits = make_new_lab(split["new_lab"][:count], np.random.default_rng([seed, 1]))
    return write_images(digits, folder, fmt=fmt, sizes=sizes, prefix="digit"), split["new_lab_labels"][:count]
