"""The single mapping from exceptions to problem+json (service/errors.py)."""

from __future__ import annotations

import pytest

import bnfold.errors as core
from service import errors


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


CORE_ERRORS = sorted({c for c in _all_subclasses(core.BnfoldError) if c.__module__ == "bnfold.errors"}, key=lambda c: c.__name__)


def _instance(cls):
    try:
        return cls("what was wrong and how to fix it")
    except TypeError:
        return cls("what was wrong and how to fix it", field="options")


@pytest.mark.parametrize("cls", CORE_ERRORS, ids=lambda c: c.__name__)
def test_every_core_error_maps_to_its_status_title_and_field(cls):
    exc = _instance(cls)
    body = errors.problem_for(exc)
    assert body["status"] == cls.status and 400 <= body["status"] < 500
    assert body["title"] == cls.title and body["detail"] == "what was wrong and how to fix it"
    assert body.get("field") == exc.field
    assert body["type"].startswith("urn:bnfold:problem:") and " " not in body["type"]


def test_field_names_follow_the_multipart_parts():
    assert errors.problem_for(core.InvalidModel("x"))["field"] == "model"
    assert errors.problem_for(core.NoBatchNorm("x"))["type"] == "urn:bnfold:problem:no-batch-norm"
    assert errors.problem_for(core.InvalidSamples("x"))["field"] == "samples"
    assert errors.problem_for(core.InvalidOptions("x"))["field"] == "options"


@pytest.mark.parametrize("cls, status", [(errors.Unauthorized, 401), (errors.NotFound, 404), (errors.NotReady, 409),
                                         (errors.PayloadTooLarge, 413), (errors.UnsupportedMediaType, 415),
                                         (errors.InvalidRequest, 422), (errors.Unavailable, 503)])
def test_service_errors_carry_their_status(cls, status):
    assert errors.problem_for(cls("detail"))["status"] == status


def test_queue_full_says_when_to_retry():
    exc = errors.QueueFull("busy", retry_after=7)
    assert errors.problem_for(exc)["status"] == 429 and exc.headers == {"Retry-After": "7"}


def test_anything_else_is_a_generic_500_without_internals():
    body = errors.problem_for(KeyError("secret internal detail"))
    assert body["status"] == 500 and "secret" not in body["detail"]
