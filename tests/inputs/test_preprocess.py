"""`preprocess`: the spec (validation, JSON, model metadata) and the transform, equal to torchvision's.

The transform is checked against `torchvision_reference` — a NumPy/PIL transcription of
Resize → CenterCrop → ToTensor → Normalize — bit for bit on 8-bit images (odd sizes, both
orientations, grey and RGB, crops larger than the image), and to float32 rounding on 16-bit ones.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest

PIL = pytest.importorskip("PIL")
import torchvision_reference as tv  # noqa: E402
from PIL import Image  # noqa: E402

from bnfold.errors import InvalidModel, InvalidOptions  # noqa: E402
from bnfold.inputs.preprocess import (  # noqa: E402
    METADATA_KEY,
    BadImage,
    PreprocessSpec,
    convert_color,
    overrides_from_text,
    parse_spec,
    pil_to_array,
    resolve_spec,
    spec_from_metadata,
    transform,
    write_spec,
)

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _png(h: int, w: int, mode: str = "RGB", seed: int = 0) -> bytes:
    """A PNG of smooth gradients plus noise (so resampling has structure to get right)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * 255 / max(w - 1, 1)), (y * 255 / max(h - 1, 1)), ((x + y) * 17 % 256)]
    rgb = np.clip(np.stack(planes, axis=2) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def _ours(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    array = pil_to_array(Image.open(io.BytesIO(data)), spec.color)
    return transform(array, spec, array.dtype)


# -- the spec --------------------------------------------------------------------------------------


def test_defaults_and_json_round_trip():
    spec = PreprocessSpec()
    assert (spec.resize, spec.center_crop, spec.color, spec.scale, spec.mean, spec.layout) == (None, None, "rgb", "auto", None, "NCHW")
    full = PreprocessSpec(resize=256, center_crop=(224, 200), color="gray", scale="1/255", mean=[0.5], std=[0.2], layout="NHWC", channels=[0])
    assert full.color == "grey" and full.scale == pytest.approx(1 / 255) and full.center_crop == (224, 200)
    assert parse_spec(full.to_json()) == full
    assert parse_spec(json.loads(full.to_json())) == full
    assert full.sample_shape() == (224, 200, 1)
    assert PreprocessSpec(resize=(5, 7)).sample_shape() == (3, 5, 7)
    assert PreprocessSpec(color="keep", resize=8).sample_shape() == (None, None, None)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"resize": 0}, "resize"),
        ({"resize": True}, "resize"),
        ({"resize": [1, 2, 3]}, "resize"),
        ({"center_crop": 2.5}, "center_crop"),
        ({"color": "cmyk"}, "color"),
        ({"scale": -1}, "scale"),
        ({"scale": "1/0"}, "fraction"),
        ({"mean": [0.5]}, "together"),
        ({"mean": [0.5], "std": [0.0]}, "non-zero"),
        ({"mean": [0.1, 0.2], "std": [1, 1]}, "one per channel"),
        ({"color": "grey", "mean": [0.1, 0.2, 0.3], "std": [1]}, "one per channel"),
        ({"color": "grey", "channels": [1]}, "channels"),
        ({"channels": []}, "channels"),
        ({"layout": "CHW"}, "layout"),
        ({"sizes": 3}, "sizes"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(fields, words):
    with pytest.raises(InvalidOptions, match=words) as info:
        parse_spec(fields)
    assert info.value.field == "options"


def test_check_input_against_the_model():
    spec = PreprocessSpec(resize=8, center_crop=8, color="grey")
    spec.check_input("image", (None, 1, 8, 8))
    spec.check_input("image", (None, None, None, None))
    with pytest.raises(InvalidOptions, match=r"shape \(1, 8, 8\).*expects \(3, 8, 8\)"):
        spec.check_input("image", (None, 3, 8, 8))
    with pytest.raises(InvalidOptions, match="rank 2"):
        spec.check_input("x", (None, 64))
    with pytest.raises(InvalidOptions, match="expects"):
        PreprocessSpec(center_crop=8, color="grey", layout="NHWC").check_input("image", (None, 1, 8, 8))


def _model_with(props: dict[str, str]) -> onnx.ModelProto:
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])])
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, props)
    return model


