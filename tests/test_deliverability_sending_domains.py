"""Deliverability per sending domain (issue 13 item 7): the rollups carry the sending domain a copy
went out from (fed by real deliveries), the report shows bounce and complaint rates per sending
domain, and the hourly evaluation raises, escalates and clears complaint (0.1% / 0.3%) and
hard-bounce (2% / 5%) alerts per sending domain — audit event and signed webhook naming the
organization's own domain, never a recipient's."""

from __future__ import annotations

import json

from sqlalchemy import select

from carepost.core import clock
from carepost.tracking import rollups
from tests.fixtures.accounts import login_client
from tests.test_deliverability import _alerts, _audit, _evaluate, _key
from tests.test_webhooks import (  # noqa: F401
    _receiver,
    allow_private,
    immediate,
    independent_verify,
    make_endpoint,
    receiver,
)


def _count(session, org_id, domain_id, **metrics):
    for metric, n in metrics.items():
        rollups.add(session, org_id=org_id, at=clock.now(), metric=metric, n=n, receiving_domain="gmail.com",
                    source="api", sending_domain_id=domain_id)
    session.commit()


def test_deliveries_are_counted_per_sending_domain(delivery_env, sender, delivery_queue, client, session):
    from carepost.delivery import pipeline
    from carepost.tracking.rollups import AnalyticsRollup

    key = sender.key()
    ids = []
    for to in ("pat@valid.test", "lee@valid.test"):
        r = client.post("/api/v1/messages", headers=key, json={
            "from": "care@bar.example", "to": [to], "subject": "From your care team", "text": "Hello"})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    pipeline.deliver(ids)
    session.rollback()
    rows = session.execute(select(AnalyticsRollup.metric, AnalyticsRollup.sending_domain_id, AnalyticsRollup.n)
                           .where(AnalyticsRollup.org_id == sender.org_id, AnalyticsRollup.grain == "d")).all()
    counted = {(m, d): n for m, d, n in rows}
    assert counted[("delivered", sender.domain_id)] == 2 and counted[("accepted", sender.domain_id)] == 2
    assert not [r for r in rows if r[1] == ""]
    r = client.get("/api/v1/deliverability/sending-domains", headers=_key(session, sender.org_id))
    assert r.status_code == 200, r.text
    [row] = r.json()["data"]
    assert (row["sending_domain"], row["sending_domain_id"], row["sent"], row["delivered"]) == (
        "bar.example", sender.domain_id, 2, 2)
    assert row["rates"]["complaint_rate"]["status"] == "too_little_mail"
    # The analytics API's breakdown and filter by sending domain say the same.
    key = _key(session, sender.org_id, ("analytics:read", "phi:read_unmasked"))
    rows = client.get("/api/v1/analytics/breakdown?by=sending_domain", headers=key).json()["rows"]
    assert [(x["key"], x["counts"]["delivered"]) for x in rows] == [(sender.domain_id, 2)]
    assert client.get(f"/api/v1/analytics/summary?sending_domain_id={sender.domain_id}",
                      headers=key).json()["totals"]["delivered"] == 2
    assert client.get("/api/v1/deliverability/sending-domains?days=3", headers=key).status_code == 422


