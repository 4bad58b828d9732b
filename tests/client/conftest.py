"""Fixtures for the client SDK tests: real servers on loopback ports (the service tests' helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

try:
    import fastapi, httpx, python_multipart, sqlalchemy, tenacity, uvicorn  # noqa: F401, E401
except ImportError:  # the 'service' or 'client' extra is not installed
    collect_ignore_glob = ["test_*.py"]

from service_helpers import KEY_A, Server  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A plain server (keys A, B): small upload limits so 413 is cheap to provoke."""
    srv = Server(tmp_path_factory.mktemp("client") / "data",
                 env={"BNFOLD_MAX_MODEL_BYTES": "64KiB", "BNFOLD_MAX_SAMPLES_BYTES": "256KiB", "BNFOLD_MAX_WAIT": "20"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def held_server(tmp_path_factory):
    """Jobs wait in their process while the hold is on (see service_testapp); one worker, one queue slot."""
    srv = Server(tmp_path_factory.mktemp("client-held") / "data", held=True,
                 env={"BNFOLD_WORKERS": "1", "BNFOLD_MAX_QUEUED_JOBS": "1"})
    srv.start()
    yield srv
    srv.release()
    srv.stop()


@pytest.fixture
def held(held_server):
    """The held server with the hold on; afterwards the hold is off and unfinished jobs are cancelled."""
    held_server.hold()
    yield held_server
    held_server.release()
    with held_server.client() as client:
        for state in ("queued", "running"):
            for job in client.get("/v1/jobs", params={"state": state, "limit": 100}).json()["items"]:
                client.delete(job["url"])


@pytest.fixture
def client_env(monkeypatch, server):
    """BNFOLD_URL / BNFOLD_API_KEY pointing at the plain server, as a user's shell would have them."""
    monkeypatch.setenv("BNFOLD_URL", server.url)
    monkeypatch.setenv("BNFOLD_API_KEY", KEY_A)
    return server
