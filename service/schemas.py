"""Request and response bodies of API v1 (pydantic); openapi.yaml is generated from these."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from bnfold.inputs.preprocess import PreprocessSpec
from bnfold.pipeline import DEFAULT_BATCH_SIZE
from bnfold.quantize import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_COSINE

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


#: Kept as the fields the client sent (a partial spec: the core merges it over the model's own), and
#: documented as PreprocessSpec's schema; the core validates it (422, field options.preprocess).
Preprocess = Annotated[
    dict[str, Any] | None,
    WithJsonSchema({"anyOf": [{**PreprocessSpec.model_json_schema(), "title": "PreprocessSpec",
                               "description": "Fields of bnfold.inputs.preprocess.PreprocessSpec, any subset."},
                              {"type": "null"}]}),
]


class JobOptionsIn(BaseModel):
    """The ``options`` part of POST /v1/jobs (JSON). Every field is optional. Strict: ``true`` is not
    a batch size, ``"1"`` not a boolean."""

    model_config = ConfigDict(extra="forbid", strict=True)

    fold: bool = Field(True, description="Fold BN into neighbouring layers (false: only BN mean/var change).")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=65536, description="Samples per inference call (speed/memory only).")
    verify_samples: int = Field(32, ge=0, le=1_000_000, description="Samples to compare folded vs unfolded on.")
    rtol: float | None = Field(None, ge=0, allow_inf_nan=False, description="Verification rtol (default: by float type).")
    atol: float | None = Field(None, ge=0, allow_inf_nan=False, description="Verification atol (default: by float type).")
    unfoldable: Literal["keep", "affine"] = Field(
        "keep", description="A BN with no exact linear neighbour stays BatchNormalization ('keep') or becomes Mul + Add "
                            "('affine', for runtimes without BN).")
    preprocess: Preprocess = Field(None, description=(
        "Image samples only: how an image becomes model input (torchvision's Resize → CenterCrop → ToTensor → "
        "Normalize). The fields given override the spec the model carries (metadata 'bnfold.preprocess'); fields "
        "neither given nor carried take the defaults shown. Needed when the model carries no spec."))
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="Image samples only: an image that cannot be read or does not fit fails the job ('fail'), "
                            "or is left out and listed in the report's extra.images.skipped ('skip').")
    quantize: Literal["int8"] | None = Field(None, description=(
        "'int8': after folding, quantize statically (ONNX Runtime QDQ, per-channel int8 weights, uint8 activations), "
        "calibrated on the same samples; the job fails (quantization-refused) when the INT8 model disagrees with the "
        "float one beyond min_agreement / min_cosine. Figures in the report's extra.quantize. Needs fold."))
    quantize_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="INT8 calibration method.")
    min_agreement: float = Field(DEFAULT_MIN_AGREEMENT, ge=0, le=1, description=(
        "INT8 gate: least top-1 agreement with the float model, for classifier-like outputs (N, K) and discrete outputs."))
    min_cosine: float = Field(DEFAULT_MIN_COSINE, ge=0, le=1, description=(
        "INT8 gate: least cosine similarity between the INT8 and the float model's float outputs."))
    prior: float = Field(0.0, ge=0, le=1e12, allow_inf_nan=False, description=(
        "Source prior (Schneider et al. 2020): mix the model's own statistics in with this weight, in samples, inside "
        "the fixed point. Helps mild shifts with very few samples, hurts severe shifts; 0: off."))
    allow_worse: bool = Field(False, description=(
        "With the check_samples/check_labels parts: keep a result whose labelled check metric got worse (default: "
        "the job fails and nothing is kept)."))


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; ``field`` names the part of the request that was wrong."""

    type: str = Field(examples=["urn:bnfold:problem:invalid-model"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    field: str | None = None
    errors: list[FieldError] | None = None


class JobError(BaseModel):
    """Why a job failed: the problem details of the core error, or of the worker's end."""

    type: str
    title: str
    status: int
    detail: str
    field: str | None = None


class Progress(BaseModel):
    stage: str = Field(description="What the job is doing, e.g. 'recalibrating: BN level 2/3'.")
    fraction: float = Field(ge=0, le=1)


class Timings(BaseModel):
    queued_s: float | None = Field(None, description="Seconds from submission to start (so far, while queued).")
    running_s: float | None = Field(None, description="Seconds from start to end (so far, while running).")


class InputFile(BaseModel):
    filename: str | None
    bytes: int


class Inputs(BaseModel):
    model: InputFile
    samples: InputFile


class JobResult(BaseModel):
    model_url: str
    report_url: str
    report_html_url: str = Field(description="The report as one self-contained HTML page with plots.")
    model_sha256: str = Field(description="Also the ETag of GET model_url.")
    model_bytes: int


class Job(BaseModel):
    id: str
    state: JobState
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    progress: Progress
    timings: Timings
    attempts: int = Field(description="Times a worker started this job (more than 1 after a server restart).")
    options: JobOptionsIn
    inputs: Inputs
    result: JobResult | None = Field(None, description="Set when the job succeeded.")
    report: dict[str, Any] | None = Field(None, description="The report, once succeeded (GET /v1/jobs/{id} only).")
    error: JobError | None = Field(None, description="Set when the job failed.")
    url: str


class JobList(BaseModel):
    items: list[Job]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class ImageSampleLimits(BaseModel):
    """Bounds on image samples (bnfold.inputs.images.ImageLimits), checked before anything is decoded."""

    max_members: int = Field(description="Files in a folder or archive, of every kind.")
    max_total_bytes: int = Field(description="All images of the archive together, uncompressed.")
    max_file_bytes: int = Field(description="One image file.")
    max_image_pixels: int = Field(description="Width × height of one image.")
    max_image_bytes: int = Field(description="One decoded TIFF, all channels.")
    max_total_pixels: int = Field(description="All images of one job together.")


class Limits(BaseModel):
    max_model_bytes: int
    max_samples_bytes: int
    max_queued_jobs: int
    workers: int
    job_timeout_s: float
    max_wait_s: float
    job_threads: int = Field(description="ONNX Runtime threads each job uses.")
    images: ImageSampleLimits


class Info(BaseModel):
    name: str
    version: str
    api_version: str
    limits: Limits
    default_options: JobOptionsIn


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool]
