"""Business associates (issue 16 item 9): the register through the API (bad input 422 naming the
field), PHI refused through an organization relay and to a PHI webhook without a BAA on record —
with the real pipeline, a real relay (aiosmtpd over STARTTLS) and a real HTTPS receiver — and sent
once a BAA is recorded; the responsibility matrix lists the associates and the gaps."""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.delivery import pipeline
from tests.test_delivery_org_relay import RELAY_PASSWORD, relay  # noqa: F401
from tests.test_delivery_worker import env  # noqa: F401
from tests.test_webhooks import (  # noqa: F401
    _tls_receiver,
    allow_private,
    immediate,
    make_endpoint,
    record_baa,
    tls_receiver,
)


def _officer(env):  # noqa: F811
    from carepost.accounts.credentials import create_credential

    cred, secret = create_credential(env.sender.session, env.sender.org_id, name="officer",
                                     scopes=["org:manage", "compliance:manage", "phi:read_unmasked"])
    env.sender.session.commit()
    return {"Authorization": f"Bearer {cred.key_id}.{secret}"}


def test_phi_is_refused_through_an_organization_relay_without_a_baa(env, relay):  # noqa: F811
    h = _officer(env)
    r = env.client.patch("/api/v1/delivery-settings", headers=h,
                         json={"relay": {"host": relay.host, "username": "clinic", "password": RELAY_PASSWORD,
                                         "enforces_tls": True}})
    assert r.status_code == 200, r.text

    first = env.send(to=["Pat Doe <pat@valid.test>"])
    pipeline.deliver([first])
    pat = env.one(first)
    assert pat["status"] == "failed", pat
    assert "no business associate agreement" in pat["reason"] and "relay.bar.example" in pat["reason"]
    assert relay.recorder.messages == []  # nothing crossed the relay

    # The register refuses bad input, naming the field.
    def field(body):
        resp = env.client.post("/api/v1/compliance/business-associates", json=body, headers=h)
        assert resp.status_code == 422, resp.text
        return resp.json()["error"]["field"]

    good = {"name": "Bar Relay Co", "kind": "smtp_relay", "ref": "relay.bar.example", "scope": "Outbound email with PHI",
            "baa_signed_on": (date.today() - timedelta(days=10)).isoformat(),
            "baa_expires_on": (date.today() + timedelta(days=30)).isoformat()}
    assert field({**good, "kind": "smtp"}) == "kind"
    assert field({**good, "name": " "}) == "name"
    assert field({**good, "ref": ""}) == "ref"
    assert field({**good, "baa_signed_on": (date.today() + timedelta(days=2)).isoformat()}) == "baa_signed_on"
    assert field({**good, "baa_expires_on": (date.today() - timedelta(days=20)).isoformat()}) == "baa_expires_on"
    assert field({**good, "baa_signed_on": "2026-02-30"}) == "baa_signed_on"

    # A BAA not yet signed does not count; a signed one does.
    r = env.client.post("/api/v1/compliance/business-associates", json={**good, "baa_signed_on": None}, headers=h)
    assert r.status_code == 201 and r.json()["state"] == "no_baa"
    second = env.send(to=["Pat Doe <pat@valid.test>"])
    pipeline.deliver([second])
    assert env.one(second)["status"] == "failed"
    r = env.client.patch(f"/api/v1/compliance/business-associates/{r.json()['id']}", headers=h,
                         json={"baa_signed_on": good["baa_signed_on"]})
    assert r.status_code == 200 and r.json()["state"] == "renewal_due", r.text  # renewal within 60 days
    third = env.send(to=["Pat Doe <pat@valid.test>"])
    pipeline.deliver([third])
    assert env.one(third)["status"] == "sent", env.one(third)
    assert [m.rcpt_tos for m in relay.recorder.messages] == [["pat@valid.test"]]

    # The matrix lists the associate with its BAA state; no gap is left.
    r = env.client.get("/api/v1/compliance/responsibilities", headers=h)
    assert r.status_code == 200
    m = r.json()
    assert [(a["name"], a["state"]) for a in m["business_associates"]] == [("Bar Relay Co", "renewal_due")]
    assert m["gaps"] == [] and m["carepost"] and m["organization"]


def test_phi_webhook_refused_without_a_baa_then_sent(session, org, tls_receiver, allow_private, immediate):  # noqa: F811
    from carepost.core.database import org_session
    from carepost.tracking.models import WebhookDelivery
    from carepost.tracking.service import emit, replay

    ep, _secret = make_endpoint(session, org.id, tls_receiver.url("/phi"), event_types=["consent.unsubscribed"],
                                include_phi=True, allow_phi=True, baa=False)
    with org_session(org.id) as work:
        emit(work, org.id, "consent.unsubscribed", {"contact_id": "c" * 32, "topic_id": None},
             phi={"address": "pat@valid.test"})
        work.commit()
    session.rollback()
    [d] = session.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == ep.id)).all()
    assert d.status == "failed" and "no business associate agreement" in d.last_error and ep.id in d.last_error
    assert tls_receiver.requests == [] if hasattr(tls_receiver, "requests") else True
    assert session.scalar(select(AuditEvent).where(AuditEvent.action == "webhook.phi_refused",
                                                   AuditEvent.target_id == ep.id)) is not None
    from carepost.compliance import associates

    with org_session(org.id) as s:
        assert [f["covered"] for f in associates.phi_flows(s, org.id)] == [False]
    record_baa(session, org.id, "webhook", ep.id)
    with org_session(org.id) as work:
        replay(work, org.id, ep.id, d.id)
        work.commit()
    [req] = tls_receiver.wait(1)
    assert b"pat@valid.test" in req.body
    with org_session(org.id) as s:
        assert [f["covered"] for f in associates.phi_flows(s, org.id)] == [True]
