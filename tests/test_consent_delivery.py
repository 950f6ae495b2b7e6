"""Consent wired into delivery, end to end against real SMTP peers: a marketing message to a
patient whose authorization was revoked between acceptance and delivery is excluded at claim
time with the reason; marketing carries DKIM-signed RFC 8058 headers whose link unsubscribes at
once; the copy of a signed authorization goes out through the pipeline."""

from __future__ import annotations

import email
from email import policy as email_policy

import pytest
from sqlalchemy import select

from carepost.consent import authorizations
from carepost.core.database import org_session
from carepost.delivery import pipeline
from carepost.delivery.models import Message

TEXT = "Our flu clinic is open on Saturdays this month."


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client, monkeypatch):
    from carepost.core.config import reset_settings

    monkeypatch.setenv("CAREPOST_BASE_URL", "https://localhost:8000")  # RFC 8058 links are https
    reset_settings()
    key = sender.key("messages:send", "messages:read", "phi:read_unmasked", "consent:manage")
    return delivery_env, sender, key, client


def _contact(org_id, address, *, sign=True):
    from carepost.patients import service as patients

    with org_session(org_id) as s:
        c = patients.save_contact(s, org_id, {"given_name": "Pat", "email": address}).contact
        auth_id = None
        if sign:
            auth_id = authorizations.record_authorization(s, org_id, contact_id=c.id, purpose="marketing", method="api",
                                                          signature_name="Pat Doe", send_copy=False).id
        s.commit()
        return c.id, auth_id


def _send(client, key, to, **over):
    body = {"from": "Bar Clinic <care@bar.example>", "to": to, "subject": "Flu clinic", "text": TEXT,
            "purpose": "marketing", **over}
    r = client.post("/api/v1/messages", json=body, headers=key)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _recipients(client, key, message_id):
    r = client.get(f"/api/v1/messages/{message_id}", headers=key)
    assert r.status_code == 200, r.text
    return {x["address"]: x for x in r.json()["recipients"]}


def test_revocation_between_acceptance_and_delivery_excludes_at_claim_time(env):
    peers, sender, key, client = env
    _, auth_id = _contact(sender.org_id, "pat@valid.test")
    _contact(sender.org_id, "sam@valid.test")
    message_id = _send(client, key, ["pat@valid.test", "sam@valid.test", "stranger@valid.test"])
    # accepted (202); then the patient's authorization is revoked before a worker claims it
    r = client.post(f"/api/v1/authorizations/{auth_id}/revoke", headers=key)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    pipeline.deliver([message_id])
    got = _recipients(client, key, message_id)
    assert got["pat@valid.test"]["status"] == "excluded" and got["pat@valid.test"]["reason"] == "authorization_revoked"
    assert got["stranger@valid.test"]["status"] == "excluded" and got["stranger@valid.test"]["reason"] == "no_authorization"
    assert got["sam@valid.test"]["status"] == "delivered"
    assert [r for m in peers.mx["valid"].recorder.messages for r in m.rcpt_tos] == ["sam@valid.test"]


def test_ineligible_recipients_are_excluded_at_acceptance(env):
    """Issue 5 item 9: accepted (202), and the ineligible recipient reads ``excluded`` with the
    reason at once — before any worker runs; the eligible one stays queued."""
    peers, sender, key, client = env
    _contact(sender.org_id, "pat@valid.test")
    _contact(sender.org_id, "sam@valid.test", sign=False)
    message_id = _send(client, key, ["pat@valid.test", "sam@valid.test", "stranger@valid.test"])
    got = _recipients(client, key, message_id)
    assert got["sam@valid.test"]["status"] == "excluded" and got["sam@valid.test"]["reason"] == "no_authorization"
    assert got["stranger@valid.test"]["status"] == "excluded" and got["stranger@valid.test"]["reason"] == "no_authorization"
    assert got["pat@valid.test"]["status"] == "queued" and got["pat@valid.test"]["reason"] is None
    assert [e["type"] for e in got["sam@valid.test"]["events"]] == ["queued", "excluded"]
    pipeline.deliver([message_id])
    assert [r for m in peers.mx["valid"].recorder.messages for r in m.rcpt_tos] == ["pat@valid.test"]


