"""Commercial messages never go out without an opt-out (issue 10 item 1), through the real
pipeline and real SMTP peers: on an http base URL (the default ``make run``) the message carries
List-Unsubscribe with the http link and a ``mailto:`` of the return path (no one-click), the
visible footer link and the organization's postal address; a mail to that mailto address, over
SMTP to ``carepost inbound``, unsubscribes; without a postal address marketing is excluded
(``no_postal_address``); a portal fallback's copy has the footer and its notification
List-Unsubscribe; a commercial copy with no link is excluded (``no_opt_out``), never sent."""

from __future__ import annotations

import email
import smtplib
from email import policy as email_policy

import pytest

from carepost.consent import authorizations, eligibility
from carepost.consent.service import set_consent_settings
from carepost.core.database import org_session
from carepost.delivery import pipeline
from tests.fixtures.delivery import free_port

TEXT = "Our flu clinic is open on Saturdays this month."
POSTAL = "Bar Clinic, 1 Main Street, Springfield, IL 62701"


@pytest.fixture
def env(delivery_env, sender, delivery_queue, client):
    # the default base URL, http://localhost:8000 (make run)
    key = sender.key("messages:send", "messages:read", "phi:read_unmasked", "consent:manage")
    return delivery_env, sender, key, client


def _contact(org_id, address):
    from carepost.patients import service as patients

    with org_session(org_id) as s:
        c = patients.save_contact(s, org_id, {"given_name": "Pat", "email": address}).contact
        authorizations.record_authorization(s, org_id, contact_id=c.id, purpose="marketing", method="api",
                                            signature_name="Pat Doe", send_copy=False)
        s.commit()
        return c.id


def _send(client, key, to, **over):
    body = {"from": "Bar Clinic <care@bar.example>", "to": to, "subject": "Flu clinic", "text": TEXT,
            "html": f"<p>{TEXT}</p>", "purpose": "marketing", **over}
    r = client.post("/api/v1/messages", json=body, headers=key)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _recipients(client, key, message_id):
    r = client.get(f"/api/v1/messages/{message_id}", headers=key)
    assert r.status_code == 200, r.text
    return {x["address"]: x for x in r.json()["recipients"]}


def _eligible(org_id, contact_id):
    with org_session(org_id) as s:
        return eligibility.check_eligibility(s, [contact_id], "marketing", None, "email", org_id=org_id)[contact_id]


def _uris(msg) -> list[str]:
    return [u.strip().strip("<>") for u in str(msg["List-Unsubscribe"]).split(",")]


def test_http_base_url_gets_a_link_a_mailto_and_the_postal_address(env):
    peers, sender, key, client = env
    contact_id = _contact(sender.org_id, "pat@valid.test")
    message_id = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([message_id])
    [received] = peers.mx["valid"].recorder.messages
    msg = email.message_from_bytes(received.data, policy=email_policy.default)
    http, mailto = _uris(msg)
    assert http.startswith("http://localhost:8000/t/u/") and "pat" not in http
    assert mailto.startswith("mailto:u+") and "@bounces.bar.example" in mailto and "pat" not in mailto
    assert msg["List-Unsubscribe-Post"] is None  # one-click needs https
    signed = " ".join(str(h) for h in msg.get_all("DKIM-Signature")).lower().replace(" ", "")
    assert "list-unsubscribe" in signed
    text = msg.get_body(preferencelist=("plain",)).get_content()
    assert f"unsubscribe: {http}" in text and POSTAL in text and text.startswith(TEXT)
    html = msg.get_body(preferencelist=("html",)).get_content()
    assert 'class="carepost-unsubscribe"' in html and POSTAL in html
    # the visible http link works (the page's "all marketing" choice)
    r = client.post(http.removeprefix("http://localhost:8000"), data={"choice": "all"})
    assert r.status_code == 200 and 'data-testid="unsubscribed"' in r.text
    assert _eligible(sender.org_id, contact_id) == "unsubscribed_all"


@pytest.fixture
def inbound(db, monkeypatch):
    from carepost.core.config import get_settings, reset_settings
    from carepost.core.queue import huey
    from carepost.delivery.inbound import start_inbound

    monkeypatch.setenv("CAREPOST_SMTP_HELO_NAME", "mx.carepost.example")
    reset_settings()
    port = free_port()
    controller = start_inbound(get_settings(), host="127.0.0.1", port=port)
    yield port, huey
    controller.stop()
    huey.immediate = False


