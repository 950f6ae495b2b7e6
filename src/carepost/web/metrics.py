"""Prometheus metrics. Labels are route templates and status codes — never paths with ids or PHI.

The registry is the process's one registry (carepost.core.metrics), which also holds the worker
counters; ``exposition`` adds the scrape-time collector the caller passes (the dashboard's
installation-wide gauges) and sums processes in multi-process mode."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from carepost.core.metrics import REGISTRY
from carepost.core.metrics import exposition as _exposition

HTTP_REQUESTS = Counter(
    "carepost_http_requests_total", "HTTP requests handled", ["method", "route", "status"], registry=REGISTRY
)
HTTP_LATENCY = Histogram(
    "carepost_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY
)
AUTH_EVENTS = Counter(
    "carepost_auth_events_total", "Authentication outcomes", ["method", "outcome"], registry=REGISTRY
)


_CHILDREN: dict[tuple, tuple] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    # The labelled children are looked up once per (method, route, status): ``labels()`` takes a
    # lock and builds its key at every call (~5 µs, on every request; issue 13, /t/ throughput).
    key = (method, route, status)
    children = _CHILDREN.get(key)
    if children is None:
        children = (HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(method, route))
        if len(_CHILDREN) < 10000:  # routes are templates; only odd methods could grow it
            _CHILDREN[key] = children
    children[0].inc()
    children[1].observe(seconds)


def exposition(extra=None) -> tuple[bytes, str]:
    return _exposition(extra)
