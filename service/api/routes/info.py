"""/v1/info: what this server is and which limits it applies."""

from __future__ import annotations

from fastapi import APIRouter

from bnfold import __version__

from ...errors import problem_responses
from ...schemas import ImageSampleLimits, Info, JobOptionsIn, Limits
from ..deps import Owner, SettingsDep

router = APIRouter(prefix="/v1", tags=["info"])


@router.get("/info", operation_id="getInfo", response_model=Info, responses=problem_responses(401))
async def info(_: Owner, settings: SettingsDep) -> Info:
    """bnfold version, API version, upload/queue/time limits and the default job options."""
    limits = Limits(
        max_model_bytes=int(settings.max_model_bytes), max_samples_bytes=int(settings.max_samples_bytes),
        max_queued_jobs=settings.max_queued_jobs, workers=settings.workers, job_timeout_s=settings.job_timeout,
        max_wait_s=settings.max_wait, job_threads=settings.resolved_job_threads,
        images=ImageSampleLimits(**settings.image_limits()),
    )
    return Info(name="bnfold", version=__version__, api_version="v1", limits=limits, default_options=JobOptionsIn())
