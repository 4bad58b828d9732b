"""torchvision models exported with their BN nodes kept, and image-like samples to run them on.

Random init (no download). Every BN gets distinct weight, bias and running statistics: the running
statistics are measured on the samples' distribution (torch train-mode passes, cumulative average)
and then jittered, the affine parameters drawn around (1, 0). Distinct values keep PyTorch's
exporter from deduplicating initializers, and statistics that match the data make the network
behave like a trained one on it (activations neither vanish nor explode with depth).
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import numpy as np


def import_torchvision():
    """torchvision, or skip the test: its C ops do not load beside this torch (see shared NOTES)."""
    import pytest

    torch = pytest.importorskip("torch")
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    torchvision = pytest.importorskip("torchvision")
    return torch, torchvision


def image_samples(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(count, 3, size, size) float32: smooth random images in [0, 1] (bilinear upsampling of 8×8
    noise plus a gradient), normalised with the ImageNet mean/std as torchvision's transforms do."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 3, 8, 8))
    grid = np.linspace(0, 7, size)
    i0 = np.minimum(np.floor(grid).astype(int), 6)
    frac = grid - i0
    rows = coarse[:, :, i0, :] * (1 - frac)[None, None, :, None] + coarse[:, :, i0 + 1, :] * frac[None, None, :, None]
    img = rows[..., i0] * (1 - frac) + rows[..., i0 + 1] * frac
    ramp = np.linspace(0, 1, size)[None, None, :, None] * rng.random((count, 1, 1, 1)) * 0.3
    img = np.clip(0.8 * img + ramp, 0, 1)
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    return ((img - mean) / std).astype(np.float32)


def export_torchvision(name: str, path: Path, samples: np.ndarray, seed: int = 0, opset: int = 17) -> Path:
    """Build torchvision.models.<name>(weights=None), give every BN distinct parameters and
    statistics of `samples` (see module docstring), export it with BN kept (legacy exporter,
    TrainingMode.PRESERVE) to `path`, input 'input' with a dynamic batch axis, output 'output'."""
    torch, torchvision = import_torchvision()
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(1 + 0.2 * torch.randn_like(bn.weight))
            bn.bias.copy_(0.1 * torch.randn_like(bn.bias))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the passes below
        model.train()
        x = torch.from_numpy(samples)
        for start in range(0, len(x), 16):
            model(x[start:start + 16])
        for bn in bns:  # off the exact statistics: something left for recalibration to do
            bn.running_mean.mul_(1 + 0.05 * torch.randn_like(bn.running_mean))
            bn.running_var.mul_(1 + 0.1 * torch.rand_like(bn.running_var))
    model.eval()
    with warnings.catch_warnings():  # the legacy exporter's deprecation and constant-folding advice
        warnings.simplefilter("ignore")
        _export(torch, model, x[:1], path, opset)
    return path


def _export(torch, model, x, path: Path, opset: int) -> None:
    torch.onnx.export(
        model, x, str(path), training=torch.onnx.TrainingMode.PRESERVE, dynamo=False, opset_version=opset,
        input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
