"""Folding recalibrated BN into neighbouring layers, and proving the result equivalent.

`fold` holds the rules (Conv, ConvTranspose, Gemm, MatMul; backward, forward, or an affine map);
`edit` the editable graph they rewrite; `verify` runs both models in ONNX Runtime and compares.
"""
