"""RFC 8058 one-click unsubscribe and the patient link pages: POST with no cookies unsubscribes at
once and answers 200 without a redirect; GET never unsubscribes; re-use answers 200; forged
tokens get an error that reflects nothing; tokens survive master and data key rotation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.consent import authorizations, eligibility, service, tokens
from carepost.consent.models import Subscription, Suppression
from carepost.core import clock
from carepost.core.database import org_session


def _setup(org, *, topic=True):
    """A contact with a marketing authorization, a topic, and a delivered message recipient."""
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients import service as patients

    with org_session(org.id) as s:
        c = patients.save_contact(s, org.id, {"given_name": "Uma", "email": "uma@example.test"}).contact
        t = service.create_topic(s, org.id, key="screenings", name="Screening reminders") if topic else None
        authorizations.record_authorization(s, org.id, contact_id=c.id, purpose="marketing", method="api",
                                            signature_name="Uma Example")
        m = Message(org_id=org.id, from_address="care@bar.example", subject_enc=b"x", security="tls_required",
                    purpose="marketing", tags=[f"topic:{t.key}"] if t else [])
        s.add(m)
        s.flush()
        r = MessageRecipient(org_id=org.id, message_id=m.id, address_enc=b"x", domain_index="d", contact_id=c.id,
                             address_index=service.address_index(s, org.id, "uma@example.test"), status="delivered")
        s.add(r)
        s.flush()
        headers = service.unsubscribe_headers(s, org.id, r.id, t.id if t else None)
        s.commit()
        return c.id, (t.id if t else None), r.id, headers


def _path(headers) -> str:
    url = headers["List-Unsubscribe"].strip("<>")
    assert url.startswith("http://localhost:8000/t/u/")
    return url.removeprefix("http://localhost:8000")


def _eligible(org, contact_id, topic_id=None):
    with org_session(org.id) as s:
        return eligibility.check_eligibility(s, [contact_id], "marketing", topic_id, "email", org_id=org.id)[contact_id]


def test_headers_are_rfc8058(client, org):
    _, _, _, headers = _setup(org)
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert headers["List-Unsubscribe"].startswith("<https://") or headers["List-Unsubscribe"].startswith("<http://localhost")
    token = _path(headers).rsplit("/", 1)[1]
    assert "uma" not in token.lower() and "@" not in token  # ids only, no PHI


def test_one_click_post_unsubscribes_from_the_topic_at_once(client, org, session):
    contact_id, topic_id, rid, headers = _setup(org)
    assert _eligible(org, contact_id, topic_id) == "eligible"
    client.cookies.clear()
    r = client.post(_path(headers), content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 200 and "location" not in r.headers
    assert "set-cookie" not in r.headers
    assert _eligible(org, contact_id, topic_id) == "unsubscribed_topic"
    assert _eligible(org, contact_id) == "eligible"  # only that topic
    # re-use answers 200 and changes nothing
    again = client.post(_path(headers), data={"List-Unsubscribe": "One-Click"}, follow_redirects=False)
    assert again.status_code == 200
    session.rollback()
    assert session.scalar(select(Subscription.status).where(Subscription.contact_id == contact_id)) == "unsubscribed"
    ev = session.scalars(select(AuditEvent).where(AuditEvent.action == "consent.unsubscribe")).all()
    assert ev and ev[0].actor_type == "patient" and ev[0].details["method"] == "one_click"
    assert "uma@" not in str(ev[0].details)


def test_one_click_multipart_body_without_topic_unsubscribes_from_all_marketing(client, org):
    contact_id, _, _, headers = _setup(org, topic=False)
    r = client.post(_path(headers), files={"List-Unsubscribe": (None, "One-Click")}, follow_redirects=False)
    assert r.status_code == 200
    assert _eligible(org, contact_id) == "unsubscribed_all"
    # transactional mail still goes
    with org_session(org.id) as s:
        assert eligibility.check_eligibility(s, [contact_id], "treatment", None, "email", org_id=org.id) == {contact_id: "eligible"}


def test_get_never_unsubscribes_but_offers_both_choices(client, org, session):
    contact_id, topic_id, _, headers = _setup(org)
    for _ in range(3):  # link scanners
        r = client.get(_path(headers))
        assert r.status_code == 200
    assert 'value="topic"' in r.text and 'value="all"' in r.text and "Screening reminders" in r.text
    assert _eligible(org, contact_id, topic_id) == "eligible"
    session.rollback()
    assert session.scalar(select(Suppression.id)) is None
    # the page's "all marketing" button
    r = client.post(_path(headers), data={"choice": "all"})
    assert r.status_code == 200 and 'data-testid="unsubscribed"' in r.text
    assert _eligible(org, contact_id) == "unsubscribed_all"


def test_forged_and_altered_tokens_are_refused_without_reflection(client, org):
    _, _, _, headers = _setup(org)
    path = _path(headers)
    token = path.rsplit("/", 1)[1]
    altered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    probe = "u1.PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg.AAAAAAAAAAAAAAAAAAAAAA"
    for bad in (altered, probe, "<script>alert(1)</script>", "x" * 300, token.replace("u1.", "p1.", 1)):
        for prefix in ("/t/u/", "/t/preferences/", "/t/confirm/", "/t/revoke/", "/t/authorizations/"):
            for method in ("get", "post") if prefix != "/t/authorizations/" else ("get",):
                r = getattr(client, method)(f"{prefix}{bad}", headers={"Accept": "text/html"})
                assert r.status_code in (400, 404), (prefix, bad, r.status_code)
                assert bad not in r.text and "<script>alert" not in r.text


def test_token_of_another_kind_or_organization_fails(org, session):
    from carepost.accounts.service import create_organization

    other = create_organization(session, "Other Clinic")
    session.commit()
    with org_session(org.id) as s:
        token = service.unsubscribe_token(s, org.id, "a" * 32)
        s.commit()
    with org_session(org.id) as s:
        with pytest.raises(tokens.InvalidToken):
            tokens.verify(s, token, "p")
        # the same payload MACed by another organization's key does not verify
        payload = token.split(".")[1]
        forged = "u1." + payload + "." + tokens._mac(s, other.id, "u", payload)
        with pytest.raises(tokens.InvalidToken):
            tokens.verify(s, forged, "u")
        assert tokens.verify(s, token, "u").ref_id == "a" * 32


def test_tokens_never_expire_and_survive_key_rotation(client, org, storage, session):
    from carepost.core.config import get_settings
    from carepost.core.crypto import get_keyring, rotate_master_key
    from carepost.core.database import session_factory, system_session

    contact_id, topic_id, _, headers = _setup(org)
    clock.advance(timedelta(days=3650))
    rotate_master_key(get_settings(), session_factory())
    with system_session() as s:
        get_keyring().rotate_data_keys(s)
        s.commit()
    r = client.post(_path(headers), data={"List-Unsubscribe": "One-Click"}, follow_redirects=False)
    assert r.status_code == 200
    assert _eligible(org, contact_id, topic_id) == "unsubscribed_topic"


def test_unsubscribe_holds_for_the_address_after_the_patient_is_deleted(client, org):
    from carepost.patients import service as patients

    contact_id, _, _, headers = _setup(org, topic=False)
    client.post(_path(headers), data={"List-Unsubscribe": "One-Click"})
    with org_session(org.id) as s:
        patients.delete_contact(s, org.id, contact_id)
        s.commit()
        new = patients.save_contact(s, org.id, {"given_name": "Uma", "email": "uma@example.test"}).contact
        authorizations.record_authorization(s, org.id, contact_id=new.id, purpose="marketing", method="api",
                                            signature_name="Uma Example")
        s.commit()
        assert eligibility.check_eligibility(s, [new.id], "marketing", None, "email", org_id=org.id) == {
            new.id: "unsubscribed_all"}
    # the old link still answers 200 (the recipient row stays; the contact is gone)
    assert client.post(_path(headers), data={"List-Unsubscribe": "One-Click"}).status_code == 200


def test_preference_center(client, org, session):
    contact_id, topic_id, rid, headers = _setup(org)
    with org_session(org.id) as s:
        service.create_topic(s, org.id, key="news", name="Newsletter")
        url = service.preferences_url(s, org.id, rid)
        s.commit()
    path = url.removeprefix("http://localhost:8000")
    page = client.get(path)
    assert page.status_code == 200 and "Screening reminders" in page.text and "Newsletter" in page.text
    assert 'data-testid="revoke-link"' in page.text  # the patient's authorization can be revoked from here
    with org_session(org.id) as s:
        news_id = service.get_topic(s, org.id, "news").id
    # keep the newsletter only
    r = client.post(path, data={f"topic_{news_id}": "on", "all_marketing": "on", "frequency": "weekly"})
    assert r.status_code == 200 and 'data-testid="preferences-saved"' in r.text
    assert _eligible(org, contact_id, topic_id) == "unsubscribed_topic"
    assert _eligible(org, contact_id, news_id) == "eligible"
    # resubscribe to screenings (opt-out topic: no confirmation needed)
    client.post(path, data={f"topic_{news_id}": "on", f"topic_{topic_id}": "on", "all_marketing": "on"})
    assert _eligible(org, contact_id, topic_id) == "eligible"
    # all marketing off
    client.post(path, data={"all_marketing": "off"})
    assert _eligible(org, contact_id, news_id) == "unsubscribed_all"
    session.rollback()
    assert session.scalar(select(Subscription.frequency).where(Subscription.topic_key == "*")) == "weekly"
    assert client.get(path[:-4] + "AAAA").status_code in (400, 404)


def test_revocation_link_is_immediate(client, org, session):
    contact_id, _, _, _ = _setup(org)
    with org_session(org.id) as s:
        row = authorizations.authorizations_of(s, org.id, contact_id)[0]
        url = authorizations.revocation_url(s, row)
        s.commit()
    path = url.removeprefix("http://localhost:8000")
    page = client.get(path)
    assert page.status_code == 200 and "Authorization to receive marketing" in page.text
    assert _eligible(org, contact_id) == "eligible"  # GET changes nothing
    r = client.post(path, data={})
    assert r.status_code == 422 and "Tick the box" in r.text
    r = client.post(path, data={"confirm": "yes"})
    assert r.status_code == 200 and 'data-testid="revoked"' in r.text
    assert _eligible(org, contact_id) == "authorization_revoked"
    assert client.post(path, data={"confirm": "yes"}).status_code == 200  # already revoked
    session.rollback()
    ev = session.scalars(select(AuditEvent).where(AuditEvent.action == "authorization.revoke")).all()
    assert len(ev) == 2 and ev[0].actor_type == "patient" and ev[0].details["method"] == "form"


def test_copy_page_and_expiring_copy_link(client, org):
    contact_id, _, _, _ = _setup(org)
    with org_session(org.id) as s:
        row = authorizations.authorizations_of(s, org.id, contact_id)[0]
        assert row.copy_delivered == "link"  # no mailer registered in this test
        url = authorizations.copy_url(s, row)
        s.commit()
    path = url.removeprefix("http://localhost:8000")
    page = client.get(path)
    assert page.status_code == 200 and "Uma Example" in page.text and "Your right to revoke" in page.text
    clock.advance(timedelta(days=authorizations.COPY_LINK_DAYS + 1))
    r = client.get(path)
    assert r.status_code == 410 and "expired" in r.text


def test_double_opt_in_confirmation(client, org, session):
    from carepost.patients import service as patients

    sent = []

    def mailer(s, email):
        sent.append(email)
        return "f" * 32

    service.register_mailer(mailer)
    try:
        with org_session(org.id) as s:
            c = patients.save_contact(s, org.id, {"given_name": "Ola", "email": "ola@example.test"}).contact
            t = service.create_topic(s, org.id, key="offers", name="Offers", opt_in_required=True, double_opt_in=True)
            authorizations.record_authorization(s, org.id, contact_id=c.id, purpose="marketing", method="api",
                                                signature_name="Ola Example")
            sub = service.resubscribe_contact(s, org.id, c.id, t.id, source="form")
            s.commit()
            assert sub.status == "pending" and sub.confirmation_sent_at is not None
    finally:
        service.register_mailer(None)
    kinds = [e.kind for e in sent]
    assert kinds == ["authorization_copy", "subscription_confirmation"]
    assert "@" not in sent[1].subject
    assert _eligible(org, c.id, t.id) == "unsubscribed_topic"  # not confirmed yet
    link = next(line for line in sent[1].text.splitlines() if "/t/confirm/" in line).strip()
    path = link.removeprefix("http://localhost:8000")
    assert client.get(path).status_code == 200
    assert _eligible(org, c.id, t.id) == "unsubscribed_topic"  # GET does not confirm
    r = client.post(path)
    assert r.status_code == 200 and 'data-testid="confirmed"' in r.text
    assert _eligible(org, c.id, t.id) == "eligible"
    # an expired confirmation link
    with org_session(org.id) as s:
        token = service.confirmation_token(s, org.id, sub.id)
        s.commit()
    clock.advance(timedelta(hours=49))
    r = client.post(f"/t/confirm/{token}")
    assert r.status_code == 410 and token not in r.text


def test_visible_footer_links(client, org):
    _, topic_id, rid, _ = _setup(org)
    with org_session(org.id) as s:
        footer = service.unsubscribe_footer(s, org.id, rid, topic_id, language="es")
        s.commit()
    assert "Cancelar la suscripción" in footer["text"] and footer["unsubscribe_url"] in footer["text"]
    assert f'href="{footer["preferences_url"]}"' in footer["html"] and "Bar Clinic" in footer["html"]
    path = footer["unsubscribe_url"].removeprefix("http://localhost:8000")
    assert client.get(path).status_code == 200
