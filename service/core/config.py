"""All service configuration: one pydantic-settings class read from ``BNFOLD_*`` environment variables.

Sizes accept units (``BNFOLD_MAX_SAMPLES_BYTES=2GiB``); durations are seconds. API keys are a
comma-separated list (``BNFOLD_API_KEYS=key-one,key-two``); keys that are empty, short, or look like
a placeholder (``changeme``, ``secret``, …) are refused at start-up rather than silently accepted.
An empty key list is allowed here and resolved by `service.main.serve`: on a loopback address a
random key is generated and printed once; on any other address the server refuses to start.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from typing import Annotated

from pydantic import ByteSize, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .cpu import usable_cpus

MIN_KEY_LENGTH = 16
PLACEHOLDER_WORDS = ("changeme", "change-me", "changethis", "placeholder", "your-api-key", "example", "secret", "password")


class ConfigError(Exception):
    """The configuration cannot be used as given; the message says which variable to fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BNFOLD_", extra="ignore", frozen=True)

    data_dir: Path = Field(Path("bnfold-data"), description="Uploads, results and the embedded SQLite database.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="Bearer keys, comma-separated.")
    workers: int = Field(2, ge=1, le=64, description="Jobs computed at the same time (one child process each).")
    max_queued_jobs: int = Field(32, ge=0, description="Jobs waiting for a worker before POST answers 429.")
    job_timeout: float = Field(900.0, gt=0, description="Seconds a job may run before its process is stopped.")
    max_wait: float = Field(60.0, ge=0, description="Upper bound for POST /v1/jobs?wait=SECONDS.")
    max_model_bytes: ByteSize = Field(ByteSize(512 * 2**20), ge=1)
    max_samples_bytes: ByteSize = Field(ByteSize(2 * 2**30), ge=1, description="Also bounds an .npz's unpacked size.")
    job_memory_budget: ByteSize = Field(ByteSize(512 * 2**20), ge=0, description="RAM a job keeps between BN levels.")
    job_disk_budget: ByteSize | None = Field(None, ge=0, description="Disk a job's spilled tensors may take; default: "
                                             "half the data directory's free space shared by the workers, when the job starts.")
    job_threads: int | None = Field(None, ge=1, le=1024, description="ONNX Runtime threads per job; default: "
                                    "usable CPUs (affinity and cgroup CPU quota) // workers, at least 1 (see resolved_job_threads).")
    job_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers for jobs, comma-separated in order of preference.")
    # image samples (bnfold.inputs.images.ImageLimits), checked before anything is decoded
    max_archive_files: int = Field(100_000, ge=1, description="Files in an image archive, of every kind (max_members).")
    max_archive_unpacked_bytes: ByteSize = Field(ByteSize(4 * 2**30), ge=1,
                                                 description="All images of an archive, uncompressed (max_total_bytes).")
    max_image_file_bytes: ByteSize = Field(ByteSize(64 * 2**20), ge=1, description="One image file (max_file_bytes).")
    max_image_pixels: int = Field(2**26, ge=1, description="Width × height of one image (max_image_pixels).")
    max_image_decoded_bytes: ByteSize = Field(ByteSize(512 * 2**20), ge=1,
                                              description="One decoded TIFF, all channels (max_image_bytes).")
    max_total_pixels: int = Field(2**34, ge=1, description="All images of one job together (max_total_pixels).")
    precheck_timeout: float = Field(120.0, gt=0, description="Seconds the up-front check of an upload may take "
                                    "(in its own process) before the upload is refused (422).")
    stale_after: float = Field(60.0, gt=0, description="A running job whose server sent no heartbeat this long is re-queued.")
    log_level: str = "info"

    @field_validator("job_providers", mode="before")
    @classmethod
    def _split_providers(cls, value):
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value

    @field_validator("job_providers")
    @classmethod
    def _available_providers(cls, value):
        from bnfold.engine.recalibrate import check_providers
        from bnfold.errors import InvalidOptions

        try:
            return list(check_providers(value))
        except InvalidOptions as exc:  # reported as this variable's validation error
            raise ValueError(str(exc)) from None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            value = value.split(",") if value.strip() else []
        return value

    @field_validator("api_keys")
    @classmethod
    def _refuse_weak_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for index, key in enumerate(keys):
            text = key.get_secret_value()
            where = f"BNFOLD_API_KEYS entry {index + 1}"
            if not text.strip():
                raise ValueError(f"{where} is empty; remove the stray comma")
            if text != text.strip() or any(c.isspace() for c in text):
                raise ValueError(f"{where} contains whitespace")
            if len(text) < MIN_KEY_LENGTH:
                raise ValueError(f"{where} is shorter than {MIN_KEY_LENGTH} characters; generate one with "
                                 "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
            if any(word in text.lower() for word in PLACEHOLDER_WORDS):
                raise ValueError(f"{where} looks like a placeholder; set a real random key")
        return keys

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'jobs.sqlite3'}"

    def key_values(self) -> list[str]:
        return [key.get_secret_value() for key in self.api_keys]

    @property
    def resolved_job_threads(self) -> int:
        """BNFOLD_JOB_THREADS, else the CPUs this process may use (affinity, capped by the container's
        CPU quota: `service.core.cpu`) shared by the workers (≥ 1), so that BNFOLD_WORKERS jobs at once
        do not oversubscribe the machine or the quota."""
        if self.job_threads is not None:
            return self.job_threads
        return max(1, usable_cpus() // self.workers)

    def resolved_job_disk_budget(self) -> int:
        """BNFOLD_JOB_DISK_BUDGET, else half of the free space under data_dir now, shared by the workers:
        concurrent jobs cannot fill the disk that results, uploads and the database live on."""
        if self.job_disk_budget is not None:
            return int(self.job_disk_budget)
        free = shutil.disk_usage(self.data_dir if self.data_dir.exists() else Path.cwd()).free
        return free // (2 * self.workers)

    def image_limits(self) -> dict[str, int]:
        """Keyword arguments of `bnfold.inputs.images.ImageLimits` (kept a plain dict: no bnfold import here)."""
        return {
            "max_members": self.max_archive_files, "max_total_bytes": int(self.max_archive_unpacked_bytes),
            "max_file_bytes": int(self.max_image_file_bytes), "max_image_pixels": self.max_image_pixels,
            "max_image_bytes": int(self.max_image_decoded_bytes), "max_total_pixels": self.max_total_pixels,
        }


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' are loopback; everything else (0.0.0.0, names, …) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
