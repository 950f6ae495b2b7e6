"""A message's topic is a field (issue 10 item 6): ``topic`` in the API (by id or short name) and
in the message view, ``X-CarePost-Topic`` on SMTP submission, stored in ``messages.topic_id``;
eligibility and the unsubscribe link use it (old ``topic:<key>`` tags are still read, see
tests/test_unsubscribe.py); an unknown or archived topic is refused naming ``topic``; double
opt-in applies to opt-in topics only. Through the real API, pipeline and SMTP peers."""

from __future__ import annotations

import email
from email import policy as email_policy

from sqlalchemy import select

from carepost.core.database import org_session
from carepost.delivery import pipeline
from carepost.delivery.models import Message
from tests.test_consent_delivery import _contact, _recipients, _send
from tests.test_consent_delivery import env  # noqa: F401  (fixture)
from tests.test_delivery_submission import Submission, message, submission  # noqa: F401  (fixture)


def _topic(client, headers, **body):
    r = client.post("/api/v1/topics", json={"key": "screenings", "name": "Screening reminders", **body}, headers=headers)
    assert r.status_code in (200, 201), r.text
    return r.json()


def _eligible(org_id, contact_id, topic_id=None):
    from carepost.consent import eligibility

    with org_session(org_id) as s:
        return eligibility.check_eligibility(s, [contact_id], "marketing", topic_id, "email", org_id=org_id)[contact_id]


def test_topic_field_drives_eligibility_and_the_unsubscribe_link(env, session):
    peers, sender, key, client = env
    topic = _topic(client, key)
    contact_id, _ = _contact(sender.org_id, "pat@valid.test")
    message_id = _send(client, key, ["pat@valid.test"], topic="screenings")
    r = client.get(f"/api/v1/messages/{message_id}", headers=key)
    assert r.json()["topic"] == topic["id"]
    session.rollback()
    row = session.get(Message, message_id)
    assert row.topic_id == topic["id"] and not any(t.startswith("topic:") for t in row.tags or [])
    pipeline.deliver([message_id])
    [received] = peers.mx["valid"].recorder.messages
    msg = email.message_from_bytes(received.data, policy=email_policy.default)
    url = str(msg["List-Unsubscribe"]).split(",")[0].strip().strip("<>")
    client.cookies.clear()
    r = client.post(url.split("localhost:8000", 1)[1], content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 200
    # the link opted out of that topic only
    assert _eligible(sender.org_id, contact_id, topic["id"]) == "unsubscribed_topic"
    assert _eligible(sender.org_id, contact_id) == "eligible"
    # the next message of the topic (named by id this time) is excluded; one without a topic goes
    second = _send(client, key, ["pat@valid.test"], topic=topic["id"])
    assert _recipients(client, key, second)["pat@valid.test"]["reason"] == "unsubscribed_topic"
    third = _send(client, key, ["pat@valid.test"])
    assert _recipients(client, key, third)["pat@valid.test"]["status"] == "queued"
    assert client.get(f"/api/v1/messages/{third}", headers=key).json()["topic"] is None


def test_unknown_and_archived_topics_are_refused_naming_the_field(env):
    peers, sender, key, client = env
    topic = _topic(client, key)
    body = {"from": "Bar Clinic <care@bar.example>", "to": ["pat@valid.test"], "subject": "Flu clinic",
            "text": "Saturday hours.", "purpose": "marketing"}
    r = client.post("/api/v1/messages", json={**body, "topic": "no-such-topic"}, headers=key)
    assert r.status_code == 422 and "topic" in r.text
    r = client.patch(f"/api/v1/topics/{topic['id']}", json={"name": "Screenings (old)", "archived": True}, headers=key)
    assert r.status_code == 200 and r.json()["archived"] is True and r.json()["name"] == "Screenings (old)"
    r = client.post("/api/v1/messages", json={**body, "topic": "screenings"}, headers=key)
    assert r.status_code == 422 and "archived" in r.text and "topic" in r.text


def test_double_opt_in_only_for_opt_in_topics(env):
    peers, sender, key, client = env
    opt_out = _topic(client, key, key="news", name="News", double_opt_in=True)
    assert opt_out["double_opt_in"] is False  # an opt-out topic never asks for a confirmation
    opt_in = _topic(client, key, key="offers", name="Offers", opt_in_required=True, double_opt_in=True)
    assert opt_in["double_opt_in"] is True
    r = client.patch(f"/api/v1/topics/{opt_in['id']}", json={"opt_in_required": False}, headers=key)
    assert r.json()["double_opt_in"] is False
    contact_id, _ = _contact(sender.org_id, "pat@valid.test", sign=False)
    r = client.put("/api/v1/subscriptions", json={"contact_id": contact_id, "topic_id": opt_out["id"],
                                                  "status": "subscribed"}, headers=key)
    assert r.status_code == 200 and r.json()["status"] == "subscribed"


def test_x_carepost_topic_header_on_submission(submission, session):
    from carepost.consent import service

    with org_session(submission.sender.org_id) as s:
        topic = service.create_topic(s, submission.sender.org_id, key="flu-clinic", name="Flu clinic")
        s.commit()
        topic_id = topic.id
    key_id, secret = submission.credential()
    with submission.connect() as client:
        client.login(key_id, secret)
        client.send_message(message(X_CarePost_Topic="flu-clinic"), to_addrs=["pat@valid.test"])
        import smtplib

        import pytest

        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.send_message(message(X_CarePost_Topic="nope"), to_addrs=["pat@valid.test"])
        assert "topic" in str(exc.value)
    session.rollback()
    [row] = session.scalars(select(Message)).all()
    assert row.topic_id == topic_id
