"""Analytics fed by what happens (issue 13 items 4-6), end to end: a message sent through the API
and the real pipeline to local SMTP servers counts accepted, sent, delivered, secured, bounced per
receiving domain; the analytics API reads those rollups (masked and unmasked, CSV); custom events
are idempotent, refuse bad input naming the field, and goals attribute conversions to the last
message delivered within their window."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from carepost.core import clock
from carepost.core.database import org_session, read_only_session
from carepost.core.ids import new_id
from carepost.delivery import pipeline
from carepost.tracking.conversions import ContactEvent
from carepost.tracking.rollups import AnalyticsRollup


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client, monkeypatch):
    from carepost.core.config import reset_settings

    valid = delivery_env.mx["valid"]
    overrides = ",".join(s.override for s in delivery_env.mx.values())
    # gmail.com is served by the local "valid" MX: a large provider keeps its name in analytics.
    monkeypatch.setenv("CAREPOST_MX_OVERRIDES", f"{overrides},gmail.com={valid.override_target}")
    reset_settings()
    full = sender.key("messages:send", "messages:read", "phi:read_unmasked", "phi:write", "analytics:read",
                      "campaigns:manage")
    masked = sender.key("analytics:read", "phi:write")
    return delivery_env, sender, full, masked, client


def _contact(org_id: str, address: str) -> str:
    from carepost.patients import service as patients

    with org_session(org_id) as s:
        cid = patients.save_contact(s, org_id, {"given_name": "Pat", "email": address}).contact.id
        s.commit()
    return cid


def _send(client, key, to) -> str:
    r = client.post("/api/v1/messages", headers=key, json={
        "from": "Bar Clinic <care@bar.example>", "to": to, "subject": "Your visit", "text": "See you soon."})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _rollup(org_id: str, metric: str, **dims) -> int:
    with read_only_session(org_id) as s:
        q = select(func.coalesce(func.sum(AnalyticsRollup.n), 0)).where(AnalyticsRollup.grain == "d",
                                                                      AnalyticsRollup.metric == metric)
        for k, v in dims.items():
            q = q.where(getattr(AnalyticsRollup, k) == v)
        return int(s.scalar(q))


def test_a_real_send_feeds_the_rollups_and_the_api_reads_them(env):
    peers, sender, key, masked, client = env
    peers.mx["valid"].recorder.rcpt_replies["gone@valid.test"] = "550 5.1.1 No such user"
    message_id = _send(client, key, ["pat@valid.test", "ann@gmail.com", "gone@valid.test"])
    assert _rollup(sender.org_id, "accepted", source="api") == 3  # counted at acceptance, before any worker
    pipeline.deliver([message_id])
    received = [r for m in peers.mx["valid"].recorder.messages for r in m.rcpt_tos]
    assert sorted(received) == ["ann@gmail.com", "pat@valid.test"]

    assert _rollup(sender.org_id, "delivered") == 2
    assert _rollup(sender.org_id, "delivered", receiving_domain="gmail.com") == 1
    assert _rollup(sender.org_id, "delivered", receiving_domain="other") == 1  # valid.test is not a provider
    assert _rollup(sender.org_id, "bounced_hard", receiving_domain="other") == 1
    tls = _rollup(sender.org_id, "secured:tls1.3") + _rollup(sender.org_id, "secured:tls1.2")
    assert tls == 2

    # The API reads the same figures, unmasked for a key holding phi:read_unmasked...
    r = client.get("/api/v1/analytics/summary", headers=key)
    assert r.status_code == 200, r.text
    totals = r.json()["totals"]
    assert totals["accepted"] == 3 and totals["delivered"] == 2 and totals["bounced_hard"] == 1
    r = client.get(f"/api/v1/analytics/messages/{message_id}", headers=key)
    assert r.json()["totals"]["delivered"] == 2
    r = client.get("/api/v1/analytics/breakdown", params={"by": "receiving_domain"}, headers=key)
    rows = {row["key"]: row["counts"] for row in r.json()["rows"]}
    assert rows["gmail.com"]["delivered"] == 1 and rows["other"]["delivered"] == 1
    assert "valid.test" not in r.text
    # ... and suppressed for one without: three people are a small cell.
    r = client.get("/api/v1/analytics/summary", headers=masked)
    body = r.json()
    assert body["masked"] is True and body["totals"]["accepted"] == "<11" and body["rates"] == {}
    r = client.get(f"/api/v1/analytics/messages/{message_id}", headers=masked)
    assert set(r.json()["totals"].values()) == {"<11"}

    # Hourly series: today's hour holds the three acceptances.
    r = client.get("/api/v1/analytics/series", params={"interval": "hour", "metric": ["accepted", "delivered"]},
                   headers=key)
    assert r.status_code == 200, r.text
    assert sum(r.json()["series"]["accepted"]) == 3 and len(r.json()["periods"]) == 30 * 24

    # CSV export: the breakdown per source, masked for the masked key.
    r = client.get("/api/v1/analytics/export.csv", params={"by": "source"}, headers=key)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert table[0]["source"] == "api" and table[0]["accepted"] == "3" and table[0]["delivered"] == "2"
    r = client.get("/api/v1/analytics/export.csv", params={"by": "source"}, headers=masked)
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert table[0]["accepted"] == "<11"
    r = client.get("/api/v1/analytics/export.csv", params={"interval": "day"}, headers=key)
    assert r.text.splitlines()[0].startswith("day,") and len(r.text.splitlines()) == 31


def test_the_analytics_api_refuses_bad_filters(env):
    _, _, key, _, client = env
    for params, field in (({"start": "2026-12-05", "end": "2026-12-01"}, "start"),
                          ({"start": "2020-01-01", "end": "2026-12-01"}, "start"),
                          ({"interval": "hour", "start": "2026-01-01", "end": "2026-12-01"}, "interval"),
                          ({"metric": "openned"}, "metric")):
        r = client.get("/api/v1/analytics/series", params=params, headers=key)
        assert r.status_code == 422, (params, r.text)
        assert field in r.text
    r = client.get("/api/v1/analytics/breakdown", params={"by": "address"}, headers=key)
    assert r.status_code == 422
    r = client.get("/api/v1/analytics/summary", params={"campaign_id": "x' or 1=1"}, headers=key)
    assert r.status_code == 422


def test_goals_attribute_conversions_to_the_last_message_in_the_window(env):
    peers, sender, key, _, client = env
    cid = _contact(sender.org_id, "pat@valid.test")
    r = client.post("/api/v1/goals", headers=key, json={"name": "Booked", "event_name": "appointment.booked",
                                                        "window_days": 3})
    assert r.status_code == 201, r.text
    goal_id = r.json()["id"]
    assert client.post("/api/v1/goals", headers=key, json={"name": "Again", "event_name": "appointment.booked",
                                                           "window_days": 3}).status_code == 409
    for bad, field in (({"window_days": 0}, "window_days"), ({"window_days": 91}, "window_days"),
                       ({"event_name": "Appointment Booked"}, "event_name")):
        body = {"name": "x", "event_name": "refill.picked_up", "window_days": 7, **bad}
        r = client.post("/api/v1/goals", headers=key, json=body)
        assert r.status_code == 422 and field in r.text

    first = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([first])
    clock.advance(timedelta(hours=2))
    second = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([second])
    clock.advance(timedelta(hours=1))

    # Within the window: attributed to the last message delivered (the second).
    r = client.post("/api/v1/events", headers=key, json={"name": "appointment.booked", "contact_id": cid,
                                                         "properties": {"clinic": "cardiology"}})
    assert r.status_code == 201, r.text
    assert r.json()["conversion"] == {"goal_id": goal_id, "message_id": second}
    assert "cardiology" not in r.text  # properties are never echoed
    assert _rollup(sender.org_id, "converted", message_id=second) == 0  # grain d carries no message id
    with read_only_session(sender.org_id) as s:
        per_message = s.scalar(select(func.sum(AnalyticsRollup.n)).where(
            AnalyticsRollup.grain == "m", AnalyticsRollup.message_id == second, AnalyticsRollup.metric == "converted"))
        assert per_message == 1
        stored = s.scalars(select(ContactEvent)).one()
        assert b"cardiology" not in stored.properties_enc  # encrypted at rest
    assert _rollup(sender.org_id, "converted", source="api") == 1

    # An event before any delivery in the window, and one after the window: kept, not converted.
    r = client.post("/api/v1/events", headers=key, json={
        "name": "appointment.booked", "contact_id": cid,
        "occurred_at": (clock.now() - timedelta(hours=5)).isoformat()})
    assert r.status_code == 201 and r.json()["conversion"] is None
    clock.advance(timedelta(days=3, hours=1))
    r = client.post("/api/v1/events", headers=key, json={"name": "appointment.booked", "contact_id": cid})
    assert r.status_code == 201 and r.json()["conversion"] is None
    # An event without a goal is only kept.
    r = client.post("/api/v1/events", headers=key, json={"name": "refill.picked_up", "contact": {"email": "pat@valid.test"}})
    assert r.status_code == 201 and r.json()["conversion"] is None and r.json()["contact_id"] == cid
    assert _rollup(sender.org_id, "converted") == 1
    r = client.get("/api/v1/goals", headers=key)
    assert [g["event_name"] for g in r.json()] == ["appointment.booked"]
    assert client.patch(f"/api/v1/goals/{goal_id}", headers=key, json={"window_days": 14}).json()["window_days"] == 14
    assert client.delete(f"/api/v1/goals/{goal_id}", headers=key).status_code == 204


def test_events_are_idempotent_by_key(env):
    _, sender, key, _, client = env
    cid = _contact(sender.org_id, "pat@valid.test")
    body = {"name": "refill.picked_up", "contact_id": cid, "properties": {"rx": "lisinopril 10 mg"}}
    a = client.post("/api/v1/events", headers={**key, "Idempotency-Key": "pickup-1"}, json=body)
    b = client.post("/api/v1/events", headers={**key, "Idempotency-Key": "pickup-1"}, json=body)
    c = client.post("/api/v1/events", headers=key, json={**body, "idempotency_key": "pickup-1"})
    assert a.status_code == b.status_code == c.status_code == 201
    assert a.json() == b.json() == c.json() and b.headers["idempotent-replayed"] == "true"
    r = client.post("/api/v1/events", headers={**key, "Idempotency-Key": "pickup-1"},
                    json={**body, "properties": {"rx": "metformin"}})
    assert r.status_code == 409 and r.json()["error"]["field"] == "idempotency_key"
    assert "metformin" not in r.text and "lisinopril" not in r.text
    r = client.post("/api/v1/events", headers={**key, "Idempotency-Key": "a"}, json={**body, "idempotency_key": "b"})
    assert r.status_code == 422
    with read_only_session(sender.org_id) as s:
        assert s.scalar(select(func.count()).select_from(ContactEvent)) == 1


def test_bad_events_are_refused_naming_the_field_and_nothing_is_stored(env, session):
    from carepost.accounts.service import create_organization

    _, sender, key, _, client = env
    cid = _contact(sender.org_id, "pat@valid.test")
    other = create_organization(session, "Other Clinic")
    session.commit()
    theirs = _contact(other.id, "sam@valid.test")
    cases = [
        ({"name": "appointment.booked", "contact_id": theirs}, 404, "contact_id"),  # another organization's
        ({"name": "appointment.booked", "contact_id": new_id()}, 404, "contact_id"),  # unknown
        ({"name": "appointment.booked", "contact_id": "not-an-id"}, 422, "contact_id"),
        ({"name": "appointment.booked", "contact": {"email": "nobody@valid.test"}}, 404, "contact"),
        ({"name": "appointment.booked", "contact": {"email": "sam@valid.test"}}, 404, "contact"),
        ({"name": "appointment.booked"}, 422, "contact_id"),
        ({"name": "Appointment Booked!", "contact_id": cid}, 422, "name"),
        ({"name": "a" * 65, "contact_id": cid}, 422, "name"),
        ({"name": 42, "contact_id": cid}, 422, "name"),
        ({"name": "x.y", "contact_id": cid, "properties": ["not", "an", "object"]}, 422, "properties"),
        ({"name": "x.y", "contact_id": cid, "properties": {"bad key!": 1}}, 422, "properties"),
        ({"name": "x.y", "contact_id": cid, "properties": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, 422, "properties"),
        ({"name": "x.y", "contact_id": cid, "properties": {"note": "x" * 20_000}}, 413, "properties"),
        ({"name": "x.y", "contact_id": cid, "occurred_at": "2026-01-01T00:00:00"}, 422, "occurred_at"),
        ({"name": "x.y", "contact_id": cid, "occurred_at": "not a date"}, 422, "occurred_at"),
        ({"name": "x.y", "contact_id": cid, "occurred_at": (datetime.now(UTC) + timedelta(days=2)).isoformat()},
         422, "occurred_at"),
        ({"name": "x.y", "contact_id": cid, "surprise": True}, 422, "surprise"),
    ]
    for body, status, field in cases:
        r = client.post("/api/v1/events", headers=key, json=body)
        assert r.status_code == status, (body, r.text)
        assert field in r.text, (body, r.text)
        assert "sam@" not in r.text and "nobody@" not in r.text
    r = client.post("/api/v1/events", headers={**key, "Content-Type": "application/json"}, content=b"{" * 50_000)
    assert r.status_code in (413, 422)
    with read_only_session(sender.org_id) as s:
        assert s.scalar(select(func.count()).select_from(ContactEvent)) == 0


def test_rebuild_recounts_old_data_from_the_events(env):
    """``carepost analytics rebuild --org``: rollups lost (or never kept) are recounted from the
    message events to the same figures; engagement and conversions counted elsewhere stay."""
    from sqlalchemy import delete
    from typer.testing import CliRunner

    from carepost.accounts.service import get_organization
    from carepost.cli import app as cli_app
    from carepost.tracking import rollups

    peers, sender, key, _, client = env
    peers.mx["valid"].recorder.rcpt_replies["gone@valid.test"] = "550 5.1.1 No such user"
    message_id = _send(client, key, ["pat@valid.test", "ann@gmail.com", "gone@valid.test"])
    pipeline.deliver([message_id])
    with org_session(sender.org_id) as s:
        rollups.add(s, org_id=sender.org_id, at=clock.now(), metric="opened_human", source="api")
        s.commit()
    before = client.get("/api/v1/analytics/summary", headers=key).json()["totals"]
    with org_session(sender.org_id) as s:
        s.execute(delete(AnalyticsRollup).where(AnalyticsRollup.org_id == sender.org_id,
                                                AnalyticsRollup.metric != "opened_human"))
        s.commit()
        slug = get_organization(s, sender.org_id).slug
    assert client.get("/api/v1/analytics/summary", headers=key).json()["totals"] == {"opened_human": 1}
    result = CliRunner().invoke(cli_app, ["analytics", "rebuild", "--org", slug])
    assert result.exit_code == 0, result.output
    assert "events counted" in result.output
    assert client.get("/api/v1/analytics/summary", headers=key).json()["totals"] == before
    assert client.get(f"/api/v1/analytics/messages/{message_id}", headers=key).json()["totals"]["delivered"] == 2
    # Run twice: the same figures, not doubled.
    assert CliRunner().invoke(cli_app, ["analytics", "rebuild", "--org", slug]).exit_code == 0
    assert client.get("/api/v1/analytics/summary", headers=key).json()["totals"] == before
    bad = CliRunner().invoke(cli_app, ["analytics", "rebuild", "--org", slug, "--since", "yesterday"])
    assert bad.exit_code == 2
