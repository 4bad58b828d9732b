"""A zoo of real architectures (torchvision, timm, segmentation_models_pytorch) exported with BN kept,
and an independent float64 PyTorch reference for their recalibrated statistics.

Shared by ``tests/zoo/test_zoo.py`` (the acceptance checks) and ``bench/zoo.py`` (the published
table), so the table is made by exactly the code the tests run.

Each `Case` is one architecture with random initialisation, exported by PyTorch's legacy exporter
with BN kept (``training=PRESERVE, dynamo=False``) at one opset, either

* ``perturbed``: every BN gets random running statistics and affine parameters (an "old lab"), or
* untouched: as constructed (γ=1, β=0, μ=0, σ²=1), which the exporter deduplicates into shared
  tensors routed through ``Identity`` nodes — what a user exporting a fresh model gets.

The reference (`torch_fixed_point`) is the eval-mode fixed point computed in PyTorch in float64, BN
by BN in forward order: BN k is measured over all samples with BNs 1…k−1 already holding their new
statistics (population mean, biased variance). It shares nothing with bnfold's graph cutting,
ONNX Runtime or moment merging. Statistics errors are measured in the units that decide the BN
output: |Δμ| / sqrt(σ²_ref + ε) and |Δσ²| / (σ²_ref + ε).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import sys
import types
from collections.abc import Callable

import numpy as np
import onnx

IMAGE = (3, 64, 64)


@dataclasses.dataclass(frozen=True)
class Case:
    """One export: ``dynamic`` marks batch and spatial axes symbolic (else only the batch)."""

    name: str
    family: str  # torchvision | timm | smp | custom
    arch: str
    opset: int
    perturbed: bool
    dynamic: bool = False
    heavy: bool = True
    image: tuple[int, int, int] = IMAGE

    @property
    def id(self) -> str:
        return f"{self.name}-op{self.opset}-{'perturbed' if self.perturbed else 'untouched'}" + (
            "-dynamic" if self.dynamic else ""
        )


def _c(family, arch, opset, perturbed, dynamic=False, heavy=True, image=IMAGE, name=None):
    return Case(name or arch, family, arch, opset, perturbed, dynamic, heavy, image)


# Opsets 11/13/17, perturbed/untouched and dynamic axes spread across the set; the two light cases
# (heavy=False: resnet18 and the custom flatten_head) run in every `make test`, the rest with `pytest -m heavy` (CI).
CASES = [
    _c("torchvision", "resnet18", 13, False, heavy=False),
    _c("smp", "Unet", 17, True, dynamic=True, name="smp_unet_resnet18"),
    _c("torchvision", "resnet50", 11, False),
    _c("torchvision", "mobilenet_v2", 17, False),
    _c("torchvision", "mobilenet_v3_small", 13, True),
    _c("torchvision", "efficientnet_b0", 17, False),
    _c("torchvision", "regnet_y_400mf", 11, True),
    _c("torchvision", "densenet121", 13, True),
    _c("torchvision", "shufflenet_v2_x0_5", 17, True),
    _c("torchvision", "mnasnet0_5", 11, False),
    _c("torchvision", "googlenet", 13, False),
    _c("timm", "resnet26d", 17, True),
    _c("timm", "efficientnet_lite0", 13, False),
    _c("timm", "mixnet_s", 11, True),
    _c("timm", "dla34", 17, False),
    _c("timm", "rexnet_100", 13, True),
    _c("timm", "cspresnet50", 11, False),
    _c("smp", "FPN", 11, False, dynamic=True, name="smp_fpn_resnet18"),
    _c("smp", "DeepLabV3", 13, True, dynamic=True, name="smp_deeplabv3_resnet18"),
    _c("smp", "Unet", 11, False, name="smp_unet_resnet18"),
    _c("smp", "Linknet", 13, False, dynamic=True, name="smp_linknet_resnet18"),
]


def import_torchvision():
    """torchvision's models without its C ops: the local torch CPU wheel and the registry's
    torchvision wheel disagree on the ``torchvision::nms`` registration (see shared notes)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    return torchvision


def build(case: Case):
    """The PyTorch model of `case`, seeded, in eval mode (BN statistics perturbed if asked)."""
    import torch

    torch.manual_seed(0)
    if case.family == "torchvision":
        tv = import_torchvision()
        kwargs = {"aux_logits": False, "init_weights": True} if case.arch == "googlenet" else {}
        net = getattr(tv.models, case.arch)(weights=None, num_classes=10, **kwargs)
    elif case.family == "timm":
        import_torchvision()
        import timm

        net = timm.create_model(case.arch, pretrained=False, num_classes=10)
    elif case.family == "smp":
        import_torchvision()
        import segmentation_models_pytorch as smp

        net = getattr(smp, case.arch)(encoder_name="resnet18", encoder_weights=None, classes=2)
    else:
        net = CUSTOM[case.arch]()
    if case.perturbed:
        perturb(net)
    return net.eval()


