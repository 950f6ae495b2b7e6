"""Prometheus metrics. Labels are route templates and status codes — never paths with ids or PHI."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "carepost_http_requests_total", "HTTP requests handled", ["method", "route", "status"], registry=REGISTRY
)
HTTP_LATENCY = Histogram(
    "carepost_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY
)
AUTH_EVENTS = Counter(
    "carepost_auth_events_total", "Authentication outcomes", ["method", "outcome"], registry=REGISTRY
)


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(method, route).observe(seconds)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
