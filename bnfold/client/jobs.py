"""What the service answers, as Python objects: `Job` (a job resource), `Result` (a finished job's
model and report), and `report_from_dict`, the inverse of `bnfold.report.Report.to_dict`.

The report crosses the wire as JSON; float64 values survive it exactly (JSON numbers are written
with ``repr``, which round-trips), so a remote report equals the local one value for value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfold.client.errors import ServerError
from bnfold.report import LayerReport, Report, ShiftScore

FINAL_STATES = ("succeeded", "failed", "cancelled")


@dataclasses.dataclass(frozen=True)
class Job:
    """A job as ``GET /v1/jobs/{id}`` describes it (``raw`` holds the whole JSON object)."""

    id: str
    state: str  # queued, running, succeeded, failed, cancelled
    stage: str
    fraction: float
    attempts: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    options: dict[str, Any]
    error: dict[str, Any] | None  # problem details when failed
    model_sha256: str | None  # when succeeded
    model_bytes: int | None
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        try:
            result = body.get("result") or {}
            return cls(
                id=body["id"], state=body["state"], stage=body["progress"]["stage"],
                fraction=float(body["progress"]["fraction"]), attempts=int(body["attempts"]),
                created_at=_time(body["created_at"]), started_at=_time(body.get("started_at")),
                finished_at=_time(body.get("finished_at")), options=dict(body.get("options") or {}),
                error=body.get("error"), model_sha256=result.get("model_sha256"), model_bytes=result.get("model_bytes"),
                raw=body,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerError(f"the server's job description is not one this client understands ({exc!r})") from None

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def report(self) -> Report | None:
        """The typed report, once succeeded (``GET /v1/jobs/{id}`` carries it)."""
        data = self.raw.get("report")
        return report_from_dict(data) if data else None


@dataclasses.dataclass
class Result:
    """A succeeded job's outputs: the model file's bytes exactly as the server wrote them (sha256
    checked against the job), the model parsed on first use, and the typed report."""

    job: Job
    content: bytes
    report: Report

    @functools.cached_property
    def model(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.ParseFromString(self.content)
        return model

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def save(self, path: str | os.PathLike, report: str | os.PathLike | None = None) -> None:
        """Write the model (and the JSON report, as ``bnfold recalibrate --report`` does) atomically."""
        write_atomic(Path(path), self.content)
        if report is not None:
            write_atomic(Path(report), self.report.to_json().encode())


_OPTIONAL_ARRAYS = ("stderr_mean", "stderr_var", "target_mean", "target_var")  # None or per-channel arrays


def report_from_dict(data: dict[str, Any]) -> Report:
    """Rebuild a `Report` from `Report.to_dict()` output (``totals`` is derived, so dropped)."""
    layers = [
        LayerReport(
            **{k: v for k, v in layer.items()
               if k not in ("old_mean", "old_var", "new_mean", "new_var", "shift", *_OPTIONAL_ARRAYS)},
            **{k: np.asarray(layer[k], dtype=np.float64) for k in ("old_mean", "old_var", "new_mean", "new_var")},
            **{k: np.asarray(layer[k], dtype=np.float64) for k in _OPTIONAL_ARRAYS if layer.get(k) is not None},
            shift=ShiftScore(**layer["shift"]),
        )
        for layer in data.get("layers", [])
    ]
    fields = {f.name for f in dataclasses.fields(Report)} - {"layers"}
    return Report(layers=layers, **{k: v for k, v in data.items() if k in fields})


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file beside `path`, then rename: readers see the old file or all of the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
    umask = os.umask(0)  # a saved model gets a plain new file's permissions, not mkstemp's private 0600
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)