def batchnorms(net) -> list:
    import torch

    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def perturb(net, seed: int = 1) -> None:
    """Random "old lab" statistics and affine parameters in every BN (so nothing is deduplicated)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batchnorms(net):
            for tensor, low, high in ((bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0),
                                      (bn.weight, 0.5, 1.5), (bn.bias, -0.3, 0.3)):
                if tensor is not None:
                    tensor.copy_(torch.rand(tensor.shape, generator=gen) * (high - low) + low)


def export(net, case: Case) -> onnx.ModelProto:
    """Legacy exporter, BN kept, constant folding on (the default, which deduplicates initializers)."""
    import torch

    dynamic = {0: "N", 2: "H", 3: "W"} if case.dynamic else {0: "N"}
    out_axes = dynamic if case.family == "smp" else {0: "N"}
    buffer = io.BytesIO()
    torch.onnx.export(
        net, torch.zeros(2, *case.image), buffer, training=torch.onnx.TrainingMode.PRESERVE, dynamo=False,
        opset_version=case.opset, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": dynamic, "y": out_axes},
    )
    return onnx.load_from_string(buffer.getvalue())


def samples(case: Case, count: int = 16, seed: int = 7) -> np.ndarray:
    """A shifted "new lab": smooth random images with per-sample contrast and offset, float32 NCHW."""
    rng = np.random.default_rng(seed)
    c, h, w = case.image
    coarse = rng.standard_normal((count, c, h // 8, w // 8))
    x = np.kron(coarse, np.ones((1, 1, 8, 8)))[:, :, :h, :w] + 0.5 * rng.standard_normal((count, c, h, w))
    x = x * rng.uniform(0.8, 1.6, (count, 1, 1, 1)) + rng.uniform(-0.4, 0.6, (count, c, 1, 1))
    return x.astype(np.float32)


def torch_fixed_point(net, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(mean, biased var, eps) per BN call, in forward order, float64, each with upstream BNs updated.

    All samples go through as ONE batch, so when a BN is reached every BN before it in forward
    order has already been measured on all samples, updated, and applied with its new statistics:
    measuring each BN's input as the pass reaches it is the BN-by-BN fixed point, in one pass.
    """
    import torch

    net = copy.deepcopy(net).double().eval()
    result = []

    def measure(bn, inputs):
        (x,) = inputs[:1]
        axes = [0, *range(2, x.dim())]
        mean = x.mean(dim=axes)
        var = ((x - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dim=axes)
        bn.running_mean.copy_(mean)  # eval-mode BN now normalises with the new statistics
        bn.running_var.copy_(var)
        result.append((bn, mean.numpy().copy(), var.numpy().copy(), float(bn.eps)))

    hooks = [bn.register_forward_pre_hook(measure) for bn in batchnorms(net)]
    try:
        with torch.no_grad():
            net(torch.from_numpy(x).double())
    finally:
        for h in hooks:
            h.remove()
    if len({id(bn) for bn, *_ in result}) != len(result):
        raise NotImplementedError("a BN module is called twice per forward pass; the reference assumes once")
    return [stats for _, *stats in result]


def statistics_error(layers, reference) -> tuple[float, float]:
    """(max |Δμ|/sqrt(σ²+ε), max |Δσ²|/(σ²+ε)) over all BNs and channels; layers in graph order."""
    if len(layers) != len(reference):
        raise AssertionError(f"{len(layers)} BN nodes in the ONNX graph vs {len(reference)} BN calls in PyTorch")
    mean_err = var_err = 0.0
    for layer, (mean, var, eps) in zip(layers, reference):
        scale = var + eps
        mean_err = max(mean_err, float(np.max(np.abs(layer.new_mean - mean) / np.sqrt(scale))))
        var_err = max(var_err, float(np.max(np.abs(layer.new_var - var) / scale)))
    return mean_err, var_err


def fold_difference(unfolded: onnx.ModelProto, folded: onnx.ModelProto, x: np.ndarray) -> float:
    """max |y_folded − y_unfolded| / max |y_unfolded| over all outputs, in ONNX Runtime, on `x`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no Conv+BN fusion
    ref = ort.InferenceSession(unfolded.SerializeToString(), options, providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(folded.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = ref.get_inputs()[0].name
    worst = 0.0
    for r, c in zip(ref.run(None, {name: x}), cand.run(None, {name: x})):
        worst = max(worst, float(np.max(np.abs(c - r)) / max(float(np.max(np.abs(r))), 1e-30)))
    return worst


def count_op(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


# -- custom models for shapes across stage cuts -----------------------------------------------------


def _custom() -> dict[str, Callable]:
    import torch
    from torch import nn

    class FlattenHead(nn.Module):
        """BN after a dynamic Flatten/Reshape whose target shape comes from x.shape (Shape→Gather→Concat)."""

        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.bn1d = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 4)
            self.bn_out = nn.BatchNorm1d(4)

        def forward(self, x):
            n, _, h, w = x.shape
            y = self.a(x)
            y = nn.functional.interpolate(self.b(y), size=(h, w), mode="bilinear") + y  # size from a shape
            y = y.reshape(n, 8, h * w)  # Reshape with a computed target
            y = self.bn1d(y).mean(dim=2)
            return self.bn_out(self.fc(torch.flatten(y, 1)))

    return {"flatten_head": FlattenHead}


class _Custom(dict):
    def __missing__(self, key):
        self.update(_custom())
        return self[key]


CUSTOM = _Custom()
CASES.append(_c("custom", "flatten_head", 13, True, dynamic=True, heavy=False))