def test_a_mail_to_the_mailto_address_unsubscribes(env, inbound, session):
    from sqlalchemy import select

    from carepost.delivery.models import InboundReport

    port, huey = inbound
    peers, sender, key, client = env
    contact_id = _contact(sender.org_id, "pat@valid.test")
    message_id = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([message_id])
    [received] = peers.mx["valid"].recorder.messages
    mailto = _uris(email.message_from_bytes(received.data, policy=email_policy.default))[1]
    address = mailto.removeprefix("mailto:").split("?", 1)[0]
    assert _eligible(sender.org_id, contact_id) == "eligible"
    huey.immediate = True
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        # a forged mailbox is refused at RCPT
        local, domain = address.split("@")
        forged = local[:-1] + ("0" if local[-1] != "0" else "1") + "@" + domain
        smtp.ehlo("mta.gmail.example")
        smtp.mail("pat@valid.test")
        assert smtp.rcpt(forged)[0] == 550
        smtp.rset()
        assert smtp.sendmail("pat@valid.test", [address], b"Subject: unsubscribe\r\n\r\nunsubscribe\r\n") == {}
    huey.immediate = False
    assert _eligible(sender.org_id, contact_id) == "unsubscribed_all"
    session.rollback()
    [report] = session.scalars(select(InboundReport)).all()
    assert report.status == "unsubscribed" and report.kind == "unsubscribe"


def test_marketing_without_a_postal_address_is_excluded(env):
    peers, sender, key, client = env
    _contact(sender.org_id, "pat@valid.test")
    with org_session(sender.org_id) as s:
        set_consent_settings(s, sender.org_id, {"postal_address": None})
        s.commit()
    message_id = _send(client, key, ["pat@valid.test"])
    pipeline.deliver([message_id])
    got = _recipients(client, key, message_id)["pat@valid.test"]
    assert got["status"] == "excluded" and got["reason"] == "no_postal_address"
    assert peers.mx["valid"].recorder.messages == []
    # treatment mail is not commercial: it still goes
    treatment = _send(client, key, ["pat@valid.test"], purpose="treatment")
    pipeline.deliver([treatment])
    assert _recipients(client, key, treatment)["pat@valid.test"]["status"] == "delivered"


def test_postal_address_setting_is_checked_and_named(env):
    peers, sender, key, client = env
    for bad in ("x", "a" * 301, 5):
        r = client.patch("/api/v1/consent/settings", json={"postal_address": bad}, headers=key)
        assert r.status_code == 422, r.text
        assert "postal_address" in r.text
    r = client.patch("/api/v1/consent/settings", json={"postal_address": " 2 Oak Ave\n Springfield, IL 62701 "},
                   headers=key)
    assert r.status_code == 200 and r.json()["postal_address"] == "2 Oak Ave\nSpringfield, IL 62701"


def test_portal_fallback_copy_has_the_footer_and_the_notification_list_unsubscribe(env, session):
    from sqlalchemy import select

    from carepost.core.crypto import get_keyring
    from carepost.portal.models import PortalMessage

    peers, sender, key, client = env
    _contact(sender.org_id, "pat@plain.test")
    message_id = _send(client, key, ["pat@plain.test"], security="tls_required")
    pipeline.deliver([message_id])
    got = _recipients(client, key, message_id)["pat@plain.test"]
    assert got["method"] == "portal" and got["status"] == "sent"
    [notification] = [email.message_from_bytes(m.data, policy=email_policy.default)
                      for m in peers.mx["plain"].recorder.messages]
    http, mailto = _uris(notification)
    assert http.startswith("http://localhost:8000/t/u/") and mailto.startswith("mailto:u+")
    assert POSTAL in notification.get_body(("plain",)).get_content()
    session.rollback()
    [pm] = session.scalars(select(PortalMessage)).all()
    text = get_keyring().decrypt_text(session, pm.org_id, PortalMessage.__tablename__, "text", pm.id, pm.text_enc)
    assert text.startswith(TEXT) and f"unsubscribe: {http}" in text and POSTAL in text


def test_a_commercial_copy_without_a_link_is_excluded(env, monkeypatch):
    peers, sender, key, client = env
    _contact(sender.org_id, "pat@valid.test")
    message_id = _send(client, key, ["pat@valid.test"])
    # the opt-out step forms no link (a consent defect): the copy is excluded, never sent bare
    original = pipeline.list_unsubscribe.impl
    pipeline.list_unsubscribe.fill(lambda session, candidates: {})
    try:
        pipeline.deliver([message_id])
    finally:
        pipeline.list_unsubscribe.fill(original)
    got = _recipients(client, key, message_id)["pat@valid.test"]
    assert got["status"] == "excluded" and got["reason"] == "no_opt_out"
    assert peers.mx["valid"].recorder.messages == []
