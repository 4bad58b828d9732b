"""`samples`: model inputs, batching (static batch dims re-cut, uneven iterables), casting, files."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest
from models import conv_bn, multi_input
from onnx import helper, numpy_helper

import bnfold.inputs.arrays as samples_module
from bnfold.errors import InvalidSamples
from bnfold.inputs.arrays import LazyArray, ModelInput, iter_batches, load_samples, model_inputs

X = ModelInput("x", np.dtype(np.float32), (None, 3))
X4 = ModelInput("x", np.dtype(np.float32), (4, 3))  # static batch dimension 4


def _rows(n: int, start: int = 0, dtype=np.float32) -> np.ndarray:
    """n samples of shape (3,), sample i holds i, i + 0.25, i + 0.5: order is visible."""
    i = np.arange(start, start + n, dtype=np.float64)[:, None]
    return (i + np.array([0.0, 0.25, 0.5])).astype(dtype)


def _sizes(batches) -> list[int]:
    return [b["x"].shape[0] for b in batches]


# -- model_inputs ----------------------------------------------------------------------------------

def test_model_inputs_symbolic_and_static_dims():
    (spec,) = model_inputs(conv_bn())
    assert spec == ModelInput("x", np.dtype(np.float32), (None, 3, 8, 8))
    assert spec.describe() == "(?, 3, 8, 8)"
    assert [(i.name, i.dims) for i in model_inputs(multi_input())] == [("img", (None, 3, 6, 6)), ("vec", (None, 5))]


def test_model_inputs_skip_initializer_backed_inputs():
    """IR < 4 lists initializers as graph inputs too: those are constants, not samples."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["batch", 2])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT16, [2])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x, w],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["batch", 2])],
        [numpy_helper.from_array(np.ones(2, np.float16), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    assert model_inputs(model) == [ModelInput("x", np.dtype(np.float16), (None, 2))]


# -- dynamic batch dimension -----------------------------------------------------------------------

def test_array_is_cut_into_batch_size():
    x = _rows(10)
    batches = list(iter_batches(x, [X], 3))
    assert _sizes(batches) == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


def test_uneven_iterable_passes_through_and_skips_empty_batches():
    parts = [_rows(3), _rows(0, 3), _rows(5, 3), _rows(2, 8)]
    batches = list(iter_batches(iter(parts), [X], 4))
    assert _sizes(batches) == [3, 5, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), _rows(10))


def test_iterable_is_read_once_and_lazily():
    consumed = []

    def source():
        for i in range(3):
            consumed.append(i)
            yield _rows(2, 2 * i)

    batches = iter_batches(source(), [X], 8)
    assert consumed == []  # nothing read before the first batch is asked for
    next(batches)
    assert consumed == [0]
    assert _sizes(batches) == [2, 2]
    assert consumed == [0, 1, 2]


# -- static batch dimension ------------------------------------------------------------------------

def test_static_batch_dim_overrides_batch_size():
    batches = list(iter_batches(_rows(12), [X4], 5))
    assert _sizes(batches) == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), _rows(12))


def test_static_batch_dim_recuts_uneven_iterables():
    parts = [_rows(3), _rows(5, 3), _rows(1, 8), _rows(0, 9), _rows(3, 9)]
    batches = list(iter_batches(iter(parts), [X4], 2))
    assert _sizes(batches) == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), _rows(12))


def test_static_batch_dim_recuts_big_iterable_batches():
    batches = list(iter_batches(iter([_rows(9, 0), _rows(3, 9)]), [X4], 64))
    assert _sizes(batches) == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), _rows(12))


def test_static_batch_dim_remainder_fails_after_the_full_batches():
    batches = iter_batches(iter([_rows(3), _rows(3, 3)]), [X4], 2)
    assert _sizes([next(batches)]) == [4]
    with pytest.raises(InvalidSamples, match="fixed at 4.*2 over"):
        next(batches)


