"""Real architectures at real sizes: torchvision models exported to ONNX with their BN kept.

    python -m bench.real_models --workdir bench/out

writes (once; existing files are reused) ``tv_<arch>_<size>.onnx`` (opset 17, BN kept, dynamic
batch axis, input 3×size×size) and ``tv_samples_<N>_<size>.npy`` (float32 N×3×size×size, the seeded "new lab" images of
``bench.models`` resampled to ``size``).

Random init. Every BN's weight, bias, running mean and running var is perturbed with distinct seeded
values before export: a fresh torchvision model has γ=1, β=0, μ=0, σ²=1 in every BN, which the
exporter deduplicates into shared initializers routed through Identity nodes (NOTES.md), a case
the bench is not about.

torchvision is imported with an empty ``torchvision._meta_registrations`` module: on these machines
its wheel is linked against another torch build and its C ops fail to register; the model
definitions need none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import numpy as np

ARCHS = ("mobilenet_v2", "efficientnet_b0", "resnet50", "resnet18")


def _torchvision():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    return torchvision


def build(arch: str, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = getattr(_torchvision().models, arch)(weights=None)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c)))
                m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.1, c)))
                m.running_mean.copy_(torch.from_numpy(rng.normal(0.0, 0.2, c)))
                m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, c)))
    return model.eval()


def export(arch: str, path: str | os.PathLike, size: int = 224) -> None:
    import torch

    model = build(arch)
    tmp = str(path) + ".tmp"
    torch.onnx.export(
        model, torch.zeros(2, 3, size, size), tmp,
        training=torch.onnx.TrainingMode.PRESERVE, dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )  # fmt: skip
    os.replace(tmp, path)


def write_samples(path: str | os.PathLike, n: int, size: int) -> None:
    """The bench's seeded "new lab" images (128×128), bilinearly resampled to size×size."""
    from bench.models import IMAGE_SIZE, _upsample_matrix, target_images

    up = _upsample_matrix(IMAGE_SIZE, size)
    tmp = Path(str(path) + ".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, 3, size, size))
    for start in range(0, n, 64):
        k = min(64, n - start)
        arr[start : start + k] = np.einsum("hi,ncij,wj->nchw", up, target_images(start, k), up, optimize=True)
    arr.flush()
    del arr
    os.replace(tmp, path)


def model_path(workdir, arch: str, size: int) -> Path:
    return Path(workdir) / f"tv_{arch}_{size}.onnx"


def samples_path(workdir, n: int, size: int) -> Path:
    return Path(workdir) / f"tv_samples_{n}_{size}.npy"


def prepare(workdir, arch: str, n: int, size: int) -> tuple[str, str]:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    mp, sp = model_path(workdir, arch, size), samples_path(workdir, n, size)
    if not mp.exists():
        export(arch, mp, size)
    if not sp.exists():
        write_samples(sp, n, size)
    return str(mp), str(sp)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    for arch in args.archs.split(","):
        print(*prepare(args.workdir, arch, args.samples, args.size))


if __name__ == "__main__":
    main()
