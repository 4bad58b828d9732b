"""How decoded images become model input, declared as data: `PreprocessSpec`.

The transform is torchvision's evaluation pipeline on PIL images — ImageFolder's loader,
then ``Resize → CenterCrop → ToTensor → Normalize`` — reproduced step by step, so a model
trained with it sees the same numbers (bit for bit on 8-bit images):

1. colour: 'rgb' / 'grey' convert as Pillow's ``Image.convert("RGB" / "L")`` does (ITU-R 601-2
   luma for grey; deeper images use the same weights 0.299, 0.587, 0.114 in float); 'keep' leaves
   the decoded channels; ``channels`` then picks or reorders them (e.g. ``[2, 1, 0]`` for BGR).
2. Resize: an int resizes the shorter side to ``size`` and the longer to ``int(size·long/short)``;
   ``[h, w]`` resizes exactly; an image already that size is left untouched. Resampling is Pillow's
   (antialiased: the filter widens by the downscale factor), in 8 bits on 8-bit grey/RGB images
   as torchvision does, otherwise per channel in float32 (Pillow mode "F").
3. CenterCrop (h, w): top = round((H − h)/2), left = round((W − w)/2), Python's round (half to even);
   a crop larger than the image first zero-pads it, (h − H)//2 above/left and the rest below/right.
4. ToTensor: x / d in float32 with d = 1/scale ('auto': 255 for 8-bit, 65535 for 16-bit, 1 for float).
5. Normalize: (x − mean[c]) / std[c] in float32; then layout NCHW (C, H, W per sample) or NHWC.

A model may carry its spec as JSON in ``metadata_props["bnfold.preprocess"]``; fields given by
a caller override the model's (`resolve_spec`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bnfold.errors import InvalidModel, InvalidOptions

METADATA_KEY = "bnfold.preprocess"
#: Largest resize / center_crop side, and largest side an image may be resized to (an int resize
#: sets the shorter side; the longer follows the aspect ratio): bounds the memory one image takes.
MAX_SIDE = 8192
Side = Annotated[int, Field(strict=True, ge=1, le=MAX_SIDE)]
Size = Side | tuple[Side, Side]
_LUMA = np.array([0.299, 0.587, 0.114])


class BadImage(Exception):
    """One image cannot become a sample (the message is the reason); the caller skips or fails."""


class PreprocessSpec(BaseModel):
    """Resize → CenterCrop → ToTensor → Normalize, as torchvision does it (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: Size | None = Field(None, description="Shorter side (int), or exact [height, width]; null: no resize.")
    interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"] = Field(
        "bilinear", description="Pillow resampling filter (antialiased, like torchvision on PIL images).")
    center_crop: Size | None = Field(None, description="Crop size (int: square, or [height, width]); zero-pads if larger.")
    color: Literal["rgb", "grey", "keep"] = Field("rgb", description="Convert to RGB or grey ('gray' accepted), or keep the decoded channels.")
    channels: tuple[Annotated[int, Field(strict=True, ge=0)], ...] | None = Field(
        None, min_length=1, description="Channels to keep, in order, after colour conversion (e.g. [2, 1, 0] for BGR).")
    scale: float | Literal["auto"] = Field(
        "auto", description="Multiplier of raw pixel values, e.g. 1/255 (also as the string \"1/255\"); 'auto': by dtype.")
    mean: tuple[float, ...] | None = Field(None, min_length=1, description="Per-channel mean subtracted after scaling.")
    std: tuple[float, ...] | None = Field(None, min_length=1, description="Per-channel std divided by after the mean.")
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @field_validator("color", mode="before")
    @classmethod
    def _gray(cls, value: Any) -> Any:
        return "grey" if isinstance(value, str) and value.lower() in ("gray", "grey") else value

    @field_validator("scale", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto":
            top, slash, bottom = value.partition("/")
            try:
                return float(top) / float(bottom) if slash else float(top)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"cannot read scale '{value}': use a number, a fraction like 1/255, or 'auto'") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        if self.scale != "auto" and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0 or 'auto', got {self.scale}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together (Normalize needs both), or neither")
        if self.std is not None and not all(math.isfinite(v) and v != 0 for v in self.std):
            raise ValueError(f"std must be finite and non-zero, got {list(self.std)}")
        if self.mean is not None and not all(math.isfinite(v) for v in self.mean):
            raise ValueError(f"mean must be finite, got {list(self.mean)}")
        decoded = {"grey": 1, "rgb": 3}.get(self.color)
        if self.channels and decoded is not None and max(self.channels) >= decoded:
            raise ValueError(f"channels {list(self.channels)} pick beyond the {decoded} channel(s) of color='{self.color}'")
        lengths = {len(v) for v in (self.mean, self.std) if v is not None} - {1}
        if len(lengths) > 1 or (lengths and self.out_channels not in (None, *lengths)):
            raise ValueError(f"mean/std have {sorted(lengths)} values for {self.out_channels} channel(s): give one per channel, or one for all")
        return self

    @property
    def out_channels(self) -> int | None:
        """Channels per sample, when the spec alone decides it."""
        return len(self.channels) if self.channels else {"grey": 1, "rgb": 3}.get(self.color)

    @property
    def out_size(self) -> tuple[int, int] | None:
        """(height, width) per sample, when the spec alone decides it."""
        size = self.center_crop if self.center_crop is not None else self.resize if isinstance(self.resize, tuple) else None
        return (size, size) if isinstance(size, int) else size

    def sample_shape(self) -> tuple[int | None, int | None, int | None]:
        """Shape of one sample in `layout`; None where the images decide."""
        h, w = self.out_size or (None, None)
        return (self.out_channels, h, w) if self.layout == "NCHW" else (h, w, self.out_channels)

    def check_input(self, name: str, dims: tuple[int | None, ...]) -> None:
        """Refuse a spec that cannot produce what the model input (N, ...) expects."""
        shape = self.sample_shape()
        if len(dims) != 4:
            raise InvalidOptions(f"images become 4-D batches ({self.layout}), but model input '{name}' has rank {len(dims)}")
        clash = [i for i, (d, s) in enumerate(zip(dims[1:], shape)) if None not in (d, s) and d != s]
        if clash:
            got = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
            want = "(" + ", ".join("?" if d is None else str(d) for d in dims[1:]) + ")"
            raise InvalidOptions(
                f"the preprocessing gives samples of shape {got} ({self.layout[1:]}), but model input '{name}' expects {want}: "
                "check resize/center_crop, color/channels and layout")

    def to_json(self) -> str:
        return self.model_dump_json()


