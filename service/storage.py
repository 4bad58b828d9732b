"""Data directory layout, streamed multipart uploads with size limits, and atomic writes.

    <data_dir>/incoming/<job id>/   an upload being received (renamed into jobs/ once admitted)
    <data_dir>/jobs/<job id>/       model.onnx, samples.<kind> (inputs, removed when the job ends),
                                    spill/ (the job's cut tensors beyond its memory budget),
                                    result.onnx, report.json (written atomically by the job process)
    <data_dir>/trash/               files being deleted: moved here at once (one rename), then removed
                                    by a background thread, so neither a request nor the supervisor
                                    waits for gigabytes of spilled tensors to be unlinked

The service writes nothing outside the data directory: an upload's check unpacks into
incoming/<job id>/scratch, a job's temporary files go to its spill/.

The samples file is named by its content, never by the client's file name: samples.npy,
samples.npz (a zip of .npy arrays), or an archive of images — samples.zip, samples.tar,
samples.tar.gz / .tar.bz2 / .tar.xz. The core decides arrays-or-images by content too
(`bnfold.inputs.image_sources.is_image_source`, which this module asks for zips, so both agree); the name
only keeps the job directory, the report (``extra.images.source``) and the logs honest.

Why a hand-written multipart sink rather than FastAPI's ``UploadFile``: Starlette's form parser
spools every file to a temporary file *before* the handler runs and has no per-file size limit, so
a 100 GB upload would fill the disk before it could be refused. Here python-multipart's streaming
parser feeds each part straight into its final file, counting bytes, and stops at the limit (413).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
import unicodedata
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from bnfold.inputs.image_sources import is_image_source

from .errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

MODEL_FILE, RESULT_FILE, REPORT_FILE = "model.onnx", "result.onnx", "report.json"
REPORT_HTML_FILE = "report.html"
#: the optional labelled check set (bnfold.trust.check): both parts or neither, .npy / .npz by content
CHECK_FILES = ("check_samples.npy", "check_samples.npz", "check_labels.npy")
MAX_OPTIONS_BYTES = 64 * 1024
DRAIN_LIMIT = 8 * 2**20  # after a 413, read (and drop) this much more so the client can see the answer
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
#: compressed tar archives of images, by leading bytes (the core opens them by content as well)
COMPRESSED_TARS = {b"\x1f\x8b": "samples.tar.gz", b"BZh": "samples.tar.bz2", b"\xfd7zXZ\x00": "samples.tar.xz"}
SAMPLES_FILES = ("samples.npy", "samples.npz", "samples.zip", "samples.tar", *COMPRESSED_TARS.values())
#: leading bytes of files people upload instead of an ONNX model
FOREIGN_MODEL_FORMATS = {
    ZIP_MAGIC: "a zip archive (PyTorch .pt/.pth, Keras .keras or .npz)",
    NPY_MAGIC: "a NumPy .npy array",
    b"\x89HDF": "an HDF5 file (Keras .h5)",
    b"\x1f\x8b": "a gzip file",
    **{bytes([0x80, protocol]): "a Python pickle (PyTorch or scikit-learn)" for protocol in range(2, 6)},
}


@dataclasses.dataclass
class Limits:
    model_bytes: int
    samples_bytes: int


@dataclasses.dataclass
class Upload:
    directory: Path
    model_filename: str | None
    samples_filename: str | None
    samples_file: str  # one of SAMPLES_FILES, by content
    model_bytes: int
    samples_bytes: int
    options: bytes | None

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def samples_path(self) -> Path:
        return self.directory / self.samples_file


class Storage:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.jobs = self.root / "jobs"
        self.incoming = self.root / "incoming"
        self.trash = self.root / "trash"

    def prepare(self, stale_incoming_after: float = 3600.0) -> None:
        """Create the layout; drop uploads that were being received when a server died."""
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.trash.mkdir(parents=True, exist_ok=True)
        for entry in self.incoming.iterdir():
            if time.time() - entry.stat().st_mtime > stale_incoming_after:
                self._discard(entry)
        for entry in self.trash.iterdir():  # deletions a previous server did not finish
            _delete_later(entry)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def new_upload_dir(self, job_id: str) -> Path:
        path = self.incoming / job_id
        path.mkdir()
        return path

    def admit(self, upload: Upload, job_id: str) -> None:
        os.replace(upload.directory, self.job_dir(job_id))
        upload.directory = self.job_dir(job_id)

    def remove_upload(self, upload: Upload) -> None:
        """An upload that was not admitted (or whose admission failed), wherever it is now."""
        self._discard(upload.directory)

    def remove_job(self, job_id: str) -> None:
        self._discard(self.job_dir(job_id))

    def remove_inputs(self, job_id: str) -> None:
        for name in (MODEL_FILE, *SAMPLES_FILES, *CHECK_FILES, "spill"):
            self._discard(self.job_dir(job_id) / name)

    def _discard(self, path: Path) -> None:
        """Make `path` disappear now (a rename into trash/) and delete it in the background."""
        target = self.trash / f"{path.parent.name}-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        except OSError:  # e.g. trash/ is gone: delete in place, still off this thread
            target = path
        _delete_later(target)

    def writable(self) -> bool:
        try:
            with tempfile.TemporaryFile(dir=self.root):
                return True
        except OSError:
            return False


def safe_filename(name: str) -> str | None:
    """A client's file name as it may be stored and sent back (Content-Disposition): its last path
    component without control, format (bidi overrides such as U+202E, zero-width) or line-separator
    characters, at most 255 characters; None when nothing is left."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
    kept = kept.strip().lstrip(".")[:255]
    return kept or None


