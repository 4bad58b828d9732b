"""Folding recalibrated BN into neighbouring layers, and proving the result equivalent.

`fold` decides each BN's fate (maths in its docstring): `backward` and `forward` hold the rules (Conv,
ConvTranspose, Gemm, MatMul, channel Concat, Transpose chains), `weights` what they share; a BN no
rule folds is kept, or becomes an affine map on request; `edit` the editable graph they rewrite; `verify`
runs both models in ONNX Runtime and compares; `probe` draws its random inputs at the scale the
model's BN statistics imply.
"""
