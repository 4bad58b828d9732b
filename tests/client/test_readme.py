"""README.md's "From a pipeline" examples, run as written against a live server.

Every fenced block right after a ``<!-- tested … -->`` line is run in a fresh folder holding
``model.onnx`` and ``samples.npy``, with ``BNFOLD_URL`` / ``BNFOLD_API_KEY`` set as a user's shell
would have them: Python blocks by a new interpreter, sh blocks by bash (``-euo pipefail``).
Each must leave a model whose BN statistics are those of the local library.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from service_helpers import KEY_A, samples_array, tiny_model

from bnfold.pipeline import JobOptions, recalibrate_files

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"^<!-- tested[^\n]*-->\n```(\w+)\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


def test_the_readme_marks_its_examples():
    assert [language for language, _ in readme_blocks()] == ["python", "sh", "sh"]


@pytest.mark.parametrize("index", range(3))
def test_readme_example_runs(index, server, tmp_path):
    language, code = readme_blocks()[index]
    if "curl" in code and not (shutil.which("curl") and shutil.which("jq")):
        pytest.skip("curl and jq are needed for the curl example")
    (tmp_path / "model.onnx").write_bytes(tiny_model())
    np.save(tmp_path / "samples.npy", samples_array())
    env = {**os.environ, "BNFOLD_URL": server.url, "BNFOLD_API_KEY": KEY_A,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    ran = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, f"README block {index} failed:\n{code}\n{ran.stdout}\n{ran.stderr}"

    expected = recalibrate_files(tmp_path / "model.onnx", tmp_path / "samples.npy", JobOptions()).model
    produced = onnx.load(tmp_path / "adapted.onnx")
    assert produced.graph.initializer == expected.graph.initializer
