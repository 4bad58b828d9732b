"""Real architectures as users export them: the issue's acceptance criteria, model by model.

For each case of `zoo_models.CASES` (torchvision, timm, segmentation_models_pytorch; random init;
perturbed or untouched BN; opsets 11/13/17; some with dynamic batch *and* spatial axes):

* statistics — ``bnfold.recalibrate`` agrees with the float64 PyTorch eval-mode fixed point within
  1e-4 (|Δμ| in units of sqrt(σ²+ε), |Δσ²| relative to σ²+ε), for every BN and channel;
* folding — the public pipeline (``recalibrate_files``: recalibrate → fold → verify) succeeds; no
  BatchNormalization is left except those the fold reports as having no exact linear neighbour;
  and on the real samples the folded model matches the unfolded recalibrated one within 1e-3 of
  max |y| (ONNX Runtime, graph optimisations off).

Two light cases run in every ``make test``; the rest are marked ``heavy`` (CI: ``pytest -m heavy``).
Skipped without torch / timm / segmentation_models_pytorch.
"""

from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import pytest
import zoo_models as zoo

import bnfold
from bnfold.engine import recompute
from bnfold.pipeline import JobOptions, recalibrate_files

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

STATS_TOL = 1e-4
FOLD_TOL = 1e-3
SAMPLES = 16
BATCH = 6  # not a divisor of SAMPLES: the last batch is short

# BNs that have no exact linear neighbour and therefore stay BatchNormalization (issue 12), with the
# producer each one's reason names: DenseNet's BNs after a Concat whose inputs later blocks read too
# (58 dense layers' norm1, 3 transitions, norm5), followed by Relu; flatten_head's BatchNorm1d after a
# dynamic Reshape, followed by ReduceMean. Every other case folds to 0 BN.
KEPT = {"densenet121": (62, "Concat"), "flatten_head": (1, "Reshape")}


def _params(cases):
    out = []
    for case in cases:
        marks = [pytest.mark.heavy] if case.heavy else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def _require(case: zoo.Case) -> None:
    if case.family in ("torchvision", "timm", "smp"):
        try:  # first: timm and smp import torchvision, which needs the workaround in import_torchvision
            zoo.import_torchvision()
        except ImportError:
            pytest.skip("torchvision is not installed")
    if case.family == "timm":
        pytest.importorskip("timm")
    elif case.family == "smp":
        pytest.importorskip("segmentation_models_pytorch")


@functools.cache
def _exported(case: zoo.Case):
    net = zoo.build(case)
    return net, zoo.export(net, case), zoo.samples(case, SAMPLES)


@functools.cache
def _recalibrated(case: zoo.Case) -> bnfold.RecalibrationResult:
    """With `engine.recompute` on whatever the data size (16 small samples would not trigger it), so
    the statistics are checked with the peak tensors recomputed, as at real sizes."""
    _, model, x = _exported(case)
    with mock.patch.object(recompute, "MIN_BYTES", 0):
        return bnfold.recalibrate(model, x, batch_size=BATCH)


@pytest.mark.parametrize("case", _params(zoo.CASES))
def test_statistics_match_the_float64_pytorch_fixed_point(case):
    _require(case)
    net, model, x = _exported(case)
    assert zoo.count_op(model, "BatchNormalization") > 0, "the export lost its BN nodes"
    result = _recalibrated(case)
    mean_err, var_err = zoo.statistics_error(result.report.layers, zoo.torch_fixed_point(net, x))
    assert mean_err < STATS_TOL and var_err < STATS_TOL, (mean_err, var_err)
    # every real export is cut in ORT's optimized graph (engine.native), the BN1d of the flatten head too
    assert result.report.extra["stage_graph"] == "onnxruntime-optimized"
    if case.name in ("mobilenet_v2", "efficientnet_b0", "resnet50"):  # so the check above covers it
        assert result.report.extra["recomputed"], "no peak tensor recomputed"


@pytest.mark.parametrize("case", _params(zoo.CASES))
def test_pipeline_folds_and_matches_on_real_samples(case, tmp_path):
    _require(case)
    _, model, x = _exported(case)
    np.save(tmp_path / "samples.npy", x)
    out = recalibrate_files(model.SerializeToString(), tmp_path / "samples.npy",
                            JobOptions(batch_size=BATCH, verify_samples=SAMPLES))
    decisions = out.report.extra["fold"]["decisions"]
    without_neighbour = [d for d in decisions if d["fate"] in ("kept", "affine")]
    kept, producer = KEPT.get(case.name, (0, None))
    assert len(without_neighbour) == kept, [d["reason"] for d in without_neighbour]
    for d in without_neighbour:
        assert "no exact linear neighbour" in d["reason"], d
        assert f"its producer {producer}" in d["reason"] or f"{producer} input" in d["reason"], d
    assert zoo.count_op(out.model, "BatchNormalization") == len(without_neighbour)
    assert not [d["bn"] for d in decisions if d["fate"] == "affine"], "BN without an exact neighbour must stay BN"
    unfolded = _recalibrated(case).model
    assert zoo.fold_difference(unfolded, out.model, x) < FOLD_TOL
