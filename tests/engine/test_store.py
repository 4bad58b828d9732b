"""`store.TensorStore`: cut tensors in RAM up to a budget, the rest in a private temp dir."""

from __future__ import annotations

import os

import numpy as np
import pytest
from models import _Builder, make_samples, residual_block
from reference import reference_recalibrate

import bnfold
from bnfold.engine.store import TensorStore


def _array(value: float, n: int = 4) -> np.ndarray:
    return np.full(n, value, np.float64)  # n * 8 bytes


def _spill_dirs(parent) -> list[str]:
    return [d for d in os.listdir(parent) if d.startswith("bnfold-spill-")]


def test_keeps_in_memory_within_budget(tmp_path):
    with TensorStore(budget=64, spill_dir=tmp_path) as store:
        a, b = _array(1.0), _array(2.0)
        store.put("a", 0, a)
        store.put("b", 0, b)
        assert store.bytes_in_memory == 64 and store.bytes_spilled == 0
        assert store.get("a", 0) is a  # not copied
        np.testing.assert_array_equal(store.get("b", 0), b)
        assert _spill_dirs(tmp_path) == []  # no directory until something spills


def test_spills_beyond_budget(tmp_path):
    with TensorStore(budget=40, spill_dir=tmp_path) as store:
        store.put("a", 0, _array(1.0))  # 32 bytes: fits
        store.put("a", 1, _array(2.0))  # would make 64 > 40: spilled
        store.put("b", 0, _array(3.0, 1))  # 8 bytes: fits again (32 + 8 = 40)
        assert store.bytes_in_memory == 40 and store.bytes_spilled == 32
        (spill,) = _spill_dirs(tmp_path)
        assert len(os.listdir(tmp_path / spill)) == 1
        got = store.get("a", 1)
        np.testing.assert_array_equal(got, _array(2.0))
        assert not isinstance(got, np.memmap)
        np.testing.assert_array_equal(store.get("a", 0), _array(1.0))
        np.testing.assert_array_equal(store.get("b", 0), _array(3.0, 1))


def test_budget_zero_spills_everything(tmp_path):
    with TensorStore(budget=0, spill_dir=tmp_path) as store:
        for i in range(3):
            store.put("t", i, _array(i, 2))
        assert store.bytes_in_memory == 0 and store.peak_bytes_in_memory == 0
        assert store.bytes_spilled == 3 * 16
        for i in range(3):
            np.testing.assert_array_equal(store.get("t", i), _array(i, 2))


def test_drop_frees_memory_and_files(tmp_path):
    with TensorStore(budget=32, spill_dir=tmp_path) as store:
        store.put("a", 0, _array(1.0))  # memory
        store.put("a", 1, _array(2.0))  # disk
        store.put("b", 0, _array(3.0))  # disk
        (spill,) = _spill_dirs(tmp_path)
        assert len(os.listdir(tmp_path / spill)) == 2
        store.drop("a")
        assert store.bytes_in_memory == 0
        assert store.peak_bytes_in_memory == 32
        assert len(os.listdir(tmp_path / spill)) == 1
        with pytest.raises(KeyError):
            store.get("a", 1)
        np.testing.assert_array_equal(store.get("b", 0), _array(3.0))
        store.put("c", 0, _array(4.0))  # memory is free again
        assert store.bytes_in_memory == 32


def test_spilled_tensors_survive_drops_of_others(tmp_path):
    """Files of dropped tensors must not be reused by name while other spilled tensors live:
    after put a, put b, drop a, put c, tensor b must still read back as b."""
    with TensorStore(budget=0, spill_dir=tmp_path) as store:
        store.put("a", 0, _array(1.0))
        store.put("b", 0, _array(2.0))
        store.drop("a")
        store.put("c", 0, _array(3.0))
        np.testing.assert_array_equal(store.get("b", 0), _array(2.0), err_msg="b was overwritten by c")
        np.testing.assert_array_equal(store.get("c", 0), _array(3.0))
        store.drop("b")
        np.testing.assert_array_equal(store.get("c", 0), _array(3.0), err_msg="dropping b deleted c's file")


def test_close_removes_the_temp_dir(tmp_path):
    store = TensorStore(budget=0, spill_dir=tmp_path)
    store.put("a", 0, _array(1.0))
    assert len(_spill_dirs(tmp_path)) == 1
    store.close()
    assert _spill_dirs(tmp_path) == []
    assert store.bytes_in_memory == 0
    store.close()  # twice is fine


