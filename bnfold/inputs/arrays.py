"""Unlabeled samples: read them, check them against the model's inputs, and cut them into batches.

Samples may be one array (single-input models), a mapping input name → array (all arrays share the
sample axis 0), or an iterable of such batches (data that does not fit in memory, read lazily and
only once). Every batch is checked before it reaches ONNX Runtime: names, dtype kind, rank, static
dimensions, finiteness. Floating-point samples are cast to the input's float type (numpy's default
float64 is the common case); any other dtype mismatch is an error rather than a silent conversion.

Files are read lazily, one batch of rows at a time, so memory stays near one batch whatever the
file or archive holds (`LazyArray`): a .npy file by seeking to the rows; a .npz member by where it
is stored. An uncompressed (ZIP_STORED, `np.savez`) member is plain .npy bytes at a fixed offset in
the zip file, read exactly like a .npy file. A compressed (`np.savez_compressed`) member cannot be
entered at an offset, so it is decompressed as a stream that moves forward batch by batch
(`zipfile`'s own seek: skipping ahead decompresses and drops, going back restarts the member);
batches are read in order, so one pass decompresses each member once. The declared sizes in the
zip directory are checked against the .npy headers up front, and zipfile never inflates a member
beyond its declared size, so a "zip bomb" costs time but never memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx

from bnfold.errors import InvalidOptions, InvalidSamples

Batch = np.ndarray | Mapping[str, np.ndarray]
Samples = np.ndarray | Mapping[str, np.ndarray] | Iterable[Batch]  # arrays may be LazyArray (load_samples)


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """A runtime input of the model. dims: int for static, None for symbolic or unknown."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]

    def describe(self) -> str:
        return "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ")"


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """Graph inputs that need feeding (inputs with an initializer default are constants)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            raise InvalidSamples(f"model input '{value.name}' is not a tensor of known rank")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        inputs.append(ModelInput(value.name, np.dtype(dtype), dims))
    return inputs


def iter_batches(samples: Samples, inputs: list[ModelInput], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Validated batches {input name: array}; arrays of a batch share axis 0 (the sample axis)."""
    if batch_size < 1:
        raise InvalidOptions(f"batch_size must be ≥ 1, got {batch_size}")
    if samples is None or isinstance(samples, (str, bytes, os.PathLike, np.generic)) or not (
        isinstance(samples, (np.ndarray, LazyArray, Mapping)) or hasattr(samples, "__iter__")
    ):
        raise InvalidSamples(
            f"samples must be an array, a dict of arrays or an iterable of batches, not {type(samples).__name__}; "
            "to read a file use bnfold.samples.load_samples(path)"
        )
    fixed = inputs[0].dims[0] if inputs and inputs[0].dims else None
    size = fixed or batch_size  # a model exported with a static batch size only runs that size
    if isinstance(samples, (np.ndarray, LazyArray, Mapping)):
        whole = _as_mapping(samples, inputs)
        total = _sample_count(whole)
        if total == 0:
            raise InvalidSamples("the sample set is empty: give at least one sample")
        raw: Iterable[dict[str, np.ndarray]] = (
            {k: v[i : i + size] for k, v in whole.items()} for i in range(0, total, size)
        )
    else:
        raw = (_as_mapping(batch, inputs) for batch in samples)
    seen = 0
    for index, batch in enumerate(_rechunk(raw, fixed)):
        seen += _sample_count(batch)
        yield _checked(batch, inputs, index)
    if seen == 0:
        raise InvalidSamples("the sample set is empty: give at least one sample")


