"""Archives of images as samples over HTTP (the shared `server`): .zip and .tar.gz jobs give what the
library gives on the same images; bad images fail or are skipped and reported; unsafe archives and
missing or unusable preprocessing specs are refused before a job is queued (422 naming the field).
Also: the samples file is named by its content in the job directory."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile

import numpy as np
import onnx
import pytest
from service_helpers import npy_bytes, samples_array, submit, tiny_model

from bnfold.pipeline import JobOptions, recalibrate_files
from service.errors import UnsupportedMediaType
from service.storage import _place_samples

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("tifffile")

SPEC = {"resize": 8, "center_crop": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
PROBLEM = "application/problem+json"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _images(count: int = 12) -> dict[str, bytes]:
    """Small RGB images of assorted sizes (resize + crop make each 8×8), a few hundred bytes each."""
    rng = np.random.default_rng(3)
    return {f"lab/{i:03d}.png": _png(rng.integers(0, 256, (10 + i % 3, 9 + i % 4, 3), dtype=np.uint8))
            for i in range(count)}


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


ARCHIVES = {"zip": _zip, "tar.gz": lambda members: _tar(members, "w:gz")}


@pytest.mark.parametrize("kind", list(ARCHIVES))
def test_image_archive_job_matches_the_library_on_the_same_images(server, tmp_path, kind):
    archive = ARCHIVES[kind](_images())
    with server.client() as client:
        response = submit(client, samples=archive, samples_name=f"lab.{kind}", wait=20,
                          options={"preprocess": SPEC, "batch_size": 4})
        job = response.json()
        assert response.status_code == 200 and job["state"] == "succeeded", job["error"]
        folded = onnx.load_from_string(client.get(job["result"]["model_url"]).content)
    images = job["report"]["extra"]["images"]
    assert (images["used"], images["skipped_count"], images["spec_origin"]) == (12, 0, "options")
    assert images["kind"] == kind.split(".")[0] and images["source"] == f"samples.{kind}"
    assert job["options"]["preprocess"] == SPEC and job["options"]["on_bad_image"] == "fail"

    (tmp_path / "m.onnx").write_bytes(tiny_model())
    (tmp_path / f"lab.{kind}").write_bytes(archive)
    expected = recalibrate_files(tmp_path / "m.onnx", tmp_path / f"lab.{kind}", JobOptions(preprocess=SPEC, batch_size=4))
    layer, want = job["report"]["layers"][0], expected.report.layers[0]
    np.testing.assert_array_equal(layer["new_mean"], want.new_mean)  # same float32 inputs, same batches
    np.testing.assert_array_equal(layer["new_var"], want.new_var)
    assert {p.key: p.value for p in folded.metadata_props}["bnfold.preprocess"] == \
        {p.key: p.value for p in expected.model.metadata_props}["bnfold.preprocess"]


def test_a_bad_image_past_the_first_batch_fails_the_job_or_is_skipped(server):
    members = _images()
    members["lab/011.png"] = b"\x89PNG\r\n\x1a\n broken"  # the precheck decodes the first batch only
    archive = _zip(members)
    with server.client() as client:
        failed = submit(client, samples=archive, options={"preprocess": SPEC}, wait=20).json()
        skipped = submit(client, samples=archive, options={"preprocess": SPEC, "on_bad_image": "skip"}, wait=20).json()
    assert failed["state"] == "failed" and failed["error"]["field"] == "samples"
    assert "lab/011.png" in failed["error"]["detail"]
    assert skipped["state"] == "succeeded", skipped["error"]
    images = skipped["report"]["extra"]["images"]
    assert images["used"] == 11 and [s["name"] for s in images["skipped"]] == ["lab/011.png"]


REFUSED = {
    # name: (samples, options, field, words in the detail)
    "path traversal member": (_zip({**_images(2), "../evil.png": _png(np.zeros((8, 8, 3), np.uint8))}),
                              {"preprocess": SPEC}, "samples", ["../evil.png", ".."]),
    "tar link member": (None, {"preprocess": SPEC}, "samples", ["link"]),
    "gzip that is not a tar": (gzip.compress(b"not a tar archive " * 40), {"preprocess": SPEC}, "samples", ["tar"]),
    "no spec anywhere": (_zip(_images(2)), None, "options.preprocess", ["no preprocessing", "preprocess"]),
    "spec that does not fit the model": (_zip(_images(2)), {"preprocess": {**SPEC, "center_crop": 9}},
                                         "options.preprocess", ["(3, 9, 9)", "(3, 8, 8)"]),
    "unknown spec field": (_zip(_images(2)), {"preprocess": {"crop": 8}}, "options.preprocess", ["crop"]),
    "invalid spec value": (_zip(_images(2)), {"preprocess": {**SPEC, "std": [0, 1, 1]}}, "options.preprocess", ["std"]),
    "spec for arrays": (npy_bytes(samples_array()), {"preprocess": SPEC}, "options.preprocess", ["image samples"]),
    "unknown on_bad_image": (_zip(_images(2)), {"preprocess": SPEC, "on_bad_image": "ignore"},
                             "options.on_bad_image", ["fail", "skip"]),
}


def _tar_with_link() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = _images(1)["lab/000.png"]
        info = tarfile.TarInfo("lab/000.png")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("lab/001.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(REFUSED))
def test_unusable_image_samples_or_specs_are_422_naming_the_field(server, case):
    samples, options, field, words = REFUSED[case]
    with server.client() as client:
        response = submit(client, samples=_tar_with_link() if samples is None else samples, options=options)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["field"] == field and all(word in body["detail"] for word in words), body
    assert list((server.data_dir / "incoming").iterdir()) == []


@pytest.mark.parametrize("content, name", [
    (npy_bytes(samples_array(2)), "samples.npy"),
    (None, "samples.npz"),
    (_zip(_images(1)), "samples.zip"),
    (_tar(_images(1)), "samples.tar"),
    (_tar(_images(1), "w:gz"), "samples.tar.gz"),
    (bz2.compress(_tar(_images(1))), "samples.tar.bz2"),
    (lzma.compress(_tar(_images(1))), "samples.tar.xz"),
])
def test_samples_are_named_by_content_not_by_the_client(tmp_path, content, name):
    if content is None:
        buffer = io.BytesIO()
        np.savez(buffer, x=samples_array(2))
        content = buffer.getvalue()
    upload = tmp_path / "samples.upload"
    upload.write_bytes(content)
    assert _place_samples(upload, limit=2**20) == name
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_other_samples_are_415(tmp_path):
    (tmp_path / "samples.upload").write_bytes(b"a,b\n1,2\n")
    with pytest.raises(UnsupportedMediaType, match="archive of images"):
        _place_samples(tmp_path / "samples.upload", limit=2**20)
