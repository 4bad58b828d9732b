"""Provenance of a rewritten model, stored in its ``metadata_props`` under ``bnfold.*`` keys.

Keys (all values are strings, as ONNX requires):

* ``bnfold.version`` — ``bnfold.__version__`` that wrote the model;
* ``bnfold.source_sha256`` — SHA-256 of the source model file's bytes;
* ``bnfold.samples`` / ``bnfold.samples_sha256`` — how many samples recalibrated it and a
  digest of them (omitted when there were none, e.g. fold only);
* ``bnfold.options`` — the options as canonical JSON (sorted keys, no NaN);
* ``bnfold.created_utc`` — ISO-8601 UTC time, e.g. ``2024-05-01T12:00:00Z``.

Stamping replaces every existing ``bnfold.*`` entry (a model re-processed by bnfold describes
its latest run) and keeps all other entries in their order.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import onnx

from bnfold.errors import InvalidOptions

PREFIX = "bnfold."
_SHA256 = re.compile(r"[0-9a-f]{64}")


def stamp(
    model: onnx.ModelProto,
    *,
    source_sha256: str,
    samples: int | None,
    samples_sha256: str | None,
    options: Mapping[str, Any],
    now: _dt.datetime | None = None,
) -> None:
    """Write the ``bnfold.*`` provenance entries into ``model.metadata_props`` in place."""
    from bnfold import __version__  # late: the package imports its modules first

    entries = {
        "version": __version__,
        "source_sha256": _digest(source_sha256, "source_sha256"),
        "options": _options_json(options),
        "created_utc": _utc(now),
    }
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
            raise InvalidOptions(f"samples must be a count ≥ 0, got {samples!r}")
        entries["samples"] = str(int(samples))
    if samples_sha256 is not None:
        entries["samples_sha256"] = _digest(samples_sha256, "samples_sha256")
    onnx.helper.set_model_props(model, {**_others(model), **{PREFIX + k: v for k, v in entries.items()}})


def read(model: onnx.ModelProto) -> dict[str, str]:
    """The ``bnfold.*`` entries, without the prefix (empty when the model was never stamped)."""
    return {p.key[len(PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of raw bytes (e.g. the source model file)."""
    return hashlib.sha256(data).hexdigest()


def sha256_arrays(batches: Iterable[np.ndarray | Mapping[str, np.ndarray]]) -> str:
    """Hex SHA-256 of sample batches: names, dtypes, shapes and C-order bytes, in order."""
    h = hashlib.sha256()
    for batch in batches:
        items = sorted(batch.items()) if isinstance(batch, Mapping) else [("", batch)]
        for name, array in items:
            array = np.ascontiguousarray(array)
            h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
            h.update(array.tobytes())
    return h.hexdigest()


def _others(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props if not p.key.startswith(PREFIX)}


def _digest(value: str, name: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
        raise InvalidOptions(f"{name} must be 64 hexadecimal digits (a SHA-256), got {value!r}")
    return value.lower()


def _options_json(options: Mapping[str, Any]) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, PurePath):
            return str(value)
        if isinstance(value, (set, frozenset, tuple)):
            return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        raise TypeError(type(value).__name__)

    try:
        return json.dumps(dict(options), sort_keys=True, allow_nan=False, default=plain, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise InvalidOptions(f"options must be JSON-serialisable without NaN/inf: {err}") from err


def _utc(now: _dt.datetime | None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is None:
        raise InvalidOptions("now must be timezone-aware")
    return now.astimezone(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


__all__ = ["PREFIX", "read", "sha256_arrays", "sha256_bytes", "stamp"]
