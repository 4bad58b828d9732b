"""Make tests/zoo/data/keras_bn.onnx (+ .npz): a Keras model with BatchNormalization, through tf2onnx.

Not run by the tests (TensorFlow is a 600 MB install); its output is committed. Run, in a separate
virtual environment with ``pip install tensorflow-cpu tf_keras tf2onnx``:

    python tests/zoo/make_keras_export.py tests/zoo/data

Measured (tensorflow-cpu 2.21, tf_keras 2.21, tf2onnx 1.17, opset 13):

* Keras 3 (``tf.keras`` in TF 2.16+) lowers BatchNormalization to arithmetic before tf2onnx sees it:
  the export has no BatchNormalization node at all (Conv/Mul/Add), with or without tf2onnx's
  optimizers — nothing identifies the running statistics, so nothing can be recalibrated.
* Keras 2 (``tf_keras``) emits FusedBatchNormV3, which tf2onnx turns into BatchNormalization in
  NCHW between two Transposes (the graph stays NHWC). Its default optimizers then fold Conv+BN away,
  so the model is exported with ``optimizers={}``. BatchNormalization after Dense (2-D input) is
  lowered to Mul/Add by Keras itself.

The .npz holds the samples (NHWC float32) and the reference fixed point computed in Keras: BN layer
by BN layer in order, each measured (float64 mean / biased variance over N, H, W) with the BNs
before it already updated — independent of ONNX and of bnfold.
"""

import os
import sys

import numpy as np


def main(out_dir: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tf2onnx
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input((16, 16, 3), name="x")
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)))
    h = layers.ReLU()(layers.BatchNormalization()(layers.DepthwiseConv2D(3, padding="same")(h)))
    skip = h
    h = layers.BatchNormalization()(layers.Conv2D(8, 1)(h))
    h = layers.ReLU()(layers.Add()([h, skip]))
    out = layers.Dense(3, name="y")(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    bns = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    for bn in bns:  # an "old lab": non-trivial statistics and affine parameters
        shape = bn.get_weights()[0].shape
        bn.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.3, shape), rng.normal(0, 0.5, shape),
                        rng.uniform(0.5, 2.0, shape)])
    spec = (tf.TensorSpec((None, 16, 16, 3), tf.float32, name="x"),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, optimizers={})

    x = (rng.standard_normal((32, 16, 16, 3)) * 1.3 + 0.4).astype(np.float32)
    means, variances = [], []
    for bn in bns:  # BN by BN, upstream BNs already updated
        probe = keras.Model(model.input, bn.input)
        value = probe.predict(x, verbose=0).astype(np.float64)
        mean, var = value.mean(axis=(0, 1, 2)), value.var(axis=(0, 1, 2))
        gamma, beta, _, _ = bn.get_weights()
        bn.set_weights([gamma, beta, mean, var])
        means.append(mean)
        variances.append(var)
    import onnx

    onnx.save(onnx_model, os.path.join(out_dir, "keras_bn.onnx"))
    np.savez(os.path.join(out_dir, "keras_bn.npz"), x=x, y=model.predict(x, verbose=0),
             **{f"mean{i}": m for i, m in enumerate(means)}, **{f"var{i}": v for i, v in enumerate(variances)},
             versions=np.array([tf.__version__, keras.__version__, tf2onnx.__version__]))


if __name__ == "__main__":
    main(sys.argv[1])