def parse_spec(value: PreprocessSpec | Mapping[str, Any] | str | bytes) -> PreprocessSpec:
    """A spec from an instance, a dict or JSON text; errors as `InvalidOptions` naming the fields."""
    if isinstance(value, PreprocessSpec):
        return value
    try:
        if isinstance(value, (str, bytes)):
            return PreprocessSpec.model_validate_json(value)
        return PreprocessSpec.model_validate(dict(value))
    except ValidationError as exc:
        raise InvalidOptions(f"invalid preprocessing spec: {_reasons(exc)}") from None


def check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Fields a caller sets on top of the model's spec: known names only (validated when merged)."""
    unknown = sorted(set(overrides) - set(PreprocessSpec.model_fields))
    if unknown:
        raise InvalidOptions(f"unknown preprocessing field(s) {unknown}; the fields are {list(PreprocessSpec.model_fields)}")
    return dict(overrides)


def resolve_spec(model: onnx.ModelProto, overrides: Mapping[str, Any] | PreprocessSpec | None) -> tuple[PreprocessSpec, str]:
    """The spec to apply and where it came from: 'options', 'model' or 'model + options'.

    A `PreprocessSpec` is taken whole; a mapping's fields override the model's spec (or defaults)."""
    if isinstance(overrides, PreprocessSpec):
        return overrides, "options"
    carried = spec_from_metadata(model)
    if carried is None and not overrides:
        raise InvalidOptions(
            "the samples are images, but no preprocessing was given and the model carries none "
            f"(metadata '{METADATA_KEY}'): give one — CLI: --preprocess spec.json or flags such as "
            "--resize 256 --crop 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225; "
            "library/service: options preprocess={...}")
    if carried is None:
        return parse_spec(check_overrides(overrides)), "options"
    if not overrides:
        return carried, "model"
    merged = carried.model_dump() | check_overrides(overrides)
    return parse_spec(merged), "model + options"


