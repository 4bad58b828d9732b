"""The standard errors are calibrated on a held-out lab shift (the issue's "done when").

Cases: the demo's digits CNN (bnfold.demo.lab, 2 BN levels), and a deeper one built the same way
here (5 Conv–BN–ReLU levels, 16–64 channels, random He filters, source statistics measured on 800
source-lab digits); the new lab is all 1797 digits as `make_new_lab` records them, shuffled — the
"full set". For random 8-sample draws, the 8-sample fixed point is compared with the full-set one:
per layer and channel, the actual RMS deviation over draws against the RMS predicted standard
error, then the median over channels. Upstream statistics are re-estimated from the same 8 samples
in every draw, as in real use.

Measured (seed 7, 100 draws), RMS(actual)/RMS(predicted), mean / var:
demo bn1 0.96 / 0.99, bn2 0.74 / 0.82; deep bn1 0.96 / 0.99, bn2 0.48 / 0.59, bn3 0.72 / 0.87,
bn4 0.50 / 0.83, bn5 0.85 / 0.94. Below 1 deeper down: the standard errors are conditional on the
upstream statistics, and re-estimating those from the same samples partly normalises the sampling
error away (the predicted error is then conservative, never optimistic, on these cases).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("sklearn")

import bnfold
from bnfold.demo.lab import (
    EPS,
    _bn_relu,
    _conv,
    load_digits_images,
    make_new_lab,
)

DRAWS = 60


def deep_model(source: np.ndarray, widths=(16, 16, 32, 32, 64), strides=(1, 1, 2, 1, 2), seed: int = 0):
    """image (N,1,8,8) → 5 × [Conv 3×3 pad 1 → BN → Relu] → (N,64,2,2); BN statistics of `source`."""
    rng = np.random.default_rng(seed)
    h, c_in, params, nodes, x = source.astype(np.float64), 1, {}, [], "image"
    for i, (c, s) in enumerate(zip(widths, strides), 1):
        w = rng.normal(0, np.sqrt(2 / (9 * c_in)), (c, c_in, 3, 3))
        h, mean, var = _bn_relu(_conv(h, w, stride=s))
        params |= {f"w{i}": w, f"s{i}": np.ones(c), f"b{i}": np.zeros(c), f"m{i}": mean, f"v{i}": var}
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", strides=[s, s],
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", *(f"{p}{i}" for p in "sbmv")], [f"n{i}"],
                                   name=f"bn{i}", epsilon=EPS),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
        x, c_in = f"r{i}", c
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", c_in, 2, 2])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def lab(demo_model):
    model, split = demo_model()
    images, _ = load_digits_images()
    full = make_new_lab(images, np.random.default_rng(1))
    return model, split, full[np.random.default_rng(2).permutation(len(full))]


@pytest.mark.parametrize("case", ["demo", "deep"])
def test_eight_sample_stderr_predicts_the_real_deviation(lab, case):
    model, split, full = lab
    if case == "deep":
        model = deep_model(split["source_train"])
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