def _delete_later(path: Path) -> None:
    def delete() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    threading.Thread(target=delete, name="bnfold-delete", daemon=True).start()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename: readers see all of it or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def receive_upload(chunks: AsyncIterator[bytes], content_type: str | None, directory: Path, limits: Limits) -> Upload:
    """Stream a multipart/form-data body (parts model, samples, options) into `directory`."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise UnsupportedMediaType(f"the body must be multipart/form-data with parts model, samples and options, "
                                   f"not '{kind.decode('latin-1') or 'nothing'}'", field="body")
    if not params.get(b"boundary"):
        raise InvalidRequest("the multipart/form-data Content-Type has no boundary", field="body")
    sink = _Sink(directory, limits)
    parser = MultipartParser(params[b"boundary"], sink.callbacks())
    stream = chunks.__aiter__()
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except PayloadTooLarge:
        await _drain(stream, DRAIN_LIMIT)
        raise
    except MultipartParseError as exc:
        raise InvalidRequest(f"the body is not valid multipart/form-data: {exc}", field="body") from None
    except ClientDisconnect:
        raise InvalidRequest("the client disconnected before the upload was complete", field="body") from None
    finally:
        sink.close()
    return sink.result()


class _Sink:
    """python-multipart callbacks writing file parts to disk as they arrive."""

    FILES = {"model": MODEL_FILE, "samples": "samples.upload"}
    OPTIONAL_FILES = {"check_samples": "check_samples.upload", "check_labels": "check_labels.upload"}

    def __init__(self, directory: Path, limits: Limits):
        self.directory, self.limits = directory, limits
        self.header_field, self.header_value = bytearray(), bytearray()
        self.disposition = b""
        self.name: str | None = None
        self.file = None
        self.sizes: dict[str, int] = {}
        self.filenames: dict[str, str | None] = {}
        self.options: bytearray | None = None
        self.ended = False

    def callbacks(self):
        return {
            "on_part_begin": self._begin, "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
            "on_part_data": self._data, "on_part_end": self._part_end, "on_end": self._end,
        }

    def _begin(self):
        self.disposition, self.name = b"", None

    def _field(self, data, start, end):
        self.header_field += data[start:end]

    def _value(self, data, start, end):
        self.header_value += data[start:end]

    def _header_end(self):
        if bytes(self.header_field).lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_field, self.header_value = bytearray(), bytearray()

    def _headers_done(self):
        _, params = parse_options_header(self.disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name not in (*self.FILES, *self.OPTIONAL_FILES, "options"):
            raise InvalidRequest(f"unexpected part '{name}': send the parts model, samples and options (and optionally "
                                 "check_samples with check_labels)", field=name or "body")
        if name in self.sizes:
            raise InvalidRequest(f"part '{name}' appears twice", field=name)
        self.name, self.sizes[name] = name, 0
        filename = params.get(b"filename")
        self.filenames[name] = safe_filename(filename.decode("utf-8", "replace")) if filename else None
        if name == "options":
            self.options = bytearray()
        else:
            self.file = open(self.directory / (self.FILES | self.OPTIONAL_FILES)[name], "wb")

    def _data(self, data, start, end):
        size = self.sizes[self.name] = self.sizes[self.name] + (end - start)
        limit = {"model": self.limits.model_bytes, "samples": self.limits.samples_bytes,
                 "check_samples": self.limits.samples_bytes, "check_labels": self.limits.samples_bytes}.get(
            self.name, MAX_OPTIONS_BYTES)
        if size > limit:
            raise PayloadTooLarge(f"{self.name} is larger than the limit of {limit} bytes", field=self.name)
        if self.file is not None:
            self.file.write(data[start:end])
        else:
            self.options += data[start:end]

    def _part_end(self):
        self.close()
        self.name = None

    def _end(self):
        self.ended = True

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def result(self) -> Upload:
        if not self.ended:
            raise InvalidRequest("the body ended before the closing multipart boundary (truncated upload?)", field="body")
        for name in self.FILES:
            if name not in self.sizes:
                raise InvalidRequest(f"the '{name}' file part is missing", field=name)
            if self.sizes[name] == 0:
                raise InvalidRequest(f"the '{name}' file is empty", field=name)
        _refuse_foreign_model(self.directory / MODEL_FILE)
        samples_file = _place_samples(self.directory / self.FILES["samples"], self.limits.samples_bytes)
        _place_check(self.directory, self.sizes, self.limits.samples_bytes)
        return Upload(self.directory, self.filenames.get("model"), self.filenames.get("samples"), samples_file,
                      self.sizes["model"], self.sizes["samples"], bytes(self.options) if self.options is not None else None)


def _place_check(directory: Path, sizes: dict[str, int], limit: int) -> None:
    """The labelled check parts: both or neither, non-empty, arrays (.npy; samples may be .npz), named by content."""
    given = [name for name in _Sink.OPTIONAL_FILES if name in sizes]
    if len(given) == 1:
        missing = ({*_Sink.OPTIONAL_FILES} - set(given)).pop()
        raise InvalidRequest(f"the '{given[0]}' part needs a '{missing}' part too", field=missing)
    for name in given:
        path = directory / _Sink.OPTIONAL_FILES[name]
        head = _head(path)
        if sizes[name] == 0:
            raise InvalidRequest(f"the '{name}' file is empty", field=name)
        if head.startswith(NPY_MAGIC):
            os.replace(path, directory / f"{name}.npy")
        elif name == "check_samples" and head.startswith(ZIP_MAGIC):
            _refuse_large_npz(path, limit)
            os.replace(path, directory / f"{name}.npz")
        else:
            raise UnsupportedMediaType(f"{name} must be a NumPy .npy file" + (" or .npz" if name == "check_samples" else ""),
                                       field=name)


def check_paths(directory: Path) -> tuple[Path | None, Path | None]:
    """(check samples, check labels) in a job or upload directory, or (None, None)."""
    samples = next((directory / n for n in CHECK_FILES[:2] if (directory / n).is_file()), None)
    labels = directory / CHECK_FILES[2]
    return (samples, labels) if samples is not None and labels.is_file() else (None, None)


def _refuse_foreign_model(path: Path) -> None:
    head = _head(path)
    for magic, what in FOREIGN_MODEL_FORMATS.items():
        if head.startswith(magic):
            raise UnsupportedMediaType(f"the model is {what}, not an ONNX model; export it to ONNX first", field="model")


def _place_samples(path: Path, limit: int) -> str:
    """Name the samples file by its content (see the module doc), refusing anything else and .npz
    archives that unpack to more than `limit` bytes. Image archives are bounded by the image
    limits when the precheck lists them; what a compressed tar holds is only known by unpacking it."""
    head = _head(path, 512)
    if head.startswith(NPY_MAGIC):
        name = "samples.npy"
    elif head.startswith(ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):  # the latter: an empty zip
        name = "samples.zip" if is_image_source(path) else "samples.npz"
        if name == "samples.npz":
            _refuse_large_npz(path, limit)
    elif head.startswith(tuple(COMPRESSED_TARS)):
        name = next(name for magic, name in COMPRESSED_TARS.items() if head.startswith(magic))
    elif head[257:262] == b"ustar":
        name = "samples.tar"
    else:
        raise UnsupportedMediaType("samples must be a NumPy .npy or .npz file (np.save / np.savez), or a .zip, .tar, "
                                   ".tar.gz, .tar.bz2 or .tar.xz archive of images", field="samples")
    os.replace(path, path.with_name(name))
    return name


def _refuse_large_npz(path: Path, limit: int) -> None:
    """The core reads .npz members batch by batch, but a member that inflates a thousandfold still
    costs the job its time: refuse archives whose declared sizes add up to more than `limit`."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        unpacked = 0  # not readable as an archive: the precheck reports why
    if unpacked > limit:
        raise PayloadTooLarge(f"the samples archive unpacks to {unpacked} bytes, above the limit of {limit}",
                              field="samples")


def _head(path: Path, size: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


async def _drain(stream: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    try:
        async for chunk in stream:
            seen += len(chunk)
            if seen > limit:
                return
    except Exception:  # the client gave up: nothing left to answer
        return
