"""A NumPy/PIL transcription of torchvision's evaluation transforms: the reference `bnfold.preprocess` must match.

torchvision cannot be installed beside this torch, so its PIL code path is written out here from its
documented behaviour (``torchvision/transforms/functional.py`` and ``_functional_pil.py``), one
function per step, deliberately naive and independent of `bnfold`:

* ``pil_loader``: ``Image.open(f).convert("RGB")`` (ImageFolder's loader), or ``"L"`` for grey;
* ``resize``: an int is the shorter side, the longer becomes ``int(size * long / short)``; an image
  already that size is returned as is; otherwise ``img.resize((w, h), BILINEAR)`` (PIL antialiases);
* ``center_crop``: zero-pad (left, top, right, bottom) = ((tw−w)//2, (th−h)//2, (tw−w+1)//2,
  (th−h+1)//2) when the crop is larger, then crop at ``int(round((h − th) / 2.0))`` etc.;
* ``to_tensor``: HWC uint8 → CHW float32 divided by 255 (in float32);
* ``normalize``: ``(t − mean) / std`` per channel in float32.

For deeper images (16-bit, float) — which ToTensor does not scale and PIL cannot hold in colour —
the tensor path is the reference: `aa_resize` is PIL's antialiased separable resampling (triangle
filter widened by the downscale factor, horizontal pass first, float32 between passes) in NumPy.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def pil_loader(data: bytes, mode: str = "RGB") -> Image.Image:
    return Image.open(io.BytesIO(data)).convert(mode)


def resized_output_size(h: int, w: int, size) -> list[int]:
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        return [new_h, new_w]
    return [size[0], size[1]]


def resize(img: Image.Image, size, interpolation=Image.BILINEAR) -> Image.Image:
    w, h = img.size
    output_size = resized_output_size(h, w, size)
    if [h, w] == output_size:
        return img
    return img.resize(tuple(output_size[::-1]), interpolation)


def center_crop(img: Image.Image, output_size) -> Image.Image:
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    image_width, image_height = img.size
    crop_height, crop_width = output_size
    if crop_width > image_width or crop_height > image_height:
        padding_ltrb = [
            (crop_width - image_width) // 2 if crop_width > image_width else 0,
            (crop_height - image_height) // 2 if crop_height > image_height else 0,
            (crop_width - image_width + 1) // 2 if crop_width > image_width else 0,
            (crop_height - image_height + 1) // 2 if crop_height > image_height else 0,
        ]
        img = ImageOps.expand(img, border=tuple(padding_ltrb), fill=0)
        image_width, image_height = img.size
        if crop_width == image_width and crop_height == image_height:
            return img
    crop_top = int(round((image_height - crop_height) / 2.0))
    crop_left = int(round((image_width - crop_width) / 2.0))
    return img.crop((crop_left, crop_top, crop_left + crop_width, crop_top + crop_height))


def to_tensor(pic: Image.Image) -> np.ndarray:
    img = np.array(pic, np.uint8, copy=True)
    img = img.reshape(pic.size[1], pic.size[0], len(pic.getbands())).transpose(2, 0, 1)
    return img.astype(np.float32) / np.float32(255)


def normalize(tensor: np.ndarray, mean, std) -> np.ndarray:
    mean = np.asarray(mean, tensor.dtype).reshape(-1, 1, 1)
    std = np.asarray(std, tensor.dtype).reshape(-1, 1, 1)
    return (tensor - mean) / std


def classic(data: bytes, *, mode="RGB", resize_to=None, crop=None, mean=None, std=None, interpolation=Image.BILINEAR) -> np.ndarray:
    """pil_loader → Resize → CenterCrop → ToTensor → Normalize: one CHW float32 sample."""
    img = pil_loader(data, mode)
    if resize_to is not None:
        img = resize(img, resize_to, interpolation)
    if crop is not None:
        img = center_crop(img, crop)
    tensor = to_tensor(img)
    return tensor if mean is None else normalize(tensor, mean, std)


# -- tensor path for deep images -------------------------------------------------------------------


def aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's `precompute_coeffs` for the bilinear (triangle) filter: (out_size, in_size) float64."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    weights = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = np.arange(xmin, xmax)
        w = np.clip(1.0 - np.abs((x - center + 0.5) / filterscale), 0.0, None)
        weights[xx, xmin:xmax] = w / w.sum() if w.sum() else w
    return weights


def aa_resize(chw: np.ndarray, size) -> np.ndarray:
    """Antialiased bilinear resize of a CHW float image, as PIL does in mode "F" (horizontal pass first)."""
    c, h, w = chw.shape
    new_h, new_w = resized_output_size(h, w, size)
    if (new_h, new_w) == (h, w):
        return chw.astype(np.float32)
    x = chw.astype(np.float64)
    if new_w != w:
        x = (x @ aa_weights(w, new_w).T).astype(np.float32).astype(np.float64)
    if new_h != h:
        x = np.einsum("oh,chw->cow", aa_weights(h, new_h), x)
    return x.astype(np.float32)


def tensor_center_crop(chw: np.ndarray, output_size) -> np.ndarray:
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    _, h, w = chw.shape
    th, tw = output_size
    if tw > w or th > h:
        left, top = (tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0
        right, bottom = (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0
        chw = np.pad(chw, ((0, 0), (top, bottom), (left, right)))
        _, h, w = chw.shape
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return chw[:, top : top + th, left : left + tw]


def deep(chw: np.ndarray, *, divide_by: float, resize_to=None, crop=None, mean=None, std=None) -> np.ndarray:
    """float CHW tensor (e.g. a 16-bit TIFF) → Resize(antialias) → CenterCrop → / divide_by → Normalize."""
    x = chw.astype(np.float32)
    if resize_to is not None:
        x = aa_resize(x, resize_to)
    if crop is not None:
        x = tensor_center_crop(x, crop)
    x = x / np.float32(divide_by)
    return x if mean is None else normalize(x, mean, std)