def spec_from_metadata(model: onnx.ModelProto) -> PreprocessSpec | None:
    """The spec a model carries in ``metadata_props["bnfold.preprocess"]``, or None."""
    text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        return None
    try:
        return PreprocessSpec.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidModel(f"the model's metadata '{METADATA_KEY}' is not a valid preprocessing spec: {_reasons(exc)}") from None


def write_spec(model: onnx.ModelProto, spec: PreprocessSpec | Mapping[str, Any]) -> None:
    """Store `spec` as JSON in ``metadata_props["bnfold.preprocess"]`` (in place; other entries kept)."""
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = parse_spec(spec).to_json()
    onnx.helper.set_model_props(model, props)


def overrides_from_text(spec_file: str | None = None, **flags: str | None) -> dict[str, Any] | None:
    """Fields from a JSON spec file, then command-line flags (strings) over them; None if nothing given.

    Sizes read "224" or "224x200" (height × width); lists read "0.485,0.456,0.406"; the flags are
    resize, center_crop, color, channels, scale, mean, std, layout, interpolation."""
    fields: dict[str, Any] = {}
    if spec_file is not None:
        try:
            with open(spec_file, "rb") as f:
                fields = json.loads(f.read())
        except OSError as exc:
            raise InvalidOptions(f"cannot read the preprocessing spec {spec_file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise InvalidOptions(f"the preprocessing spec {spec_file} is not valid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise InvalidOptions(f"the preprocessing spec {spec_file} must be a JSON object of fields")
    for name, text in flags.items():
        if text is None:
            continue
        try:
            if name in ("resize", "center_crop"):
                sides = [int(v) for v in text.lower().replace(",", "x").split("x")]
                fields[name] = sides[0] if len(sides) == 1 else sides
            elif name in ("mean", "std", "channels"):
                fields[name] = [(int if name == "channels" else float)(v) for v in text.split(",")]
            else:
                fields[name] = text
        except ValueError:
            raise InvalidOptions(f"cannot read --{name.replace('_', '-')} '{text}': sizes read 224 or 224x200, "
                                 "lists 0.485,0.456,0.406") from None
    return check_overrides(fields) if spec_file is not None or fields else None


def _reasons(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())


# -- the transform ---------------------------------------------------------------------------------


def pil_to_array(image, color: str) -> np.ndarray:
    """A Pillow image → (H, W, C) array, colour-converted by Pillow where it is 8-bit."""
    deep = image.mode in ("I", "F") or image.mode.startswith("I;16")
    if deep:  # 16/32-bit or float: Pillow's convert() would clip to 8 bits
        array = np.array(image)
        array = array.astype(array.dtype.newbyteorder("="))  # "I;16B" reads big-endian
        if image.mode == "I" and image.format == "PNG":
            array = array.astype(np.uint16)  # PNG has no 32-bit grey: older Pillow reads 16-bit as "I"
        return convert_color(array[:, :, None], color)
    if color == "rgb":
        image = image.convert("RGB")
    elif color == "grey":
        image = image.convert("L")
    elif image.mode in ("1", "P", "PA"):
        alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("L" if image.mode == "1" else "RGBA" if alpha else "RGB")
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def convert_color(array: np.ndarray, color: str) -> np.ndarray:
    """(H, W, C) → (H, W, C'): 'rgb' (C' = 3), 'grey' (C' = 1) or 'keep'. Pillow converts its own
    images (alpha, palettes, CMYK); here 'rgb'/'grey' accept 1 or 3 channels, nothing is guessed."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255  # bilevel, as Pillow's mode "1" → "L"
    c = array.shape[2]
    if color == "keep" or c == 1 or (color == "rgb" and c == 3):
        return np.repeat(array, 3, axis=2) if color == "rgb" and c == 1 else array
    if c != 3:
        raise BadImage(f"has {c} channels; color='{color}' reads 1 (grey) or 3 (RGB): use color='keep' "
                       "and pick channels with channels=[...]")
    if array.dtype == np.uint8:
        from PIL import Image

        return np.asarray(Image.fromarray(np.ascontiguousarray(array)).convert("L"))[:, :, None]
    return (array.astype(np.float64) @ _LUMA).astype(np.float32)[:, :, None]


def transform(array: np.ndarray, spec: PreprocessSpec, source_dtype: np.dtype) -> np.ndarray:
    """One colour-converted image (H, W, C) → one float32 sample in ``spec.layout``.

    source_dtype: the decoded pixel type, which 'auto' scaling reads."""
    if spec.channels:
        if max(spec.channels) >= array.shape[2]:
            raise BadImage(f"has {array.shape[2]} channel(s), but channels={list(spec.channels)}")
        array = array[:, :, list(spec.channels)]
    if spec.resize is not None:
        array = _resize(array, _resized_size(array.shape[:2], spec.resize), spec.interpolation)
    if spec.center_crop is not None:
        crop = spec.center_crop
        array = _center_crop(array, (crop, crop) if isinstance(crop, int) else crop)
    x = array.astype(np.float32) / np.float32(1.0 / _scale(spec.scale, np.dtype(source_dtype)))
    if spec.mean is not None:
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if spec.layout == "NCHW" else x)


def _resized_size(hw: tuple[int, int], size: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision's `_compute_resized_output_size` (no max_size)."""
    if not isinstance(size, int):
        return size
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > MAX_SIDE:
        raise BadImage(f"is {h}×{w}: resizing its shorter side to {size} makes the longer {new_long} pixels, "
                       f"above the limit of {MAX_SIDE}")
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _resize(array: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    from PIL import Image

    if array.shape[:2] == tuple(size):
        return array  # torchvision returns the image unchanged
    resample, wh = getattr(Image.Resampling, interpolation.upper()), (size[1], size[0])
    if array.dtype == np.uint8 and array.shape[2] in (1, 3):  # Pillow "L" / "RGB": 8-bit, as torchvision
        image = Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))
        out = np.asarray(image.resize(wh, resample))
        return out[:, :, None] if out.ndim == 2 else out
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(array[:, :, c], np.float32)).resize(wh, resample))
              for c in range(array.shape[2])]
    return np.stack(planes, axis=2)


def _center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision's `center_crop`: zero-pad when the crop is larger, then crop around the centre."""
    (h, w), (th, tw) = array.shape[:2], size
    if th > h or tw > w:
        top, left = max(th - h, 0) // 2, max(tw - w, 0) // 2
        bottom, right = (max(th - h, 0) + 1) // 2, (max(tw - w, 0) + 1) // 2
        array = np.pad(array, ((top, bottom), (left, right), (0, 0)))
        h, w = array.shape[:2]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return array[top : top + th, left : left + tw]


def _scale(scale: float | str, dtype: np.dtype) -> float:
    if scale != "auto":
        return float(scale)
    if dtype.kind == "u":
        return 1.0 / np.iinfo(dtype).max
    if dtype.kind == "f":
        return 1.0
    if dtype.kind == "b":
        return 1.0 / 255  # converted to 0/255 like Pillow's mode "1"
    raise BadImage(f"has {dtype} pixels (signed): give an explicit scale, e.g. scale=1/32767")


__all__ = ["METADATA_KEY", "BadImage", "PreprocessSpec", "parse_spec", "resolve_spec", "spec_from_metadata", "write_spec", "transform"]