def test_marketing_carries_signed_one_click_headers_that_work(env, session):
    peers, sender, key, client = env
    contact_id, _ = _contact(sender.org_id, "pat@valid.test")
    message_id = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([message_id])
    [received] = peers.mx["valid"].recorder.messages
    msg = email.message_from_bytes(received.data, policy=email_policy.default)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url, mailto = (u.strip().strip("<>") for u in str(msg["List-Unsubscribe"]).split(","))
    assert mailto.startswith("mailto:u+") and "@bounces.bar.example" in mailto  # the return path handles it
    assert url.startswith("https://localhost:8000/t/u/") and "pat" not in url
    signed = " ".join(str(h) for h in msg.get_all("DKIM-Signature")).lower().replace(" ", "")
    assert "list-unsubscribe" in signed and "list-unsubscribe-post" in signed
    # and a visible link in the body (CAN-SPAM), the same opaque URL
    body_text = msg.get_body(preferencelist=("plain",)).get_content()
    assert f"unsubscribe: {url}" in body_text and body_text.startswith(TEXT)
    # the receiver's one-click POST, with no cookies
    client.cookies.clear()
    r = client.post(url.split("localhost:8000", 1)[1], content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 200
    # the next message to them is excluded at once
    second = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([second])
    assert _recipients(client, key, second)["pat@valid.test"]["reason"] == "unsubscribed_all"
    # transactional mail has no List-Unsubscribe and still goes
    third = _send(client, key, ["pat@valid.test"], purpose="treatment", subject="Your appointment", text="See you Monday.")
    pipeline.deliver([third])
    assert _recipients(client, key, third)["pat@valid.test"]["status"] == "delivered"
    last = email.message_from_bytes(peers.mx["valid"].recorder.messages[-1].data, policy=email_policy.default)
    assert "unsubscribe" not in last.get_body(preferencelist=("plain",)).get_content().lower()
    assert last["List-Unsubscribe"] is None


def test_the_copy_of_a_signed_authorization_goes_through_the_pipeline(env, session):
    peers, sender, key, client = env
    contact_id, _ = _contact(sender.org_id, "pat@valid.test", sign=False)
    r = client.post("/api/v1/authorizations", headers=key, json={
        "contact_id": contact_id, "purpose": "marketing", "signature": {"name": "Pat Doe"}})
    assert r.status_code == 201, r.text
    assert r.json()["copy_delivered"] == "email"
    session.rollback()
    message = session.scalars(select(Message).where(Message.org_id == sender.org_id)).one()
    assert message.tags == ["consent:authorization_copy"] and message.purpose == "transactional"
    pipeline.deliver([message.id])
    [received] = peers.mx["valid"].recorder.messages
    msg = email.message_from_bytes(received.data, policy=email_policy.default)
    assert msg["Subject"] == "Your copy of the authorization you signed"
    text = msg.get_body(("plain",)).get_content()
    assert "Your right to revoke" in text and "/t/authorizations/" in text


def test_quiet_hours_defer_marketing_and_never_exclude(env):
    """Issue 5 item 6: inside the recipient's quiet hours a marketing message is deferred to the
    next allowed time; once that time comes it is delivered. Treatment mail is not held."""
    from datetime import datetime, timedelta, timezone

    from carepost.consent.service import set_consent_settings
    from carepost.core import clock

    peers, sender, key, client = env
    _contact(sender.org_id, "pat@valid.test")
    # 02:00 UTC now; quiet from 00:00 to 06:00 in UTC (the organization's default time zone)
    now = clock.now()
    clock.advance(datetime(now.year + 1, 1, 5, 2, 0, tzinfo=timezone.utc) - now)
    with org_session(sender.org_id) as s:
        set_consent_settings(s, sender.org_id, {"quiet_hours_start": "00:00", "quiet_hours_end": "06:00",
                                                 "default_time_zone": "UTC"})
        s.commit()
    marketing = _send(client, key, ["pat@valid.test"])
    treatment = _send(client, key, ["pat@valid.test"], purpose="treatment", subject="Your appointment", text="Monday.")
    pipeline.deliver([marketing, treatment])
    got = _recipients(client, key, marketing)["pat@valid.test"]
    assert got["status"] == "deferred" and got["reason"] == "quiet_hours"
    assert _recipients(client, key, treatment)["pat@valid.test"]["status"] == "delivered"
    clock.advance(timedelta(hours=4, minutes=1))
    with org_session(sender.org_id) as s:
        due = pipeline.due_message_ids(s)
        s.commit()
    assert marketing in due
    pipeline.deliver([marketing])
    assert _recipients(client, key, marketing)["pat@valid.test"]["status"] == "delivered"


def test_deceased_patients_are_excluded_from_every_send(env):
    """Issue 10 item 2: a patient imported as deceased is excluded at acceptance, for a
    transactional message as for marketing; one marked deceased after acceptance is excluded
    when the worker claims the message. The reason is ``deceased``; the living still get mail."""
    peers, sender, key, client = env
    writer = sender.key("phi:write", "phi:read_unmasked")
    dead_id, _ = _contact(sender.org_id, "gone@valid.test")
    later_id, _ = _contact(sender.org_id, "later@valid.test")
    _contact(sender.org_id, "pat@valid.test")
    r = client.patch(f"/api/v1/contacts/{dead_id}", json={"deceased": True}, headers=writer)
    assert r.status_code == 200 and r.json()["deceased"] is True and r.json()["care_stage"] == "deceased"
    for purpose in ("transactional", "marketing"):
        message_id = _send(client, key, ["gone@valid.test", "pat@valid.test"], purpose=purpose)
        got = _recipients(client, key, message_id)
        assert got["gone@valid.test"]["status"] == "excluded" and got["gone@valid.test"]["reason"] == "deceased", purpose
    message_id = _send(client, key, ["later@valid.test", "pat@valid.test"], purpose="transactional")
    assert _recipients(client, key, message_id)["later@valid.test"]["status"] == "queued"
    r = client.patch(f"/api/v1/contacts/{later_id}", json={"deceased": True}, headers=writer)
    assert r.status_code == 200
    pipeline.deliver([message_id])
    got = _recipients(client, key, message_id)
    assert got["later@valid.test"]["status"] == "excluded" and got["later@valid.test"]["reason"] == "deceased"
    assert got["pat@valid.test"]["status"] == "delivered"
    rcpts = [r for m in peers.mx["valid"].recorder.messages for r in m.rcpt_tos]
    assert "gone@valid.test" not in rcpts and "later@valid.test" not in rcpts and "pat@valid.test" in rcpts
    report = client.get("/api/v1/consent/reports", headers=key)
    assert report.status_code == 200 and report.json()["excluded_contacts"] == {"deceased": 2}


def test_frequency_cap_holds_for_two_messages_accepted_and_delivered_together(env):
    """Two marketing messages to one patient in one batch, cap one a day: the database's count
    leaves out the messages being checked (a message never counts against itself), so both
    would pass it; the cap's places (consent.eligibility.hold_cap_places: Redis when configured,
    else this process) admit the first and exclude the second with ``frequency_cap``. Delivered
    together in one run, one arrives."""
    from carepost.consent.service import set_consent_settings
    from carepost.delivery.models import MessageRecipient

    peers, sender, key, client = env
    _contact(sender.org_id, "capped@valid.test")
    with org_session(sender.org_id) as s:
        set_consent_settings(s, sender.org_id, {"frequency_cap_daily": 1})
        s.commit()
    body = {"from": "Bar Clinic <care@bar.example>", "to": ["capped@valid.test"], "subject": "Flu clinic",
            "text": TEXT, "purpose": "marketing"}
    r = client.post("/api/v1/messages/batch", json={"messages": [body, {**body, "subject": "Flu clinic, again"}]},
                    headers=key)
    assert r.status_code == 202, r.text
    ids = r.json()["ids"]
    with org_session(sender.org_id) as s:
        rows = {r.message_id: (r.status, r.reason) for r in s.scalars(
            select(MessageRecipient).where(MessageRecipient.message_id.in_(ids)))}
    assert sorted(rows.values(), key=str) == [("excluded", "frequency_cap"), ("queued", None)], rows
    pipeline.deliver(ids)  # one run for both: the excluded one stays excluded
    received = [rcpt for m in peers.mx["valid"].recorder.messages for rcpt in m.rcpt_tos]
    assert received == ["capped@valid.test"]
    with org_session(sender.org_id) as s:
        statuses = sorted(r.status for r in s.scalars(select(MessageRecipient).where(MessageRecipient.message_id.in_(ids))))
    assert statuses == ["delivered", "excluded"]
