"""Progress of `recalibrate`: it moves during the first BN level too, which reads the samples lazily.

With arrays the sample count is known up front, so stage 0 reports samples read / samples expected;
with a plain iterable of batches it is not, and the description counts the samples read instead.
"""

from __future__ import annotations

import numpy as np
import pytest
from models import make_samples, residual_block

import bnfold


def _calls(samples, **options) -> list[tuple[str, float]]:
    calls: list[tuple[str, float]] = []
    bnfold.recalibrate(residual_block(), samples, progress=lambda text, fraction: calls.append((text, fraction)), **options)
    return calls


def test_arrays_move_the_fraction_during_the_first_level():
    x = make_samples(residual_block(), 40, seed=0)["x"]
    calls = _calls(x, batch_size=8)
    first = [fraction for text, fraction in calls if text.startswith("BN level 1/3")]
    assert first == pytest.approx([k / 5 / 3 for k in range(1, 6)])  # 8, 16, …, 40 of 40 samples, level 1 of 3
    fractions = [fraction for _, fraction in calls]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_a_dict_of_arrays_is_counted_too():
    x = make_samples(residual_block(), 12, seed=0)["x"]
    calls = _calls({"x": x}, batch_size=4)
    assert calls[0] == ("BN level 1/3", pytest.approx(1 / 3 / 3))


def test_unknown_count_says_how_many_samples_were_read():
    x = make_samples(residual_block(), 12, seed=0)["x"]
    calls = _calls((x[i:i + 4] for i in range(0, 12, 4)), batch_size=4)
    first = [(text, fraction) for text, fraction in calls if text.startswith("BN level 1/3")]
    assert first == [("BN level 1/3 (4 samples read)", 0.0), ("BN level 1/3 (8 samples read)", 0.0),
                     ("BN level 1/3 (12 samples read)", 0.0)]
    assert calls[-1][1] == pytest.approx(1.0)


def test_image_sources_give_their_file_count(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from bnfold.inputs.images import ImageSamples

    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    spec = {"resize": 8, "center_crop": 8, "color": "grey", "mean": [0.5], "std": [0.25]}
    with ImageSamples(tmp_path, spec, batch_size=2) as images:
        assert images.expected_samples == 6
