"""The demo's two labs: scikit-learn's bundled digits, a small BN model built on the source lab
without any deep-learning framework, and the "new lab" that records the same digits differently.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

EPS = 1e-5
N_SOURCE_TRAIN, N_SOURCE_TEST, N_CALIBRATION = 800, 300, 400  # the remaining 297 digits: new-lab evaluation


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Digits as images ``(1797, 1, 8, 8)`` float32 in [0, 1] and labels ``(1797,)`` int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return (digits.images[:, None] / 16.0).astype(np.float32), digits.target.astype(np.int64)


def make_new_lab(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same digits as another lab's scanner records them: ``(N, 1, 8, 8)`` → same shape, float32.

    Under-exposed (30 % of the source contrast), slightly out of focus (3×3 blur) and noisier
    (sensor noise σ = 0.02), clipped to the sensor range [0, 1]. To the network this is mostly a
    per-channel rescaling of its activations — what fresh BN statistics undo — while the lost
    detail and the noise are not, so recalibration helps a lot but does not reach source accuracy.
    """
    x = images.astype(np.float64)
    kernel = np.array([0.2, 0.6, 0.2])  # separable blur; edge padding keeps the borders dark
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    x = sum(k * padded[:, :, i : i + 8, :] for i, k in enumerate(kernel))
    padded = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1)), mode="edge")
    x = sum(k * padded[:, :, :, i : i + 8] for i, k in enumerate(kernel))
    x = 0.3 * x + rng.normal(0.0, 0.02, size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _conv(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """NumPy Conv with pad 1, no bias: ``(N, C, H, W)``, ``(K, C, 3, 3)`` → ``(N, K, H', W')`` float64."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    return np.einsum("nchwij,kcij->nkhw", windows[:, :, ::stride, ::stride], w, optimize=True)


def _bn_relu(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel population statistics of ``x`` ``(N, C, H, W)``, and ReLU(BN(x)) with them."""
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    y = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + EPS)
    return np.maximum(y, 0.0), mean, var


def build_demo_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The source-lab model and the data split.

    Returns the model — input ``"image"`` ``(N, 1, 8, 8)`` float32, output ``"logits"`` ``(N, 10)``:
    Conv(1→16, 3×3, pad 1) → BN → Relu → Conv(16→32, 3×3, stride 2, pad 1) → BN → Relu → Flatten → Gemm
    — and a dict of the split: ``source_train/source_test/new_lab`` images (float32, unshifted) and
    their ``*_labels`` (int64). Splits are disjoint and drawn with ``seed``.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    rng = np.random.default_rng(seed)
    images, labels = load_digits_images()
    order = rng.permutation(len(images))
    cuts = np.split(order, [N_SOURCE_TRAIN, N_SOURCE_TRAIN + N_SOURCE_TEST])
    split = {}
    for name, idx in zip(("source_train", "source_test", "new_lab"), cuts):
        split[name], split[name + "_labels"] = images[idx], labels[idx]

    # Random He-initialised filters: a fixed feature extractor; only the statistics and head are fitted.
    w1 = rng.normal(0.0, np.sqrt(2 / 9), size=(16, 1, 3, 3))
    w2 = rng.normal(0.0, np.sqrt(2 / 144), size=(32, 16, 3, 3))
    # BN statistics of the source lab, measured over the whole training split (what training leaves behind).
    h1, *stats1 = _bn_relu(_conv(split["source_train"].astype(np.float64), w1, stride=1))
    h2, *stats2 = _bn_relu(_conv(h1, w2, stride=2))
    # One BLAS thread: on a small shared CPU, multi-threaded BLAS on these tiny matrices spin-waits
    # and turns a 0.1 s fit into several seconds.
    with threadpool_limits(limits=1, user_api="blas"):
        head = LogisticRegression(C=0.1, max_iter=2000).fit(h2.reshape(len(h2), -1), split["source_train_labels"])

    params = {"conv1.weight": w1, "conv2.weight": w2, "fc.weight": head.coef_, "fc.bias": head.intercept_}
    for i, (mean, var) in ((1, stats1), (2, stats2)):
        params |= {f"bn{i}.scale": np.ones_like(mean), f"bn{i}.bias": np.zeros_like(mean), f"bn{i}.mean": mean, f"bn{i}.var": var}

    def bn(i: int) -> onnx.NodeProto:
        inputs = [f"conv{i}"] + [f"bn{i}.{p}" for p in ("scale", "bias", "mean", "var")]
        return helper.make_node("BatchNormalization", inputs, [f"bn{i}"], name=f"bn{i}", epsilon=EPS)

    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight"], ["conv1"], name="conv1", **conv),
        bn(1),
        helper.make_node("Relu", ["bn1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "conv2.weight"], ["conv2"], name="conv2", strides=[2, 2], **conv),
        bn(2),
        helper.make_node("Relu", ["bn2"], ["relu2"], name="relu2"),
        helper.make_node("Flatten", ["relu2"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "bnfold_demo_digits",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold.demo")
    model.ir_version = 8  # readable by any onnxruntime ≥ 1.11
    onnx.checker.check_model(model, full_check=True)
    return model, split


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (one float32 image input) on ``images`` ``(N, 1, 8, 8)``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny model; threads would only add overhead on a shared CPU
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float((logits.argmax(axis=1) == labels).mean())
