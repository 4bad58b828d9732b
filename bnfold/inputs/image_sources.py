"""Where image samples come from: a folder or an archive, listed safely before anything is read.

A source is a folder (walked recursively; file symlinks followed as any local path would be,
symlinked folders never entered, FIFOs and devices never opened), a ``.zip``, or a ``.tar`` (plain,
``.gz``, ``.bz2`` or ``.xz``). Its image files (by name: PNG, JPEG, BMP, TIFF) are listed in sorted
order; other files are ignored and listed. A compressed tar is first decompressed to a bounded
temporary file, because a compressed stream cannot be read in sorted order without starting over.

Refused, for the whole source (`InvalidSamples`), before any image is read: more than
``max_members`` files; one file above ``max_file_bytes`` or all images above ``max_total_bytes``
(archives: uncompressed, as declared — zipfile and tarfile never read past the declared size);
nested archives (by name here, by content when read); and in archives absolute paths, ``..``,
symlinks, hard links, devices, encrypted or duplicate members.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import re
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from bnfold.errors import InvalidOptions, InvalidSamples
from bnfold.inputs.preprocess import BadImage

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = frozenset({".zip", ".npz", ".tar", ".tgz", ".tbz2", ".txz", ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar"})
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd", *_COMPRESSED)


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Bounds on what one source may make bnfold read and decode."""

    max_members: int = 200_000  # files in the folder or archive, of every kind
    max_total_bytes: int = 16 * 2**30  # all files together (archives: uncompressed)
    max_file_bytes: int = 256 * 2**20  # one file
    max_image_pixels: int = 2**26  # width × height of one image (≈ 8192²)
    max_image_bytes: int = 2**30  # one decoded TIFF, all channels
    max_total_pixels: int = 2**36  # all images of one pass together

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptions(f"image limit {field.name} must be an integer ≥ 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Member:
    name: str  # relative POSIX path inside the source
    size: int
    ref: Any  # ZipInfo, TarInfo or filesystem path


def is_image_source(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder or archive of images (by content), rather than .npy/.npz samples."""
    path = Path(path)
    if path.is_dir():
        return True
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return path.suffix.lower() not in (".npy", ".npz") and (path.suffix.lower() in ARCHIVE_SUFFIXES | IMAGE_SUFFIXES)
    if head.startswith(b"\x93NUMPY"):
        return False
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError):
            names = []
        return not all(n.endswith(".npy") for n in names) if names else not suffixes.endswith(".npz")
    return head.startswith(tuple(_COMPRESSED)) or head[257:262] == b"ustar" or path.suffix.lower() in ARCHIVE_SUFFIXES | IMAGE_SUFFIXES


class _Source:
    kind = "?"

    def __init__(self, where: str, members, limits: ImageLimits):
        self.where = where
        self.images, self.ignored = _admit(members, limits, where)
        if not self.images:
            raise InvalidSamples(f"{where} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                                 + (f"; ignored {len(self.ignored)} other file(s), e.g. {self.ignored[0]}" if self.ignored else ""))

    def read(self, member: Member) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Folder(_Source):
    kind = "folder"

    def __init__(self, root: Path, limits: ImageLimits):
        self.limit = limits.max_file_bytes
        super().__init__(f"folder {root.absolute().name}", self._walk(root), limits)

    @staticmethod
    def _walk(root: Path):
        """Regular files (file symlinks followed, as any local path would be); symlinked folders not entered."""
        for directory, folders, files in os.walk(root, followlinks=False):
            for name in sorted(folders + files):
                full = os.path.join(directory, name)
                relative = Path(full).relative_to(root).as_posix()
                if name in folders and not os.path.islink(full):
                    continue  # walked into next
                try:
                    regular = name in files and stat.S_ISREG(os.stat(full).st_mode)
                except OSError:
                    regular = False  # a dangling symlink
                # FIFOs, devices, symlinked folders and dangling links are listed as ignored (size -1)
                yield (relative, os.path.getsize(full), full) if regular else (relative, -1, None)

    def read(self, member: Member) -> bytes:
        try:
            with open(member.ref, "rb") as f:
                data = f.read(self.limit + 1)
        except OSError as exc:
            raise BadImage(f"cannot be read ({exc.strerror or exc})") from None
        if len(data) > self.limit:
            raise BadImage(f"grew above the per-file limit of {self.limit} bytes while being read")
        return data


class _Zip(_Source):
    kind = "zip"

    def __init__(self, path: Path, limits: ImageLimits):
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InvalidSamples(f"archive {path.name} is not a readable zip file: {exc}") from None
        where = f"archive {path.name}"
        try:
            super().__init__(where, self._entries(where), limits)
        except BaseException:
            self.archive.close()
            raise

    def _entries(self, where: str):
        for info in self.archive.infolist():
            mode = info.external_attr >> 16 if info.create_system == 3 else 0  # Unix mode bits, when recorded
            _check_name(info.filename, where)
            if info.is_dir():
                continue
            if stat.S_ISLNK(mode):
                raise InvalidSamples(f"{where}: member '{info.filename}' is a symbolic link; archives must hold plain files only")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                raise InvalidSamples(f"{where}: member '{info.filename}' is not a regular file")
            if info.flag_bits & 0x1:
                raise InvalidSamples(f"{where}: member '{info.filename}' is encrypted; send an unencrypted archive")
            yield info.filename, info.file_size, info

    def read(self, member: Member) -> bytes:
        try:
            with self.archive.open(member.ref) as f:
                return f.read()  # never more than the declared size, which the listing bounded
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, lzma.LZMAError) as exc:
            raise BadImage(f"cannot be read from the archive ({exc})") from None

    def close(self) -> None:
        self.archive.close()


class _Tar(_Source):
    kind = "tar"

    def __init__(self, path: Path, limits: ImageLimits, opener=None):
        where = f"archive {path.name}"
        self.file = _decompressed(path, opener, limits, where) if opener else open(path, "rb")
        try:
            self.archive = tarfile.open(fileobj=self.file, mode="r:")
            super().__init__(where, self._entries(where), limits)
        except (tarfile.TarError, OSError, EOFError) as exc:
            self.file.close()
            raise InvalidSamples(f"{where} is not a readable tar archive: {exc}") from None
        except BaseException:
            self.file.close()
            raise

    def _entries(self, where: str):
        for member in self.archive:  # lazy: stops at the first refused member or past max_members
            _check_name(member.name, where)
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                raise InvalidSamples(f"{where}: member '{member.name}' is a {'symbolic' if member.issym() else 'hard'} "
                                     "link; archives must hold plain files only")
            if not member.isfile():
                raise InvalidSamples(f"{where}: member '{member.name}' is not a regular file (device or FIFO)")
            yield member.name, member.size, member

    def read(self, member: Member) -> bytes:
        try:
            return self.archive.extractfile(member.ref).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BadImage(f"cannot be read from the archive ({exc})") from None

    def close(self) -> None:
        self.archive.close()
        self.file.close()


def open_source(path: Path, limits: ImageLimits) -> _Source:
    if path.is_dir():
        return _Folder(path, limits)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise InvalidSamples(f"cannot read samples {path}: {exc.strerror or exc}") from None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _Zip(path, limits)
    for magic, opener in _COMPRESSED.items():
        if head.startswith(magic):
            return _Tar(path, limits, opener)
    if head[257:262] == b"ustar" or path.suffix.lower() == ".tar":
        return _Tar(path, limits)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise InvalidSamples(f"{path.name} is one image: give a folder, or a .zip / .tar / .tar.gz archive of images")
    raise InvalidSamples(f"{path.name} is not a folder or a .zip / .tar / .tar.gz archive of images")


def _decompressed(path: Path, opener, limits: ImageLimits, where: str):
    """Decompress to a temporary file, refusing more than the member data and tar headers can need."""
    cap = limits.max_total_bytes + 2048 * limits.max_members + 2 * tarfile.RECORDSIZE  # + headers and padding
    spool = tempfile.TemporaryFile()
    try:
        with opener(path, "rb") as stream:
            copied = 0
            while chunk := stream.read(1 << 20):
                copied += len(chunk)
                if copied > cap:
                    raise InvalidSamples(f"{where} decompresses to more than {cap} bytes (limit max_total_bytes)")
                spool.write(chunk)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        spool.close()
        raise InvalidSamples(f"{where} is not readable: {exc}") from None
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def _check_name(name: str, where: str) -> None:
    parts = re.split(r"[\\/]", name)
    if "\0" in name or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise InvalidSamples(f"{where}: member '{name}' has an absolute or parent ('..') path; refusing the archive")


def _admit(members, limits: ImageLimits, where: str) -> tuple[list[Member], list[str]]:
    images, ignored, names, total = [], [], set(), 0
    for count, (name, size, ref) in enumerate(members, start=1):
        if count > limits.max_members:
            raise InvalidSamples(f"{where} has more than {limits.max_members} files (limit max_members); split it")
        if name in names:
            raise InvalidSamples(f"{where}: member '{name}' appears twice; refusing the ambiguous archive")
        names.add(name)
        path = PurePosixPath(name)
        if size < 0 or any(p.startswith(".") or p == "__MACOSX" for p in path.parts):
            ignored.append(name)  # not a regular file, or hidden (e.g. macOS resource forks)
            continue
        if path.suffix.lower() in ARCHIVE_SUFFIXES:
            raise InvalidSamples(f"{where}: '{name}' is an archive inside the samples; nested archives are not "
                                 "opened: unpack it into the top level")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(name)
            continue
        total += size
        if size > limits.max_file_bytes:
            raise InvalidSamples(f"{where}: '{name}' is {size} bytes, above the per-file limit of {limits.max_file_bytes} (max_file_bytes)")
        if total > limits.max_total_bytes:
            raise InvalidSamples(f"{where} holds more than {limits.max_total_bytes} bytes of images (limit max_total_bytes)")
        images.append(Member(name, size, ref))
    images.sort(key=lambda m: m.name)
    return images, sorted(ignored)


__all__ = ["ARCHIVE_SUFFIXES", "IMAGE_SUFFIXES", "ImageLimits", "Member", "is_image_source", "open_source"]
