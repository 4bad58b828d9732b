"""`images`: folders and archives of images as samples — order, formats, safety, bad images,
and the whole path (library, pipeline, CLI) matching recalibration on the equivalent .npy."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("PIL")
tifffile = pytest.importorskip("tifffile")
import torchvision_reference as tv  # noqa: E402
from PIL import Image, ImageFile  # noqa: E402

from bnfold.errors import InvalidOptions, InvalidSamples  # noqa: E402
from bnfold.inputs.images import ImageLimits, ImageSamples, is_image_source  # noqa: E402
from bnfold.inputs.preprocess import PreprocessSpec  # noqa: E402

GREY = PreprocessSpec(color="grey")
NAMES = ["b/10.png", "a.png", "c/1.png", "b/2.png", "b/1.jpg", "z.bmp"]  # sorted: a, b/1.jpg, b/10, b/2, c/1, z


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _flat(value: int, h: int = 6, w: int = 5, fmt: str = "PNG") -> bytes:
    """A constant grey image: its value identifies it after decoding (JPEG keeps flat images exact)."""
    return _encode(np.full((h, w), value, np.uint8), fmt)


def _members() -> dict[str, bytes]:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP"}
    return {name: _flat(10 * (i + 1), fmt=fmt[Path(name).suffix]) for i, name in enumerate(NAMES)}


def _tiff(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def _folder(path: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return path


def _tar(path: Path, members: dict[str, bytes], mode: str = "w", special: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in special:
            archive.addfile(info)
    return path


def _values(samples) -> list[float]:
    return [float(v) for v in np.concatenate(list(samples))[:, 0, 0, 0]]


# -- sources and order -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_every_source_yields_the_same_batches_in_sorted_order(tmp_path, kind):
    members = _members()
    if kind == "folder":
        source = _folder(tmp_path / "images", members)
    elif kind == "zip":
        source = _zip(tmp_path / "images.zip", members)
    else:
        mode = "w" if kind == "tar" else "w:" + kind.split(".")[1]
        source = _tar(tmp_path / f"images.{kind}", members, mode)
    samples = ImageSamples(source, GREY, batch_size=4)
    batches = list(samples)
    assert [b.shape for b in batches] == [(4, 1, 6, 5), (2, 1, 6, 5)] and batches[0].dtype == np.float32
    order = sorted(NAMES)
    assert _values(batches) == pytest.approx([(NAMES.index(n) + 1) * 10 / 255 for n in order], abs=1e-6)
    assert samples.used == 6 and samples.skipped == [] and samples.kind == kind.split(".")[0]
    assert list(samples) and samples.used == 6  # every pass reads the source again


def test_digest_depends_on_names_and_bytes_not_on_the_container(tmp_path):
    members = _members()
    folder, archive = ImageSamples(_folder(tmp_path / "f", members), GREY), ImageSamples(_zip(tmp_path / "a.zip", members), GREY)
    assert folder.sha256 is None  # known after a complete pass
    list(folder), list(archive)
    assert folder.sha256 == archive.sha256 and len(folder.sha256) == 64
    renamed = ImageSamples(_zip(tmp_path / "b.zip", {"x" + k: v for k, v in members.items()}), GREY)
    list(renamed)
    assert renamed.sha256 != folder.sha256


def test_other_files_are_ignored_and_listed(tmp_path):
    members = _members() | {"README.txt": b"lab notes", ".DS_Store": b"\0", "__MACOSX/._a.png": b"\0\5\x16\7", "b/.hidden.png": b"x"}
    samples = ImageSamples(_zip(tmp_path / "a.zip", members), GREY)
    list(samples)
    assert samples.ignored == [".DS_Store", "README.txt", "__MACOSX/._a.png", "b/.hidden.png"]
    report = samples.report()
    assert (report["used"], report["ignored_count"], report["skipped_count"], report["kind"]) == (6, 4, 0, "zip")
    assert report["spec"]["color"] == "grey" and json.dumps(report)


def test_first_decodes_the_first_samples_without_touching_the_counters(tmp_path):
    samples = ImageSamples(_folder(tmp_path / "f", _members()), GREY, batch_size=2)
    assert samples.first(3).shape == (3, 1, 6, 5) and samples.first(100).shape == (6, 1, 6, 5)
    assert samples.first(0) is None and samples.used == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX links and FIFOs")
def test_folders_follow_file_links_but_never_enter_linked_folders_or_read_fifos(tmp_path):
    outside = _folder(tmp_path / "outside", {"x.png": _flat(7), "sub/y.png": _flat(8)})
    folder = _folder(tmp_path / "f", {"a.png": _flat(1)})
    (folder / "link.png").symlink_to(outside / "x.png")
    (folder / "linked_dir").symlink_to(outside / "sub", target_is_directory=True)
    (folder / "dangling.png").symlink_to(tmp_path / "missing.png")
    os.mkfifo(folder / "pipe.png")
    samples = ImageSamples(folder, GREY)
    assert _values(samples) == pytest.approx([1 / 255, 7 / 255])
    assert samples.ignored == ["dangling.png", "linked_dir", "pipe.png"]


def test_demo_images_round_trip(tmp_path):
    images = np.random.default_rng(2).random((3, 2, 5, 4))
    for fmt, bits in (("png", 255), ("tiff16", 65535)):
        data = images[:, :1] if fmt == "png" else images
        write_images(data, tmp_path / fmt, fmt=fmt)
        got = np.concatenate(list(ImageSamples(tmp_path / fmt, PreprocessSpec(color="keep"))))
        np.testing.assert_allclose(got, np.round(data * bits) / bits, atol=1e-7)
    write_images(images[:, :1], tmp_path / "sized", sizes=[(9, 7), (7, 9)])
    assert [Image.open(p).size for p in sorted((tmp_path / "sized").iterdir())] == [(7, 9), (9, 7), (7, 9)]


def test_is_image_source_by_content(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    np.savez(tmp_path / "x.npz", image=np.zeros((2, 3)))
    assert not is_image_source(tmp_path / "x.npy") and not is_image_source(tmp_path / "x.npz")
    assert is_image_source(_zip(tmp_path / "i.zip", _members()))
    assert is_image_source(_zip(tmp_path / "images-named.npz", _members()))  # the content decides
    assert is_image_source(_tar(tmp_path / "i.tar.gz", _members(), "w:gz"))
    assert is_image_source(tmp_path) and not is_image_source(tmp_path / "missing.npy")


def test_sources_that_hold_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidSamples, match="holds no images"):
        ImageSamples(tmp_path / "empty", GREY)
    with pytest.raises(InvalidSamples, match="README.txt"):
        ImageSamples(_zip(tmp_path / "a.zip", {"README.txt": b"x"}), GREY)
    (tmp_path / "one.png").write_bytes(_flat(1))
    with pytest.raises(InvalidSamples, match="is one image"):
        ImageSamples(tmp_path / "one.png", GREY)
    (tmp_path / "notes.bin").write_bytes(b"hello")
    with pytest.raises(InvalidSamples, match="not a folder or"):
        ImageSamples(tmp_path / "notes.bin", GREY)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InvalidSamples, match="not a readable zip"):
        ImageSamples(tmp_path / "broken.zip", GREY)
    with pytest.raises(InvalidOptions, match="on_error"):
        ImageSamples(tmp_path / "broken.zip", GREY, on_error="ignore")
    with pytest.raises(InvalidOptions, match="max_members"):
        ImageLimits(max_members=0)


# -- archive safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/x.png", "C:/x.png", "..\\x.png"])
def test_zip_path_traversal_is_refused(tmp_path, name):
    with pytest.raises(InvalidSamples, match="absolute or parent"):
        ImageSamples(_zip(tmp_path / "a.zip", {"ok.png": _flat(1), name: _flat(2)}), GREY)


@pytest.mark.parametrize("name", ["../x.png", "/etc/x.png", "a/../../x.png"])
def test_tar_path_traversal_is_refused(tmp_path, name):
    with pytest.raises(InvalidSamples, match="absolute or parent"):
        ImageSamples(_tar(tmp_path / "a.tar", {"ok.png": _flat(1), name: _flat(2)}), GREY)


def _link(name: str, kind: bytes, target: str = "ok.png") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("special, words", [
    (_link("evil.png", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    (_link("dup.png", tarfile.LNKTYPE), "hard link"),
    (_link("pipe.png", tarfile.FIFOTYPE, ""), "not a regular file"),
])
def test_tar_links_and_devices_are_refused(tmp_path, special, words):
    with pytest.raises(InvalidSamples, match=words):
        ImageSamples(_tar(tmp_path / "a.tar.gz", {"ok.png": _flat(1)}, "w:gz", [special]), GREY)


def test_zip_symlinks_encryption_and_duplicates_are_refused(tmp_path):
    link = zipfile.ZipInfo("evil.png")
    link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(InvalidSamples, match="symbolic link"):
        ImageSamples(tmp_path / "link.zip", GREY)
    data = bytearray(_zip(tmp_path / "secret.zip", {"secret.png": _flat(1)}).read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x1  # general-purpose flag bit 0 in the central directory: encrypted
    (tmp_path / "secret.zip").write_bytes(bytes(data))
    with pytest.raises(InvalidSamples, match="encrypted"):
        ImageSamples(tmp_path / "secret.zip", GREY)
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as archive, pytest.warns(UserWarning):
        archive.writestr("a.png", _flat(1))
        archive.writestr("a.png", _flat(2))
    with pytest.raises(InvalidSamples, match="twice"):
        ImageSamples(tmp_path / "dup.zip", GREY)


def test_nested_archives_are_refused_by_name_and_by_content(tmp_path):
    inner = _zip(tmp_path / "inner.zip", _members()).read_bytes()
    with pytest.raises(InvalidSamples, match="nested archives"):
        ImageSamples(_zip(tmp_path / "a.zip", {"ok.png": _flat(1), "more/inner.zip": inner}), GREY)
    with pytest.raises(InvalidSamples, match="nested archives"):
        ImageSamples(_tar(tmp_path / "a.tar", {"ok.png": _flat(1), "x.tar.gz": b"\x1f\x8b"}), GREY)
    disguised = ImageSamples(_zip(tmp_path / "b.zip", {"a.png": _flat(1), "b.png": inner}), GREY, on_error="skip")
    with pytest.raises(InvalidSamples, match="b.png is an archive"):  # never skipped: the archive is suspect
        list(disguised)
    with pytest.raises(InvalidSamples, match="nested archives"):
        ImageSamples(_folder(tmp_path / "f", {"ok.png": _flat(1), "old/backup.zip": inner}), GREY)


def test_member_count_and_sizes_are_bounded(tmp_path):
    members = _members()
    source = _tar(tmp_path / "a.tar.gz", members, "w:gz")
    with pytest.raises(InvalidSamples, match="max_members"):
        ImageSamples(source, GREY, limits=ImageLimits(max_members=5))
    with pytest.raises(InvalidSamples, match="max_file_bytes"):
        ImageSamples(source, GREY, limits=ImageLimits(max_file_bytes=50))
    total = sum(len(v) for v in members.values())
    with pytest.raises(InvalidSamples, match="max_total_bytes"):
        ImageSamples(_zip(tmp_path / "a.zip", members), GREY, limits=ImageLimits(max_total_bytes=total - 1))
    assert len(ImageSamples(source, GREY, limits=ImageLimits(max_members=6, max_total_bytes=total))) == 6


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width × height grey pixels, with a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])  # above our limit only; above Pillow's own bomb check too
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch, side):
    def never(self):
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    bomb = _png_declaring(side, side)
    assert len(bomb) < 200
    with pytest.raises(InvalidSamples, match=r"bomb\.png.*(decompression bomb|max_image_pixels)"):
        list(ImageSamples(_zip(tmp_path / "a.zip", {"bomb.png": bomb}), GREY))


def test_oversize_images_fail_or_are_skipped_by_name(tmp_path, monkeypatch):
    members = {"big.png": _flat(1, 30, 30), "big.tif": _tiff(np.zeros((30, 30), np.uint16)), "ok.png": _flat(2, 9, 9)}
    source = _zip(tmp_path / "a.zip", members)
    limits = ImageLimits(max_image_pixels=100)
    with pytest.raises(InvalidSamples, match=r"'big.png' declares 30×30 = 900 pixels, above the limit of 100.*on_error='skip'"):
        list(ImageSamples(source, GREY, limits=limits))
    samples = ImageSamples(source, PreprocessSpec(color="grey", center_crop=2), limits=limits, on_error="skip")
    assert [b.shape for b in samples] == [(1, 1, 2, 2)]
    assert [name for name, _ in samples.skipped] == ["big.png", "big.tif"] and "max_image_pixels" in samples.skipped[1][1]
    # Pillow's own limit is respected too, whichever is lower
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    list(samples)
    assert [name for name, _ in samples.skipped] == ["big.png", "big.tif", "ok.png"]


def test_decoded_bytes_of_multichannel_tiff_are_bounded(tmp_path):
    source = _zip(tmp_path / "a.zip", {"stack.tif": _tiff(np.zeros((8, 10, 10), np.uint16), photometric="minisblack", metadata={"axes": "CYX"})})
    with pytest.raises(InvalidSamples, match="decodes to 1600 bytes.*max_image_bytes"):
        list(ImageSamples(source, PreprocessSpec(color="keep"), limits=ImageLimits(max_image_bytes=1000)))


def test_total_pixels_are_bounded_even_when_skipping(tmp_path):
    source = _folder(tmp_path / "f", {f"{i}.png": _flat(i) for i in range(4)})  # 30 pixels each
    samples = ImageSamples(source, GREY, on_error="skip", limits=ImageLimits(max_total_pixels=100))
    with pytest.raises(InvalidSamples, match="max_total_pixels"):
        list(samples)


# -- bad images: fail (default) or skip ------------------------------------------------------------


def _with_bad_images(tmp_path) -> Path:
    good = _members()
    return _folder(tmp_path / "f", good | {
        "b/3.png": good["a.png"][:45],  # truncated inside the image data
        "c/0.jpg": b"\xff\xd8\xff not a jpeg at all",
        "d.png": _flat(5, 7, 5),  # decodes, but to another shape
        "e.gif": b"GIF89a",  # not an image type we read: ignored, not bad
    })


def test_a_bad_image_fails_by_name(tmp_path):
    samples = ImageSamples(_with_bad_images(tmp_path), GREY)
    with pytest.raises(InvalidSamples, match=r"image 'b/3.png' (cannot be decoded|is not a readable).*--on-bad-image skip"):
        list(samples)


def test_bad_images_are_skipped_and_reported(tmp_path):
    samples = ImageSamples(_with_bad_images(tmp_path), GREY, on_error="skip")
    assert np.concatenate(list(samples)).shape == (6, 1, 6, 5)
    reasons = dict(samples.skipped)
    assert list(reasons) == ["b/3.png", "c/0.jpg", "d.png"]
    assert "shape (1, 7, 5)" in reasons["d.png"] and "'a.png' gave (1, 6, 5)" in reasons["d.png"]
    report = samples.report()
    assert report["skipped"][0] == {"name": "b/3.png", "reason": reasons["b/3.png"]} and report["ignored"] == ["e.gif"]


def test_the_model_shape_is_enforced_per_image(tmp_path):
    source = _folder(tmp_path / "f", {"a.png": _flat(1, 8, 8), "b.png": _flat(2, 9, 8)})
    with pytest.raises(InvalidSamples, match=r"'b.png' becomes a sample of shape \(1, 9, 8\).*the model expects \(1, 8, 8\)"):
        list(ImageSamples(source, GREY, sample_shape=(1, 8, 8)))


# -- TIFF: 16-bit and multi-channel ----------------------------------------------------------------


def test_16bit_and_multichannel_tiffs(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 65536, (4, 13, 9), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (9, 13, 3), dtype=np.uint16)
    members = {
        "a_cyx.tif": _tiff(stack, photometric="minisblack", metadata={"axes": "CYX"}),
        "b_pages.tiff": _tiff(stack, photometric="minisblack"),  # a plain page stack: QYX
        "c_ome.tif": _tiff(stack[None, :, None], photometric="minisblack", metadata={"axes": "TCZYX"}),  # singleton T and Z
        "d_rgb.tif": _tiff(rgb16, photometric="rgb"),  # YXS
    }
    spec = PreprocessSpec(color="keep", resize=7, center_crop=(6, 5), mean=[0.5], std=[0.25])
    got = np.concatenate(list(ImageSamples(_zip(tmp_path / "t.zip", members), spec, on_error="skip")))
    expected = tv.deep(stack, divide_by=65535, resize_to=7, crop=(6, 5), mean=[0.5], std=[0.25])
    assert got.shape == (3, 4, 6, 5)  # d_rgb has 3 channels, the others 4: skipped as mismatched
    for sample in got:
        np.testing.assert_allclose(sample, expected, rtol=1e-6, atol=1e-6)
    rgb = next(iter(ImageSamples(_zip(tmp_path / "rgb.zip", {"d.tif": members["d_rgb.tif"]}), PreprocessSpec(channels=[2, 1, 0]))))
    np.testing.assert_allclose(rgb[0], rgb16.transpose(2, 0, 1)[::-1] / np.float32(65535), rtol=1e-6)


def test_tiff_volumes_are_refused(tmp_path):
    source = _zip(tmp_path / "v.zip", {"v.tif": _tiff(np.zeros((3, 2, 8, 8), np.uint8), photometric="minisblack", metadata={"axes": "ZCYX"})})
    with pytest.raises(InvalidSamples, match="axes ZCYX"):
        list(ImageSamples(source, PreprocessSpec(color="keep")))


def test_8bit_tiff_reads_like_the_same_png(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (11, 14, 3), dtype=np.uint8)
    spec = PreprocessSpec(resize=6, center_crop=5, color="grey")
    tif, png = (next(iter(ImageSamples(_zip(tmp_path / f"{k}.zip", {f"x.{k}": data}), spec)))
                for k, data in (("tif", _tiff(rgb, photometric="rgb")), ("png", _encode(rgb))))
    np.testing.assert_array_equal(tif, png)
    np.testing.assert_array_equal(png[0], tv.classic(_encode(rgb), mode="L", resize_to=6, crop=5))


# -- end to end: the demo model on a folder of lab PNGs --------------------------------------------

from typer.testing import CliRunner  # noqa: E402

from bnfold.cli import app  # noqa: E402
from bnfold.demo.images import write_images, write_new_lab_digits  # noqa: E402
from bnfold.engine.recalibrate import recalibrate  # noqa: E402
from bnfold.inputs.preprocess import METADATA_KEY, spec_from_metadata, write_spec  # noqa: E402
from bnfold.pipeline import JobOptions, precheck, recalibrate_files  # noqa: E402

LAB_SPEC = PreprocessSpec(resize=8, center_crop=8, color="grey")
LAB_SIZES = [(12, 10), (10, 13), (9, 9), (8, 11)]  # odd sizes, both orientations


@pytest.fixture(scope="module")
def lab(tmp_path_factory, demo_model):
    """The demo model, 96 new-lab digits rendered as PNGs of assorted sizes, and the same digits
    as a .npy made by the torchvision reference from those PNG files."""
    root = tmp_path_factory.mktemp("lab")
    model, _ = demo_model()
    paths, labels = write_new_lab_digits(root / "pngs", count=96, sizes=LAB_SIZES)
    assert len(paths) == len(labels) == 96
    reference = np.stack([tv.classic(p.read_bytes(), mode="L", resize_to=8, crop=8) for p in paths])
    np.save(root / "digits.npy", reference)
    onnx.save(model, root / "model.onnx")
    return root, model


def _bn_stats(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith((".mean", ".var"))}


def _invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args])


def test_library_recalibration_on_images_equals_the_npy(lab):
    root, model = lab
    with ImageSamples(root / "pngs", LAB_SPEC, batch_size=32) as images:
        from_images = recalibrate(model, images, batch_size=32)
    from_npy = recalibrate(model, np.load(root / "digits.npy"), batch_size=32)
    assert from_images.report.samples == images.used == 96
    for name, value in _bn_stats(from_npy.model).items():
        np.testing.assert_allclose(_bn_stats(from_images.model)[name], value, rtol=1e-6, atol=1e-9)


def test_cli_on_a_folder_of_pngs_matches_the_npy(lab, tmp_path):
    """The same float32 inputs in the same batches: the statistics are identical, not just close."""
    root, _ = lab
    common = ["--no-fold", "--batch-size", "32", "-q"]
    result = _invoke("recalibrate", root / "model.onnx", root / "pngs", "-o", tmp_path / "img.onnx", "--report", tmp_path / "r.json",
                     "--resize", "8", "--crop", "8", "--color", "grey", *common)
    assert result.exit_code == 0, result.stderr
    assert _invoke("recalibrate", root / "model.onnx", root / "digits.npy", "-o", tmp_path / "npy.onnx", *common).exit_code == 0
    got, want = _bn_stats(onnx.load(tmp_path / "img.onnx")), _bn_stats(onnx.load(tmp_path / "npy.onnx"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    images = json.loads((tmp_path / "r.json").read_text())["extra"]["images"]
    assert (images["used"], images["skipped_count"], images["spec_origin"]) == (96, 0, "options")
    assert images["spec"] == LAB_SPEC.model_dump(mode="json")


def test_cli_uses_the_spec_the_model_carries_and_writes_it_into_the_folded_model(lab, tmp_path):
    root, model = lab
    carrying = onnx.ModelProto()
    carrying.CopyFrom(model)
    write_spec(carrying, LAB_SPEC)
    onnx.save(carrying, tmp_path / "carrying.onnx")
    archive = _zip(tmp_path / "digits.zip", {p.name: p.read_bytes() for p in sorted((root / "pngs").iterdir())})
    result = _invoke("recalibrate", tmp_path / "carrying.onnx", archive, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert "images: 96 used, 0 skipped" in result.stdout and "from model" in result.stdout
    folded = onnx.load(tmp_path / "out.onnx")
    assert spec_from_metadata(folded) == LAB_SPEC
    props = {p.key: p.value for p in folded.metadata_props}
    assert props["bnfold.samples"] == "96" and len(props["bnfold.samples_sha256"]) == 64


def test_cli_without_any_spec_says_what_to_pass(lab):
    root, _ = lab
    result = _invoke("recalibrate", root / "model.onnx", root / "pngs", "-o", root / "never.onnx")
    assert result.exit_code == 1 and "--preprocess spec.json" in result.stderr and "Traceback" not in result.stderr
    assert not (root / "never.onnx").exists()


def test_cli_skips_bad_images_when_asked(lab, tmp_path):
    root, _ = lab
    folder = _folder(tmp_path / "f", {p.name: p.read_bytes() for p in sorted((root / "pngs").iterdir())[:40]})
    (folder / "digit00003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    spec = tmp_path / "spec.json"
    spec.write_text(LAB_SPEC.to_json())
    args = ["recalibrate", root / "model.onnx", folder, "-o", tmp_path / "out.onnx", "--preprocess", spec, "--report", tmp_path / "r.json"]
    failed = _invoke(*args)
    assert failed.exit_code == 1 and "digit00003.png" in failed.stderr and "--on-bad-image skip" in failed.stderr
    result = _invoke(*args, "--on-bad-image", "skip")
    assert result.exit_code == 0, result.stderr
    assert "skipped digit00003.png" in result.stdout
    images = json.loads((tmp_path / "r.json").read_text())["extra"]["images"]
    assert images["used"] == 39 and [s["name"] for s in images["skipped"]] == ["digit00003.png"]


def test_pipeline_checks_spec_and_samples_kind_early(lab):
    root, _ = lab
    precheck(root / "model.onnx", root / "pngs", options=JobOptions(preprocess=LAB_SPEC))
    with pytest.raises(InvalidOptions, match=r"shape \(1, 9, 9\).*expects \(1, 8, 8\)"):
        precheck(root / "model.onnx", root / "pngs", options=JobOptions(preprocess={"color": "grey", "center_crop": 9}))
    with pytest.raises(InvalidOptions, match="apply to image samples"):
        recalibrate_files(root / "model.onnx", root / "digits.npy", JobOptions(preprocess={"resize": 8}))
    with pytest.raises(InvalidOptions, match="on_bad_image"):
        JobOptions(on_bad_image="ignore")
    with pytest.raises(InvalidOptions, match="unknown preprocessing field"):
        JobOptions(preprocess={"crop": 8})
    assert METADATA_KEY == "bnfold.preprocess"
    assert os.path.isdir(root / "pngs")