def test_metadata_round_trip_keeps_other_entries():
    model = _model_with({"author": "lab A"})
    assert spec_from_metadata(model) is None
    spec = PreprocessSpec(resize=4, **IMAGENET)
    write_spec(model, spec)
    write_spec(model, spec)  # replaces, never duplicates
    assert [p.key for p in model.metadata_props] == ["author", METADATA_KEY]
    assert spec_from_metadata(model) == spec
    onnx.helper.set_model_props(model, {METADATA_KEY: '{"resize": -1}'})
    with pytest.raises(InvalidModel, match=METADATA_KEY):
        spec_from_metadata(model)


def test_resolve_spec_layers_options_over_the_model():
    bare = _model_with({})
    with pytest.raises(InvalidOptions, match="--preprocess spec.json"):
        resolve_spec(bare, None)
    assert resolve_spec(bare, {"resize": 4}) == (PreprocessSpec(resize=4), "options")
    carrying = _model_with({METADATA_KEY: PreprocessSpec(resize=4, **IMAGENET).to_json()})
    assert resolve_spec(carrying, None) == (PreprocessSpec(resize=4, **IMAGENET), "model")
    assert resolve_spec(carrying, {"center_crop": 3}) == (PreprocessSpec(resize=4, center_crop=3, **IMAGENET), "model + options")
    assert resolve_spec(carrying, {"mean": None, "std": None})[0].mean is None  # explicit null removes a field
    assert resolve_spec(carrying, PreprocessSpec()) == (PreprocessSpec(), "options")  # a whole spec replaces
    with pytest.raises(InvalidOptions, match="one per channel"):
        resolve_spec(carrying, {"color": "grey"})  # the merged spec is validated as a whole
    with pytest.raises(InvalidOptions, match="unknown preprocessing field"):
        resolve_spec(carrying, {"crop": 3})


def test_overrides_from_text(tmp_path):
    assert overrides_from_text(None) is None
    assert overrides_from_text(None, resize="256", center_crop="224x200", mean="0.5,0.25", std="1,2", channels="2,1,0",
                               scale="1/255", color=None) == {
        "resize": 256, "center_crop": [224, 200], "mean": [0.5, 0.25], "std": [1.0, 2.0], "channels": [2, 1, 0], "scale": "1/255"}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"resize": 8, "color": "grey"}))
    assert overrides_from_text(str(spec_file), resize="10") == {"resize": 10, "color": "grey"}
    spec_file.write_text("[1]")
    with pytest.raises(InvalidOptions, match="JSON object"):
        overrides_from_text(str(spec_file))
    with pytest.raises(InvalidOptions, match="cannot read --resize"):
        overrides_from_text(None, resize="big")
    with pytest.raises(InvalidOptions, match="cannot read the preprocessing spec"):
        overrides_from_text(str(tmp_path / "missing.json"))


# -- the transform against torchvision -------------------------------------------------------------

SIZES = [(13, 9), (9, 13), (8, 8), (5, 17), (31, 20), (1, 6)]
GEOMETRY = [
    (None, None),  # ToTensor + Normalize only
    (8, 8),  # shorter side, then square crop
    (7, (5, 3)),  # odd crop, rectangular
    ((6, 11), 5),  # exact resize
    (None, 12),  # crop larger than the image: zero padding on every side
    (4, (9, 3)),  # pad one dimension, crop the other
    (40, 33),  # upsampling
]


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("resize_to, crop", GEOMETRY)
def test_8bit_equals_torchvision_bit_for_bit(h, w, mode, resize_to, crop):
    data = _png(h, w, mode="RGB" if mode == "RGB" else "L", seed=h * w)
    color = "rgb" if mode == "RGB" else "grey"
    norm = IMAGENET if mode == "RGB" else {"mean": (0.45,), "std": (0.27,)}
    spec = PreprocessSpec(resize=resize_to, center_crop=crop, color=color, **norm)
    expected = tv.classic(data, mode=mode, resize_to=resize_to, crop=crop, **norm)
    got = _ours(data, spec)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_imagenet_evaluation_pipeline_on_a_larger_photo():
    data = _png(301, 257, seed=3)
    spec = PreprocessSpec(resize=256, center_crop=224, **IMAGENET)
    np.testing.assert_array_equal(_ours(data, spec), tv.classic(data, resize_to=256, crop=224, **IMAGENET))


