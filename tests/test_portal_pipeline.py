"""End to end through the real pipeline: a message sent with the API to a recipient without
verified TLS goes to the portal; the notification (no PHI) arrives at the recipient's MX; its
link and a one-time code (a second real email) open the message; the read receipt and a reply
show in the API; the sender's portal options (question, expiry) are honoured."""

from __future__ import annotations

import email
import re
from datetime import timedelta
from email import policy as email_policy

import pytest

from carepost.core import clock
from carepost.delivery import pipeline
from tests.fixtures.accounts import csrf_from

PHI = "Your HbA1c is 7.9 %; please call about your insulin dose."


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client):
    return delivery_env, sender, sender.key(), client


def _send(client, key, **over) -> str:
    body = {"from": "Bar Clinic <care@bar.example>", "to": ["Pat Doe <pat@plain.test>"], "subject": "Your lab result",
            "text": PHI, "html": f"<p>{PHI}</p>", "attachments": []}
    body.update(over)
    r = client.post("/api/v1/messages", json=body, headers=key)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _mails(peers, name="plain"):
    return [email.message_from_bytes(m.data, policy=email_policy.default) for m in peers.mx[name].recorder.messages]


def _link(mail) -> str:
    text = mail.get_body(("plain",)).get_content()
    return re.search(r"http://localhost:8000(/p/[A-Za-z0-9_-]+)", text).group(1)


def test_api_message_to_a_domain_without_tls_is_read_in_the_portal(env):
    from carepost.core.queue import huey

    peers, sender, key, client = env
    message_id = _send(client, key)
    pipeline.deliver([message_id])
    [notification] = _mails(peers)
    raw = notification.as_string()
    for phi in ("HbA1c", "insulin", "Pat Doe", "Your lab result", "pat@plain.test"):
        assert phi not in notification["Subject"] and phi not in notification.get_body(("plain",)).get_content()
    assert "Bar Clinic" in raw
    path = _link(notification)
    [pat] = client.get(f"/api/v1/messages/{message_id}", headers=key).json()["recipients"]
    assert pat["method"] == "portal" and pat["status"] == "sent"

    huey.immediate = True
    try:
        page = client.get(path)
        client.post(f"{path}/code", data={"csrf_token": csrf_from(page.text)})
    finally:
        huey.immediate = False
    code_mail = _mails(peers)[-1]
    code = "".join(re.search(r"(\d{4}) (\d{4})", code_mail.get_body(("plain",)).get_content()).groups())
    page = client.get(path)
    r = client.post(f"{path}/verify", data={"code": code, "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get(f"{path}/message")
    assert "Your lab result" in page.text and "HbA1c is 7.9" in page.text

    [pat] = client.get(f"/api/v1/messages/{message_id}", headers=key).json()["recipients"]
    assert pat["status"] == "portal_viewed"
    assert [e["type"] for e in pat["events"]].count("portal_viewed") == 1

    r = client.post(f"{path}/reply", data={"text": "Thanks, I will call.", "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
    assert r.status_code == 303
    client.cookies.clear()
    pm_id = pat["evidence"]["portal_message_id"]
    replies = client.get(f"/api/v1/portal-messages/{pm_id}/replies", headers=sender.key("messages:read", "phi:read_masked"))
    assert replies.json()["items"][0]["text"] == "Thanks, I will call."


def test_sender_question_and_expiry_from_the_api(env):
    peers, sender, key, client = env
    expires = (clock.now() + timedelta(days=3)).isoformat()
    message_id = _send(client, key, portal={"auth": "question", "question": "Your favourite colour?", "answer": "Teal",
                                            "expires_at": expires})
    pipeline.deliver([message_id])
    [notification] = _mails(peers)
    path = _link(notification)
    page = client.get(path)
    assert "Your favourite colour?" in page.text
    r = client.post(f"{path}/verify", data={"answer": "TEAL ", "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    clock.advance(timedelta(days=3, minutes=1))
    r = client.get(path)
    assert r.status_code == 410 and "expired" in r.text
    [pat] = client.get(f"/api/v1/messages/{message_id}", headers=key).json()["recipients"]
    assert pat["status"] == "expired"


def test_portal_answer_is_hashed_at_acceptance_never_stored_readable(env, session):
    """Issue 9 item 17: the answer to the sender's question is Argon2id-hashed before the message
    is stored; messages.portal_enc, decrypted with the organization's keys, holds no answer, and
    the portal still accepts it ignoring case and spacing."""
    import json

    from carepost.core.crypto import get_keyring
    from carepost.delivery.models import Message
    from carepost.portal.models import PortalMessage

    peers, sender, key, client = env
    answer = "Blue Heron Lane"
    message_id = _send(client, key, portal={"auth": "question", "question": "Street you grew up on?", "answer": answer})
    session.rollback()
    message = session.get(Message, message_id)
    stored = get_keyring().decrypt_text(session, message.org_id, "messages", "portal", message.id, message.portal_enc)
    options = json.loads(stored)
    assert "answer" not in options and options["answer_hash"].startswith("$argon2id$")
    for form in (answer, answer.lower(), "blue heron lane", "Blue", "Heron"):
        assert form not in stored
    pipeline.deliver([message_id])
    session.rollback()
    pm = session.query(PortalMessage).filter_by(message_id=message_id).one()
    assert pm.answer_hash == options["answer_hash"]  # the portal copy keeps the same hash, nothing more
    path = _link(_mails(peers)[0])
    page = client.get(path)
    r = client.post(f"{path}/verify", data={"answer": "wrong lane", "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
    assert r.status_code != 303
    page = client.get(path)
    r = client.post(f"{path}/verify", data={"answer": "  blue   HERON lane ", "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
    assert r.status_code == 303


def test_portal_answer_too_short_is_refused_at_acceptance_naming_the_field(env):
    peers, sender, key, client = env
    body = {"from": "Bar Clinic <care@bar.example>", "to": ["pat@plain.test"], "subject": "Your lab result",
            "text": PHI, "portal": {"auth": "question", "question": "Initial?", "answer": " x "}}
    r = client.post("/api/v1/messages", json=body, headers=key)
    assert r.status_code == 422 and "portal.answer" in r.text
