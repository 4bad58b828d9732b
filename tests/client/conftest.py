"""Fixtures for the client SDK tests: real servers on loopback ports (the service tests' helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

try:
    import fastapi  # noqa: F401, E401
    import httpx
    import python_multipart
    import sqlalchemy
    import tenacity
    import uvicorn
except ImportError:  # the 'service' or 'client' extra is not installed
    collect_ignore_glob = ["test_*.py"]

from service_helpers import KEY_A, Server  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A plain server (keys A, B): small upload limits so 413 is cheap to provoke."""
    with Server.small_limits(tmp_path_factory.mktemp("client") / "data") as srv:
        yield srv


@pytest.fixture(scope="session")
def held_server(tmp_path_factory):
    """Jobs wait in their process while the hold is on (see service_testapp); one worker, one queue slot."""
    with Server.single_slot(tmp_path_factory.mktemp("client-held") / "data") as srv:
        yield srv


@pytest.fixture
def held(held_server):
    """The held server with the hold on; afterwards hold off and every unfinished job cancelled."""
    with held_server.holding():
        yield held_server


@pytest.fixture
def client_env(monkeypatch, server):
    """BNFOLD_URL / BNFOLD_API_KEY pointing at the plain server, as a user's shell would have them."""
    monkeypatch.setenv("BNFOLD_URL", server.url)
    monkeypatch.setenv("BNFOLD_API_KEY", KEY_A)
    return server
