"""Schemathesis against the live server, from openapi.yaml: no 5xx, and every response (status,
content type, headers, body) matches the schema. Skipped when schemathesis is not installed
(``pip install -e '.[service,test]'`` installs it); deselect locally with ``-m 'not schemathesis'``.

All checks run except ``positive_data_acceptance``: a schema-valid multipart body holds arbitrary
bytes where the model and samples go, and refusing those with 415/422 is the correct answer.
A real job is created first and its id handed to schemathesis, so the per-job operations (status,
download with ETag, report, delete, then use-after-delete) are exercised with an id that exists.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from service_helpers import KEY_FUZZ, REPO, submit

MAX_EXAMPLES = 25


@pytest.mark.schemathesis
def test_schemathesis_finds_no_server_errors_or_schema_violations(server, tmp_path):
    pytest.importorskip("schemathesis")
    with server.client(KEY_FUZZ) as client:
        job = submit(client, wait=20).json()
        assert job["state"] == "succeeded"
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.job_id" = "{job["id"]}"\n')
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
        str(REPO / "openapi.yaml"), "--url", server.url, "--header", f"Authorization: Bearer {KEY_FUZZ}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(MAX_EXAMPLES), "--request-timeout", "30", "--workers", "1",
    ]
    # Only the fuzzing run's requests: readiness polls while the server started may rightly get 503.
    before = len(server.log_lines())
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-10000:] + result.stderr[-2000:]
    server_errors = [
        line for line in server.log_lines()[before:] if line.get("logger") == "bnfold.access" and line["status"] >= 500
    ]
    assert server_errors == []
