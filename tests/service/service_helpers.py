"""Helpers for the service tests: tiny models and samples, and real servers on loopback ports.

Servers run in their own process (``python -m bnfold.cli serve``, or uvicorn with the app factory in
`service_testapp` when a test needs to hold or crash jobs), each with its own data directory, and
are talked to over HTTP with httpx, exactly as a deployment pipeline would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# `service/` sits beside `bnfold/` in the repository but is not (yet) an installed package.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEY_A = "key-a-" + "0" * 26
KEY_B = "key-b-" + "1" * 26
KEY_FUZZ = "key-fuzz-" + "2" * 23


# ------------------------------------------------------------------------------ models, samples


def tiny_model(batchnorm: bool = True, seed: int = 0) -> bytes:
    """x(N,3,8,8) -> Conv 3x3 pad 1 (3->4) -> [BN] -> Relu -> y(N,4,8,8), opset 17.

        x --> [conv] --> [bn] --> [relu] --> y
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv_y"], name="conv", pads=[1, 1, 1, 1])]
    last = "conv_y"
    if batchnorm:
        for name, value in (("scale", rng.uniform(0.5, 1.5, 4)), ("bias", rng.normal(0, 0.3, 4)),
                            ("mean", rng.normal(0, 0.5, 4)), ("var", rng.uniform(0.5, 2.0, 4))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["conv_y", "scale", "bias", "mean", "var"], ["bn_y"], name="bn"))
        last = "bn_y"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="relu"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def samples_array(n: int = 16, channels: int = 3, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, channels, 8, 8)) * 1.5 + 0.5).astype(np.float32)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One service process on 127.0.0.1 with its own data directory; restartable on the same data."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, held: bool = False, keys=(KEY_A, KEY_B, KEY_FUZZ)):
        self.data_dir, self.held = data_dir, held
        self.hold_dir = data_dir.parent / f"{data_dir.name}-hold"
        self.hold_dir.mkdir(parents=True, exist_ok=True)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
        self.env = {**inherited, "BNFOLD_DATA_DIR": str(data_dir), "BNFOLD_WORKERS": "2", "BNFOLD_TEST_HOLD_DIR": str(self.hold_dir),
                    "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])}
        if keys:
            self.env["BNFOLD_API_KEYS"] = ",".join(keys)
        else:
            self.env.pop("BNFOLD_API_KEYS", None)
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-{self.starts}.log"

    @property
    def stdout_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-{self.starts}.out"

    def start(self, host: str = "127.0.0.1", wait: bool = True) -> Server:
        self.starts += 1
        self.port = free_port()
        if self.held:
            command = [sys.executable, "-m", "uvicorn", "service_testapp:create", "--factory", "--host", host,
                       "--port", str(self.port), "--no-access-log"]
        else:
            command = [sys.executable, "-m", "bnfold.cli", "serve", "--host", host, "--port", str(self.port)]
        with open(self.log_path, "wb") as log, open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=out, stderr=log)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """Graceful: SIGTERM, as a process manager would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def crash(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.process.kill()
        self.process.wait()

    def client(self, key: str | None = KEY_A, headers: dict[str, str] | None = None):
        import httpx

        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers={**auth, **(headers or {})}, timeout=30)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    # holding jobs (servers started with held=True): jobs wait in their process while the file exists
    def hold(self) -> None:
        (self.hold_dir / "hold").touch()

    def release(self) -> None:
        (self.hold_dir / "hold").unlink(missing_ok=True)

    @contextlib.contextmanager
    def holding(self):
        """The hold on for the block; afterwards off, and every unfinished job cancelled."""
        self.hold()
        try:
            yield self
        finally:
            self.release()
            with self.client() as client:
                for state in ("queued", "running"):
                    for job in client.get("/v1/jobs", params={"state": state, "limit": 100}).json()["items"]:
                        client.delete(job["url"])

    @classmethod
    @contextlib.contextmanager
    def small_limits(cls, data_dir: Path):
        """A started server with small upload limits (413 is cheap to provoke) and a short max wait."""
        srv = cls(data_dir, env={"BNFOLD_MAX_MODEL_BYTES": "64KiB", "BNFOLD_MAX_SAMPLES_BYTES": "256KiB", "BNFOLD_MAX_WAIT": "20"})
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()

    @classmethod
    @contextlib.contextmanager
    def single_slot(cls, data_dir: Path):
        """A started server whose jobs can be held: one worker, one queue slot."""
        srv = cls(data_dir, held=True, env={"BNFOLD_WORKERS": "1", "BNFOLD_MAX_QUEUED_JOBS": "1"})
        srv.start()
        try:
            yield srv
        finally:
            srv.release()
            srv.stop()

    def worker_pid(self, job_id: str, timeout: float = 30.0) -> int:
        path = self.hold_dir / f"{job_id}.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return int(path.read_text())
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never started")

    def forget_pid(self, job_id: str) -> None:
        (self.hold_dir / f"{job_id}.pid").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- requests


def submit(client, model: bytes | None = None, samples: bytes | None = None, options: dict | str | None = None,
           wait: float | None = None, samples_name: str = "samples.npy"):
    """POST /v1/jobs with the tiny model and samples unless told otherwise."""
    files = {}
    if model is not False:
        files["model"] = ("tiny.onnx", tiny_model() if model is None else model, "application/octet-stream")
    if samples is not False:
        files["samples"] = (samples_name, npy_bytes(samples_array()) if samples is None else samples, "application/octet-stream")
    if options is not None:
        files["options"] = (None, options if isinstance(options, str) else json.dumps(options), "application/json")
    return client.post("/v1/jobs", files=files, params={"wait": wait} if wait is not None else None)


def wait_for(client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']} ({job['progress']}) after {timeout} s")


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once the process has exited (a zombie nobody reaped counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False
