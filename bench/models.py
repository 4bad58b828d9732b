"""Bench fixtures: a ResNet-18-style model exported to ONNX with its BN nodes kept, and seeded
"new lab" samples.

    python -m bench.models --workdir bench/out --samples 512

writes (once; existing files are reused)

* ``resnet18.onnx``        — opset 17, 20 BatchNormalization nodes, dynamic batch axis "N";
* ``resnet18_state.npz``   — the same weights/buffers as a torch state_dict, as plain arrays
                             (no pickle), for the torch methods;
* ``samples_<N>.npy``      — float32, N×3×128×128, the shifted target domain.

Everything is deterministic (fixed seeds). Samples are generated in chunks of 64 with one seed per
chunk, so ``samples_512`` is exactly the first 512 rows of ``samples_4096``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

IMAGE_SIZE = 128
CHANNELS = 3
NUM_CLASSES = 1000
MODEL_SEED = 0
SOURCE_SEED = 1
TARGET_SEED = 2
CHUNK = 64

MODEL_FILE = "resnet18.onnx"
STATE_FILE = "resnet18_state.npz"


def samples_file(n: int) -> str:
    return f"samples_{n}.npy"


# --------------------------------------------------------------------------------------------
# model (plain torch.nn; torchvision is not importable beside this torch)
# --------------------------------------------------------------------------------------------


def _torch_modules():
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes: int, planes: int, stride: int = 1):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self, layers=(2, 2, 2, 2), num_classes: int = NUM_CLASSES):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(CHANNELS, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(64, layers[0], 1)
            self.layer2 = self._make_layer(128, layers[1], 2)
            self.layer3 = self._make_layer(256, layers[2], 2)
            self.layer4 = self._make_layer(512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def _make_layer(self, planes: int, blocks: int, stride: int):
            layers = [BasicBlock(self.inplanes, planes, stride)]
            self.inplanes = planes
            layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return torch, nn, ResNet


def build_model(num_classes: int = NUM_CLASSES, seed: int = MODEL_SEED):
    """ResNet-18 (BasicBlock, [2,2,2,2]) with seeded weights and non-trivial BN affine params.
    Running statistics are still the defaults (0, 1); see ``calibrate_source_stats``."""
    torch, nn, ResNet = _torch_modules()
    torch.manual_seed(seed)
    model = ResNet(num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return model.eval()


def batchnorms(model):
    """The BN modules in forward (call) order, as (qualified name, module)."""
    torch, nn, _ = _torch_modules()
    names = {m: n for n, m in model.named_modules()}
    order: list = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp: order.append(mod))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, dtype=next(model.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    return [(names[m], m) for m in order]


def calibrate_source_stats(model, n: int = 512, batch: int = 64):
    """Give the BNs realistic running statistics: exact cumulative averages of train-mode batch
    statistics over ``n`` seeded source-domain images (the "old lab")."""
    torch, nn, _ = _torch_modules()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for start in range(0, n, batch):
            model(torch.from_numpy(source_images(start, min(batch, n - start))))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def save_state(model, path: str | os.PathLike) -> None:
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def load_model(path: str | os.PathLike, dtype=None):
    """Rebuild the bench model from ``save_state``'s npz (no pickle)."""
    torch, _, _ = _torch_modules()
    model = build_model()
    with np.load(path, allow_pickle=False) as z:
        state = {k: torch.from_numpy(z[k]) for k in z.files}
    model.load_state_dict(state)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def export_onnx(model, path: str | os.PathLike) -> None:
    torch, _, _ = _torch_modules()
    x = torch.from_numpy(target_images(0, 2))
    torch.onnx.export(
        model.eval(),
        x,
        str(path),
        training=torch.onnx.TrainingMode.PRESERVE,
        dynamo=False,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
    )
    check_onnx(path)


def onnx_batchnorms(path_or_model):
    """(node name, running-mean initializer name, channels) of each ONNX BN in node order."""
    import onnx

    model = onnx.load(str(path_or_model)) if not hasattr(path_or_model, "graph") else path_or_model
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            mean = node.input[3]
            out.append((node.name, mean, int(np.prod(inits[mean].dims)) if mean in inits else None))
    return out


def check_onnx(path) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    bns = onnx_batchnorms(model)
    if len(bns) != 20:
        raise RuntimeError(f"{path}: expected 20 BatchNormalization nodes, found {len(bns)}")
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            mode = [a.i for a in node.attribute if a.name == "training_mode"]
            if mode and mode[0] != 0:
                raise RuntimeError(f"{path}: {node.name} exported with training_mode={mode[0]}")


