"""A data directory the server cannot use: one clear line, exit status 78, and no restart loop in a container.

`bnfold serve` checks BNFOLD_DATA_DIR before anything starts (`service.main.check_data_dir`). With
``--on-data-error wait`` (the image's entry point) it says so once and waits for SIGTERM, so that
``restart: unless-stopped`` does not restart it into the same error forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from service_helpers import REPO

from service.main import DataDirError, check_data_dir

KEY = "k" * 24


def _serve(data_dir, *extra: str, **popen) -> subprocess.Popen:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "BNFOLD_DATA_DIR": str(data_dir),
           "BNFOLD_API_KEYS": KEY, "HOME": str(data_dir) + "-home"}
    return subprocess.Popen([sys.executable, "-m", "bnfold.cli", "serve", "--host", "0.0.0.0", "--port", "0", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_a_file_in_place_of_the_data_directory_is_one_line_and_exit_78(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    process = _serve(tmp_path / "data")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 78, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: data directory") and str(tmp_path / "data") in lines[0]
    assert "Not a directory" in lines[0] and "chown" in lines[0]


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root writes anywhere")
def test_a_read_only_data_directory_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        with pytest.raises(DataDirError, match=f"uid {os.getuid()}.*Permission denied"):
            check_data_dir(data)
    finally:
        data.chmod(0o755)


def test_entries_left_by_another_user_are_refused(tmp_path, monkeypatch):
    """A volume first used by a root container: the directory is writable, its database is not."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs.sqlite3").write_bytes(b"")
    check_data_dir(tmp_path)  # usable as it is
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("jobs.sqlite3") and real_access(path, mode))
    with pytest.raises(DataDirError, match="jobs.sqlite3"):
        check_data_dir(tmp_path)


def test_wait_mode_says_it_once_and_stays_up_until_sigterm(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    process = _serve(tmp_path / "data", "--on-data-error", "wait")
    try:
        first = process.stderr.readline()
        assert first.startswith("error: data directory"), first
        assert "waiting for SIGTERM" in process.stderr.readline()
        time.sleep(1.0)
        assert process.poll() is None, "exited: a restart policy would start it again into the same error"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 78
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()
        process.wait()
