"""Prometheus metrics of this process: the registry, the worker's counters, multi-process collection.

Labels are fixed words (outcomes, reason classes, task names) and the process's ``worker`` name
(host name and process id) — never addresses, ids or anything a message contains.

* ``carepost serve`` exposes ``/metrics``: this registry (HTTP counters, see carepost.web.metrics)
  plus the installation-wide gauges computed at scrape time from the database and the queue
  (queue depth, webhook lag, import progress, journey lag; carepost.dashboard.metrics).
* ``carepost worker`` exposes its own counters (sends, deferrals by reason, TLS failures, tasks)
  on ``CAREPOST_WORKER_METRICS_PORT``: one scrape target per worker, whatever machine it is on.
* Several processes on one machine (``serve --workers N``, or workers without a port of their
  own) share counters through ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multi-process
  mode): :func:`exposition` then sums every process's files (docs/deployment.md).
"""

from __future__ import annotations

import os
import socket
import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

WORKER = f"{socket.gethostname()}:{os.getpid()}"

SENDS = Counter("carepost_send_total", "Recipient deliveries recorded, by outcome", ["worker", "outcome"],
                registry=REGISTRY)
DEFERRALS = Counter("carepost_deferrals_total", "Deliveries deferred, by reason class", ["worker", "reason"],
                    registry=REGISTRY)
TLS_FAILURES = Counter("carepost_tls_failures_total",
                       "Deliveries where verified TLS could not be established (deferred or not sent in clear)",
                       ["worker", "outcome"], registry=REGISTRY)
TASKS = Counter("carepost_tasks_total", "Queue tasks run, by task and outcome", ["worker", "task", "outcome"],
                registry=REGISTRY)
TASK_SECONDS = Histogram("carepost_task_seconds", "Queue task run time", ["worker", "task"], registry=REGISTRY,
                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))

DEFERRAL_REASONS = ("rate_limit", "connection_limit", "quiet_hours", "tls", "dns", "reply_4xx", "network",
                    "possible_duplicate", "other")


def _worker() -> str:
    return WORKER if os.getpid() == int(WORKER.rsplit(":", 1)[1]) else f"{socket.gethostname()}:{os.getpid()}"


def deferral_reason(reason: str | None, reply_code: int | None = None) -> str:
    """A deferral's reason as one of :data:`DEFERRAL_REASONS` (reasons are PHI-free words)."""
    text = (reason or "").lower()
    if "domain rate limit" in text:
        return "rate_limit"
    if "connections the domain allows" in text or "shared limit store" in text:
        return "connection_limit"
    if "quiet" in text:
        return "quiet_hours"
    if reply_code is not None and 400 <= reply_code < 500:
        return "reply_4xx"
    if "tls" in text or "certificate" in text or "mta-sts" in text or "dane" in text:
        return "tls"
    if "dns" in text or "no mx" in text or "no address" in text or "look-up" in text:
        return "dns"
    if any(w in text for w in ("connection", "timed out", "refused", "reachable", "network")):
        return "network"
    return "other"


def observe_delivery(status: str, reason: str | None = None, reply_code: int | None = None,
                     possible_duplicate: bool = False) -> None:
    """One recorded recipient outcome (the delivery pipeline's record step)."""
    worker = _worker()
    SENDS.labels(worker, status).inc()
    if status == "deferred":
        DEFERRALS.labels(worker, "possible_duplicate" if possible_duplicate and not reason
                         else deferral_reason(reason, reply_code)).inc()
        if deferral_reason(reason, reply_code) == "tls":
            TLS_FAILURES.labels(worker, "deferred").inc()
    elif status == "tls_unavailable":
        TLS_FAILURES.labels(worker, "not_sent_in_clear").inc()


def observe_task(task: str, outcome: str, seconds: float | None = None) -> None:
    worker = _worker()
    TASKS.labels(worker, task, outcome).inc()
    if seconds is not None:
        TASK_SECONDS.labels(worker, task).observe(seconds)


def exposition(extra=None) -> tuple[bytes, str]:
    """The text exposition: this registry, or every process's files in multi-process mode;
    ``extra``: a collector of scrape-time values added to either."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    if extra is None:
        return generate_latest(registry), CONTENT_TYPE_LATEST
    combined = CollectorRegistry()
    combined.register(_Union(registry, extra))
    return generate_latest(combined), CONTENT_TYPE_LATEST


class _Union:
    def __init__(self, registry, extra) -> None:
        self.registry, self.extra = registry, extra

    def collect(self):
        yield from self.registry.collect()
        yield from self.extra.collect()


_server_lock = threading.Lock()
_server_started: list[int] = []


def serve_worker_metrics(port: int, host: str = "0.0.0.0", extra=None) -> None:
    """``/metrics`` of a worker process on ``port`` (a daemon thread; once per process)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    with _server_lock:
        if _server_started:
            return
        _server_started.append(port)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_response(404)
                self.end_headers()
                return
            body, content_type = exposition(extra)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # no access log lines (paths carry nothing, but stay quiet)
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="carepost-worker-metrics", daemon=True).start()
