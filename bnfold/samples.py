"""Unlabeled samples: read them, check them against the model's inputs, and cut them into batches.

Samples may be one array (single-input models), a mapping input name → array (all arrays share the
sample axis 0), or an iterable of such batches (data that does not fit in memory, read lazily and
only once). Every batch is checked before it reaches ONNX Runtime: names, dtype kind, rank, static
dimensions, finiteness. Floating-point samples are cast to the input's float type (numpy's default
float64 is the common case); any other dtype mismatch is an error rather than a silent conversion.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx

from .errors import InvalidOptions, InvalidSamples

Batch = np.ndarray | Mapping[str, np.ndarray]
Samples = np.ndarray | Mapping[str, np.ndarray] | Iterable[Batch]  # or an NpyFile (see load_samples)


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
        isinstance(samples, (np.ndarray, NpyFile, Mapping)) or hasattr(samples, "__iter__")
    ):
        raise InvalidSamples(
            f"samples must be an array, a dict of arrays or an iterable of batches, not {type(samples).__name__}; "
            "to read a file use bnfold.samples.load_samples(path)"
        )
    fixed = inputs[0].dims[0] if inputs and inputs[0].dims else None
    size = fixed or batch_size  # a model exported with a static batch size only runs that size
    if isinstance(samples, (np.ndarray, NpyFile, Mapping)):
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


def _array(value) -> np.ndarray | NpyFile:
    return value if isinstance(value, NpyFile) else np.asarray(value)


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


class NpyFile:
    """A C-order .npy file read slice by slice along axis 0.

    Not memory-mapped on purpose: pages of a mapping that have been read count towards the
    process's resident set until unmapped, so RSS would grow with the sample count. Here each
    slice is read into a fresh array that is freed with its batch.
    """

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, fortran_order, self.dtype = read_header(f)
            self._offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        if self.dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        if fortran_order or not self.shape:
            raise ValueError("the array is Fortran-ordered or 0-d; save a C-order array of shape (N, ...)")
        self._row = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        if size < self._offset + self._row * self.shape[0]:
            raise ValueError(f"the file is truncated ({size} bytes for an array of shape {self.shape})")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("NpyFile reads contiguous row ranges only")
        out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self._offset + start * self._row)
            f.readinto(memoryview(out).cast("B"))
        return out


def load_samples(path: str | os.PathLike) -> NpyFile | dict[str, np.ndarray]:
    """Read .npy (one array, read lazily slice by slice) or .npz (one array per input name)."""
    path = os.fspath(path)
    if path.endswith(".npz") and os.path.isfile(path) and not zipfile.is_zipfile(path):
        # np.load falls back to unpickling files it does not recognise; say what it really is
        raise InvalidSamples(f"{path} is not a readable NumPy .npz file (not a zip archive)")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        if path.endswith(".npy"):
            return NpyFile(path)
    except FileNotFoundError:
        raise InvalidSamples(f"no such samples file: {path}") from None
    except ValueError as exc:
        if any(word in str(exc) for word in ("pickle", "Object arrays", "Python objects")):
            raise InvalidSamples(f"{path} holds pickled Python objects, which are never loaded; save plain numeric arrays") from None
        raise InvalidSamples(f"{path} is not a readable NumPy file: {exc}") from None
    except (OSError, EOFError) as exc:
        raise InvalidSamples(f"{path} is not a readable NumPy file: {exc}") from None
    raise InvalidSamples(f"{path}: samples must be a .npy (single-input models) or .npz (one array per input) file")
