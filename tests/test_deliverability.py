"""Deliverability per receiving provider and its alerts (issue 13 item 7), on both databases.

Counts go in through the real rollup API (:func:`carepost.tracking.rollups.add`, committed with the
session), the receiving domain taken from real message recipients (their domain blind index mapped
to a provider by :func:`rollups.provider_of_index`). The hourly task raises an alert when Gmail's
complaint rate crosses 0.1% and escalates it over 0.3% — each time an audit event and a signed
``deliverability.threshold_crossed`` webhook to a real HTTP receiver — shows it on the dashboard,
and clears it when the rate is back under. No alert, audit event, webhook or API answer carries a
recipient's address or domain (a family domain is only ever "other")."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import select

from carepost.accounts.credentials import create_credential
from carepost.core import clock
from carepost.tracking import rollups
from tests.fixtures.accounts import login_client
from tests.test_bounces import make_sent
from tests.test_webhooks import _receiver, allow_private, immediate, independent_verify, make_endpoint, receiver  # noqa: F401

GMAIL_PATIENT = "jane.q.patient@gmail.com"
FAMILY_PATIENT = "jane.q.patient@doe-family-clinic.example"


def _key(session, org_id, scopes=("analytics:read",)):
    cred, secret = create_credential(session, org_id, name="analyst", scopes=list(scopes))
    session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def _provider_of(session, org_id, address) -> str:
    """Send (a delivered recipient row, as the pipeline leaves it) and map its domain index the way
    the rollup feed does."""
    from carepost.delivery.models import MessageRecipient

    sent = make_sent(session, org_id, address)
    recipient = session.get(MessageRecipient, sent.recipient_id)
    return rollups.provider_of_index(session, org_id, recipient.domain_index)


def _count(session, org_id, provider, *, at=None, **metrics):
    at = at or clock.now()
    for metric, n in metrics.items():
        rollups.add(session, org_id=org_id, at=at, metric=metric, n=n, receiving_domain=provider, source="api")
    session.commit()


def _row(view, provider):
    return next(r for r in view["data"] if r["provider"] == provider)


def test_rates_per_provider_and_window(session, org, client):
    gmail = _provider_of(session, org.id, GMAIL_PATIENT)
    family = _provider_of(session, org.id, FAMILY_PATIENT)
    assert (gmail, family) == ("gmail.com", "other")
    _count(session, org.id, gmail, sent=1000, delivered=990, deferred=30, bounced_hard=10, complained=1)
    _count(session, org.id, "googlemail.com", sent=200, delivered=200, complained=1)  # Google, the same provider
    _count(session, org.id, "aol.com", sent=300, delivered=240, bounced_hard=30, bounced_soft=30)  # Yahoo runs AOL
    _count(session, org.id, "hotmail.com", sent=50, delivered=50, complained=1)  # too little mail to judge
    _count(session, org.id, family, sent=400, delivered=380, bounced_hard=4, bounced_soft=16)
    _count(session, org.id, gmail, at=clock.now() - timedelta(days=20), sent=5000, delivered=5000, complained=50)

    headers = _key(session, org.id)
    view = client.get("/api/v1/deliverability/domains", headers=headers).json()
    assert view["window_days"] == 7 and view["min_volume"] == 100
    assert [r["provider"] for r in view["data"]] == ["gmail.com", "yahoo.com", "outlook.com", "other"]
    g = _row(view, "gmail.com")
    assert (g["sent"], g["delivered"], g["complained"], g["deferred"], g["bounced_hard"]) == (1200, 1190, 2, 30, 10)
    assert g["gmail_yahoo_rules"] is True
    complaint = g["rates"]["complaint_rate"]
    assert complaint["value"] == round(2 / 1190, 6) and complaint["status"] == "warning"  # over 0.1%, under 0.3%
    assert (complaint["warning"], complaint["limit"]) == (0.001, 0.003)
    assert g["rates"]["deferral_rate"]["value"] == 0.025 and g["rates"]["deferral_rate"]["status"] == "ok"
    y = _row(view, "yahoo.com")
    assert y["rates"]["bounce_rate"]["value"] == 0.1 and y["rates"]["bounce_rate"]["status"] == "limit"
    assert y["delivery_rate"] == 0.8 and y["soft_bounce_rate"] == 0.1
    assert _row(view, "outlook.com")["rates"]["complaint_rate"]["status"] == "too_little_mail"
    o = _row(view, "other")
    assert o["rates"]["bounce_rate"]["value"] == 0.01 and o["rates"]["bounce_rate"]["status"] == "ok"
    assert o["gmail_yahoo_rules"] is False
    assert view["total"]["sent"] == 1200 + 300 + 50 + 400
    assert "doe-family" not in json.dumps(view) and "@" not in json.dumps(view["data"])

    month = client.get("/api/v1/deliverability/domains?days=30", headers=headers).json()
    g30 = _row(month, "gmail.com")
    assert g30["sent"] == 6200 and g30["rates"]["complaint_rate"]["status"] == "limit"  # 52 / 6190

    r = client.get("/api/v1/deliverability/domains?days=14", headers=headers)
    assert r.status_code == 422 and "days" in r.text
    assert client.get("/api/v1/deliverability/domains",
                      headers=_key(session, org.id, ("messages:send",))).status_code == 403


def test_other_organizations_counts_are_not_seen(session, org, client):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    _count(session, other.id, "gmail.com", sent=500, delivered=500, complained=5)
    view = client.get("/api/v1/deliverability/domains", headers=_key(session, org.id)).json()
    assert view["data"] == [] and view["total"]["sent"] == 0


def _evaluate():
    from carepost.tracking.tasks import evaluate_deliverability

    evaluate_deliverability.call_local()


def _alerts(session, org_id):
    from carepost.tracking.deliverability import DeliverabilityAlert

    session.rollback()
    return list(session.scalars(select(DeliverabilityAlert).where(DeliverabilityAlert.org_id == org_id)
                                .order_by(DeliverabilityAlert.raised_at)
                                .execution_options(populate_existing=True)))


def _audit(session, org_id, prefix="deliverability."):
    from carepost.audit.models import AuditEvent

    return [e for e in session.scalars(select(AuditEvent).where(AuditEvent.org_id == org_id)
                                       .order_by(AuditEvent.seq)) if e.action.startswith(prefix)]


def test_alert_raised_escalated_and_cleared(session, org, make_user, client, receiver, allow_private, immediate):  # noqa: F811
    endpoint, secret = make_endpoint(session, org.id, receiver.url(),
                                     event_types=("deliverability.threshold_crossed", "deliverability.threshold_cleared"))
    gmail = _provider_of(session, org.id, GMAIL_PATIENT)
    family = _provider_of(session, org.id, FAMILY_PATIENT)
    _count(session, org.id, gmail, sent=1000, delivered=1000, complained=2)  # 0.2%: over the recommended 0.1%
    _count(session, org.id, family, sent=1000, delivered=1000, complained=9)  # 0.9% at "other"
    _evaluate()

    alerts = _alerts(session, org.id)
    assert sorted((a.provider, a.rate, a.level, a.cleared_at) for a in alerts) == [
        ("gmail.com", "complaint_rate", "warning", None), ("other", "complaint_rate", "limit", None)]
    gmail_alert = next(a for a in alerts if a.provider == "gmail.com")
    assert (gmail_alert.value, gmail_alert.numerator, gmail_alert.denominator) == (0.002, 2, 1000)
    requests = receiver.wait(2)
    payloads = [independent_verify(secret, r.headers, r.body) for r in requests]
    assert {p["type"] for p in payloads} == {"deliverability.threshold_crossed"}
    by_provider = {p["data"]["provider"]: p["data"] for p in payloads}
    assert by_provider["gmail.com"] == {
        "alert_id": gmail_alert.id, "provider": "gmail.com", "rate": "complaint_rate", "level": "warning",
        "value": 0.002, "level_value": 0.001, "numerator": 2, "denominator": 1000, "window_days": 7, "state": "raised"}
    assert [(e.action, e.target_id) for e in _audit(session, org.id)][:1] == [
        ("deliverability.threshold_crossed", alerts[0].id)]

    # Running again changes nothing: no new alert, no new event.
    _evaluate()
    assert len(_alerts(session, org.id)) == 2 and len(receiver.wait(3, timeout=0.5)) == 2

    # The dashboard and the deliverability page show the banner.
    owner = make_user(org, role="owner")
    login_client(client, owner)
    home = client.get("/app").text
    assert 'data-testid="deliverability-banner"' in home and "gmail.com" in home and "over the 0.3% limit" in home
    page = client.get("/app/deliverability").text
    assert page.count('data-active="true"') == 2

    # Gmail goes over 0.3%: the alert escalates (one alert, level limit) and is announced again.
    _count(session, org.id, gmail, complained=2)
    _evaluate()
    gmail_alert = next(a for a in _alerts(session, org.id) if a.provider == "gmail.com")
    assert (gmail_alert.level, gmail_alert.level_value, gmail_alert.value) == ("limit", 0.003, 0.004)
    third = independent_verify(secret, receiver.wait(3)[2].headers, receiver.wait(3)[2].body)
    assert third["data"]["state"] == "escalated" and third["data"]["level"] == "limit"

    # Enough clean mail brings Gmail back under 0.1%: cleared, announced; "other" stays open.
    _count(session, org.id, gmail, sent=9000, delivered=9000)
    _evaluate()
    alerts = {a.provider: a for a in _alerts(session, org.id)}
    assert alerts["gmail.com"].cleared_at is not None and alerts["gmail.com"].cleared_reason == "back_under"
    assert alerts["other"].cleared_at is None
    cleared = independent_verify(secret, receiver.wait(4)[3].headers, receiver.wait(4)[3].body)
    assert cleared["type"] == "deliverability.threshold_cleared" and cleared["data"]["cleared_reason"] == "back_under"
    assert [e.action for e in _audit(session, org.id)] == [
        "deliverability.threshold_crossed", "deliverability.threshold_crossed", "deliverability.threshold_crossed",
        "deliverability.threshold_cleared"]

    listed = client.get("/api/v1/deliverability/alerts?active=true", headers=_key(session, org.id)).json()["data"]
    assert [a["provider"] for a in listed] == ["other"]
    history = client.get("/api/v1/deliverability/alerts", headers=_key(session, org.id)).json()["data"]
    assert {(a["provider"], a["active"]) for a in history} == {("gmail.com", False), ("other", True)}

    # No PHI anywhere: not the address, not the family's domain, not the local part.
    everything = json.dumps([
        [p for p in (independent_verify(secret, r.headers, r.body) for r in receiver.wait(4))],
        [e.details for e in _audit(session, org.id)], history,
    ])
    for needle in ("jane", "doe-family", "@", "patient"):
        assert needle not in everything.lower(), needle


def test_alerts_need_enough_mail_and_clear_when_mail_stops(session, org):
    _count(session, org.id, "yahoo.com", sent=50, delivered=50, complained=5)  # 10%, but 50 messages
    _evaluate()
    assert _alerts(session, org.id) == []

    from carepost.core.database import org_session
    from carepost.tracking import deliverability

    _count(session, org.id, "yahoo.com", sent=100, delivered=100)
    _evaluate()
    [alert] = _alerts(session, org.id)
    assert (alert.provider, alert.level) == ("yahoo.com", "limit")
    # Eight days later no mail is left in the 7-day window: the alert cannot be judged, so it clears.
    with org_session(org.id) as work:
        deliverability.evaluate(work, org.id, now=clock.now() + timedelta(days=8))
        work.commit()
    [alert] = _alerts(session, org.id)
    assert alert.cleared_reason == "too_little_mail"