def test_static_batch_dim_multi_input_recut_together():
    img = ModelInput("img", np.dtype(np.float32), (2, 2))
    vec = ModelInput("vec", np.dtype(np.float32), (2, 1))
    parts = [{"img": _rows(3)[:, :2], "vec": _rows(3)[:, :1]}, {"img": _rows(1, 3)[:, :2], "vec": _rows(1, 3)[:, :1]}]
    batches = list(iter_batches(iter(parts), [img, vec], 10))
    assert [(b["img"].shape, b["vec"].shape) for b in batches] == [((2, 2), (2, 1))] * 2
    np.testing.assert_array_equal(np.concatenate([b["vec"] for b in batches])[:, 0], np.arange(4))


# -- casting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.float32])
def test_float_samples_are_cast_to_the_input_type(dtype):
    x = (np.random.default_rng(0).standard_normal((5, 3)) * 100).astype(dtype)
    (batch,) = iter_batches(x, [X], 8)
    assert batch["x"].dtype == np.float32
    assert batch["x"].flags.c_contiguous
    np.testing.assert_array_equal(batch["x"], x.astype(np.float32))


def test_float32_samples_to_a_float16_model():
    spec = ModelInput("x", np.dtype(np.float16), (None, 3))
    (batch,) = iter_batches(_rows(4), [spec], 8)
    assert batch["x"].dtype == np.float16


def test_non_contiguous_samples_become_contiguous():
    x = _rows(12)[::2]
    assert not x.flags.c_contiguous
    batches = list(iter_batches(x, [X], 4))
    assert all(b["x"].flags.c_contiguous for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)


def test_int_samples_are_not_cast():
    with pytest.raises(InvalidSamples, match="dtype int64.*float32"):
        list(iter_batches(np.arange(12).reshape(4, 3), [X], 8))


# -- mappings ----------------------------------------------------------------------------------------

def test_mapping_batches_keep_every_input():
    specs = model_inputs(multi_input())
    samples = {"vec": np.zeros((5, 5)), "img": np.ones((5, 3, 6, 6))}
    batches = list(iter_batches(samples, specs, 2))
    assert [sorted(b) for b in batches] == [["img", "vec"]] * 3
    assert [b["img"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b["vec"].dtype == np.float32 for b in batches)


def test_single_input_may_be_given_as_a_mapping():
    (batch,) = iter_batches({"x": _rows(3)}, [X], 8)
    np.testing.assert_array_equal(batch["x"], _rows(3))


# -- files -------------------------------------------------------------------------------------------

def test_npy_file_reads_the_same_batches(tmp_path):
    path = tmp_path / "s.npy"
    x = _rows(11, dtype=np.float64)
    np.save(path, x)
    samples = load_samples(path)
    assert samples.shape == (11, 3) and len(samples) == 11
    np.testing.assert_array_equal(samples[2:5], x[2:5])
    batches = list(iter_batches(samples, [X], 4))
    assert _sizes(batches) == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x.astype(np.float32))


def test_npy_file_with_static_batch_dim(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, _rows(8))
    assert _sizes(iter_batches(load_samples(path), [X4], 3)) == [4, 4]


def test_fortran_order_npy_is_refused_clearly(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.asfortranarray(_rows(6)))
    with pytest.raises(InvalidSamples, match="f.npy"):
        load_samples(path)


def test_npz_file_gives_a_mapping(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, img=np.zeros((2, 3, 6, 6), np.float32), vec=np.ones((2, 5), np.float32))
    samples = load_samples(path)
    assert sorted(samples) == ["img", "vec"]
    batches = list(iter_batches(samples, model_inputs(multi_input()), 8))
    assert len(batches) == 1 and batches[0]["vec"].shape == (2, 5)


# -- .npz read lazily (a member is never read whole) ----------------------------------------------

WIDE = ModelInput("x", np.dtype(np.float32), (None, 256))


