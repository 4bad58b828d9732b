"""A small segmentation case: a U-Net-like BN model on synthetic shapes, and a "new lab" that records
them differently. Built like the digits demo (`bnfold.demo.lab`), without a deep-learning framework:
random He-initialised filters form a fixed feature extractor, BN holds the statistics of the source
lab's training images, and only the 1×1 head is fitted (a per-pixel logistic regression).

    image (N, 1, 16, 16) → Conv 1→16 3×3 → BN → Relu ─────────────────────────────┐ (skip)
                           → Conv 16→32 3×3 stride 2 → BN → Relu (8×8)             │
                           → Conv 32→32 3×3 → BN → Relu                            │
                           → ConvTranspose 32→16 2×2 stride 2 → BN → Relu (16×16) ─ Concat → Conv 32→2 1×1 → logits

Output ``logits`` (N, 2, 16, 16): class 1 = inside a shape. Used by the INT8 tests and bench.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-5
SIZE = 16


def make_shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (N, 1, 16, 16) float32 in [0, 1] with 1–3 discs or rectangles, and masks (N, 16, 16) int64."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = rng.normal(0.2, 0.05, size=(n, SIZE, SIZE))
    masks = np.zeros((n, SIZE, SIZE), np.int64)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(3, SIZE - 3), rng.uniform(3, SIZE - 3), rng.uniform(2, 4.5)
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if rng.random() < 0.5 else (
                (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= 0.7 * r))
            masks[i][inside] = 1
        images[i][masks[i] == 1] += rng.uniform(0.4, 0.7)
    images += rng.normal(0.0, 0.05, size=images.shape)
    return np.clip(images, 0, 1)[:, None].astype(np.float32), masks


def make_new_lab(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same scenes from another lab: 40 % contrast, brighter (+0.35), slightly blurred, noisier."""
    x = images.astype(np.float64)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    blurred = sum(w * padded[:, :, 1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE]
                  for dy, dx, w in ((0, 0, 0.6), (-1, 0, 0.1), (1, 0, 0.1), (0, -1, 0.1), (0, 1, 0.1)))
    return np.clip(0.4 * blurred + 0.35 + rng.normal(0.0, 0.03, size=x.shape), 0, 1).astype(np.float32)


def _conv(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
    """NumPy Conv, pad k//2, no bias: (N, C, H, W), (K, C, k, k) → (N, K, H', W') float64."""
    k = w.shape[-1]
    padded = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))
    return np.einsum("nchwij,kcij->nkhw", windows[:, :, ::stride, ::stride], w, optimize=True)


def _conv_transpose2(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NumPy ConvTranspose 2×2 stride 2: (N, C, H, W), (C, K, 2, 2) → (N, K, 2H, 2W) float64."""
    n, _, h, wd = x.shape
    out = np.einsum("ncij,ckab->nkiajb", x, w, optimize=True)
    return out.reshape(n, w.shape[1], 2 * h, 2 * wd)


def _bn_relu(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    return np.maximum((x - mean[:, None, None]) / np.sqrt(var[:, None, None] + EPS), 0.0), mean, var


def build_segmentation_model(seed: int = 0, n_train: int = 200) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The source-lab model (see the module doc) and held-out data: ``new_lab_calibration`` (unlabeled,
    300), ``new_lab_test`` with ``new_lab_test_masks`` (300), ``source_test`` with masks (200)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    train, train_masks = make_shapes(rng, n_train)
    w = {"enc": rng.normal(0, np.sqrt(2 / 9), (16, 1, 3, 3)), "down": rng.normal(0, np.sqrt(2 / 144), (32, 16, 3, 3)),
         "mid": rng.normal(0, np.sqrt(2 / 288), (32, 32, 3, 3)), "up": rng.normal(0, np.sqrt(2 / 128), (32, 16, 2, 2))}
    x = train.astype(np.float64)
    skip, *s_enc = _bn_relu(_conv(x, w["enc"]))
    h, *s_down = _bn_relu(_conv(skip, w["down"], stride=2))
    h, *s_mid = _bn_relu(_conv(h, w["mid"]))
    h, *s_up = _bn_relu(_conv_transpose2(h, w["up"]))
    features = np.concatenate([skip, h], axis=1).transpose(0, 2, 3, 1).reshape(-1, 32)
    pick = rng.choice(len(features), size=8000, replace=False)
    with threadpool_limits(limits=1, user_api="blas"):
        head = LogisticRegression(C=1.0, max_iter=500).fit(features[pick], train_masks.reshape(-1)[pick])
    head_w = np.stack([-head.coef_[0], head.coef_[0]]) / 2  # two-class logits whose softmax is the regression's
    head_b = np.array([-head.intercept_[0], head.intercept_[0]]) / 2

    params = {f"{k}.weight": v for k, v in w.items()} | {"head.weight": head_w[:, :, None, None], "head.bias": head_b}
    for name, (mean, var) in (("enc", s_enc), ("down", s_down), ("mid", s_mid), ("up", s_up)):
        params |= {f"{name}.bn.scale": np.ones_like(mean), f"{name}.bn.bias": np.zeros_like(mean),
                   f"{name}.bn.mean": mean, f"{name}.bn.var": var}
    nodes = []

    def block(op: str, name: str, source: str, **attrs) -> str:
        nodes.append(helper.make_node(op, [source, f"{name}.weight"], [f"{name}.out"], name=name, **attrs))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.out"] + [f"{name}.bn.{p}" for p in
                                      ("scale", "bias", "mean", "var")], [f"{name}.bn"], name=f"{name}.bn", epsilon=EPS))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    enc = block("Conv", "enc", "image", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = block("Conv", "down", enc, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    h = block("Conv", "mid", h, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = block("ConvTranspose", "up", h, kernel_shape=[2, 2], strides=[2, 2])
    nodes.append(helper.make_node("Concat", [enc, h], ["features"], name="concat", axis=1))
    nodes.append(helper.make_node("Conv", ["features", "head.weight", "head.bias"], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes, "bnfold_shapes_unet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, SIZE, SIZE])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold.demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)

    source_test, source_masks = make_shapes(rng, 200)
    scenes, scene_masks = make_shapes(rng, 600)
    shifted = make_new_lab(scenes, rng)
    data = {"source_test": source_test, "source_test_masks": source_masks,
            "new_lab_calibration": shifted[:300], "new_lab_test": shifted[300:], "new_lab_test_masks": scene_masks[300:]}
    return model, data


def mean_iou(model: onnx.ModelProto | bytes, images: np.ndarray, masks: np.ndarray) -> float:
    """Mean over the two classes of intersection / union of the arg-max prediction, over all pixels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"image": images})[0].argmax(axis=1)
    ious = [np.sum((predicted == c) & (masks == c)) / max(np.sum((predicted == c) | (masks == c)), 1) for c in (0, 1)]
    return float(np.mean(ious))
