"""openapi.yaml is generated from the app and must not drift from it."""

from __future__ import annotations

import yaml

from service.openapi import DEFAULT_PATH, render

OPERATIONS = {"createJob", "listJobs", "getJob", "getJobModel", "getJobReport", "getJobReportHtml", "deleteJob", "health", "ready",
              "metrics", "getInfo"}


def test_openapi_file_matches_the_app():
    assert DEFAULT_PATH.read_text() == render(), "openapi.yaml is out of date: run python -m service.openapi"


def test_operation_ids_are_the_stable_hand_picked_ones():
    spec = yaml.safe_load(render())
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert sorted(ids) == sorted(OPERATIONS)


def test_every_error_response_is_problem_json():
    spec = yaml.safe_load(render())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (method, path, status)
