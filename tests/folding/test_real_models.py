"""Folding real torchvision exports: no false alarms, real-sample equivalence, unfoldable BNs kept.

efficientnet_b0 and regnet_y_400mf (squeeze-excite) were refused by verification on
standard-normal inputs; densenet121 has BNs after a Concat, followed by Relu, that no rule folds.
Each model is exported once per module (random init, see real_models.py), then folded with and
without samples and recalibrated (fold included) on image-like samples; the folded models are
compared with the unfolded ones on held-out samples of the same distribution.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from real_models import export_torchvision, image_samples

from bnfold.pipeline import JobOptions, fold_file, recalibrate_files

pytestmark = pytest.mark.heavy
MODELS = ["efficientnet_b0", "regnet_y_400mf", "densenet121"]
TOLERANCE = 1e-3  # of max |y| on the held-out samples (the bar)


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp(request.param)
    samples = image_samples(48, seed=0)
    np.save(d / "samples.npy", samples)
    path = export_torchvision(request.param, d / "model.onnx", samples)
    return request.param, path, d / "samples.npy", image_samples(16, seed=1)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no Conv+BN fusion in the reference
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _relative_diff(reference: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray) -> float:
    want, got = _run(reference, x).astype(np.float64), _run(folded, x).astype(np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _bns(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _unfoldable(model: onnx.ModelProto) -> set[str]:
    """BNs with no exact linear neighbour, read off the graph independently of bnfold's rules:
    not produced by a Conv that feeds only them, and not feeding a Conv/Gemm alone."""
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    out = set()
    for bn in _bns(model):
        before = producer.get(bn.input[0])
        after = users.get(bn.output[0], [])
        backward = before is not None and before.op_type == "Conv" and len(users[bn.input[0]]) == 1
        forward = len(after) == 1 and after[0].op_type in ("Conv", "Gemm")
        if not (backward or forward):
            out.add(bn.name)
    return out


def test_fold_without_samples_is_accepted_and_matches_on_real_samples(exported):
    _, path, _, held_out = exported
    job = fold_file(path)
    check = job.report.extra["verification"]
    assert check["passed"] and check["random"] == 2 and check["random_inputs"]["bn"], check
    assert _relative_diff(onnx.load(path), job.model, held_out) <= TOLERANCE


def test_fold_on_samples_is_accepted(exported):
    _, path, samples, held_out = exported
    job = fold_file(path, JobOptions(verify_samples=16), samples)
    check = job.report.extra["verification"]
    assert check["passed"] and (check["feeds"], check["random"]) == (1, 0)
    assert check["outputs"][0]["max_rel"] <= TOLERANCE
    assert _relative_diff(onnx.load(path), job.model, held_out) <= TOLERANCE


def test_recalibrate_and_fold_matches_the_unfolded_recalibrated_model(exported):
    name, path, samples, held_out = exported
    options = JobOptions(batch_size=16, verify_samples=16)
    unfolded = recalibrate_files(path, samples, JobOptions(fold=False, batch_size=16)).model
    folded = recalibrate_files(path, samples, options)
    assert folded.report.extra["verification"]["passed"]
    assert _relative_diff(unfolded, folded.model, held_out) <= TOLERANCE
    expected = _unfoldable(onnx.load(path))
    left = {n.name for n in _bns(folded.model)}
    assert left == expected  # only the BNs with no exact linear neighbour stay BN
    if name == "densenet121":
        assert len(expected) == 62 and len(_bns(onnx.load(path))) == 121
        kept = [d for d in folded.report.extra["fold"]["decisions"] if d["fate"] == "kept"]
        assert {d["bn"] for d in kept} == expected and all("no exact linear neighbour" in d["reason"] for d in kept)
        # kept BNs carry the recalibrated statistics, not the exported ones
        stats = {t.name: t for t in folded.model.graph.initializer}
        bn = next(n for n in _bns(folded.model))
        original = {t.name: t for t in onnx.load(path).graph.initializer}
        assert stats[bn.input[3]].raw_data != original[bn.input[3]].raw_data
    else:
        assert not expected