def test_alerts_per_sending_domain(session, org, make_user, client, receiver, allow_private, immediate):  # noqa: F811
    from carepost.core.database import org_session
    from carepost.delivery import service

    with org_session(org.id) as s:
        news = service.create_sending_domain(s, org.id, "news.clinic.example")
        care = service.create_sending_domain(s, org.id, "care.clinic.example")
        s.commit()
        news_id, care_id = news.id, care.id
    _endpoint, secret = make_endpoint(session, org.id, receiver.url(),
                                      event_types=("deliverability.threshold_crossed", "deliverability.threshold_cleared"))
    # The newsletter domain: 0.2% complaints (over the recommended 0.1%) and 6% hard bounces (over 5%);
    # the care domain is clean. Across the organization Gmail's complaint rate is 0.1% — the warning too.
    _count(session, org.id, news_id, sent=1000, delivered=1000, complained=2, bounced_hard=60)
    _count(session, org.id, care_id, sent=1000, delivered=1000)
    _evaluate()
    alerts = [a for a in _alerts(session, org.id) if a.sending_domain_id]
    assert sorted((a.sending_domain, a.rate, a.level, a.provider) for a in alerts) == [
        ("news.clinic.example", "bounce_rate", "limit", "all"),
        ("news.clinic.example", "complaint_rate", "warning", "all")]
    complaint = next(a for a in alerts if a.rate == "complaint_rate")
    assert (complaint.value, complaint.numerator, complaint.denominator) == (0.002, 2, 1000)
    payloads = [independent_verify(secret, r.headers, r.body) for r in receiver.wait(3)]
    by_scope = {(p["data"]["provider"], p["data"].get("sending_domain"), p["data"]["rate"]): p["data"] for p in payloads}
    assert by_scope[("all", "news.clinic.example", "complaint_rate")] == {
        "alert_id": complaint.id, "provider": "all", "sending_domain_id": news_id,
        "sending_domain": "news.clinic.example", "rate": "complaint_rate", "level": "warning", "value": 0.002,
        "level_value": 0.001, "numerator": 2, "denominator": 1000, "window_days": 7, "state": "raised"}
    assert ("gmail.com", None, "bounce_rate") in by_scope  # 60 of 2,000 = 3%: the provider's warning

    # The API and the page show the sending domains, their rates and the alerts.
    key = _key(session, org.id)
    rows = {r["sending_domain"]: r for r in client.get("/api/v1/deliverability/sending-domains",
                                                       headers=key).json()["data"]}
    assert rows["news.clinic.example"]["rates"]["complaint_rate"]["status"] == "warning"
    assert rows["news.clinic.example"]["rates"]["bounce_rate"]["status"] == "limit"
    assert rows["care.clinic.example"]["rates"]["complaint_rate"]["status"] == "ok"
    listed = client.get("/api/v1/deliverability/alerts?active=true", headers=key).json()["data"]
    assert {(a["sending_domain"], a["rate"]) for a in listed if a["sending_domain_id"]} == {
        ("news.clinic.example", "bounce_rate"), ("news.clinic.example", "complaint_rate")}
    owner = make_user(org, role="owner")
    login_client(client, owner)
    home = client.get("/app").text
    assert "from news.clinic.example" in home
    page = client.get("/app/deliverability").text
    assert 'data-testid="sending-domain-table"' in page and 'data-sending-domain="news.clinic.example"' in page

    # The newsletter domain's complaints climb over 0.3%: escalated; then clean mail clears both.
    _count(session, org.id, news_id, complained=2)
    _evaluate()
    complaint = next(a for a in _alerts(session, org.id) if a.sending_domain_id and a.rate == "complaint_rate")
    assert (complaint.level, complaint.value) == ("limit", 0.004)
    _count(session, org.id, news_id, sent=99000, delivered=99000)
    _evaluate()
    mine = [a for a in _alerts(session, org.id) if a.sending_domain_id]
    assert all(a.cleared_reason == "back_under" for a in mine) and len(mine) == 2
    actions = [(e.action, e.details.get("sending_domain")) for e in _audit(session, org.id)]
    assert ("deliverability.threshold_cleared", "news.clinic.example") in actions
    everything = json.dumps([[independent_verify(secret, r.headers, r.body) for r in receiver.wait(3)],
                             [e.details for e in _audit(session, org.id)]])
    assert "@" not in everything and "valid.test" not in everything


def test_other_organizations_sending_domains_are_not_seen(session, org, client):
    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session
    from carepost.delivery import service

    other = create_organization(session, "Other Clinic")
    session.commit()
    with org_session(other.id) as s:
        theirs = service.create_sending_domain(s, other.id, "theirs.example")
        s.commit()
        theirs_id = theirs.id
    _count(session, other.id, theirs_id, sent=500, delivered=500, complained=5)
    assert client.get("/api/v1/deliverability/sending-domains", headers=_key(session, org.id)).json()["data"] == []
    assert client.get("/api/v1/deliverability/sending-domains",
                      headers=_key(session, other.id)).json()["data"][0]["sending_domain"] == "theirs.example"
