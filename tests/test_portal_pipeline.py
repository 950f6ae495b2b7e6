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
from sqlalchemy import select

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


def _contact(sender, email: str, birth: str = "1980-01-02") -> None:
    from datetime import date

    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(sender.org_id) as s:
        save_contact(s, sender.org_id, ContactIn(email=email, birth_date=date.fromisoformat(birth)))
        s.commit()


def test_api_message_to_a_domain_without_tls_is_read_in_the_portal(env):
    """Issue 9 item 3: the link went down a path without verified TLS, so the second factor may
    not follow it: the code email is refused there (not sent at all), and the recipient confirms
    the date of birth the organization holds instead."""
    from carepost.core.queue import huey

    peers, sender, key, client = env
    _contact(sender, "pat@plain.test")
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

    page = client.get(path)
    assert 'data-testid="birth-date-form"' in page.text
    huey.immediate = True
    try:
        client.post(f"{path}/code", data={"csrf_token": csrf_from(page.text)})
    finally:
        huey.immediate = False
    # plain.test offers no STARTTLS: the code never left (only the notification arrived).
    assert len(_mails(peers)) == 1
    page = client.get(path)
    assert 'data-testid="code-unavailable"' in page.text
    r = client.post(f"{path}/verify", data={"birth_date": "1980-02-01", "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
    assert r.status_code == 422 and "date of birth is not right" in r.text
    page = client.get(path)
    r = client.post(f"{path}/verify", data={"birth_date": "1980-01-02", "csrf_token": csrf_from(page.text)},
                    follow_redirects=False)
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


def test_code_goes_only_over_verified_tls(env, session, make_user):
    """The code email is a second factor: sent when the recipient's server offers verified TLS
    (here a secure-mode message to valid.test, held in the portal by policy), with that TLS
    recorded in the audit trail."""
    from carepost.audit.models import AuditEvent
    from carepost.core.queue import huey
    from tests.fixtures.accounts import login_client

    peers, sender, key, client = env
    owner = make_user(sender.org_id, role="owner")
    csrf = login_client(client, owner)
    assert client.patch("/api/v1/delivery-settings", json={"security_mode": "secure"},
                        headers={"X-CSRF-Token": csrf}).status_code == 200
    client.cookies.clear()
    message_id = _send(client, key, to=["pat@valid.test"])
    pipeline.deliver([message_id])
    [notification] = _mails(peers, "valid")
    path = _link(notification)
    page = client.get(path)
    assert 'data-testid="birth-date-form"' not in page.text  # no contact on file: code only
    huey.immediate = True
    try:
        client.post(f"{path}/code", data={"csrf_token": csrf_from(page.text)})
    finally:
        huey.immediate = False
    code_mail = _mails(peers, "valid")[-1]
    assert peers.mx["valid"].recorder.messages[-1].tls
    code = "".join(re.search(r"(\d{4}) (\d{4})", code_mail.get_body(("plain",)).get_content()).groups())
    page = client.get(path)
    r = client.post(f"{path}/verify", data={"code": code, "csrf_token": csrf_from(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    session.rollback()
    sent = session.scalars(select(AuditEvent).where(AuditEvent.action == "portal.code.sent")).all()
    assert [e.details["status"] for e in sent] == ["delivered"] and sent[0].details["tls"].startswith("TLSv1.")


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
