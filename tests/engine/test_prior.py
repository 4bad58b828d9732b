"""`prior=N`: source statistics mixed into the target ones inside the fixed point (Schneider et al. 2020).

Yardstick: the demo digits CNN recomputed in float64 NumPy level by level — conv1 → stats →
mix → BN → ReLU → conv2 → stats → mix — so the second level must see the *mixed* first level.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.errors import InvalidOptions

pytest.importorskip("sklearn")
from bnfold.demo.lab import _conv, accuracy, make_new_lab

EPS = 1e-5


def _mixed(x, old_mean, old_var, prior, n):
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    w = prior / (prior + n)
    return w * old_mean + (1 - w) * mean, w * old_var + (1 - w) * var


def _reference(model, x, prior):
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h1 = _conv(x.astype(np.float64), p["conv1.weight"], stride=1)
    m1, v1 = _mixed(h1, p["bn1.mean"], p["bn1.var"], prior, len(x))
    y1 = np.maximum((h1 - m1[:, None, None]) / np.sqrt(v1[:, None, None] + EPS), 0)
    h2 = _conv(y1, p["conv2.weight"], stride=2)
    m2, v2 = _mixed(h2, p["bn2.mean"], p["bn2.var"], prior, len(x))
    return [(m1, v1), (m2, v2)]


@pytest.fixture(scope="module")
def lab(demo_model):
    model, split = demo_model()
    return model, split, make_new_lab(split["source_test"], np.random.default_rng(0))


@pytest.mark.parametrize("prior", [0, 4, 16.5])
def test_mixing_inside_the_fixed_point(lab, prior):
    model, _, samples = lab
    result = bnfold.recalibrate(model, samples[:16], prior=prior, batch_size=5)
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for i, (layer, (mean, var)) in enumerate(zip(result.report.layers, _reference(model, samples[:16], prior)), 1):
        np.testing.assert_allclose(stored[f"bn{i}.mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stored[f"bn{i}.var"], var, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(layer.new_mean, mean, rtol=1e-5, atol=1e-6)  # the report shows what was used
        assert (layer.target_mean is None) == (prior == 0)
    used = result.report.extra["statistics"]
    assert used["prior"] == prior and used["source_weight"] == pytest.approx(prior / (prior + 16))


def test_default_is_target_only(lab):
    model, _, samples = lab
    plain, zero = bnfold.recalibrate(model, samples[:16]), bnfold.recalibrate(model, samples[:16], prior=0)
    assert plain.model.SerializeToString() == zero.model.SerializeToString()
    assert plain.report.extra["statistics"]["statistics"] == "target"


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "16", True])
def test_bad_prior(lab, bad):
    with pytest.raises(InvalidOptions, match="prior"):
        bnfold.recalibrate(lab[0], lab[2][:4], prior=bad)


def test_prior_hurts_under_a_severe_shift(lab):
    """The documented reason it is off by default (engine/prior.py): new lab, n = 16."""
    model, split, samples = lab
    held_out = make_new_lab(split["new_lab"], np.random.default_rng(3))
    target, mixed = (accuracy(bnfold.recalibrate(model, samples[:16], prior=p).model, held_out,
                              split["new_lab_labels"]) for p in (0, 16))
    assert mixed < target - 0.2
