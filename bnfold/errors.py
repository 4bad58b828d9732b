"""One exception tree for every failure a caller can act on.

Each class names the HTTP status the service maps it to (in one place, `service/errors.py`);
the CLI prints the message and exits non-zero. Messages say what was wrong *and* how to fix it.
"""


class BnfoldError(Exception):
    """Base class. HTTP 422 unless a subclass says otherwise."""

    status: int = 422
    title: str = "bnfold error"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        #: which part of the request was wrong ("model", "samples", "options"), for problem+json
        self.field = field


class InvalidModel(BnfoldError):
    """The model file is not a usable ONNX model (parse or checker failure). HTTP 422."""

    title = "Invalid model"

    def __init__(self, message: str):
        super().__init__(message, field="model")


class UnsupportedModel(InvalidModel):
    """A valid ONNX model that bnfold cannot process (e.g. BN in training mode). HTTP 422."""

    title = "Unsupported model"


class NoBatchNorm(InvalidModel):
    """The model has no BatchNormalization node to recalibrate. HTTP 422."""

    title = "No BatchNormalization node"


class InvalidSamples(BnfoldError):
    """Samples that cannot be read or do not fit the model's inputs. HTTP 422."""

    title = "Invalid samples"

    def __init__(self, message: str):
        super().__init__(message, field="samples")


class InvalidOptions(BnfoldError):
    """An option value out of range or inconsistent with the model. HTTP 422."""

    title = "Invalid options"

    def __init__(self, message: str):
        super().__init__(message, field="options")


class DiskBudgetExceeded(BnfoldError):
    """The job would write more to disk than its budget allows (cut tensors spilled beyond the
    memory budget). HTTP 422: fewer or smaller samples fit; the message names the limit."""

    title = "Disk budget exceeded"

    def __init__(self, message: str):
        super().__init__(message, field="samples")


class VerificationFailed(BnfoldError):
    """The folded model does not match the unfolded one within tolerance; nothing is written. HTTP 422."""

    title = "Verification failed"


class QuantizationRefused(BnfoldError):
    """INT8 quantization is not possible for this model (float16, no op with an INT8 kernel) or its
    result disagrees with the float model beyond the threshold; nothing is written. HTTP 422."""

    title = "Quantization refused"

    def __init__(self, message: str, *, field: str | None = "options.quantize"):
        super().__init__(message, field=field)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 sample', '2 samples', '0 samples' (`nouns`: an irregular plural). For the messages above."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


class AdaptationWorse(BnfoldError):
    """The labelled check scored the adapted model below the original; nothing is written. HTTP 422."""

    title = "Adaptation made the check worse"

    def __init__(self, message: str):
        super().__init__(message, field="check_labels")
