"""Bounces wired into delivery, end to end with real peers: a message goes out through the pipeline
with its VERP return path; the DSN the remote system sends back to that return path arrives at the
inbound server, suppresses the address, and the next message to it is never sent. A 5xx refusal
during the SMTP transaction has the same effect. The message events of both reach webhooks."""

from __future__ import annotations

import smtplib

import pytest

from carepost.delivery import pipeline
from tests.test_bounces import sample
from tests.test_bounces_inbound import inbound  # noqa: F401
from tests.test_webhooks import _receiver, independent_verify, receiver  # noqa: F401

PATIENT = "pat@valid.test"


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client, monkeypatch):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_WEBHOOK_ALLOW_PRIVATE", "true")  # the webhook receiver is on 127.0.0.1
    reset_settings()
    key = sender.key("messages:send", "messages:read", "phi:read_unmasked", "webhooks:manage")
    return delivery_env, sender, key, client


def _send(client, key, to=PATIENT, subject="Your appointment"):
    r = client.post("/api/v1/messages", json={"from": "Bar Clinic <care@bar.example>", "to": [to], "subject": subject,
                                              "text": "See you on Monday.", "purpose": "treatment"}, headers=key)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _recipient(client, key, message_id):
    r = client.get(f"/api/v1/messages/{message_id}", headers=key)
    assert r.status_code == 200, r.text
    [one] = r.json()["recipients"]
    return one


def test_a_bounce_stops_all_further_mail_to_the_address(env, inbound, session, receiver):  # noqa: F811
    from carepost.consent.service import is_suppressed

    peers, sender, key, client = env
    mx = peers.mx["valid"].recorder
    hook = client.post("/api/v1/webhooks", json={"url": receiver.url(), "event_types": ["message.delivered",
                                                                                        "message.bounced"]},
                       headers=key).json()

    first = _send(client, key)
    pipeline.deliver([first])
    [received] = mx.messages
    verp = received.mail_from
    assert verp.startswith("b+") and verp.endswith("@bounces.bar.example") and PATIENT not in verp
    assert _recipient(client, key, first)["status"] == "delivered"

    # The recipient's system bounces it later, to the return path.
    with smtplib.SMTP("127.0.0.1", inbound, timeout=10) as smtp:
        smtp.sendmail("", [verp], sample("gmail_hard.eml", verp, PATIENT))
    got = _recipient(client, key, first)
    assert got["status"] == "bounced" and got["reason"].startswith("hard bounce: 5.1.1")
    assert [e["type"] for e in got["events"]][-1] == "bounced"
    session.rollback()
    assert is_suppressed(session, sender.org_id, PATIENT) == "bounce_hard"

    second = _send(client, key, subject="Your results are ready")
    pipeline.deliver([second])
    got = _recipient(client, key, second)
    # 5.1.1 says the mailbox does not exist: the consent engine reports it as such.
    assert got["status"] == "excluded" and got["reason"] == "invalid_address"
    assert len(mx.messages) == 1  # nothing more was sent

    # The webhook saw the delivery and the bounce, signed, without the address.
    payloads = [independent_verify(hook["secret"], r.headers, r.body) for r in receiver.wait(2)]
    assert [p["type"] for p in payloads] == ["message.delivered", "message.bounced"]
    assert payloads[1]["data"]["recipient_id"] == payloads[0]["data"]["recipient_id"]
    assert all(PATIENT not in r.body.decode() for r in receiver.requests)


def test_a_5xx_refusal_suppresses_the_address(env, session):
    from carepost.consent.service import is_suppressed

    peers, sender, key, client = env
    mx = peers.mx["valid"].recorder
    mx.rcpt_replies["gone@valid.test"] = "550 5.1.1 <gone@valid.test>: Recipient address rejected: User unknown"
    first = _send(client, key, "gone@valid.test")
    pipeline.deliver([first])
    got = _recipient(client, key, first)
    assert got["status"] == "bounced"
    bounced = [e for e in got["events"] if e["type"] == "bounced"]
    assert bounced and "gone@valid.test" not in str(bounced)
    session.rollback()
    assert is_suppressed(session, sender.org_id, "gone@valid.test") == "bounce_hard"
    second = _send(client, key, "gone@valid.test")
    pipeline.deliver([second])
    assert _recipient(client, key, second)["reason"] == "invalid_address"
    assert mx.messages == []


def test_accepted_messages_announce_message_queued(env, session, receiver):  # noqa: F811
    from sqlalchemy import select

    from carepost.tracking.models import WebhookDelivery
    from carepost.tracking.service import attempt_delivery

    peers, sender, key, client = env
    hook = client.post("/api/v1/webhooks", json={"url": receiver.url(), "event_types": ["message.queued"]},
                       headers=key).json()
    message_id = _send(client, key)
    session.rollback()
    [delivery] = session.scalars(select(WebhookDelivery)).all()
    assert attempt_delivery(delivery.id) == "succeeded"  # the test's queue has no worker: attempt it here
    [request] = receiver.wait(1)
    payload = independent_verify(hook["secret"], request.headers, request.body)
    assert payload["type"] == "message.queued"
    assert payload["data"]["message_id"] == message_id and payload["data"]["status"] == "queued"
    assert PATIENT not in request.body.decode()