def _as_mapping(batch: Batch, inputs: list[ModelInput]) -> dict[str, np.ndarray]:
    names = [i.name for i in inputs]
    if isinstance(batch, Mapping):
        unknown = sorted(set(batch) - set(names))
        missing = [n for n in names if n not in batch]
        if missing:
            raise InvalidSamples(f"samples have no array for model input(s) {missing}; inputs are {names}")
        if unknown:
            raise InvalidSamples(f"samples name {unknown}, which are not model inputs; inputs are {names}")
        return {n: _array(batch[n]) for n in names}
    if len(names) != 1:
        raise InvalidSamples(f"the model has {len(names)} inputs {names}: give one array per input name (.npz)")
    return {names[0]: _array(batch)}


def _array(value) -> np.ndarray | LazyArray:
    return value if isinstance(value, LazyArray) else np.asarray(value)


def _sample_count(batch: Mapping[str, np.ndarray]) -> int:
    counts = {name: (a.shape[0] if a.ndim else -1) for name, a in batch.items()}
    if len(set(counts.values())) > 1:
        raise InvalidSamples(f"arrays disagree on the number of samples (axis 0): {counts}")
    return next(iter(counts.values()))


def _rechunk(batches: Iterable[dict[str, np.ndarray]], size: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Re-cut batches to exactly `size` samples each (models with a static batch dimension)."""
    if size is None:
        yield from (b for b in batches if _sample_count(b) > 0)
        return
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += _sample_count(batch)
        while held >= size:
            joined = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in joined.items()}
            pending, held = [{k: v[size:] for k, v in joined.items()}], held - size
    if held:
        raise InvalidSamples(
            f"the model's batch dimension is fixed at {size}, but the sample count leaves {held} over: "
            f"give a multiple of {size} samples, or export the model with a dynamic batch axis"
        )


def _checked(batch: dict[str, np.ndarray], inputs: list[ModelInput], index: int) -> dict[str, np.ndarray]:
    out = {}
    for spec in inputs:
        array = batch[spec.name]
        where = f"samples for input '{spec.name}'"
        if array.ndim != len(spec.dims) or any(
            d is not None and d != a for d, a in zip(spec.dims[1:], array.shape[1:])
        ):
            raise InvalidSamples(
                f"{where} have shape {tuple(array.shape[1:])} per sample (array {tuple(array.shape)}), "
                f"but the model expects {spec.describe()} with axis 0 counting samples"
            )
        out[spec.name] = _converted(array, spec, where)
        if out[spec.name].dtype.kind in "fc" and not np.isfinite(out[spec.name]).all():
            raise InvalidSamples(f"{where} contain NaN or Inf (in batch {index}); clean or drop those samples")
    return out


def _converted(array: np.ndarray, spec: ModelInput, where: str) -> np.ndarray:
    if array.dtype == spec.dtype:
        return np.ascontiguousarray(array)
    if array.dtype.kind == "f" and spec.dtype.kind == "f":
        return np.ascontiguousarray(array, dtype=spec.dtype)
    raise InvalidSamples(
        f"{where} have dtype {array.dtype}, but the model expects {spec.dtype}; convert them first "
        "(e.g. images: scale to float as the model was trained)"
    )


class LazyArray:
    """A C-order array of shape (N, ...) on disk, read one contiguous row range at a time.

    Not memory-mapped on purpose: pages of a mapping that have been read count towards the
    process's resident set until unmapped, so RSS would grow with the sample count. Here each
    slice is read into a fresh array that is freed with its batch.
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    def _read_header(self, f, where: str) -> None:
        """Shape and dtype from the .npy header at the stream position; refuse what cannot be sliced."""
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran_order, self.dtype = read_header(f)
        if self.dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        if fortran_order or not self.shape:
            raise ValueError(f"{where} is Fortran-ordered or 0-d; save a C-order array of shape (N, ...)")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"{where} declares a negative dimension in its shape {self.shape}")
        # Python ints, not np.prod: a header such as (10, 2**32, 2**32) must not wrap around to 0 bytes
        # and slip past the size checks against the file (which then refuse it as truncated).
        self._row = self.dtype.itemsize * math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return self._row * self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError(f"{type(self).__name__} reads contiguous row ranges only")
        out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        if out.nbytes:
            self._read_into(start * self._row, out.reshape(-1).view(np.uint8))
        return out

    def _read_into(self, position: int, buffer: np.ndarray) -> None:
        """Fill `buffer` with the data bytes from `position` (0: the first row)."""
        raise NotImplementedError


