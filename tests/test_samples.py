"""`samples`: model inputs, batching (static batch dims re-cut, uneven iterables), casting, files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import conv_bn, multi_input
from onnx import helper, numpy_helper

from bnfold.errors import InvalidSamples
from bnfold.samples import ModelInput, iter_batches, load_samples, model_inputs

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
