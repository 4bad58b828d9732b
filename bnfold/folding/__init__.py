"""Folding recalibrated BN into neighbouring layers, and proving the result equivalent.

`fold` holds the rules (Conv, ConvTranspose, Gemm, MatMul; backward, forward; a BN no rule folds
is kept, or becomes an affine map on request); `edit` the editable graph they rewrite; `verify`
runs both models in ONNX Runtime and compares; `probe` draws its random inputs at the scale the
model's BN statistics imply.
"""
