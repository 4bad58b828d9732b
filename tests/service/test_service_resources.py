"""Resources of the API process: its resident memory stays small whatever the upload.

The up-front check used to run in the API process: a 448 MB model took it from 147 MB to 1.9 GB
(parse + checker, about 4× the model), and one 10 kB request resizing to 40000² took it to 4.85 GB.
Now the check runs in a child process; here the API process's RSS (psutil, sampled every 20 ms
while the request runs) must stay under 1 GiB and grow by less than half the model's size.
"""

from __future__ import annotations

import io
import threading
import zipfile

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto
from service_helpers import Server, npy_bytes, submit, tiny_model

GiB = 2**30


@pytest.fixture(scope="module")
def big_server(tmp_path_factory):
    """Default upload limits (512 MiB models), one worker."""
    srv = Server(tmp_path_factory.mktemp("big") / "data", env={"BNFOLD_WORKERS": "1"}).start()
    try:
        yield srv
    finally:
        srv.stop()


class PeakRSS(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.halt = psutil.Process(pid), threading.Event()
        self.before = self.peak = self.process.memory_info().rss

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.halt.wait(0.02)

    def __enter__(self) -> PeakRSS:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join()


def _model_of(size: int) -> bytes:
    """The tiny model plus an unused initializer of `size` bytes (the checker accepts it)."""
    model = onnx.load_from_string(tiny_model())
    model.graph.initializer.append(onnx.helper.make_tensor("ballast", TensorProto.UINT8, [size], b"\x01" * size, raw=True))
    return model.SerializeToString()


@pytest.mark.parametrize("megabytes", [pytest.param(64, id="64MB"),
                                       pytest.param(400, id="400MB", marks=pytest.mark.heavy)])
def test_a_large_model_upload_leaves_the_api_process_small(big_server, tmp_path, megabytes):
    path = tmp_path / "big.onnx"
    path.write_bytes(_model_of(megabytes * 2**20))
    wrong = npy_bytes(np.zeros((4, 5, 8, 8), np.float32))  # the model is parsed and checked, then refused
    with big_server.client() as client, PeakRSS(big_server.process.pid) as rss, open(path, "rb") as model:
        client.timeout = 300
        response = client.post("/v1/jobs", files={"model": ("big.onnx", model, "application/octet-stream"),
                                                  "samples": ("s.npy", wrong, "application/octet-stream")})
    assert response.status_code == 422 and response.json()["field"] == "samples", response.text
    growth = rss.peak - rss.before
    print(f"\nAPI RSS {rss.before / 2**20:.0f} → peak {rss.peak / 2**20:.0f} MiB for a {megabytes} MB model")
    assert rss.peak < 1 * GiB
    assert growth < megabytes * 2**20 / 2, f"the API process grew by {growth / 2**20:.0f} MiB"


def test_resizing_images_happens_outside_the_api_process(big_server):
    """The largest resize allowed (8192² per image) on a few small images: decoded and resized by the
    check's and the job's processes, never by the API process."""
    pytest.importorskip("PIL")
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(2):
            png = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(png, "PNG")
            archive.writestr(f"{i}.png", png.getvalue())
    spec = {"resize": [8192, 8192], "center_crop": 8, "mean": [0.5], "std": [0.25]}
    with big_server.client() as client, PeakRSS(big_server.process.pid) as rss:
        client.timeout = 120
        job = submit(client, samples=buffer.getvalue(), samples_name="x.zip", options={"preprocess": spec}, wait=60)
    assert job.status_code in (200, 202), job.text
    print(f"\nAPI RSS {rss.before / 2**20:.0f} → peak {rss.peak / 2**20:.0f} MiB resizing to 8192²")
    assert rss.peak < 1 * GiB
    assert rss.peak - rss.before < 100 * 2**20  # one 8192² RGB image alone is 192 MiB
