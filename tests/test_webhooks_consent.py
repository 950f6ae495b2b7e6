"""Consent events on the webhook stream (issue 10 item 14): ``consent.unsubscribed``,
``consent.subscribed``, ``authorization.signed``, ``authorization.revoked`` and
``message.excluded`` (with its reason code) reach a real HTTP receiver, signed, with ids and codes
only; an endpoint allowed PHI (https) also gets the address concerned.

Consent sits below tracking: it publishes domain events (``core.events``) that the composition
root wires to tracking's handlers, so these tests go through the real API, the real unsubscribe
link and the real delivery pipeline."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from carepost.core.database import org_session
from carepost.delivery import pipeline
from tests.test_consent_delivery import _contact, _recipients, _send
from tests.test_consent_delivery import env  # noqa: F401  (fixture)
from tests.test_webhooks import (  # noqa: F401  (fixtures)
    _receiver, _tls_receiver, allow_private, independent_verify, make_endpoint, receiver, tls_receiver,
)

CONSENT_EVENTS = ["consent.unsubscribed", "consent.subscribed", "authorization.signed", "authorization.revoked",
                  "message.excluded"]


def _flush_webhooks(session) -> None:
    """Make the attempts the queue would make (one per pending delivery)."""
    from carepost.tracking.models import WebhookDelivery
    from carepost.tracking.service import attempt_delivery

    session.rollback()
    for delivery_id in session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.status == "pending")).all():
        attempt_delivery(delivery_id)


def _payloads(receiver, secret, count):
    received = receiver.wait(count)
    return [independent_verify(secret, r.headers, r.body) for r in received]


def test_event_types_are_listed():
    from carepost.tracking.service import EVENT_TYPES

    for name in CONSENT_EVENTS:
        assert name in EVENT_TYPES and EVENT_TYPES[name]


def test_consent_changes_reach_the_receiver_without_phi(env, session, receiver, allow_private):
    peers, sender, key, client = env
    endpoint, secret = make_endpoint(session, sender.org_id, receiver.url("/crm"), event_types=CONSENT_EVENTS)
    contact_id, auth_id = _contact(sender.org_id, "pat@valid.test")  # authorization.signed
    # revoked through the API
    r = client.post(f"/api/v1/authorizations/{auth_id}/revoke", headers=key)
    assert r.status_code == 200
    # a marketing message to the patient is excluded with the reason code
    message_id = _send(client, key, ["pat@valid.test"])
    got = _recipients(client, key, message_id)
    assert got["pat@valid.test"]["status"] == "excluded"
    # unsubscribed from all marketing, then back (staff, through the API)
    for status in ("unsubscribed", "subscribed"):
        r = client.put("/api/v1/subscriptions", json={"contact_id": contact_id, "status": status}, headers=key)
        assert r.status_code == 200, r.text
    # the same unsubscribe twice is one event
    r = client.put("/api/v1/subscriptions", json={"contact_id": contact_id, "status": "subscribed"}, headers=key)
    assert r.status_code == 200
    _flush_webhooks(session)
    payloads = _payloads(receiver, secret, 5)
    by_type = {p["type"]: p["data"] for p in payloads}
    assert sorted(p["type"] for p in payloads) == sorted(CONSENT_EVENTS)
    assert by_type["authorization.signed"]["authorization_id"] == auth_id
    assert by_type["authorization.signed"]["purpose"] == "marketing"
    assert by_type["authorization.signed"]["contact_id"] == contact_id
    assert by_type["authorization.revoked"]["status"] == "revoked"
    assert by_type["authorization.revoked"]["revoked_by_type"] == "api"
    assert by_type["message.excluded"]["message_id"] == message_id
    assert by_type["message.excluded"]["reason_code"] == "authorization_revoked"
    assert by_type["consent.unsubscribed"] == {**by_type["consent.unsubscribed"], "contact_id": contact_id,
                                              "scope": "marketing", "status": "unsubscribed", "source": "api"}
    assert by_type["consent.subscribed"]["status"] == "subscribed"
    for request in receiver.requests:
        body = request.body.decode()
        assert "pat@valid.test" not in body and "Pat" not in body and "signature" not in body.lower()


def test_one_click_unsubscribe_is_announced_with_the_message(env, session, receiver, allow_private):
    import email
    from email import policy as email_policy

    peers, sender, key, client = env
    endpoint, secret = make_endpoint(session, sender.org_id, receiver.url("/crm"),
                                     event_types=["consent.unsubscribed"])
    contact_id, _ = _contact(sender.org_id, "pat@valid.test")
    message_id = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([message_id])
    [received] = peers.mx["valid"].recorder.messages
    msg = email.message_from_bytes(received.data, policy=email_policy.default)
    url = str(msg["List-Unsubscribe"]).split(",")[0].strip().strip("<>")
    client.cookies.clear()
    r = client.post(url.split("localhost:8000", 1)[1], content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 200
    # used again: nothing new to announce
    client.post(url.split("localhost:8000", 1)[1], content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    _flush_webhooks(session)
    [payload] = _payloads(receiver, secret, 1)
    data = payload["data"]
    assert payload["type"] == "consent.unsubscribed"
    assert data["contact_id"] == contact_id and data["message_id"] == message_id and data["recipient_id"]
    assert data["source"] == "link:one_click" and data["scope"] == "marketing"
    assert "pat@valid.test" not in json.dumps(payload)


def test_phi_endpoint_gets_the_address(env, session, tls_receiver, allow_private):
    from carepost.audit.models import AuditEvent

    peers, sender, key, client = env
    phi_endpoint, secret = make_endpoint(session, sender.org_id, tls_receiver.url("/phi"),
                                         event_types=["consent.unsubscribed"], include_phi=True, allow_phi=True)
    contact_id, _ = _contact(sender.org_id, "pat@valid.test", sign=False)
    r = client.put("/api/v1/subscriptions", json={"contact_id": contact_id, "status": "unsubscribed"}, headers=key)
    assert r.status_code == 200
    _flush_webhooks(session)
    [payload] = _payloads(tls_receiver, secret, 1)
    assert payload["data"]["address"] == "pat@valid.test"
    session.rollback()
    assert session.scalars(select(AuditEvent).where(AuditEvent.action == "webhook.phi_disclosed")).all()