@pytest.mark.parametrize("interpolation", ["nearest", "bicubic", "lanczos"])
def test_other_filters_equal_torchvision(interpolation):
    data = _png(19, 14, seed=5)
    spec = PreprocessSpec(resize=9, center_crop=7, interpolation=interpolation)
    expected = tv.classic(data, resize_to=9, crop=7, interpolation=getattr(Image.Resampling, interpolation.upper()))
    np.testing.assert_array_equal(_ours(data, spec), expected)


def test_grey_from_rgb_channel_order_and_layout():
    data = _png(11, 15, seed=7)
    nchw = _ours(data, PreprocessSpec(resize=6, center_crop=5, **IMAGENET))
    bgr = _ours(data, PreprocessSpec(resize=6, center_crop=5, channels=[2, 1, 0], mean=IMAGENET["mean"][::-1], std=IMAGENET["std"][::-1]))
    np.testing.assert_array_equal(bgr, nchw[::-1])
    nhwc = _ours(data, PreprocessSpec(resize=6, center_crop=5, layout="NHWC", **IMAGENET))
    np.testing.assert_array_equal(nhwc, nchw.transpose(1, 2, 0))
    grey = _ours(data, PreprocessSpec(resize=6, center_crop=5, color="grey"))  # Pillow's RGB → L, as ImageFolder + Grayscale
    np.testing.assert_array_equal(grey, tv.classic(data, mode="L", resize_to=6, crop=5))


def test_center_crop_offsets_round_half_to_even():
    """(10 − 5)/2 = 2.5 → 2 and (9 − 2)/2 = 3.5 → 4: Python's round, as torchvision."""
    row = np.arange(10, dtype=np.uint8)[None, :, None].repeat(10, axis=0)
    got = transform(row, PreprocessSpec(center_crop=5, color="keep", scale=1), np.dtype(np.uint8))
    assert got[0, 0].tolist() == [2, 3, 4, 5, 6]
    got = transform(row[:, :9], PreprocessSpec(center_crop=(3, 2), color="keep", scale=1), np.dtype(np.uint8))
    assert got[0, 0].tolist() == [4, 5]


def test_resize_keeps_the_aspect_ratio_by_truncation():
    """Resize(8) of 9×13 → 8×int(8·13/9) = 8×11; of 13×9 → 11×8; same size: untouched."""
    for (h, w), want in {(9, 13): (8, 11), (13, 9): (11, 8), (8, 30): (8, 30)}.items():
        got = transform(np.zeros((h, w, 1), np.uint8), PreprocessSpec(resize=8, color="keep"), np.dtype(np.uint8))
        assert got.shape[1:] == want


def test_scale_divides_like_to_tensor():
    """scale=1/255 given as a float divides by 255 in float32 (bit-identical to ToTensor)."""
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    auto = transform(x, PreprocessSpec(color="keep"), np.dtype(np.uint8))
    explicit = transform(x, PreprocessSpec(color="keep", scale=1 / 255), np.dtype(np.uint8))
    np.testing.assert_array_equal(auto, explicit)
    np.testing.assert_array_equal(auto[0], x[:, :, 0].astype(np.float32) / np.float32(255))


# -- deep images -----------------------------------------------------------------------------------