# --------------------------------------------------------------------------------------------
# data: smooth random "images"; the target domain is a shifted "new lab"
# --------------------------------------------------------------------------------------------


def _upsample_matrix(low: int, high: int = IMAGE_SIZE) -> np.ndarray:
    """Bilinear (align_corners=True) interpolation matrix high×low."""
    pos = np.linspace(0.0, low - 1.0, high)
    lo = np.clip(np.floor(pos).astype(int), 0, low - 2)
    frac = pos - lo
    m = np.zeros((high, low))
    m[np.arange(high), lo] = 1.0 - frac
    m[np.arange(high), lo + 1] = frac
    return m


_U16 = _upsample_matrix(16)
_U32 = _upsample_matrix(32)


def _base_images(rng: np.random.Generator, n: int) -> np.ndarray:
    coarse = rng.standard_normal((n, CHANNELS, 16, 16))
    fine = rng.standard_normal((n, CHANNELS, 32, 32))
    img = np.einsum("hi,ncij,wj->nchw", _U16, coarse, _U16, optimize=True)
    img += 0.4 * np.einsum("hi,ncij,wj->nchw", _U32, fine, _U32, optimize=True)
    img += 0.1 * rng.standard_normal(img.shape)
    # a colour cast shared by all channels, like real RGB images
    img += 0.5 * img.mean(axis=1, keepdims=True)
    return img


def _chunked(seed: int, start: int, n: int, transform) -> np.ndarray:
    out = np.empty((n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    first, last = start // CHUNK, (start + n - 1) // CHUNK
    for c in range(first, last + 1):
        rng = np.random.default_rng([seed, c])
        block = transform(rng, _base_images(rng, CHUNK))
        lo, hi = max(start, c * CHUNK), min(start + n, (c + 1) * CHUNK)
        out[lo - start : hi - start] = block[lo - c * CHUNK : hi - c * CHUNK]
    return out


def source_images(start: int, n: int) -> np.ndarray:
    """Rows [start, start+n) of the seeded source-domain ("old lab") set."""
    return _chunked(SOURCE_SEED, start, n, lambda rng, x: x)


def _new_lab(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    gain = np.array([0.55, 0.7, 0.85]).reshape(1, 3, 1, 1)  # lower, channel-dependent contrast
    offset = np.array([0.6, 0.25, -0.3]).reshape(1, 3, 1, 1)  # colour/brightness offset
    per_image = 1.0 + 0.15 * rng.standard_normal((x.shape[0], 1, 1, 1))  # exposure jitter
    return x * gain * per_image + offset + 0.3 * rng.standard_normal(x.shape)  # sensor noise


def target_images(start: int, n: int) -> np.ndarray:
    """Rows [start, start+n) of the seeded target-domain ("new lab") set."""
    return _chunked(TARGET_SEED, start, n, _new_lab)


def write_samples(path: str | os.PathLike, n: int) -> None:
    tmp = Path(str(path) + ".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    for start in range(0, n, 512):
        arr[start : min(n, start + 512)] = target_images(start, min(512, n - start))
    arr.flush()
    del arr
    os.replace(tmp, path)


def prepare(workdir: str | os.PathLike, sample_counts=(512,), log=print) -> dict:
    """Create (or reuse) the model files and sample files in ``workdir``; return their paths."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path, state_path = workdir / MODEL_FILE, workdir / STATE_FILE
    if not (onnx_path.exists() and state_path.exists()):
        log(f"building model -> {onnx_path}")
        model = calibrate_source_stats(build_model())
        save_state(model, state_path)
        export_onnx(model, onnx_path)
    check_onnx(onnx_path)
    paths = {"onnx": str(onnx_path), "state": str(state_path)}
    for n in sample_counts:
        p = workdir / samples_file(n)
        if not p.exists():
            log(f"generating {n} samples -> {p}")
            write_samples(p, n)
        paths[f"samples_{n}"] = str(p)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench/out")
    ap.add_argument("--samples", type=int, nargs="+", default=[512])
    args = ap.parse_args(argv)
    paths = prepare(args.workdir, args.samples)
    for k, v in paths.items():
        print(f"{k}: {v}")
    for name, mean, ch in onnx_batchnorms(paths["onnx"]):
        print(f"  {name:40s} {mean:40s} {ch}")


if __name__ == "__main__":
    main()
