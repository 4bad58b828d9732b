"""Prometheus metrics for one app (own registry, so several apps can live in one test process).

Counters and histograms are observed in this process (uploads, downloads, finished jobs, HTTP
requests). Jobs by state and queue depth are read from the job table at scrape time, so with a
shared database every replica reports the same, global numbers.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.orm import sessionmaker

from . import crud

log = logging.getLogger("bnfold.service")
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self, sessions: sessionmaker):
        self.registry = CollectorRegistry()
        self.job_duration = Histogram("bnfold_job_duration_seconds", "Run time of finished jobs, by final state.",
                                      ["state"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("bnfold_job_queue_wait_seconds", "Time jobs waited for a worker.",
                                    buckets=DURATION_BUCKETS, registry=self.registry)
        self.bytes_in = Counter("bnfold_upload_bytes", "Bytes of uploaded files, by part.", ["part"], registry=self.registry)
        self.bytes_out = Counter("bnfold_download_bytes", "Bytes of results sent, by artifact.", ["artifact"],
                                 registry=self.registry)
        self.requests = Counter("bnfold_http_requests", "HTTP requests, by method, route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.registry.register(_JobTable(sessions))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobTable:
    """Collector reading job counts from the store when scraped."""

    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    def describe(self):
        return [GaugeMetricFamily("bnfold_jobs", "Jobs in the store, by state.", labels=["state"]),
                GaugeMetricFamily("bnfold_queue_depth", "Jobs waiting for a worker."),
                GaugeMetricFamily("bnfold_store_up", "1 if the job store answered this scrape.")]

    def collect(self):
        try:
            with self.sessions() as session:
                counts = crud.counts_by_state(session)
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("metrics: job store unavailable", extra={"error": str(exc)})
            yield GaugeMetricFamily("bnfold_store_up", "1 if the job store answered this scrape.", value=0)
            return
        jobs = GaugeMetricFamily("bnfold_jobs", "Jobs in the store, by state.", labels=["state"])
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("bnfold_queue_depth", "Jobs waiting for a worker.", value=counts["queued"])
        yield GaugeMetricFamily("bnfold_store_up", "1 if the job store answered this scrape.", value=1)