def _deep(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 65535.0 / w + y * 300.0)[:, :, None] * np.linspace(0.3, 1.0, c)
    return np.clip(base + rng.normal(0, 2000, (h, w, c)), 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("h, w", [(13, 9), (9, 13), (20, 20)])
@pytest.mark.parametrize("c", [1, 2, 5])
@pytest.mark.parametrize("resize_to, crop", [(8, 8), ((6, 11), 5), (None, 15), (7, (5, 3))])
def test_16bit_multichannel_equals_the_tensor_pipeline(h, w, c, resize_to, crop):
    image = _deep(h, w, c, seed=c)
    mean, std = tuple(np.linspace(0.2, 0.5, c)), tuple(np.linspace(0.1, 0.3, c))
    spec = PreprocessSpec(resize=resize_to, center_crop=crop, color="keep", mean=mean, std=std)
    got = transform(convert_color(image, "keep"), spec, image.dtype)
    expected = tv.deep(image.transpose(2, 0, 1), divide_by=65535, resize_to=resize_to, crop=crop, mean=mean, std=std)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_16bit_resampling_matches_torch_antialias():
    """An independent check of the float path: torch's interpolate(antialias=True), torchvision's tensor Resize."""
    torch = pytest.importorskip("torch")
    image = _deep(23, 17, 3, seed=9)
    got = transform(image, PreprocessSpec(resize=(9, 12), color="keep"), image.dtype)
    chw = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))[None]
    expected = torch.nn.functional.interpolate(chw, size=(9, 12), mode="bilinear", antialias=True, align_corners=False)[0]
    np.testing.assert_allclose(got, expected.numpy() / 65535, atol=2e-6)


def test_16bit_grey_uses_luma_and_rgb_replicates():
    image = _deep(6, 5, 3)
    grey = convert_color(image, "grey")
    np.testing.assert_allclose(grey[:, :, 0], image @ np.array([0.299, 0.587, 0.114]), rtol=1e-6)
    one = image[:, :, :1]
    np.testing.assert_array_equal(convert_color(one, "rgb"), np.repeat(one, 3, axis=2))
    with pytest.raises(BadImage, match="5 channels"):
        convert_color(_deep(4, 4, 5), "rgb")


def test_16bit_png_is_read_without_clipping():
    image = _deep(7, 9, 1)[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    array = pil_to_array(Image.open(io.BytesIO(buffer.getvalue())), "rgb")
    assert array.dtype == np.uint16 and array.shape == (7, 9, 3)
    got = transform(array, PreprocessSpec(), array.dtype)
    np.testing.assert_array_equal(got[0], image.astype(np.float32) / np.float32(65535))


def test_signed_pixels_need_an_explicit_scale():
    x = np.full((4, 4, 1), -3, np.int16)
    with pytest.raises(BadImage, match="explicit scale"):
        transform(x, PreprocessSpec(color="keep"), x.dtype)
    assert transform(x, PreprocessSpec(color="keep", scale=0.5), x.dtype)[0, 0, 0] == -1.5


@pytest.mark.parametrize("fields", [{"resize": 10**9}, {"resize": [40000, 40000]}, {"center_crop": 8193},
                                    {"resize": 1e9}, {"resize": True}])
def test_every_size_is_bounded_before_anything_is_decoded(fields):
    with pytest.raises(InvalidOptions, match="resize|center_crop"):
        parse_spec(fields)


def test_the_largest_side_is_accepted():
    assert parse_spec({"resize": 8192, "center_crop": [8192, 8192]}).resize == 8192


def test_an_int_resize_that_would_stretch_the_longer_side_past_the_limit_is_a_bad_image():
    """resize=8192 on a 1×100 strip would make it 8192×819200: refused per image, not allocated."""
    strip = np.zeros((1, 100, 3), np.uint8)
    with pytest.raises(BadImage, match="above the limit of 8192"):
        transform(strip, parse_spec({"resize": 8192}), np.dtype(np.uint8))
