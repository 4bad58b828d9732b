"""Fixtures for the service tests (helpers live in service_helpers.py)."""

from __future__ import annotations

import pytest
from service_helpers import Server

try:
    import fastapi  # noqa: F401, E401
    import httpx
    import prometheus_client
    import python_multipart
    import sqlalchemy
    import uvicorn
except ImportError:  # the 'service' extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "schemathesis: property-based API run against a live server (needs schemathesis)")
    config.addinivalue_line("markers", "heavy: needs about 2 GB of RAM and a minute (e.g. a 400 MB model upload)")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server: small upload limits, two workers, keys A, B and FUZZ."""
    with Server.small_limits(tmp_path_factory.mktemp("main") / "data") as srv:
        yield srv
