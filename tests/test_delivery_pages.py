"""Delivery UI pages through HTTP: sending domains (records, live check against the local DNS
server), the delivery log (masked vs unmasked, evidence), the security preview, recipient keys
(refusals with the reason), the sender's portal view (replies audited, recall), permissions."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from carepost.audit.models import AuditEvent
from carepost.delivery.models import MessageEvent, MessageRecipient, RecipientKey, SendingDomain
from tests.fixtures.accounts import csrf_from, login_client
from tests.fixtures.portal import ADDRESS, PHI_SUBJECT, arrange, make_message


def txt(value: str) -> str:
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


@pytest.fixture
def owner_client(client, org, make_user):
    user = make_user(org, role="owner")
    csrf = login_client(client, user)
    client.csrf = csrf
    client.user = user
    return client


def _actions(session, action):
    session.rollback()
    return session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all()


def test_add_domain_shows_records_and_the_live_check_passes_and_fails_per_record(owner_client, session, delivery_env):
    c = owner_client
    page = c.get("/app/domains")
    assert page.status_code == 200 and "No sending domain yet" in page.text
    r = c.post("/app/domains", data={"domain": "bar.example", "csrf_token": c.csrf}, follow_redirects=False)
    assert r.status_code == 303
    detail = c.get(r.headers["location"])
    row = session.scalars(select(SendingDomain)).one()
    assert row.dkim_rsa_record in detail.text  # the DKIM TXT record in full
    assert f"_dmarc.bar.example" in detail.text and "bounces.bar.example" in detail.text
    assert detail.text.count("data-copy-target") >= 14 and "Not checked" in detail.text
    # Issue 9 item 2: the ownership record comes first, and nothing is sent until it is found.
    assert f"_carepost-challenge.bar.example" in detail.text and f"carepost-verify={row.ownership_token}" in detail.text
    assert 'data-testid="ownership-pending"' in detail.text and "Ownership not proven" in detail.text

    # Publish some records: DKIM and DMARC pass, SPF is wrong, the rest missing.
    from carepost.delivery import service

    records = {rec.purpose: rec for rec in service.records_to_check(row)}
    delivery_env.dns.add(records["dkim"].name, "TXT", txt(records["dkim"].value))
    delivery_env.dns.add(records["dmarc"].name, "TXT", txt(records["dmarc"].value))
    delivery_env.dns.add(records["spf"].name, "TXT", txt("v=spf1 mx -all"))
    r = c.post(f"/app/domains/{row.id}/check", data={"csrf_token": c.csrf}, follow_redirects=False)
    assert r.status_code == 303
    page = c.get(r.headers["location"]).text
    statuses = dict(re.findall(r'data-purpose="([^"]+)".*?data-testid="record-status">(\w+)', page, re.S))
    assert statuses["dkim"] == "Pass" and statuses["dmarc"] == "Pass"
    assert statuses["spf"] == "Fail" and statuses["return-path-mx"] == "Fail" and statuses["mta-sts"] == "Fail"
    assert statuses["ownership"] == "Fail" and "Ownership not proven" in page
    assert "does not contain a:carepost.bar.example" in page and "not check out yet" in page

    # Publish everything: the htmx check answers the fragment with every record passing.
    from carepost.delivery import dns as cpdns

    delivery_env.dns.clear()
    cpdns.reset()
    for rec in records.values():
        if rec.type == "TXT":
            delivery_env.dns.add(rec.name, "TXT", txt(rec.value))
        elif rec.type == "MX":
            delivery_env.dns.add(rec.name, "MX", rec.value + ".")
        else:
            delivery_env.dns.add(rec.name, "A", "127.0.0.1")
    r = c.post(f"/app/domains/{row.id}/check", headers={"HX-Request": "true", "X-CSRF-Token": c.csrf})
    assert r.status_code == 200 and "<html" not in r.text and "Every record passes" in r.text
    assert "Fail</span>" not in r.text and "Ownership proven" in r.text
    session.rollback()
    assert session.get(SendingDomain, row.id).dns_ok and session.get(SendingDomain, row.id).verified_at is not None
    assert [e.details["domain"] for e in _actions(session, "domain.verify")] == ["bar.example"]
    assert "All records pass" in c.get("/app/domains").text
    assert [e.details["ok"] for e in _actions(session, "domain.check")] == [False, True]


def test_bad_or_duplicate_domain_is_refused_with_the_reason(owner_client, session):
    c = owner_client
    r = c.post("/app/domains", data={"domain": "not a domain", "csrf_token": c.csrf})
    assert r.status_code == 422 and 'id="domain-error"' in r.text
    c.post("/app/domains", data={"domain": "bar.example", "csrf_token": c.csrf})
    r = c.post("/app/domains", data={"domain": "bar.example", "csrf_token": c.csrf})
    assert r.status_code == 409 and "already exists" in r.text
    assert len(session.scalars(select(SendingDomain)).all()) == 1


def _logged_message(session, org_id):
    from carepost.delivery.service import add_event

    msg, rcpt = make_message(session, org_id, "pat.quill@valid.test")
    rcpt.method, rcpt.status = "tls", "delivered"
    rcpt.evidence = {"mx_host": "mx.valid.test", "address": "127.0.0.1", "port": 2525, "tls_version": "TLSv1.3",
                     "cipher": "TLS_AES_256_GCM_SHA384", "cert_fingerprint": "ab" * 32, "cert_verified": True,
                     "reply_code": 250, "relay": False}
    add_event(session, rcpt, "delivered", method="tls", reply_code=250)
    _, second = make_message(session, org_id, "other.person@plain.test")
    second.method, second.status, second.reason = "none", "failed", "verified TLS unavailable"
    session.commit()
    return msg, rcpt


def test_delivery_log_masks_addresses_for_masked_roles(client, session, org, make_user):
    msg, rcpt = _logged_message(session, org.id)
    analyst = make_user(org, role="analyst")
    login_client(client, analyst)
    page = client.get("/app/deliveries")
    assert page.status_code == 200
    assert "p***@valid.test" in page.text and "pat.quill" not in page.text
    assert "delivered" in page.text and ">tls<" in page.text and "failed" in page.text
    detail = client.get(f"/app/deliveries/{msg.id}")
    assert "p***@valid.test" in detail.text and "pat.quill" not in detail.text and PHI_SUBJECT not in detail.text
    assert "mx.valid.test" in detail.text and "TLSv1.3" in detail.text and "ab" * 32 in detail.text
    [listed] = _actions(session, "message.list")
    assert listed.details["view"] == "masked" and msg.id in listed.details["message_ids"]
    [read] = _actions(session, "message.read")
    assert read.target_id == msg.id and read.details["view"] == "masked"
    # Filters
    assert "pat.quill" not in client.get("/app/deliveries?status=failed").text
    assert "p***@valid.test" not in client.get("/app/deliveries?status=failed").text
    assert client.get("/app/deliveries?status=bogus").status_code == 422


def test_delivery_log_unmasked_for_owners(owner_client, session, org):
    msg, _ = _logged_message(session, org.id)
    page = owner_client.get("/app/deliveries")
    assert "pat.quill@valid.test" in page.text
    detail = owner_client.get(f"/app/deliveries/{msg.id}")
    assert PHI_SUBJECT in detail.text and "verified" in detail.text
    assert owner_client.get(f"/app/deliveries/{'0' * 32}").status_code == 404


def test_delivery_log_pages_with_a_cursor(owner_client, session, org):
    from carepost.delivery import pages

    for _ in range(pages.PAGE_SIZE + 3):
        make_message(session, org.id)
    session.commit()
    first = owner_client.get("/app/deliveries")
    nxt = re.search(r'href="(/app/deliveries\?cursor=[^"]+)"', first.text)
    assert nxt and first.text.count('data-testid="log-recipient"') == pages.PAGE_SIZE
    second = owner_client.get(nxt.group(1).replace("&amp;", "&"))
    assert second.status_code == 200 and second.text.count('data-testid="log-recipient"') == 3
    assert owner_client.get("/app/deliveries?cursor=junk").status_code == 422


def test_security_preview_shows_method_and_reason(owner_client, session, delivery_env, gpg):
    from carepost.delivery import service

    cert = gpg.gen_key("Pat <pat@plain.test>")
    service.add_recipient_key(session, owner_client.user.org_id, "pat@plain.test", "pgp", cert)
    session.commit()
    page = owner_client.get("/app/security-preview")
    r = owner_client.post("/app/security-preview", data={
        "addresses": "someone@valid.test\nnobody@plain.test, pat@plain.test", "security": "", "contains_phi": "yes",
        "csrf_token": csrf_from(page.text)})
    assert r.status_code == 200, r.text
    rows = re.findall(r"<tr><td>([^<]+)</td><td><span class=\"badge method\">(\w+)</span></td><td>([^<]+)</td>", r.text)
    by = {a: (m, why) for a, m, why in rows}
    assert by["someone@valid.test"][0] == "tls"
    assert by["nobody@plain.test"][0] == "portal"
    assert by["pat@plain.test"][0] == "pgp"
    assert _actions(session, "security.preview")[0].details["count"] == 3
    # Lowering the organization's mode, or a bad address, is refused naming the reason.
    r = owner_client.post("/app/security-preview", data={"addresses": "a@valid.test", "security": "opportunistic",
                                                         "contains_phi": "yes", "csrf_token": owner_client.csrf})
    assert r.status_code == 422 and "never lowered" in r.text
    r = owner_client.post("/app/security-preview", data={"addresses": "not-an-address", "csrf_token": owner_client.csrf})
    assert r.status_code == 422 and 'data-testid="preview-error"' in r.text


def test_recipient_keys_upload_list_and_refusal_reasons(owner_client, session, gpg, smime_ca):
    c = owner_client
    cert = gpg.gen_key("Jordan <jordan@plain.test>")
    r = c.post("/app/recipient-keys", data={"address": "jordan@plain.test", "kind": "pgp", "key": cert, "csrf_token": c.csrf},
               follow_redirects=False)
    assert r.status_code == 303
    page = c.get(r.headers["location"])
    fp = session.scalars(select(RecipientKey.fingerprint)).one()
    assert "Key added" in page.text and fp in page.text and "jordan@plain.test" in page.text
    # A certificate for another address is refused with the reason, nothing stored.
    other = gpg.gen_key("Someone <someone@plain.test>")
    r = c.post("/app/recipient-keys", data={"address": "jordan2@plain.test", "kind": "pgp", "key": other, "csrf_token": c.csrf})
    assert r.status_code == 422 and 'data-testid="key-error"' in r.text
    assert re.search(r'data-testid="key-error">[^<]*address', r.text)
    # An S/MIME certificate uploaded as a file; a chain or garbage is refused.
    smime = smime_ca.issue("jordan@plain.test")
    r = c.post("/app/recipient-keys", data={"address": "jordan@plain.test", "kind": "smime", "csrf_token": c.csrf},
               files={"key_file": ("jordan.pem", smime.pem.encode(), "application/x-pem-file")}, follow_redirects=False)
    assert r.status_code == 303, r.text
    r = c.post("/app/recipient-keys", data={"address": "jordan@plain.test", "kind": "smime", "key": "garbage",
                                            "csrf_token": c.csrf})
    assert r.status_code == 422
    session.rollback()
    assert len(session.scalars(select(RecipientKey)).all()) == 2
    # Remove one.
    key_id = session.scalars(select(RecipientKey.id).where(RecipientKey.kind == "pgp")).one()
    assert c.post(f"/app/recipient-keys/{key_id}/delete", data={"csrf_token": c.csrf}, follow_redirects=False).status_code == 303
    session.rollback()
    assert len(session.scalars(select(RecipientKey)).all()) == 1
    assert [e.action for e in _actions(session, "recipient_key.create")] == ["recipient_key.create"] * 2


def test_recipient_keys_masked_and_read_only_for_analysts(client, session, org, make_user, gpg):
    from carepost.delivery import service

    service.add_recipient_key(session, org.id, "jordan@plain.test", "pgp", gpg.gen_key("J <jordan@plain.test>"))
    session.commit()
    login_client(client, make_user(org, role="analyst"))
    page = client.get("/app/recipient-keys")
    assert "j***@plain.test" in page.text and "jordan@plain.test" not in page.text and "Add a key" not in page.text
    csrf = csrf_from(page.text)
    r = client.post("/app/recipient-keys", data={"address": "x@plain.test", "kind": "pgp", "key": "x", "csrf_token": csrf})
    assert r.status_code == 403


def test_sender_reads_replies_and_recalls_in_the_ui(owner_client, session, org, delivery_env):
    from carepost.portal import service as portal_service
    from carepost.portal.models import PortalMessage

    a = arrange(session, org.id, sender_id=owner_client.user.id)
    pm = session.get(PortalMessage, a.portal_message_id)
    session.info.pop("scope", None)
    session.info["org_id"] = org.id
    portal_service.add_reply(session, pm, "Could we move my appointment, Jordan Vale", None)
    session.commit()
    session.info.pop("org_id", None)
    session.info["scope"] = "system"
    rcpt = session.get(MessageRecipient, a.recipient_id)
    rcpt.portal_message_id = a.portal_message_id
    session.commit()
    detail = owner_client.get(f"/app/deliveries/{a.message_id}")
    assert f'href="/app/portal/{a.portal_message_id}"' in detail.text
    assert "open · not opened yet · 1 reply" in " ".join(detail.text.split())
    page = owner_client.get(f"/app/portal/{a.portal_message_id}")
    assert "Could we move my appointment" in page.text and "Not opened yet" in page.text
    [read] = _actions(session, "portal.reply.read")
    assert read.details["via"] == "ui" and len(read.details["reply_ids"]) == 1
    r = owner_client.post(f"/app/portal/{a.portal_message_id}/recall", data={"csrf_token": owner_client.csrf},
                          follow_redirects=False)
    assert r.status_code == 303
    page = owner_client.get(r.headers["location"])
    assert "The message was recalled" in page.text and "recalled" in page.text
    session.rollback()
    assert session.get(MessageRecipient, a.recipient_id).status == "recalled"
    events = session.scalars(select(MessageEvent.type).where(MessageEvent.recipient_id == a.recipient_id)).all()
    assert "recalled" in events and "portal_reply" in events


def test_portal_notification_wording_in_the_ui(owner_client, session, org):
    from carepost.accounts.models import Organization

    page = owner_client.get("/app/portal-settings")
    assert "You have a secure message from {organization}" in page.text
    r = owner_client.post("/app/portal-settings", data={"subject": "Hello {patient}", "body": "", "csrf_token": owner_client.csrf})
    assert r.status_code == 422 and "Unknown placeholder" in r.text
    r = owner_client.post("/app/portal-settings", data={"subject": "{organization} secure mail", "body": "Open: {link}",
                                                        "csrf_token": owner_client.csrf}, follow_redirects=False)
    assert r.status_code == 303
    session.rollback()
    session.expire_all()  # the org row was loaded (and committed) by this session before
    assert session.get(Organization, org.id).settings["portal_notification_subject"] == "{organization} secure mail"


def test_delivery_pages_need_their_permissions(client, org, make_user):
    login_client(client, make_user(org, role="read_only"))
    for path in ("/app/domains", "/app/deliveries", "/app/security-preview", "/app/recipient-keys", "/app/portal-settings"):
        assert client.get(path).status_code == 403, path
    home = client.get("/app").text
    assert "/app/domains" not in home and "Delivery log" not in home


def test_message_page_shows_dane_and_mta_sts_evidence(owner_client, session, org):
    """Issue 9 item 10: DANE authentication, the MTA-STS policy id, a policy kept after a failed
    refresh and what testing mode would have refused are shown with the delivery evidence."""
    msg, rcpt = _logged_message(session, org.id)
    rcpt.evidence = {**rcpt.evidence, "dane": True, "mta_sts": "testing", "mta_sts_id": "2026a",
                     "mta_sts_source": "stored_after_failure", "mta_sts_report": "mx.valid.test is not listed in the policy"}
    session.commit()
    detail = owner_client.get(f"/app/deliveries/{msg.id}")
    assert "verified by DANE" in detail.text and "policy 2026a" in detail.text
    assert "kept from before (refresh failed)" in detail.text
    assert 'data-testid="mta-sts-report">would fail enforce: mx.valid.test is not listed' in detail.text
