"""Configuration: BNFOLD_* variables, refusal of weak keys, and the secure default without keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest
from pydantic import ValidationError
from service_helpers import REPO, Server

from service.core import cpu
from service.core.config import ConfigError, Settings, is_loopback
from service.main import serve

GOOD = "k" * 20


@pytest.fixture(autouse=True)
def _no_bnfold_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("BNFOLD_")]:
        monkeypatch.delenv(name)


def test_settings_read_bnfold_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("BNFOLD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BNFOLD_API_KEYS", f"{GOOD},{'m' * 20}")
    monkeypatch.setenv("BNFOLD_MAX_SAMPLES_BYTES", "3MiB")
    monkeypatch.setenv("BNFOLD_WORKERS", "3")
    settings = Settings()
    assert settings.key_values() == [GOOD, "m" * 20]
    assert settings.max_samples_bytes == 3 * 2**20 and settings.workers == 3
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    assert GOOD not in repr(settings)  # keys are secrets


def test_database_url_is_configurable(monkeypatch):
    monkeypatch.setenv("BNFOLD_DATABASE_URL", "postgresql+psycopg://bnfold@db/bnfold")
    assert Settings().resolved_database_url == "postgresql+psycopg://bnfold@db/bnfold"


@pytest.mark.parametrize("keys, reason", [
    (f"{GOOD},,{GOOD}x", "empty"),
    ("short-key", "shorter than 16"),
    ("changeme-changeme-changeme", "placeholder"),
    ("my-secret-api-key-123456", "placeholder"),
    (f"{GOOD} {GOOD}", "whitespace"),
])
def test_weak_or_placeholder_keys_are_refused(monkeypatch, keys, reason):
    monkeypatch.setenv("BNFOLD_API_KEYS", keys)
    with pytest.raises(ValidationError, match=reason):
        Settings()


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.3.0.1", True), ("::1", True), ("[::1]", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("10.0.0.5", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    with pytest.raises(ConfigError, match="BNFOLD_API_KEYS"):
        serve("0.0.0.0", 0, Settings(data_dir=tmp_path, api_keys=[]))


def test_cli_refuses_a_public_address_without_keys(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "BNFOLD_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "bnfold.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "refusing to serve on 0.0.0.0 without API keys" in result.stderr


def test_loopback_without_keys_generates_one_key_and_prints_it_once(tmp_path):
    srv = Server(tmp_path / "data", keys=()).start()
    try:
        printed = srv.stdout_path.read_text()
        keys = re.findall(r"^API key: (\S+)$", printed, re.MULTILINE)
        assert len(keys) == 1 and len(keys[0]) >= 32
        with srv.client(keys[0]) as client:
            assert client.get("/v1/info").status_code == 200
        assert httpx.get(srv.url + "/v1/info").status_code == 401
        assert keys[0] not in srv.log_path.read_text()
    finally:
        srv.stop()


def test_job_threads_share_the_cores_between_workers_unless_set(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(cpu, "quota_cpus", lambda *paths: None)  # whatever this machine's cgroup says
    monkeypatch.setenv("BNFOLD_WORKERS", "3")
    assert Settings().resolved_job_threads == 2
    monkeypatch.setenv("BNFOLD_WORKERS", "16")
    assert Settings().resolved_job_threads == 1  # never 0, which ONNX Runtime reads as "all cores"
    monkeypatch.setenv("BNFOLD_JOB_THREADS", "5")
    assert Settings().resolved_job_threads == 5
    monkeypatch.setenv("BNFOLD_JOB_THREADS", "0")
    with pytest.raises(ValidationError, match="job_threads"):
        Settings()


def test_image_limits_come_from_bnfold_variables(monkeypatch):
    from bnfold.inputs.images import ImageLimits

    monkeypatch.setenv("BNFOLD_MAX_ARCHIVE_UNPACKED_BYTES", "1GiB")
    monkeypatch.setenv("BNFOLD_MAX_IMAGE_PIXELS", "4096")
    limits = ImageLimits(**Settings().image_limits())  # every key is an ImageLimits field
    assert limits.max_total_bytes == 2**30 and limits.max_image_pixels == 4096
    assert limits.max_members == 100_000 and limits.max_file_bytes == 64 * 2**20


def test_job_providers_setting(monkeypatch):
    assert Settings().job_providers == ["CPUExecutionProvider"]
    monkeypatch.setenv("BNFOLD_JOB_PROVIDERS", " CPUExecutionProvider ,")
    assert Settings().job_providers == ["CPUExecutionProvider"]


def test_unavailable_job_provider_is_refused_at_startup(monkeypatch):
    monkeypatch.setenv("BNFOLD_JOB_PROVIDERS", "NoSuchExecutionProvider")
    with pytest.raises(ValidationError, match="NoSuchExecutionProvider"):
        Settings()
