"""What the SDK uploads: models and samples given as paths, bytes, file objects, `onnx.ModelProto`,
NumPy arrays or dicts of arrays, turned into multipart parts that stream and can be sent again.

A part is re-opened for every attempt, so a retried upload starts from its first byte:

* a path is opened afresh (and streamed: httpx reads 64 KiB at a time and sends Content-Length);
* a file object is read from the position it had when given, and rewound to it for a retry
  (an unseekable one is sent once: an upload from it is never retried);
* an array becomes an .npy stream — the header, then the array's own buffer in slices, with no
  copy of the data (one copy only if it is not C-contiguous);
* a dict of arrays becomes an .npz written to memory, or to a temporary file beyond
  `SPOOL_BYTES` (a zip needs its sizes and CRCs, so it cannot be produced slice by slice).

The service decides .npy vs .npz by content, not by name; names are kept for the job's record.

`SubmitOptions` is every keyword of ``submit`` / ``recalibrate`` besides model and samples, and
`multipart` the whole body of ``POST /v1/jobs``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import onnx

from bnfold.errors import InvalidModel, InvalidOptions, InvalidSamples

ModelSource = Union[str, os.PathLike, bytes, IO[bytes], onnx.ModelProto]
SamplesSource = Union[str, os.PathLike, bytes, IO[bytes], np.ndarray, Mapping[str, np.ndarray]]
SPOOL_BYTES = 64 * 2**20
ZIP_MAGIC = b"PK\x03\x04"


@dataclasses.dataclass
class Part:
    """One file of the multipart body; `open()` gives a reader positioned at its first byte."""

    filename: str
    open: Callable[[], IO[bytes]]
    replayable: bool = True

    def field(self) -> tuple[str, IO[bytes], str]:
        return self.filename, self.open(), "application/octet-stream"


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SubmitOptions:
    """The keywords `Client.submit` and `Client.recalibrate` take besides model and samples.

    A plain field is a job option, sent in the ``options`` JSON part unless None (None: the server's
    default); it means what the same option of ``bnfold recalibrate`` / `bnfold.pipeline.JobOptions`
    means. A field with ``metadata={"part": make_part}`` is an optional upload instead, sent as the
    multipart part of the field's name unless None. Adding an option or an upload is one field here
    (and, for the service, one in ``service.schemas.JobOptionsIn`` or the route's form).
    """

    fold: bool = True
    batch_size: int | None = None
    verify_samples: int | None = None
    rtol: float | None = None
    atol: float | None = None
    preprocess: dict[str, Any] | None = None  # image samples only: fields overriding the model's spec
    on_bad_image: str | None = None  # image samples only: 'fail' or 'skip'
    unfoldable: str | None = None  # a BN with no exact linear neighbour: 'keep' it as BN, or 'affine' (Mul + Add)
    quantize: str | None = None  # 'int8': quantize the folded model, gated by agreement with it
    quantize_method: str | None = None  # calibration: 'minmax', 'entropy' or 'percentile'
    min_agreement: float | None = None  # INT8 gate: least top-1 agreement with the float model
    min_cosine: float | None = None  # INT8 gate: least cosine similarity of every output
    prior: float | None = None  # source-prior weight in samples (0/None: off)
    allow_worse: bool | None = None  # keep a result whose labelled check got worse
    # A labelled check scored before and after (paths, bytes or arrays); a worse score fails the job.
    check_samples: SamplesSource | None = dataclasses.field(default=None, metadata={"part": lambda v: samples_part(v)})
    check_labels: SamplesSource | None = dataclasses.field(default=None, metadata={"part": lambda v: samples_part(v)})

    def __post_init__(self) -> None:
        if (self.check_samples is None) != (self.check_labels is None):
            raise InvalidOptions("give both check_samples and check_labels (or neither)")

    def options_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                           if "part" not in f.metadata and getattr(self, f.name) is not None})

    def parts(self) -> dict[str, Part]:
        return {f.name: f.metadata["part"](getattr(self, f.name)) for f in dataclasses.fields(self)
                if "part" in f.metadata and getattr(self, f.name) is not None}


def multipart(model: ModelSource, samples: SamplesSource, options: SubmitOptions) -> tuple[Callable[[], dict], bool]:
    """``POST /v1/jobs``'s body as a factory of httpx ``files`` (every attempt opens its parts afresh),
    and whether it can be sent again (no part read from an unseekable file)."""
    parts = {"model": model_part(model), "samples": samples_part(samples), **options.parts()}
    options_json = options.options_json()

    def files() -> dict:
        return {**{name: part.field() for name, part in parts.items()},
                "options": (None, options_json, "application/json")}

    return files, all(part.replayable for part in parts.values())


def model_part(model: ModelSource) -> Part:
    if isinstance(model, onnx.ModelProto):
        return _bytes_part(model.SerializeToString(), "model.onnx")
    return _part(model, "model.onnx", InvalidModel, "an ONNX model (path, bytes, file object or onnx.ModelProto)")


def samples_part(samples: SamplesSource) -> Part:
    if isinstance(samples, np.ndarray):
        _refuse_objects(samples, "samples")
        return Part("samples.npy", lambda: _NpyReader(samples))
    if isinstance(samples, Mapping):
        return _npz_part(samples)
    return _part(samples, "samples.npy", InvalidSamples, "samples (path, bytes, file object, NumPy array or dict of arrays)")


def _part(source: Any, default_name: str, error: type, what: str) -> Part:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _bytes_part(bytes(source), default_name)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise error(f"{path} is a directory: upload images as one .zip or .tar archive" if path.is_dir()
                        else f"{path} does not exist")
        return Part(path.name, lambda: open(path, "rb"))
    if hasattr(source, "read"):
        return _file_part(source, default_name)
    raise error(f"expected {what}, got {type(source).__name__}")


def _bytes_part(data: bytes, name: str) -> Part:
    if name == "samples.npy" and data.startswith(ZIP_MAGIC):
        name = "samples.npz"
    return Part(name, lambda: io.BytesIO(data))


def _file_part(file: IO[bytes], default_name: str) -> Part:
    name = getattr(file, "name", None)
    name = Path(name).name if isinstance(name, str) and name else default_name
    try:
        start = file.tell() if file.seekable() else None
    except (AttributeError, OSError):
        start = None
    if start is None:
        return Part(name, lambda: _Window(file, None), replayable=False)
    return Part(name, lambda: _Window(file, start))


def _npz_part(arrays: Mapping[str, np.ndarray]) -> Part:
    arrays = {str(name): np.asarray(value) for name, value in arrays.items()}
    for name, array in arrays.items():
        _refuse_objects(array, f"samples['{name}']")
    size = sum(array.nbytes for array in arrays.values())
    buffer: IO[bytes] = io.BytesIO() if size <= SPOOL_BYTES else tempfile.TemporaryFile()
    np.savez(buffer, **arrays)
    return Part("samples.npz", lambda: _Window(buffer, 0))


def _refuse_objects(array: np.ndarray, what: str) -> None:
    if array.dtype.hasobject:
        raise InvalidSamples(f"{what} has dtype object; the service takes numeric arrays only (no pickles)")


class _NpyReader(io.RawIOBase):
    """A seekable read-only view of ``np.save(array)``'s bytes: the header, then the array's buffer."""

    def __init__(self, array: np.ndarray):
        array = array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
        self._pieces = [memoryview(header.getvalue()), memoryview(array).cast("B") if array.nbytes else memoryview(b"")]
        self._size = sum(len(p) for p in self._pieces)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        offset, written, target = self._pos, 0, memoryview(buffer).cast("B")
        for piece in self._pieces:
            if offset >= len(piece):
                offset -= len(piece)
                continue
            chunk = piece[offset:offset + len(target) - written]
            target[written:written + len(chunk)] = chunk
            written += len(chunk)
            offset = 0
            if written == len(target):
                break
        self._pos += written
        return written


class _Window(io.RawIOBase):
    """A caller's file object read from `start` to its end (`start` None: unseekable, read as is).

    httpx rewinds file parts to byte 0 and sizes them with fstat, which is wrong for a file handed
    over mid-way; this view keeps positions relative to `start` and hides ``fileno``."""

    def __init__(self, file: IO[bytes], start: int | None):
        self._file, self._start = file, start
        if start is not None:
            file.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._start is not None

    def tell(self) -> int:
        if self._start is None:
            raise io.UnsupportedOperation("unseekable upload")
        return self._file.tell() - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self._start is None:
            raise io.UnsupportedOperation("unseekable upload")
        if whence == os.SEEK_SET:
            offset += self._start
        return self._file.seek(offset, whence) - self._start

    def readinto(self, buffer) -> int:
        data = self._file.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def close(self) -> None:  # the caller's file stays open; it is theirs
        super().close()
