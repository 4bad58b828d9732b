"""The SDK against a real server on a loopback port: results equal the local library's, inputs of
every kind upload, and every error answer arrives as its typed exception with the server's message.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

import numpy as np
import onnx
import pytest
from service_helpers import KEY_A, KEY_B, free_port, npy_bytes, samples_array, tiny_model

import bnfold.errors as core
from bnfold.client import AsyncClient, Client
from bnfold.client.errors import (
    ClientError,
    ConnectionFailed,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RequestRejected,
    Unauthorized,
)
from bnfold.client.uploads import _NpyReader
from bnfold.pipeline import JobOptions, recalibrate_files


@pytest.fixture
def client(server):
    with Client(server.url, KEY_A) as client:
        yield client


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """What the local library makes of the same model and samples, folded and not."""
    directory = tmp_path_factory.mktemp("local")
    (directory / "tiny.onnx").write_bytes(tiny_model())
    np.save(directory / "samples.npy", samples_array())
    return {fold: recalibrate_files(directory / "tiny.onnx", directory / "samples.npy", JobOptions(fold=fold))
            for fold in (False, True)}


def bn_statistics(model: onnx.ModelProto) -> dict[str, bytes]:
    """Every BN's mean and var initializer, serialised (raw float bytes and all)."""
    tensors = {t.name: t for t in model.graph.initializer}
    return {name: tensors[name].SerializeToString()
            for node in model.graph.node if node.op_type == "BatchNormalization" for name in node.input[3:5]}


def without_timings(report) -> dict:
    data = report.to_dict()
    data.pop("timings")
    return data


# ---------------------------------------------------------------------------------- results


def test_round_trip_equals_the_local_result_byte_for_byte(client, local):
    stages = []
    result = client.recalibrate(onnx.load_from_string(tiny_model()), samples_array(), fold=False,
                                progress=lambda stage, fraction: stages.append((stage, fraction)))
    expected = local[False]
    assert bn_statistics(result.model) == bn_statistics(expected.model) and bn_statistics(result.model)
    assert result.content == expected.model.SerializeToString()  # without folding nothing else is touched
    for remote, here in zip(result.report.layers, expected.report.layers, strict=True):
        for name in ("old_mean", "old_var", "new_mean", "new_var"):
            assert getattr(remote, name).dtype == np.float64
            assert getattr(remote, name).tobytes() == getattr(here, name).tobytes()
    assert without_timings(result.report) == without_timings(expected.report)
    assert stages[-1] == ("done", 1.0) and result.job.state == "succeeded"


def test_folded_round_trip_equals_the_local_graph(client, local, tmp_path):
    result = client.recalibrate(tiny_model(), samples_array(), batch_size=5)
    assert result.model.graph.SerializeToString() == local[True].model.graph.SerializeToString()
    assert result.report.extra["fold"] == local[True].report.extra["fold"]
    result.save(tmp_path / "adapted.onnx", report=tmp_path / "report.json")
    assert (tmp_path / "adapted.onnx").read_bytes() == result.content
    assert (tmp_path / "report.json").read_text() == result.report.to_json()
    onnx.checker.check_model(onnx.load(tmp_path / "adapted.onnx"))


def test_unfoldable_reaches_the_job_and_a_bad_value_is_refused(client):
    result = client.recalibrate(tiny_model(), samples_array(), unfoldable="affine")
    assert result.job.raw["options"]["unfoldable"] == "affine" and result.report.extra["verification"]["passed"]
    with pytest.raises(core.InvalidOptions, match="unfoldable"):
        client.recalibrate(tiny_model(), samples_array(), unfoldable="mul")


def test_async_client_round_trip(server, local):
    async def run():
        async with AsyncClient(server.url, KEY_A) as client:
            result = await client.recalibrate(tiny_model(), samples_array(), fold=False)
            listed = await client.list(limit=5)
            return result, listed, await client.cancel(result.job)

    result, listed, cancelled = asyncio.run(run())
    assert result.content == local[False].model.SerializeToString()
    assert result.job.id in [job.id for job in listed]
    assert cancelled is None  # an ended job is deleted