def test_temp_dir_removed_when_the_with_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with TensorStore(budget=0, spill_dir=tmp_path) as store:
            store.put("a", 0, _array(1.0))
            raise RuntimeError("boom")
    assert _spill_dirs(tmp_path) == []


def test_recalibrate_leaves_no_spill_dir(tmp_path):
    model = _chain(2)
    bnfold.recalibrate(model, make_samples(model, 6), memory_budget=0, spill_dir=str(tmp_path), batch_size=2)
    assert os.listdir(tmp_path) == []


# -- end to end: spilling over many BN levels ----------------------------------------------------

def _chain(levels: int, seed: int = 30):
    """x(N,3,5,5) -> (Conv -> BN -> Relu) x levels: one BN per level, each cut tensor read by the
    next stage only, so the store drops and puts at every stage boundary."""
    b = _Builder(f"chain{levels}", seed)
    h, channels = b.input("x", ["N", 3, 5, 5]), 3
    for i in range(levels):
        h = b.conv(h, channels, 4, [3, 3], pads=[1] * 4, base=f"conv{i}")
        h = b.relu(b.bn(h, 4, f"bn{i}"), f"relu{i}")
        channels = 4
    b.output(h)
    return b.build()


@pytest.mark.parametrize("budget", [2**30, 0, 1500], ids=["in-memory", "all-spilled", "part-spilled"])
def test_spilling_over_many_levels_matches_the_reference(budget):
    model = _chain(5)
    samples = make_samples(model, 10, seed=1)
    want = reference_recalibrate(model, samples)
    result = bnfold.recalibrate(model, samples, batch_size=3, memory_budget=budget)
    assert [layer.level for layer in result.report.layers] == [0, 1, 2, 3, 4]
    for layer in result.report.layers:
        mean, var = want[layer.name]
        np.testing.assert_array_less(np.abs(layer.new_mean - mean), 1e-4 * np.sqrt(var) + 1e-7)
        np.testing.assert_array_less(np.abs(layer.new_var - var), 1e-4 * var + 1e-9)
    store = result.report.extra["store"]
    assert (store["bytes_spilled"] > 0) == (budget < 2**30)
    assert store["peak_bytes_in_memory"] <= budget


def _bytes_in(directory) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_disk_budget_refuses_the_spill_that_would_pass_it_and_names_the_limit(tmp_path):
    with TensorStore(budget=0, spill_dir=tmp_path, disk_budget=100) as store:
        store.put("a", 0, _array(1.0, 6))  # 48 bytes on disk
        store.put("a", 1, _array(2.0, 6))  # 96
        with pytest.raises(bnfold.errors.DiskBudgetExceeded, match="disk budget of 100 bytes"):
            store.put("a", 2, _array(3.0, 6))  # 144 > 100: nothing written
        assert store.bytes_on_disk == 96
        (spill,) = _spill_dirs(tmp_path)
        assert len(os.listdir(tmp_path / spill)) == 2
        store.drop("a")  # dropped files give their room back
        assert store.bytes_on_disk == 0
        store.put("b", 0, _array(4.0, 12))  # 96 fits again
        np.testing.assert_array_equal(store.get("b", 0), _array(4.0, 12))


def test_recalibrate_under_a_disk_budget_fails_cleanly_and_leaves_no_files(tmp_path):
    model = residual_block()
    samples = make_samples(model, 64, seed=3)
    with pytest.raises(bnfold.errors.DiskBudgetExceeded, match="BNFOLD_JOB_DISK_BUDGET"):
        bnfold.recalibrate(model, samples, batch_size=8, memory_budget=0, spill_dir=tmp_path, disk_budget=4096)
    assert _spill_dirs(tmp_path) == []  # the store removes its files on the way out
    unbounded = bnfold.recalibrate(model, samples, batch_size=8, memory_budget=0, spill_dir=tmp_path,
                                   disk_budget=10 * 2**20)
    assert 4096 < unbounded.report.extra["store"]["bytes_spilled"]


# -- per-batch release ------------------------------------------------------------------------------

def test_done_releases_only_the_last_read(tmp_path):
    with TensorStore(budget=32, spill_dir=tmp_path) as store:
        store.put("a", 0, _array(1.0))  # memory
        store.put("a", 1, _array(2.0))  # disk
        store.done("a", 0, last=False)
        np.testing.assert_array_equal(store.get("a", 0), _array(1.0))
        store.done("a", 0, last=True)
        assert store.bytes_in_memory == 0
        with pytest.raises(KeyError):
            store.get("a", 0)
        store.done("a", 1, last=True)
        assert os.listdir(tmp_path / _spill_dirs(tmp_path)[0]) == []