class NpyFile(LazyArray):
    """A .npy file, or .npy bytes at `offset` in a larger file (an uncompressed .npz member)."""

    def __init__(self, path: str, offset: int = 0, where: str | None = None):
        self.path = path
        with open(path, "rb") as f:
            f.seek(offset)
            self._read_header(f, where or "the array")
            self._offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        if size < self._offset + self.nbytes:
            raise ValueError(f"{where or 'the file'} is truncated ({size} bytes for an array of shape {self.shape})")

    def _read_into(self, position: int, buffer: np.ndarray) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset + position)
            f.readinto(buffer)


class CompressedNpzMember(LazyArray):
    """A compressed .npz member, decompressed as a forward stream: batch after batch in order costs
    one pass; a read before the current position restarts the member (as `zipfile` seeks)."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str):
        self.where = where
        self._stream = archive.open(info)  # stays usable after the ZipFile is closed
        self._read_header(self._stream, where)
        self._offset = self._stream.tell()
        if info.file_size < self._offset + self.nbytes:
            raise ValueError(f"{where} is truncated ({info.file_size} bytes declared for an array of shape {self.shape})")

    def _read_into(self, position: int, buffer: np.ndarray) -> None:
        try:
            self._stream.seek(self._offset + position)
            got = self._stream.readinto(buffer)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
            raise InvalidSamples(f"{self.where} cannot be decompressed: {exc}") from None
        if got != len(buffer):
            raise InvalidSamples(f"{self.where} ends early ({got} of {len(buffer)} bytes of rows)")


def _npz_members(path: str) -> dict[str, LazyArray]:
    """Every member of an .npz archive as a lazy array, by name without '.npy'."""
    out: dict[str, LazyArray] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            where = f"member '{info.filename}'"
            if not info.filename.endswith(".npy"):
                raise ValueError(f"{where} is not a .npy array; an .npz holds one .npy per model input")
            if info.flag_bits & 0x1:
                raise ValueError(f"{where} is encrypted")
            if info.compress_type == zipfile.ZIP_STORED:
                out[info.filename[:-4]] = NpyFile(path, _stored_data_offset(path, info), where)
            else:
                out[info.filename[:-4]] = CompressedNpzMember(archive, info, where)
    return out


def _stored_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where an uncompressed member's bytes start: after its local header, name and extra field."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"member '{info.filename}' has no valid local zip header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


def load_samples(path: str | os.PathLike) -> LazyArray | dict[str, LazyArray]:
    """Read .npy (one array) or .npz (one array per input name), lazily: see the module doc."""
    path = os.fspath(path)
    if path.endswith(".npz") and os.path.isfile(path) and not zipfile.is_zipfile(path):
        # np.load falls back to unpickling files it does not recognise; say what it really is
        raise InvalidSamples(f"{path} is not a readable NumPy .npz file (not a zip archive)")
    try:
        if path.endswith(".npz"):
            return _npz_members(path)
        if path.endswith(".npy"):
            return NpyFile(path)
    except FileNotFoundError:
        raise InvalidSamples(f"no such samples file: {path}") from None
    except ValueError as exc:
        if any(word in str(exc) for word in ("pickle", "Object arrays", "Python objects")):
            raise InvalidSamples(f"{path} holds pickled Python objects, which are never loaded; save plain numeric arrays") from None
        raise InvalidSamples(f"{path} is not a readable NumPy file: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InvalidSamples(f"{path} is not a readable NumPy file: {exc}") from None
    raise InvalidSamples(f"{path}: samples must be a .npy (single-input models) or .npz (one array per input) file")