def test_every_kind_of_input_uploads(client, local, tmp_path):
    model, samples = tiny_model(), samples_array()
    (tmp_path / "m.onnx").write_bytes(model)
    np.save(tmp_path / "s.npy", samples)
    np.savez(tmp_path / "s.npz", x=samples)
    at_offset = io.BytesIO(b"junk" + model)
    at_offset.seek(4)  # read from where the caller left it, not from byte 0

    class Unseekable(io.RawIOBase):
        def __init__(self, data):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            return self.inner.readinto(buffer)

    cases = [
        (tmp_path / "m.onnx", tmp_path / "s.npy"),
        (str(tmp_path / "m.onnx"), tmp_path / "s.npz"),
        (model, npy_bytes(samples)),
        (at_offset, {"x": samples}),
        (onnx.load_from_string(model), np.asfortranarray(samples)),
        (model, Unseekable(npy_bytes(samples))),
    ]
    expected = local[False].model.SerializeToString()
    for model_source, samples_source in cases:
        job = client.submit(model_source, samples_source, fold=False, wait=20)
        assert job.state == "succeeded", (model_source, job.error)
        assert client.download(job) == expected, (type(model_source), type(samples_source))


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.asfortranarray(np.ones((3, 5))), np.zeros((0, 3), np.float16),
    np.array(3.5), np.arange(10)[::3], np.array([True, False]),
], ids=["c", "fortran", "empty", "scalar", "strided", "bool"])
def test_arrays_stream_as_exactly_the_npy_file(array):
    reader = _NpyReader(array)
    streamed = b"".join(iter(lambda: reader.read(7), b""))
    assert np.load(io.BytesIO(streamed)).tolist() == array.tolist()
    assert streamed == npy_bytes(array.copy(order="C"))  # np.save of the C-ordered array


def test_single_steps(client, server, tmp_path):
    job = client.submit(tiny_model(), samples_array(), batch_size=4)
    assert client.get(job.id).id == job.id
    seen = []
    job = client.wait(job.id, progress=lambda stage, fraction: seen.append(stage))
    assert job.state == "succeeded" and seen[-1] == "done"
    path = client.download(job.id, tmp_path / "out.onnx")
    assert path.read_bytes() == client.download(job)
    assert client.report(job).to_dict() == job.report.to_dict()
    assert job.id in [j.id for j in client.list(state="succeeded", limit=100)]
    with Client(server.url, KEY_B) as other, pytest.raises(NotFound):
        other.get(job.id)  # another key's job does not exist for this key
    assert client.cancel(job) is None
    with pytest.raises(NotFound, match="no job"):
        client.get(job)
    assert client.info()["api_version"] == "v1"


def test_url_and_key_come_from_the_environment(client_env, monkeypatch):
    with Client() as client:
        assert client.info()["name"] == "bnfold"
    monkeypatch.delenv("BNFOLD_URL")
    with pytest.raises(ClientError, match="BNFOLD_URL"):
        Client()


def test_importing_the_client_leaves_the_web_stack_out():
    code = ("import sys, bnfold.client; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'uvicorn', 'service', 'sqlalchemy'}))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("model, samples, options, error, message", [
    (b"not a model", samples_array(), {}, core.InvalidModel, "not an ONNX model"),
    (b"PK\x03\x04 a zip", samples_array(), {}, core.InvalidModel, "zip archive"),  # 415 from the server
    (tiny_model(batchnorm=False), samples_array(), {}, core.NoBatchNorm, "no BatchNormalization"),
    (tiny_model(), samples_array(channels=2), {}, core.InvalidSamples, "the model expects"),
    (tiny_model(), b"plain text", {}, core.InvalidSamples, "must be a NumPy"),  # 415
    (tiny_model(), np.array([object()]), {}, core.InvalidSamples, "dtype object"),  # refused before sending
    (tiny_model(), samples_array(), {"batch_size": 0}, core.InvalidOptions, "options.batch_size"),
    (tiny_model(), samples_array(n=400), {}, PayloadTooLarge, "larger than the limit"),
], ids=["garbage-model", "zip-model", "no-bn", "wrong-shape", "text-samples", "object-array", "batch-size", "too-large"])
def test_refused_inputs_raise_typed_errors_with_the_servers_message(client, model, samples, options, error, message):
    with pytest.raises(error, match=message) as caught:
        client.recalibrate(model, samples, **options)
    if error is not core.InvalidSamples or "dtype" not in message:
        assert caught.value.problem["status"] in (413, 415, 422) and caught.value.request_id


def test_a_job_that_fails_raises_job_failed_with_the_typed_cause(client):
    samples = samples_array()
    samples[12, 1, 2, 3] = np.nan  # past the first batch the server checks before queueing
    with pytest.raises(JobFailed, match="NaN") as caught:
        client.recalibrate(tiny_model(), samples)
    assert isinstance(caught.value.error, core.InvalidSamples) and caught.value.job.state == "failed"
    assert isinstance(caught.value, core.BnfoldError)  # the CLI's one-line error, exit 1


def test_authorization_errors(server):
    with Client(server.url, "not-a-key-of-this-server-0000") as client, pytest.raises(Unauthorized, match="not one"):
        client.list()
    with Client(server.url, "") as client, pytest.raises(Unauthorized, match="BNFOLD_API_KEY"):
        client.info()


def test_a_refused_query_raises_request_rejected(client):
    with pytest.raises(RequestRejected, match="query.state") as caught:
        client.list(state="finished")
    assert caught.value.problem["status"] == 422


def test_an_unreachable_server_raises_connection_failed_after_retrying():
    with Client(f"http://127.0.0.1:{free_port()}", KEY_A, retry_for=0.8) as client:
        with pytest.raises(ConnectionFailed, match=r"cannot reach .* \(after [2-9] attempts\)"):
            client.info()
