"""The SDK's INT8 parameters reach the service's job: an INT8 model back, or a typed refusal."""

from __future__ import annotations

import asyncio

import pytest
from service_helpers import KEY_A, samples_array, tiny_model

import bnfold.errors as core
from bnfold.client import AsyncClient, Client
from bnfold.client.errors import JobFailed


def test_quantize_int8_returns_the_int8_model_and_its_figures(server):
    with Client(server.url, KEY_A) as client:
        result = client.recalibrate(tiny_model(), samples_array(), quantize="int8", quantize_method="entropy",
                                    min_cosine=0.9)
    ops = {node.op_type for node in result.model.graph.node}
    assert "DequantizeLinear" in ops and "BatchNormalization" not in ops
    assert result.job.options["quantize"] == "int8" and result.job.options["quantize_method"] == "entropy"
    assert result.report.extra["quantize"]["gate"]["min_cosine"] == 0.9


def test_a_refused_quantization_is_a_typed_job_failure(server):
    with Client(server.url, KEY_A) as client, pytest.raises(JobFailed, match="Nothing was written") as caught:
        client.recalibrate(tiny_model(), samples_array(), quantize="int8", min_cosine=1.0)
    assert isinstance(caught.value.error, core.QuantizationRefused) and caught.value.error.field == "options.quantize"


def test_async_submit_sends_the_int8_options(server):
    async def run():
        async with AsyncClient(server.url, KEY_A) as client:
            job = await client.submit(tiny_model(), samples_array(), quantize="int8", min_agreement=0.5, min_cosine=0.5)
            await client.cancel(job)
            return job

    job = asyncio.run(run())
    assert job.options["quantize"] == "int8" and job.options["min_agreement"] == 0.5


def test_a_bad_method_is_refused_before_queueing(server):
    with Client(server.url, KEY_A) as client, pytest.raises(core.InvalidOptions, match="quantize_method"):
        client.submit(tiny_model(), samples_array(), quantize="int8", quantize_method="kl")
