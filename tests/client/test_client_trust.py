"""SDK side of issue 15: `prior`, the labelled check (arrays uploaded as parts), a refused
adaptation surfacing as `JobFailed` with both numbers, and `report_html` saving the page."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
from service_helpers import KEY_A, samples_array, tiny_model

from bnfold.client import AsyncClient, Client
from bnfold.client.errors import JobFailed
from bnfold.errors import InvalidOptions

pytest.importorskip("matplotlib")


def _original_masks(x):
    session = ort.InferenceSession(tiny_model(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].argmax(axis=1).astype(np.int64)


def test_check_prior_and_page(server, tmp_path):
    x = samples_array(5, seed=4)
    with Client(server.url, KEY_A) as client:
        result = client.recalibrate(tiny_model(), samples_array(), prior=2, allow_worse=True, check_samples=x,
                                    check_labels=_original_masks(x))
        report = result.report
        assert report.check["metric"] == "mean_iou" and report.check["before"] == 1.0 and report.check["samples"] == 5
        assert report.extra["statistics"]["prior"] == 2
        assert report.layers[0].stderr_mean.shape == (4,) and isinstance(report.samples_recommended, int)
        saved = client.report_html(result.job, tmp_path / "r.html")
        assert saved.read_text().count("data:image/png;base64,") >= 1
        with pytest.raises(JobFailed) as info:
            client.recalibrate(tiny_model(), samples_array(), check_samples=x, check_labels=_original_masks(x))
        assert "1.0000 before" in str(info.value) and "after" in str(info.value)
        with pytest.raises(InvalidOptions, match="both check_samples and check_labels"):
            client.submit(tiny_model(), samples_array(), check_samples=x)


def test_async_report_html(server):
    async def go():
        async with AsyncClient(server.url, KEY_A) as client:
            result = await client.recalibrate(tiny_model(), samples_array(), prior=1)
            return await client.report_html(result.job), result.report
    page, report = asyncio.run(go())
    assert page.startswith(b"<!doctype html>") and report.extra["statistics"]["prior"] == 1
