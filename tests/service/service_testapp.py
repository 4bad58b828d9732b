"""The real app with a job target tests can steer: ``uvicorn service_testapp:create --factory``.

Each job process first writes its pid to ``$BNFOLD_TEST_HOLD_DIR/<job id>.pid``, then waits while
``$BNFOLD_TEST_HOLD_DIR/hold`` exists, then runs the real `service.job.run_job`. Holding a job keeps
it "running" for as long as a test needs to cancel it, kill its process, time it out or restart
the server under it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.core.config import Settings
from service.job import run_job
from service.main import create_app


def held_job(job_dir: str, *args) -> None:
    hold = Path(os.environ["BNFOLD_TEST_HOLD_DIR"])
    pid_file = hold / f"{Path(job_dir).name}.pid"
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(pid_file)
    while (hold / "hold").exists():
        time.sleep(0.02)
    run_job(job_dir, *args)


def create():
    return create_app(Settings(), job_target=held_job)
