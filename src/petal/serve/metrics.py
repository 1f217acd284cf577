"""Prometheus metrics for one app (its own registry, so several apps can share a process).

    petal_requests_total{route, method, code}         every HTTP answer
    petal_request_errors_total{route, code}           answers with code >= 400
    petal_request_latency_seconds{route}              histogram, whole request
    petal_requests_in_flight                          gauge
    petal_images_total{model, outcome}                outcome: predicted | failed (bad instance)
    petal_batch_size{model}                           histogram, images per ONNX Runtime call
    petal_inference_seconds{model}                    histogram, per call
    petal_models_ready                                1 once every model is loaded

`route` is the route's path template ("/v1/models/{name}:predict"), or "unmatched",
so scanners hitting random paths cannot blow up the label set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("petal_requests", "HTTP requests answered", ["route", "method", "code"],
                                registry=r)
        self.errors = Counter("petal_request_errors", "HTTP answers with status >= 400", ["route", "code"],
                              registry=r)
        self.latency = Histogram("petal_request_latency_seconds", "Request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("petal_requests_in_flight", "Requests being handled", registry=r)
        self.image_count = Counter("petal_images", "Images in predict requests", ["model", "outcome"],
                                   registry=r)
        self.batch_size = Histogram("petal_batch_size", "Images per inference call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("petal_inference_seconds", "Seconds per inference call", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("petal_models_ready", "1 once every model is loaded", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def images(self, model: str, predicted: int, failed: int) -> None:
        self.image_count.labels(model, "predicted").inc(predicted)
        self.image_count.labels(model, "failed").inc(failed)

    def batch_callback(self, model: str) -> Callable[[int, float], None]:
        size, seconds = self.batch_size.labels(model), self.inference.labels(model)

        def observe(images: int, elapsed: float) -> None:
            size.observe(images)
            seconds.observe(elapsed)

        return observe

    def observe_request(self, route: str, method: str, code: int, elapsed: float) -> None:
        self.requests.labels(route, method, str(code)).inc()
        self.latency.labels(route).observe(elapsed)
        if code >= 400:
            self.errors.labels(route, str(code)).inc()


class MetricsMiddleware:
    """ASGI middleware: counts and times every HTTP request by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}  # if the app raises before answering

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router, in place
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.observe_request(route, method, status["code"], time.perf_counter() - start)
