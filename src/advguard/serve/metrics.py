"""The service's Prometheus metrics, declared once per application (a registry of its own, so
several applications in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("advguard_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.verdicts = Counter("advguard_verdicts_total", "images judged, by verdict",
                                ["verdict"], registry=self.registry)
        self.denials = Counter("advguard_denials_total", "clients newly denied",
                               registry=self.registry)
        self.repeats = Counter("advguard_query_repeats_total",
                               "queries detected as near-copies of their client's recent ones "
                               "(query-based attacks)", registry=self.registry)
        self.refused = Counter("advguard_refused_requests_total",
                               "requests refused because their client is denied",
                               registry=self.registry)
        self.latency = Histogram("advguard_request_seconds", "request latency",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                          0.5, 1.0, 2.5))

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")
