"""Static checks of docker-compose.yml and docker/Dockerfile that a fresh Docker machine relies on.

docker/ci-test.sh runs them for real (podman, slow, root); these catch the same mistakes in the
ordinary test run: a service whose image is ours but which cannot build it (`up --build` would then
try to pull bnfold:latest from a registry), or a HOME inside the data volume.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


def _services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_every_service_running_our_image_can_build_it():
    ours = {name: service for name, service in _services().items() if service.get("image", "").startswith("bnfold")}
    assert {"bnfold", "bnfold-a", "bnfold-b"} <= set(ours)
    for name, service in ours.items():
        build = service.get("build")
        assert build, f"{name}: image {service['image']} without build: `up --build` would pull it"
        assert build == {"context": ".", "dockerfile": "docker/Dockerfile"}, (name, build)


def test_home_and_caches_stay_out_of_the_data_volume():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s*(HOME|XDG_CACHE_HOME|BNFOLD_DATA_DIR)=(\S+?)\s*\\?$", dockerfile, re.MULTILINE))
    assert env["BNFOLD_DATA_DIR"] == "/data"
    for name in ("HOME", "XDG_CACHE_HOME"):
        assert env[name].startswith("/tmp"), (name, env[name])
    for name, service in _services().items():
        if service.get("image", "").startswith("bnfold"):
            assert "/tmp" in service.get("tmpfs", []), f"{name}: /tmp (HOME) is not a tmpfs"


def test_every_check_of_the_ci_script_can_fail():
    """docker/ci-test.sh --self-test: each check passes on a good state and fails on each single fault."""
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    result = subprocess.run(["bash", str(ROOT / "docker" / "ci-test.sh"), "--self-test"], capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [line for line in result.stdout.splitlines() if line.startswith("ok  ")]
    assert sum(line.startswith("ok  fail") for line in cases) >= 40 and "WRONG" not in result.stdout, result.stdout
