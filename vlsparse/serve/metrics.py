"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so that several apps can
live in one process (the tests build many).

    vlsparse_requests_total{endpoint, status}   requests answered, by endpoint and HTTP status
    vlsparse_request_latency_seconds            server-side latency of POST /v1/predict (histogram, s)
    vlsparse_batch_size                          requests per model batch (histogram)
    vlsparse_queue_depth                         requests waiting for a batch now (gauge)
    vlsparse_in_flight                           requests in running batches now (gauge)
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "ENDPOINTS"]

#: endpoints counted under their own name; any other path is counted as "other" (bounded label values)
ENDPOINTS = ("/", "/healthz", "/v1/predict", "/v1/model", "/metrics", "/docs", "/openapi.json")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _batch_buckets(max_batch: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to max_batch (inclusive)."""
    edges, b = [], 1
    while b < max_batch:
        edges.append(float(b))
        b *= 2
    return tuple(edges + [float(max_batch)])


class Metrics:
    """The server's metrics; ``queue_depth`` and ``in_flight`` read the given callables when scraped.

    Args:
        max_batch: the largest batch (the batch-size histogram's last bucket).
        queue_depth: () -> requests waiting now.
        in_flight: () -> requests in running batches now.
    """

    def __init__(self, max_batch: int, queue_depth: Callable[[], float], in_flight: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("vlsparse_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("vlsparse_request_latency_seconds", "Server-side latency of POST /v1/predict (s)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("vlsparse_batch_size", "Requests per model batch",
                                    buckets=_batch_buckets(max_batch), registry=self.registry)
        Gauge("vlsparse_queue_depth", "Requests waiting for a batch", registry=self.registry).set_function(queue_depth)
        Gauge("vlsparse_in_flight", "Requests in running batches", registry=self.registry).set_function(in_flight)

    def count(self, path: str, status: int) -> None:
        """Count one answered request (``path`` outside ENDPOINTS is counted as "other")."""
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
