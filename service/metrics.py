"""Prometheus metrics, one registry per app (so several apps in one process do not collide).

Exposed at ``GET /metrics`` in the Prometheus text format:

* ``lift_requests_total{endpoint, status}`` and ``lift_request_seconds{endpoint}`` (histogram);
  ``endpoint`` is the route template (``/v1/features`` ...), ``other`` for unknown paths;
* ``lift_queue_depth`` requests waiting for inference; ``lift_batch_size`` images per model call
  (histogram); ``lift_inference_seconds`` seconds per model call (histogram);
* ``lift_images_total`` images run by the model; ``lift_dropped_total{reason}`` requests dropped
  before inference (``disconnected``, ``cancelled``), ``lift_rejected_total{reason}`` (``queue_full``,
  ``timeout``);
* ``lift_cache_hits_total``, ``lift_cache_misses_total``, ``lift_cache_bytes``;
* ``lift_stage_seconds{stage}`` (histogram): a request's seconds in ``read``, ``decode``, ``queue``,
  ``inference``, ``encode`` (service/timing.py; the same figures as each answer's ``Server-Timing``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class ServiceMetrics:
    """All of the service's metrics on a private :class:`CollectorRegistry`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lift_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("lift_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("lift_queue_depth", "requests waiting for inference", registry=r)
        self.batch_size = Histogram("lift_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("lift_inference_seconds", "seconds per model call", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.images = Counter("lift_images", "images run by the model", registry=r)
        self.dropped = Counter("lift_dropped", "requests dropped before inference", ["reason"], registry=r)
        self.rejected = Counter("lift_rejected", "requests refused by the batcher", ["reason"], registry=r)
        self.cache_hits = Counter("lift_cache_hits", "feature cache hits", registry=r)
        self.cache_misses = Counter("lift_cache_misses", "feature cache misses", registry=r)
        self.cache_bytes = Gauge("lift_cache_bytes", "bytes held by the feature cache", registry=r)
        self.stage_seconds = Histogram("lift_stage_seconds", "seconds of a request in one stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