def _wide(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 256)).astype(np.float32)  # 1 KiB per row


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_npz_members_read_like_the_arrays_in_any_order(tmp_path, save):
    path = tmp_path / "s.npz"
    save(path, img=np.arange(14 * 3 * 6 * 6, dtype=np.float32).reshape(14, 3, 6, 6), vec=_rows(14, dtype=np.float64))
    samples = load_samples(path)
    assert all(isinstance(a, LazyArray) for a in samples.values()) and samples["vec"].shape == (14, 3)
    inputs = [ModelInput("img", np.dtype(np.float32), (None, 3, 6, 6)), ModelInput("vec", np.dtype(np.float32), (None, 3))]
    batches = list(iter_batches(samples, inputs, 4))
    assert [b["vec"].shape[0] for b in batches] == [4, 4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["vec"] for b in batches]), _rows(14))
    np.testing.assert_array_equal(samples["vec"][:3], _rows(3, dtype=np.float64))  # back to the start
    np.testing.assert_array_equal(samples["vec"][9:11], _rows(2, 9, dtype=np.float64))  # forward, skipping rows


class _CountingFile:
    """A real file that records how many bytes each read asks for."""

    def __init__(self, f, sizes: list[int]):
        self._f, self._sizes = f, sizes

    def read(self, n=-1):
        data = self._f.read(n)
        self._sizes.append(len(data))
        return data

    def readinto(self, buffer):
        got = self._f.readinto(buffer)
        self._sizes.append(got)
        return got

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_stored_npz_member_is_read_one_batch_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    np.savez(path, x=_wide(512))  # 512 KiB
    sizes: list[int] = []
    monkeypatch.setattr(samples_module, "open", lambda *a, **k: _CountingFile(open(*a, **k), sizes), raising=False)
    samples = load_samples(path)
    assert sum(sizes) < 1024  # the local header and the .npy header only
    sizes.clear()
    total = sum(b["x"].shape[0] for b in iter_batches(samples, [WIDE], 32))
    assert total == 512 and max(sizes) == 32 * 1024 and sum(sizes) == 512 * 1024


def test_compressed_npz_member_is_inflated_one_batch_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    np.savez_compressed(path, x=_wide(512))
    sizes: list[int] = []
    real_read = zipfile.ZipExtFile.read

    def read(self, n=-1):
        data = real_read(self, n)
        sizes.append(len(data) if n is not None and n >= 0 else 1 << 40)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    samples = load_samples(path)
    assert sum(sizes) < 1024
    sizes.clear()
    got = np.concatenate([b["x"] for b in iter_batches(samples, [WIDE], 32)])
    np.testing.assert_array_equal(got, _wide(512))
    assert max(sizes) <= 32 * 1024 and sum(sizes) == 512 * 1024


def _npz_with(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "compressed"])
def test_npz_member_shorter_than_its_header_says_is_refused_up_front(tmp_path, compression):
    path = tmp_path / "s.npz"
    path.write_bytes(_npz_with({"x.npy": _npy(_wide(64))[: 200 + 10 * 1024]}, compression))
    with pytest.raises(InvalidSamples, match=r"s\.npz.*member 'x\.npy' is truncated"):
        load_samples(path)


def test_corrupt_compressed_member_fails_when_read_naming_it(tmp_path):
    path = tmp_path / "s.npz"
    np.savez_compressed(path, x=_wide(64))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    end = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size
    data[end - 40 : end - 20] = bytes(20)  # inside the deflate stream, past the .npy header
    path.write_bytes(bytes(data))
    samples = load_samples(path)
    with pytest.raises(InvalidSamples, match="member 'x.npy' cannot be decompressed"):
        list(iter_batches(samples, [WIDE], 16))


def test_npz_members_that_are_not_arrays_are_refused(tmp_path):
    path = tmp_path / "s.npz"
    path.write_bytes(_npz_with({"x.npy": _npy(_rows(4)), "labels.txt": b"1 2 3 4"}))
    with pytest.raises(InvalidSamples, match="member 'labels.txt' is not a .npy array"):
        load_samples(path)


@pytest.mark.parametrize("shape, words", [((10, 2**32, 2**32), "truncated"), ((10, -1, 3), "negative dimension"),
                                          ((-5, 3), "negative dimension")])
def test_hostile_npy_headers_are_invalid_samples_not_crashes(tmp_path, shape, words):
    """(10, 2**32, 2**32) wraps to 0 bytes under np.prod(int64): it used to pass every size check
    and fail later inside np.empty (an internal error)."""
    path = tmp_path / "s.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(bytes(64))
    with pytest.raises(InvalidSamples, match=words):
        load_samples(path)
