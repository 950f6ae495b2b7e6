"""Observability (issue 17 item 6): ``/readyz`` fails (503) when the database or the queue cannot
be reached — access really stopped, by pointing at a closed port or a missing directory —
``/metrics`` carries the installation-wide gauges with the values the database and queue hold,
the worker's counters classify deferrals by reason, and a task carries the request id of the
request that queued it into the worker's log lines, never anything else."""

from __future__ import annotations

import json
import socket

import pytest

from carepost.core import metrics as core_metrics
from carepost.core.queue import JSONMessageSerializer, huey


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def repoint(monkeypatch):
    """Change one CAREPOST_* setting for the app under test; everything is put back afterwards."""
    from carepost.core.config import reset_settings
    from carepost.core.database import dispose_engine

    def apply(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        reset_settings()
        dispose_engine()
        huey.reset_storage()

    yield apply
    monkeypatch.undo()
    reset_settings()
    dispose_engine()
    huey.reset_storage()


def test_readyz_ok_when_database_and_queue_answer(client, delivery_queue):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "queue": "ok"}}


def test_readyz_503_when_the_queue_is_unreachable(client, repoint):
    repoint(CAREPOST_QUEUE_URL=f"redis://127.0.0.1:{closed_port()}/0")
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["queue"].startswith("error: ")
    # and the scrape still answers, saying which backend is down
    text = client.get("/metrics").text
    assert 'carepost_up{component="queue"} 0.0' in text
    assert 'carepost_up{component="database"} 1.0' in text


def test_readyz_503_when_the_database_is_unreachable(client, repoint, storage, tmp_path):
    if storage.backend == "postgresql":
        from sqlalchemy.engine import make_url

        url = make_url(storage.env["CAREPOST_DATABASE_URL"]).set(host="127.0.0.1", port=closed_port())
        repoint(CAREPOST_DATABASE_URL=url.render_as_string(hide_password=False))
    else:  # the embedded database's directory is gone (an unmounted volume)
        repoint(CAREPOST_DATABASE_URL=f"sqlite+sqlcipher:///{tmp_path}/unmounted/carepost.db")
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["checks"]["database"].startswith("error: ")
    assert body["checks"]["queue"] == "ok"
    assert 'carepost_up{component="database"} 0.0' in client.get("/metrics").text


def _sample(text: str, name: str, **labels) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_metrics_report_queue_depth_and_due_deliveries(client, delivery_env, sender, delivery_queue):
    key = sender.key()
    before = _sample(client.get("/metrics").text, "carepost_queue_depth", state="pending")
    assert before == 0
    for i in range(3):
        r = client.post("/api/v1/messages", headers=key, json={
            "from": "Bar Clinic <care@bar.example>", "to": [f"obsv-pat{i}@valid.test"], "subject": "Obsv-9c1 visit",
            "text": "Obsv-9c1 see you soon."})
        assert r.status_code == 202, r.text
    text = client.get("/metrics").text
    assert _sample(text, "carepost_queue_depth", state="pending") == 3  # one delivery task each, no worker ran
    assert _sample(text, "carepost_delivery_due", status="queued") == 3
    assert _sample(text, "carepost_delivery_lag_seconds", status="queued") >= 0
    for name in ("carepost_webhook_lag_seconds", "carepost_journey_lag_seconds", "carepost_journey_runs_due",
                 "carepost_webhook_deliveries_due"):
        assert _sample(text, name) == 0, name
    assert _sample(text, "carepost_imports", status="running") == 0
    # no address, subject or body in the exposition (words of this test's own: the registry is the
    # process's, and route templates such as /api/v1/fhir/Appointment are rightly in it)
    assert "obsv-pat" not in text and "Obsv-9c1" not in text


@pytest.mark.parametrize("reason, code, expected", [
    ("domain rate limit: 60 messages per minute reached", None, "rate_limit"),
    ("all 2 connections the domain allows are in use", None, "connection_limit"),
    ("mx.valid.test: 451 reply", 451, "reply_4xx"),
    ("verified TLS unavailable: mx.x.test: certificate has expired", None, "tls"),
    ("mx.valid.test: connection refused", None, "network"),
    ("temporary DNS failure", None, "dns"),
])
def test_deferrals_are_counted_by_reason_class(reason, code, expected):
    labels = {"worker": core_metrics._worker(), "reason": expected}
    before = core_metrics.REGISTRY.get_sample_value("carepost_deferrals_total", labels) or 0
    core_metrics.observe_delivery("deferred", reason, code)
    assert core_metrics.REGISTRY.get_sample_value("carepost_deferrals_total", labels) == before + 1


def test_a_task_carries_the_request_id_that_queued_it_and_nothing_else(db):
    import structlog
    from huey.registry import Message

    from carepost.core.ids import new_id
    from carepost.core.queue import _incoming

    ser = JSONMessageSerializer()
    mid = new_id()
    message = Message(new_id(), "delivery.deliver", None, 0, 0, None, (mid,), {}, None, None, None, None)
    request_id = "0123456789abcdef0123456789abcdef"
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        wire = ser.serialize(message)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    assert json.loads(wire)["request_id"] == request_id
    back = ser.deserialize(wire)
    assert back.args == (mid,) and _incoming.request_id == request_id
    # something that is not a trace id (an address) never rides along, in either direction
    structlog.contextvars.bind_contextvars(request_id="pat@valid.test")
    try:
        wire = ser.serialize(message)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    assert "request_id" not in json.loads(wire) and b"valid.test" not in wire


def test_the_shipped_dashboard_plots_only_metrics_carepost_exposes(client, delivery_queue):
    """deploy/grafana/carepost-dashboard.json: every carepost_* series it queries is one a server
    or a worker exposes (a renamed metric would leave an empty panel)."""
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana/carepost-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bcarepost_[a-z_]+", target["expr"])}
    core_metrics.observe_delivery("deferred", "connection refused")  # so every worker family has a sample
    core_metrics.observe_delivery("tls_unavailable", "certificate has expired")
    core_metrics.observe_task("t", "ok", 0.1)
    client.get("/healthz")
    exposed = set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        exposed.add(family.name)  # a gauge with no sample now (no import running) is still declared
        exposed.update(sample.name for sample in family.samples)
    assert queried - exposed == set()
    assert {"carepost_queue_depth", "carepost_send_total", "carepost_deferrals_total", "carepost_tls_failures_total",
            "carepost_webhook_lag_seconds", "carepost_import_records_processed", "carepost_journey_lag_seconds"} <= queried


def test_a_request_id_rides_from_the_api_call_into_its_delivery_task(client, delivery_env, sender, delivery_queue):
    """Through the real middleware and queue store: the client's X-Request-Id is on the queued
    delivery task (and only the id: no address, subject or body in the stored message)."""
    request_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = client.post("/api/v1/messages", headers={**sender.key(), "X-Request-Id": request_id}, json={
        "from": "Bar Clinic <care@bar.example>", "to": ["pat@valid.test"], "subject": "Appointment",
        "text": "See you soon."})
    assert r.status_code == 202, r.text
    assert r.headers["X-Request-Id"] == request_id
    stored = [bytes(item) for item in huey.storage.enqueued_items()]
    tasks = [json.loads(item) for item in stored]
    assert [t["request_id"] for t in tasks if "deliver_messages" in t["name"]] == [request_id]
    assert not any(b"valid.test" in item or b"Appointment" in item for item in stored)
