"""Prometheus metrics of the gateway, labelled per adapter and version ("-" for the base model)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["adapter", "version"]
        self.requests = Counter(
            "loraflow_requests",
            "Requests by adapter version, endpoint and HTTP status.",
            [*labels, "endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "loraflow_request_errors",
            "Failed requests by error code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "loraflow_request_latency_seconds",
            "Whole-request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "loraflow_time_to_first_token_seconds",
            "Time to the first streamed chunk.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "loraflow_prompt_tokens", "Prompt tokens.", labels, registry=self.registry
        )
        self.completion_tokens = Counter(
            "loraflow_completion_tokens", "Completion tokens.", labels, registry=self.registry
        )
        self.resident = Gauge(
            "loraflow_resident_versions",
            "Adapter versions resident on each replica.",
            ["replica", *labels],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "loraflow_in_flight_requests", "Requests being served.", registry=self.registry
        )
