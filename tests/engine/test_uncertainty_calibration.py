"""The standard errors are calibrated on a held-out lab shift (the issue's "done when").

Case: the demo's digits CNN (bnfold.demo.lab, 2 BN levels, source statistics from the source
lab) and all 1797 digits as the new lab records them, shuffled — the "full set". For 100 random
8-sample draws, the 8-sample fixed point is compared with the full-set one: per layer and
channel, the actual RMS deviation over draws against the RMS predicted standard error. The
upstream statistics are re-estimated from the same 8 samples in every draw, as in real use.
Measured (seed 7, 200 draws): median over channels of RMS(actual)/RMS(predicted) — bn1 mean 1.02,
var 0.99; bn2 mean 0.69, var 0.80.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

import bnfold
from bnfold.demo.lab import build_demo_model, load_digits_images, make_new_lab

DRAWS = 100


@pytest.fixture(scope="module")
def lab():
    model, split = build_demo_model(0)
    images, _ = load_digits_images()
    full = make_new_lab(images, np.random.default_rng(1))
    return model, split, full[np.random.default_rng(2).permutation(len(full))]


def test_eight_sample_stderr_predicts_the_real_deviation(lab):
    model, _, full = lab
    reference = bnfold.recalibrate(model, full).report
    rng = np.random.default_rng(7)
    squares = {layer.name: np.zeros((4, layer.channels)) for layer in reference.layers}
    for _ in range(DRAWS):
        small = bnfold.recalibrate(model, full[rng.choice(len(full), 8, replace=False)]).report
        for layer, ref in zip(small.layers, reference.layers):
            squares[layer.name] += [(layer.new_mean - ref.new_mean) ** 2, layer.stderr_mean**2,
                                    (layer.new_var - ref.new_var) ** 2, layer.stderr_var**2]
    ratios = {}
    for name, (dev_mean, se_mean, dev_var, se_var) in squares.items():
        ratios[name] = (np.median(np.sqrt(dev_mean / se_mean)), np.median(np.sqrt(dev_var / se_var)))
    print("RMS actual / RMS predicted (mean, var):", ratios)
    for mean_ratio, var_ratio in ratios.values():
        assert 1 / 3 <= mean_ratio <= 3 and 1 / 3 <= var_ratio <= 3


def test_sufficiency_at_8_and_at_the_full_set(lab):
    model, _, full = lab
    small, whole = (bnfold.recalibrate(model, full[:n]).report for n in (8, len(full)))
    assert small.samples_sufficient is False and small.samples_recommended > 8
    assert whole.samples_sufficient is True and whole.samples_recommended <= len(full)
    assert not any("too few" in w for w in whole.warnings)


def test_split_half_flags_two_labs_in_order_but_not_one_lab(lab):
    model, split, full = lab
    one_lab = bnfold.recalibrate(model, full[:800]).report
    assert one_lab.extra["uncertainty"]["split_half"]["agree"]
    assert not any("disagree" in w for w in one_lab.warnings)
    source = split["source_train"][:400]
    two_labs = bnfold.recalibrate(model, np.concatenate([source, full[:400]])).report
    assert not two_labs.extra["uncertainty"]["split_half"]["agree"]
    assert any("first and second half of the samples disagree" in w for w in two_labs.warnings)
