"""The gateway's Prometheus metrics, with bounded labels.

A model is a label value only when the gateway's config names it (a policy or a fallback
target); every other model is `other`. Routes are a fixed set; statuses are classes.
No key, scope or prompt is ever a label.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OTHER = "other"
ROUTES = ("messages", "count_tokens", "batches", "models", "files", "other")
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0)


def route_of(path: str) -> str:
    if path == "/v1/messages":
        return "messages"
    if path.startswith("/v1/messages/count_tokens"):
        return "count_tokens"
    if path.startswith("/v1/messages/batches"):
        return "batches"
    for prefix in ("models", "files"):
        if path.startswith(f"/v1/{prefix}"):
            return prefix
    return "other"


def status_class(status: int | None) -> str:
    """429 and 529 by themselves (they drive the limiter); the rest by hundred."""
    if status is None:
        return "error"
    if status in (429, 529):
        return str(status)
    return f"{status // 100}xx"


class GatewayMetrics:
    def __init__(self, models: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        self.known = frozenset(models)
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("limiterd_gateway_requests", "Requests received, by route.",
                                ["route", "model"], registry=r)
        self.answers = Counter("limiterd_gateway_answers",
                               "Answers the gateway gave itself instead of the provider "
                               "(bad input, no capacity in time, limiter down).",
                               ["reason"], registry=r)
        self.waits = Counter("limiterd_gateway_waits", "Limiter waits by result.",
                             ["model", "result"], registry=r)
        self.wait_seconds = Histogram("limiterd_gateway_wait_seconds",
                                      "Time a request waited for its grant.", ["model"],
                                      buckets=WAIT_BUCKETS, registry=r)
        self.upstream = Counter("limiterd_gateway_upstream_responses",
                                "Upstream answers by status class.",
                                ["route", "model", "status"], registry=r)
        self.stream_bytes = Counter("limiterd_gateway_streamed_bytes",
                                    "Bytes of event streams passed to clients.", ["model"],
                                    registry=r)
        self.stream_ends = Counter("limiterd_gateway_stream_ends",
                                   "How streams ended: complete, client_gone, upstream_broke, "
                                   "error_event.", ["model", "end"], registry=r)
        self.retries = Counter("limiterd_gateway_retries",
                               "429/529 retried inside the gateway.", ["model", "status"],
                               registry=r)
        self.fallbacks = Counter("limiterd_gateway_fallbacks", "Fallbacks to the next model.",
                                 ["model", "reason"], registry=r)
        self.in_flight = Gauge("limiterd_gateway_in_flight", "Messages requests in progress.",
                               registry=r)

    def model(self, name: str) -> str:
        return name if name in self.known else OTHER
