"""Test helpers shared across the tree (`models`, `reference`, `torchvision_reference`) import by name.

pytest puts this folder on sys.path (rootdir-relative "prepend" import mode) because it holds this
conftest; the per-room folders below (engine/, folding/, …) mirror `bnfold/`.
"""

import numpy as np
import onnx
import pytest


@pytest.fixture(scope="session")
def demo_model():
    """`bnfold.demo.lab.build_demo_model(0)` — the built-in demo's trained digits CNN and its data
    split — trained once per session instead of once per module (~1.6 s each, eight modules).
    Call it for fresh copies: ``model, split = demo_model()``."""
    pytest.importorskip("sklearn")  # the demo's digits ship with scikit-learn
    from bnfold.demo.lab import build_demo_model

    model, split = build_demo_model(0)

    def fresh() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, {name: array.copy() for name, array in split.items()}

    return fresh
