"""Prometheus metrics of one app instance (its own registry, so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "ntm_request_duration_seconds",
            "Request latency by route: HTTP, and gRPC as method GRPC with the call's path and status name",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ntm_batch_size", "Session steps per model call", ["model"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_wait = Histogram(
            "ntm_batch_queue_wait_seconds",
            "Longest wait of a step in a batch before the model ran",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "ntm_batch_compute_seconds",
            "Model time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.active_sessions = Gauge("ntm_active_sessions", "Live sessions in the store", registry=self.registry)
        self.steps = Counter("ntm_steps", "Session steps applied", ["model"], registry=self.registry)
        self.predictions = Counter(
            "ntm_predictions", "Images classified read-only (predict)", ["model"], registry=self.registry
        )
        self.package_loaded = Gauge(
            "ntm_model_package_loaded",
            "1 once the model's one-row AOTInductor packages serve calls of one session (NTM_COMPILE_PACKAGE)",
            ["model"],
            registry=self.registry,
        )
        self.errors = Counter("ntm_errors", "Error responses by code", ["code"], registry=self.registry)
        self.rate_limited = Counter(
            "ntm_rate_limited", "Requests refused over a rate limit (429), by limit", ["limit"], registry=self.registry
        )

    def batch_observer(self, model: str):
        def observe(size: int, wait: float, compute: float) -> None:
            self.batch_size.labels(model).observe(size)
            self.queue_wait.labels(model).observe(wait)
            self.compute.labels(model).observe(compute)

        return observe
