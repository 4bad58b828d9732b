"""bnfold: recalibrate BatchNorm statistics of ONNX models on a new domain, exactly, and fold BN away."""

from importlib.metadata import PackageNotFoundError, version

from bnfold.engine.recalibrate import RecalibrationResult, recalibrate
from bnfold.errors import (
    BnfoldError,
    InvalidModel,
    InvalidOptions,
    InvalidSamples,
    NoBatchNorm,
    UnsupportedModel,
    VerificationFailed,
)
from bnfold.report import LayerReport, Report

try:
    __version__ = version("bnfold")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BnfoldError",
    "InvalidModel",
    "InvalidOptions",
    "InvalidSamples",
    "LayerReport",
    "NoBatchNorm",
    "RecalibrationResult",
    "Report",
    "UnsupportedModel",
    "VerificationFailed",
    "__version__",
    "recalibrate",
]
