"""An independent float64 NumPy interpreter for the ops in ``tests/models.py`` and in the folding
tests (``tests/folding/test_fold.py``: Constant, Conv ``auto_pad``, ConvTranspose ``output_shape``),
and the exact eval-mode BatchNorm recalibration computed with it. tests/test_reference.py checks
every supported op and attribute against onnxruntime.

Why a second interpreter: the engine runs models in onnxruntime (float32, batch by batch) and
merges per-batch statistics; checking it against onnxruntime again would share its blind spots.
This one is deliberately naive — every sample in one pass, float64 throughout, textbook
formulas, no onnxruntime — so that it is easy to audit and exact up to float64 rounding.
Only the attributes the test models use are supported; anything else raises
``NotImplementedError`` rather than silently computing something different.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _spatial(a: dict, in_shape, kernel):
    """(strides, dilations, pads_begin, pads_end) of a Conv or MaxPool, with ONNX defaults, for
    spatial input shape ``in_shape`` and ``kernel``. ``auto_pad`` SAME_* pads so that the output
    is ceil(in / stride): the total padding is split evenly, its odd unit at the end (SAME_UPPER)
    or at the beginning (SAME_LOWER); VALID pads nothing."""
    nd = len(kernel)
    strides, dilations = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = list(a.get("pads", [0] * 2 * nd)) if auto_pad == "NOTSET" else [0] * 2 * nd
        return strides, dilations, pads[:nd], pads[nd:]
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"auto_pad {auto_pad}")
    begin, end = [], []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return strides, dilations, begin, end


def _windows(xp: np.ndarray, kernel, strides, dilations, out) -> np.ndarray:
    """For an already padded (N, C, *S) array: every kernel tap as a strided view, stacked to
    (N, C, K, *out) with K = prod(kernel); tap k of output pixel o reads xp[o*s + k*d]."""
    taps = []
    for offs in np.ndindex(*kernel):
        idx = tuple(slice(k * d, k * d + s * (o - 1) + 1, s) for k, d, s, o in zip(offs, dilations, strides, out))
        taps.append(xp[(slice(None), slice(None), *idx)])
    return np.stack(taps, axis=2)


def _pad(x: np.ndarray, begin, end, value=0.0) -> np.ndarray:
    return np.pad(x, [(0, 0), (0, 0), *zip(begin, end)], constant_values=value)


def _conv(a, x, w, b=None):
    # x (N, C, *S), w (M, C/G, *k), b (M,) -> (N, M, *out); any number of spatial axes.
    nd, g = x.ndim - 2, a.get("group", 1)
    kernel = w.shape[2:]
    strides, dil, pb, pe = _spatial(a, x.shape[2:], kernel)
    xp = _pad(x, pb, pe)
    out = [(xp.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    n, c, m = x.shape[0], x.shape[1], w.shape[0]
    cols = _windows(xp, kernel, strides, dil, out).reshape(n, g, c // g, -1, *out)  # (N,G,C/G,K,*out)
    wg = w.reshape(g, m // g, c // g, -1)  # (G, M/G, C/G, K)
    y = np.einsum("ngck...,gmck->ngm...", cols, wg, optimize=True).reshape(n, m, *out)
    return y if b is None else y + b.reshape(1, -1, *[1] * nd)


def _conv_transpose(a, x, w, b=None):
    # x (N, C, *S), w (C, M/G, *k), b (M,) -> (N, M, *out). Input pixel i scatters tap k into
    # output position i*s + k*d - pads_begin; output_padding only extends the end.
    nd, g = x.ndim - 2, a.get("group", 1)
    kernel = w.shape[2:]
    strides, dil = list(a.get("strides", [1] * nd)), list(a.get("dilations", [1] * nd))
    out_pad = list(a.get("output_padding", [0] * nd))
    n, c, mg = x.shape[0], x.shape[1], w.shape[1]
    ins = x.shape[2:]
    full = [s * (i - 1) + d * (k - 1) + 1 + op for s, i, d, k, op in zip(strides, ins, dil, kernel, out_pad)]
    pb, pe = _transpose_pads(a, ins, strides, full)
    y = np.zeros((n, g * mg, *full))
    xg = x.reshape(n, g, c // g, *ins)
    wg = w.reshape(g, c // g, mg, -1)  # (G, C/G, M/G, K)
    for tap, offs in enumerate(np.ndindex(*kernel)):
        contrib = np.einsum("ngc...,gcm->ngm...", xg, wg[..., tap]).reshape(n, g * mg, *ins)
        idx = tuple(slice(k * d, k * d + s * (i - 1) + 1, s) for k, d, s, i in zip(offs, dil, strides, ins))
        y[(slice(None), slice(None), *idx)] += contrib
    y = y[(slice(None), slice(None), *(slice(b_, f - e) for b_, e, f in zip(pb, pe, full)))]
    return y if b is None else y + b.reshape(1, -1, *[1] * nd)


def _transpose_pads(a, ins, strides, full):
    """(pads_begin, pads_end) that crop ConvTranspose's ``full`` output. Given ``pads``, those;
    given ``output_shape`` (or auto_pad SAME_*, whose output shape is in·stride), the total
    padding full − output_shape is split evenly with its odd unit at the beginning — except
    SAME_UPPER, which puts it at the end (the ONNX spec's rule, as onnxruntime applies it)."""
    nd = len(full)
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"auto_pad {auto_pad}")
    if "output_shape" in a:
        shape = list(a["output_shape"])[-nd:]
    elif auto_pad.startswith("SAME"):
        shape = [i * s for i, s in zip(ins, strides)]
    else:
        pads = list(a.get("pads", [0] * 2 * nd)) if auto_pad == "NOTSET" else [0] * 2 * nd
        return pads[:nd], pads[nd:]
    totals = [f - o for f, o in zip(full, shape)]
    if min(totals) < 0:
        raise NotImplementedError(f"ConvTranspose output shape {shape} beyond the full output {full}")
    small = [t // 2 for t in totals]
    big = [t - t // 2 for t in totals]
    return (small, big) if auto_pad == "SAME_UPPER" else (big, small)


def _max_pool(a, x):
    if a.get("ceil_mode", 0):
        raise NotImplementedError("MaxPool ceil_mode")
    nd = x.ndim - 2
    kernel = a["kernel_shape"]
    strides, dil, pb, pe = _spatial(a, x.shape[2:], kernel)
    xp = _pad(x, pb, pe, -np.inf)
    out = [(xp.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    return _windows(xp, kernel, strides, dil, out).max(axis=2)


def _gemm(a, x, w, c=None):
    A = x.T if a.get("transA", 0) else x
    B = w.T if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (A @ B)
    return y if c is None else y + a.get("beta", 1.0) * c


def _batch_norm(a, x, scale, bias, mean, var):
    # Inference form: y = scale * (x - mean) / sqrt(var + eps) + bias, per channel (axis 1).
    if a.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization training_mode=1")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv_std = 1.0 / np.sqrt(var.reshape(shape) + a.get("epsilon", 1e-5))
    return scale.reshape(shape) * (x - mean.reshape(shape)) * inv_std + bias.reshape(shape)


def _constant(a):
    if set(a) != {"value"}:
        raise NotImplementedError(f"Constant {sorted(a)}")
    return _as64(numpy_helper.to_array(a["value"]))


def _flatten(a, x):
    axis = a.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _reshape(a, x, shape):
    if a.get("allowzero", 0):
        raise NotImplementedError("Reshape allowzero")
    shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape)]  # 0 = copy that dim
    return x.reshape(shape)


def _slice(a, x, starts, ends, axes=None, steps=None):
    """Slice (opset ≥ 10): starts/ends/axes/steps as tensors; Python slicing clamps like ONNX does."""
    axes = range(len(starts)) if axes is None else [int(d) % x.ndim for d in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for d, start, end, step in zip(axes, starts, ends, steps):
        index[d] = slice(int(start), int(end), int(step))
    return x[tuple(index)]


_OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": lambda a, x, y: np.matmul(x, y),
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Relu": lambda a, x: np.maximum(x, 0.0),
    "BatchNormalization": _batch_norm,
    "Concat": lambda a, *xs: np.concatenate(xs, axis=a["axis"]),
    "Transpose": lambda a, x: np.transpose(x, a.get("perm")),  # no perm: reversed axes, as ONNX
    "Slice": _slice,
    "Flatten": _flatten,
    "GlobalAveragePool": lambda a, x: x.mean(axis=tuple(range(2, x.ndim)), keepdims=True),
    "MaxPool": _max_pool,
    "Identity": lambda a, x: x,
    "Reshape": _reshape,
    "Constant": _constant,
}


def _as64(a: np.ndarray) -> np.ndarray:
    # Float tensors are computed in float64; integer tensors (Reshape shapes) stay integers.
    a = np.asarray(a)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def run_reference(
    model: onnx.ModelProto,
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    overrides: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate ``model`` in float64 on all of ``inputs`` at once.

    inputs: graph input name -> array (any float dtype, shape as the graph input with the batch
        dimension filled in); cast to float64.
    outputs: tensor names to return — graph outputs by default, but any intermediate tensor,
        graph input or initializer name is allowed. Evaluation stops once all are known.
    overrides: initializer name -> replacement value (same shape), e.g. new BN statistics.
    Returns name -> float64 array.
    """
    env: dict[str, np.ndarray] = {t.name: _as64(numpy_helper.to_array(t)) for t in model.graph.initializer}
    for name, value in (overrides or {}).items():
        if name not in env:
            raise KeyError(f"override {name!r} is not an initializer")
        value = _as64(value)
        if value.shape != env[name].shape:
            raise ValueError(f"override {name!r}: shape {value.shape} != {env[name].shape}")
        env[name] = value
    env.update({name: np.asarray(v, np.float64) for name, v in inputs.items()})
    wanted = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    # ONNX requires graph.node to be topologically sorted (the checker enforces it).
    for node in model.graph.node:
        if all(w in env for w in wanted):
            break
        if node.op_type not in _OPS or node.domain not in ("", "ai.onnx"):
            raise NotImplementedError(f"op {node.domain}:{node.op_type} (node {node.name!r})")
        args = [env[i] if i else None for i in node.input]
        while args and args[-1] is None:  # trailing optional inputs
            args.pop()
        env[node.output[0]] = _OPS[node.op_type](_attrs(node), *args)
    return {w: env[w] for w in wanted}


def reference_recalibrate(
    model: onnx.ModelProto, inputs: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The exact eval-mode fixed point of BN recalibration on ``inputs``.

    BN nodes are visited in topological order. For each, the float64 interpreter runs on ALL
    samples at once with every earlier BN already using its new statistics (later BNs cannot
    influence this BN's input), and the new statistics are the per-channel mean and the biased
    (population, ddof=0) variance of the BN's input over every axis except axis 1 — i.e. what
    the BN would compute in training mode on one giant batch, given its eval-mode ancestors.

    Returns BN node name -> (mean, var), float64 arrays of shape (channels,).
    """
    overrides: dict[str, np.ndarray] = {}
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        x = run_reference(model, inputs, [node.input[0]], overrides)[node.input[0]]
        axes = (0, *range(2, x.ndim))
        mean = x.mean(axis=axes)
        # Two-pass variance: no cancellation, so this is exact up to float64 rounding.
        centred = x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))
        var = (centred * centred).mean(axis=axes)
        stats[node.name] = (mean, var)
        for slot, value in ((3, mean), (4, var)):
            if node.input[slot] in overrides:
                # A shared statistics initializer has no single fixed point; the models don't do it.
                raise NotImplementedError(f"BN statistics initializer {node.input[slot]!r} is shared")
            overrides[node.input[slot]] = value
    return stats
