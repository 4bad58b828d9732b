"""Random verification inputs drawn from the distribution the model itself implies.

Without samples, the folded and unfolded models are compared on random inputs. Standard-normal
inputs can lie far outside the distribution a network was calibrated on: squeeze-excite blocks
(EfficientNet, RegNetY) multiply activations by gates computed from them, so inputs unlike the
data drive the outputs hundreds of times beyond their range on real data, where the two models'
roundings grow with them — a false alarm, not a wrong fold.

Every BatchNormalization records what its input X looked like on the data it was calibrated on:
mean μ_c and variance σ²_c per channel c. Random inputs are drawn as

    x = s·z_α + t,

z_α zero-mean, unit-variance noise whose amplitude spectrum over the last two axes falls as 1/f^α
(`image_noise`; α = 0 is white noise, α ≈ 1 photographs), with the scalars s, t fitted to the
first BN (graph order), assuming its X is affine in the model input (Conv, Gemm, Sub/Div
normalisation — true of nearly every stem). With statistics over every axis but 1:

    m0_c = mean X | x = 0,    r_c = (mean X | x = 1) − m0_c,    v_c = var X | x = z_α,
    t = Σ_c r_c (μ_c − m0_c) / σ²_c  /  Σ_c r²_c / σ²_c        (weighted least squares for the mean),
    s = sqrt(median_c σ²_c / v_c)                               (the typical channel's spread).

The first BN cannot tell how smooth the data is; the deeper ones can. α is the one of `SPECTRA`
whose inputs put every BN's input closest to its statistics: the smallest mean over BNs of
mean_c |log(E[(X_c − μ_c)²] / σ²_c)| (``mismatch``; 0 when every channel's second moment about
its running mean equals its running variance).

Inputs that are not image-shaped (rank < 4) get white noise (α = 0). Every float graph input gets
the same (α, s, t); integer/bool inputs keep the values of
`verify`'s random batches. When no BN qualifies, a probe fails, or the numbers are not finite and
positive, inputs are standard normal and ``note`` says why. This is a heuristic for the inputs'
distribution, not a substitute for data: where it matters, verify on real samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.onnx_graph import constant_tensors, is_batchnorm, opset_version, value_types

#: spectral slopes α tried (amplitude ∝ 1/f^α): white noise … smoother than photographs
SPECTRA = (0.0, 0.5, 1.0, 1.5, 2.0)

#: runs the probe model: feeds → {name of a BN's input X: (E[X], E[X²]) per channel}
Runner = Callable[[dict[str, np.ndarray]], Mapping[str, tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class InputScale:
    """Random float inputs are ``scale·z + shift``, z standard normal (spectrum None) or
    `image_noise` of that spectral slope; ``bn`` names the BN whose statistics set scale/shift."""

    scale: float = 1.0
    shift: float = 0.0
    spectrum: float | None = None
    bn: str | None = None
    mismatch: float | None = None
    note: str = "standard normal"

    def draw(self, shape: tuple[int, ...], dtype: Any, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal(shape) if self.spectrum is None else image_noise(shape, rng, self.spectrum)
        return (self.scale * z + self.shift).astype(dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def image_noise(shape: tuple[int, ...], rng: np.random.Generator, alpha: float = 1.0) -> np.ndarray:
    """float64 noise of `shape`, zero mean and unit variance per sample, shaped like images where
    `shape` is (N, C, H, W): amplitude spectrum ∝ 1/f^alpha over the last two axes, channels
    sharing 70 % of their signal (colour channels are strongly correlated). Rank < 4: white."""
    z = rng.standard_normal(shape)
    if len(shape) < 4 or min(shape[-2:]) < 2:
        return z
    fy = np.fft.fftfreq(shape[-2])[:, None]
    fx = np.fft.rfftfreq(shape[-1])[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0  # the mean is removed below anyway
    z = np.fft.irfft2(np.fft.rfft2(z) / f**alpha, s=shape[-2:])
    z = 0.7 * z.mean(axis=1, keepdims=True) + 0.3 * z
    z -= z.mean(axis=(-2, -1), keepdims=True)
    return z / (z.std(axis=tuple(range(1, len(shape))), keepdims=True) + 1e-12)


def batchnorm_statistics(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """Main-graph BNs with constant running mean and var (float64, shape (C,)), in graph order."""
    tensors = constant_tensors(model.graph)
    found = []
    for node in model.graph.node:
        if is_batchnorm(node) and len(node.input) >= 5 and all(n in tensors for n in node.input[3:5]):
            mean, var = (numpy_helper.to_array(tensors[n]).astype(np.float64).reshape(-1) for n in node.input[3:5])
            if mean.shape == var.shape:
                found.append((node, mean, var))
    return found


def probe_model(model: onnx.ModelProto, bns: Sequence[onnx.NodeProto]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of `model` whose outputs are, for each BN input X of known rank ≥ 2, the float32
    per-channel means of X and of X² over every axis but 1 (shape (C,)), and X → their names.

    Reduced inside the graph, as onnxruntime's calibrator does: the probe moves kilobytes, not
    every activation of the network (several GB for a segmentation model at full resolution).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types, opset = value_types(model), opset_version(model)
    del probe.graph.output[:]
    outputs: dict[str, tuple[str, str]] = {}
    for i, x in enumerate(dict.fromkeys(bn.input[0] for bn in bns)):
        rank = types.get(x, (None, None))[1]
        if rank is None or rank < 2:
            continue
        axes = [0, *range(2, rank)]
        xf, sq, mean, msq = (f"bnfold_probe/{i}/{part}" for part in ("float", "square", "mean", "mean_square"))
        probe.graph.node.extend([helper.make_node("Cast", [x], [xf], to=onnx.TensorProto.FLOAT),
                                 helper.make_node("Mul", [xf, xf], [sq])])
        for source, target in ((xf, mean), (sq, msq)):
            if opset >= 18:  # axes became an input
                probe.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{target}/axes"))
                probe.graph.node.append(helper.make_node("ReduceMean", [source, f"{target}/axes"], [target], keepdims=0))
            else:
                probe.graph.node.append(helper.make_node("ReduceMean", [source], [target], axes=axes, keepdims=0))
            probe.graph.output.append(helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
        outputs[x] = (mean, msq)
    return probe, outputs


def fit_input_scale(
    run: Runner, stats: Sequence[tuple[str, str, np.ndarray, np.ndarray]], float_feeds: Mapping[str, np.ndarray],
    other_feeds: Mapping[str, np.ndarray], rng: np.random.Generator,
) -> InputScale:
    """(α, s, t) as the module docstring says. stats: (label, X's name, μ, σ²) per BN, the first
    sets s and t; float_feeds: templates whose shapes and dtypes the probes take; other_feeds:
    passed unchanged. run(feeds) returns X's name → value for every BN."""

    def probe(values: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        outs = run({k: np.asarray(v).astype(float_feeds[k].dtype) for k, v in values.items()} | dict(other_feeds))
        return [_moments(outs[x], mean.shape[0]) for _, x, mean, _ in stats]

    label, _, mean, var = stats[0]
    m0 = probe({k: np.zeros_like(v) for k, v in float_feeds.items()})[0][0]
    r = probe({k: np.ones_like(v) for k, v in float_feeds.items()})[0][0] - m0
    best = None
    images = any(len(v.shape) >= 4 and min(v.shape[-2:]) >= 2 for v in float_feeds.values())
    for alpha in SPECTRA if images else (0.0,):  # the spectrum only shapes image-like inputs
        noise = {k: image_noise(v.shape, rng, alpha) for k, v in float_feeds.items()}
        first_mean, first_square = probe(noise)[0]
        fitted = _fit(label, mean, var, m0, r, first_square - first_mean**2, alpha)
        if fitted.spectrum is None:
            return fitted
        scaled = probe({k: fitted.scale * z + fitted.shift for k, z in noise.items()})
        fitted = dataclasses.replace(fitted, mismatch=_mismatch(scaled, stats))
        if best is None or fitted.mismatch < best.mismatch:
            best = fitted
    sign = "+" if best.shift >= 0 else "−"
    note = (f"1/f^{best.spectrum:g} noise·{best.scale:.3g} {sign} {abs(best.shift):.3g}, fitted to the running statistics of "
            f"{label!r} (mean |log E[(X−μ)²]/σ²| over {len(stats)} BN: {best.mismatch:.2g})")
    return dataclasses.replace(best, note=note)


def _moments(values: tuple[np.ndarray, np.ndarray], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(E[X], E[X²]) per channel, float64 of shape (C,)."""
    mean, square = (np.asarray(v, np.float64).reshape(-1) for v in values)
    if mean.shape != (channels,) or square.shape != (channels,):
        raise ValueError(f"a BN input has {mean.shape[0]} channels, its statistics {channels}")
    return mean, square


def _fit(label: str, mean, var, m0, r, v, alpha: float) -> InputScale:
    ok = (var > 0) & (v > 0) & np.isfinite(v) & np.isfinite(r) & np.isfinite(m0)
    if not np.any(ok):
        return InputScale(note=f"standard normal: no channel of {label!r} has a positive variance on both sides")
    w = 1.0 / var[ok]
    denom = float(np.sum(r[ok] ** 2 * w))
    shift = float(np.sum(r[ok] * (mean[ok] - m0[ok]) * w) / denom) if denom > 0 else 0.0
    scale = float(np.sqrt(np.median(var[ok] / v[ok])))
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(shift)):
        return InputScale(note=f"standard normal: the fit to {label!r} gave scale {scale}, shift {shift}")
    return InputScale(scale, shift, alpha, label)


def _mismatch(xs: Sequence[np.ndarray], stats) -> float:
    errors = []
    for (m, square), (_, _, mean, var) in zip(xs, stats):
        second = square - 2 * mean * m + mean**2  # E[(X − μ)²]
        ok = (var > 0) & (second > 0) & np.isfinite(second)
        errors.append(float(np.mean(np.abs(np.log(second[ok] / var[ok])))) if np.any(ok) else np.inf)
    return float(np.mean(errors))


__all__ = ["SPECTRA", "InputScale", "Runner", "batchnorm_statistics", "fit_input_scale", "image_noise", "probe_model"]
