"""INT8 after recalibration and folding: ONNX Runtime static quantization calibrated on the same
samples, refused unless the INT8 model agrees with the float one (see `int8` and `gate`)."""

from bnfold.quantize.gate import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_COSINE
from bnfold.quantize.int8 import (
    METHODS,
    Int8Options,
    Int8Result,
    check_quantizable,
    quantize_int8,
)

__all__ = ["DEFAULT_MIN_AGREEMENT", "DEFAULT_MIN_COSINE", "METHODS", "Int8Options", "Int8Result", "check_quantizable", "quantize_int8"]
